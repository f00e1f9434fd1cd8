"""Calibration inputs for passes.measure.metrics and the auto plan: load them from a file, validate them, or make them.
What the graph's inputs are (specs, dimension roles, concrete shapes, vocabularies, cache sizes) is
passes.support.graph_inputs'.

Sources:
  FILE.npz   one array per graph input, by name (np.savez; see passes.support.input_files);
  FILE.json  polygraphy's `--save-inputs` format: a JSON list of feed dicts {name: array}. Feeds whose shapes
             agree except on the first (batch) axis are concatenated along it; otherwise the first feed is used
             and the source description says so.
  nothing    seeded random token ids in the vocabulary (integer token inputs) or standard normal values (float
             inputs); a warning says that real text is better.

Validation against the graph inputs (anything wrong is a UserError naming the input): every graph input present
and no others; element types castable (integer arrays for integer inputs, float arrays for float inputs, bool for
bool); same rank; equal sizes on every fixed dimension; no empty arrays; token ids inside [0, vocab), where vocab
is the row count of the embedding table the ids are gathered from, or else the last axis of an output named
`logits`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from passes.support.errors import fail
from passes.support.graph_inputs import (
    FLOAT_TYPES,
    INT_TYPES,
    InputSpec,
    cache_hints,
    concrete_shape,
    input_specs,
    is_cache,
    shape_text,
    vocab_sizes,
)
from passes.support.input_files import read_inputs_file
from passes.support.report import differences

DEFAULT_BATCH = 4
DEFAULT_SEQ = 128
DEFAULT_SEED = 0
RANDOM_WARNING = ("no --inputs given: using random token ids; dependencies measured on random tokens differ from "
                  "those on real text, pass --inputs FILE.npz with real text for a plan you can trust")
RANDOM_FLOAT_WARNING = ("no --inputs given: using random normal inputs; pass --inputs FILE.npz with representative "
                        "data for a plan you can trust")


@dataclass
class Calibration:
    """Feeds for every graph input, where they came from, and a warning to print (random inputs)."""
    feeds: dict[str, np.ndarray]
    source: str
    warning: str | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The `inputs` entry of reports."""
        rec = {"source": self.source,
               "shapes": {k: list(v.shape) for k, v in self.feeds.items()},
               "dtypes": {k: str(v.dtype) for k, v in self.feeds.items()},
               "tokens": token_count(self.feeds)}
        if self.warning:
            rec["warning"] = self.warning
        if self.notes:
            rec["notes"] = list(self.notes)
        return rec


# ---------------------------------------------------------------- loading

def load_inputs(path: str | os.PathLike, session_inputs, vocab: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Feeds {name: array} from an inputs file (see load_calibration), cast and checked against `session_inputs`
    (an onnx ModelProto, `session.get_inputs()` or InputSpecs); `vocab` maps token inputs to their vocabulary size
    (default: found in the model when a ModelProto is given)."""
    return load_calibration(path, session_inputs, vocab).feeds


def load_calibration(path: str | os.PathLike, session_inputs, vocab: Mapping[str, int] | None = None,
                     hints: Mapping[str, int] | None = None) -> Calibration:
    """Inputs from FILE.npz (one array per graph input), a polygraphy --save-inputs JSON, or a plain JSON of token
    ids (a list of equal-length lists, or {"input_ids": [[...], ...]}). A file that holds only the token ids of a
    model that also takes an attention mask, positions or KV caches gets those made for the ids (see
    `token_feeds`). With a ModelProto as `session_inputs` and no `vocab`, the vocabulary comes from the model."""
    if vocab is None and isinstance(session_inputs, onnx.ModelProto):
        vocab = vocab_sizes(session_inputs)
    specs = input_specs(session_inputs)
    raw, source, notes = read_inputs_file(Path(path), next((s.name for s in specs if s.name in (vocab or {})), None))
    missing = [s.name for s in specs if s.name not in raw]
    tokens = [name for name in raw if name in (vocab or {})]
    if missing and tokens and not [n for n in raw if n not in {s.name for s in specs}]:
        made, made_notes = token_feeds(specs, vocab or {}, raw[tokens[0]], hints or {}, only=missing)
        raw = {**raw, **made}
        notes += made_notes
    feeds = check_inputs(raw, session_inputs, vocab, where=str(path))
    return Calibration(feeds, source, None, notes)


# ---------------------------------------------------------------- validation

def check_inputs(raw: Mapping[str, np.ndarray], session_inputs, vocab: Mapping[str, int] | None = None,
                 where: str = "inputs") -> dict[str, np.ndarray]:
    """Validate and cast `raw` against the graph inputs; returns new arrays in the graph's element types."""
    specs = input_specs(session_inputs)
    vocab = dict(vocab or {})
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in raw]
    extra = [n for n in raw if n not in expected]
    if missing or extra:
        fail(f"{where}: input names do not match the model ({differences([('missing', missing), ('unknown', extra)])}); "
             f"the model takes {', '.join(repr(n) for n in expected)}")
    feeds = {}
    for spec in specs:
        array = np.asarray(raw[spec.name])
        feeds[spec.name] = _check_one(array, spec, vocab.get(spec.name), where)
    return feeds


def _check_one(array: np.ndarray, spec: InputSpec, vocab: int | None, where: str) -> np.ndarray:
    label = f"{where}: input '{spec.name}'"
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            fail(f"{label} has rank {array.ndim} (shape {list(array.shape)}), the model expects rank {len(spec.shape)} {shape_text(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                fail(f"{label} has size {got} on axis {axis} (shape {list(array.shape)}), the model fixes it to {want} {shape_text(spec.shape)}")
    if array.size == 0 and not is_cache(spec):
        fail(f"{label} is empty (shape {list(array.shape)})")
    kind = array.dtype.kind
    if spec.elem_type in INT_TYPES:
        if kind in "iu":
            pass
        elif kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            pass   # integral floats (e.g. token ids saved as float) are accepted
        else:
            fail(f"{label} has element type {array.dtype}, the model expects integers ({spec.type_name})")
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            fail(f"{label} has values outside the range of {spec.type_name}")
        if vocab is not None and (array.min() < 0 or array.max() >= vocab):
            bad = int(array.max()) if array.max() >= vocab else int(array.min())
            fail(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
        return array.astype(spec.dtype)
    if spec.elem_type in FLOAT_TYPES:
        if kind not in "fiu":
            fail(f"{label} has element type {array.dtype}, the model expects {spec.type_name}")
        if spec.elem_type == TensorProto.BFLOAT16:
            fail(f"{label} is bfloat16, which numpy (and so these tools) cannot feed; export the model with float inputs")
        return array.astype(spec.dtype)
    if spec.elem_type == TensorProto.BOOL:
        if kind not in "biu":
            fail(f"{label} has element type {array.dtype}, the model expects bool")
        return array.astype(bool)
    fail(f"{label}: element type {spec.type_name} is not supported for calibration inputs")


# ---------------------------------------------------------------- random inputs and files

def token_feeds(specs: list[InputSpec], vocab: Mapping[str, int], ids: np.ndarray, hints: Mapping[str, int],
                only: list[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feeds that run the model on token ids [batch, seq] from the start (no past): the token input gets the ids,
    an attention mask all ones, position ids 0..seq-1, KV caches a past length of 0. `only`: just these inputs.
    Any other input is a UserError (the model needs real inputs for it)."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, seq = ids.shape[0], ids.shape[-1]
    feeds, made = {}, []
    for spec in specs:
        if only is not None and spec.name not in only:
            continue
        lowered = spec.name.lower()
        shape = concrete_shape(spec, batch, seq, hints)
        if spec.name in vocab:
            feeds[spec.name] = ids.reshape(shape).astype(spec.dtype)
            continue
        if spec.elem_type in INT_TYPES and "mask" in lowered:
            feeds[spec.name], what = np.ones(shape, spec.dtype), "all ones"
        elif spec.elem_type in INT_TYPES and "position" in lowered:
            feeds[spec.name], what = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy(), "0..seq-1"
        elif is_cache(spec) and spec.elem_type != TensorProto.BFLOAT16:
            feeds[spec.name], what = np.zeros(shape, spec.dtype), "empty cache"
        else:
            fail(f"cannot make a value for input '{spec.name}' ({spec.type_name} {shape_text(spec.shape or ())}) from "
                 f"token ids; pass --inputs FILE.npz with every graph input")
        made.append(f"{spec.name}: {what} {list(shape)}")
    return feeds, ([f"made for the token ids: {'; '.join(made)}"] if made else [])


def random_inputs(session_inputs, vocab: Mapping[str, int] | None = None, *, batch: int = DEFAULT_BATCH,
                  seq: int = DEFAULT_SEQ, seed: int = DEFAULT_SEED, hints: Mapping[str, int] | None = None) -> Calibration:
    """Seeded random inputs. A language model (a token input) gets token ids uniform in [0, vocab) and the rest
    from `token_feeds`; a model without one gets N(0, 1) float inputs (shapes by `concrete_shape`)."""
    specs = input_specs(session_inputs)
    vocab = dict(vocab or {})
    hints = dict(hints or {})
    rng = np.random.default_rng(seed)
    token = next((s for s in specs if s.name in vocab), None)
    if token is not None:
        ids = rng.integers(0, vocab[token.name], size=(batch, seq))
        feeds, notes = token_feeds(specs, vocab, ids, hints)
        shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in feeds.items())
        return Calibration(feeds, f"random tokens (seed {seed}): {shapes}", RANDOM_WARNING, notes)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, batch, seq, hints)
        if spec.elem_type in INT_TYPES and ("mask" in spec.name.lower() or "position" in spec.name.lower()):
            feeds.update(token_feeds([spec], vocab, np.zeros((batch, seq), np.int64), hints)[0])
        elif spec.elem_type == TensorProto.BOOL:
            feeds[spec.name] = np.ones(shape, bool)
        elif spec.elem_type in FLOAT_TYPES and spec.elem_type != TensorProto.BFLOAT16:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.elem_type in INT_TYPES:
            fail(f"cannot make random values for integer input '{spec.name}' (no embedding table found, so the vocabulary "
                 f"is unknown); pass --inputs FILE.npz")
        else:
            fail(f"cannot make random values for input '{spec.name}' of type {spec.type_name}; pass --inputs FILE.npz")
    shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in feeds.items())
    return Calibration(feeds, f"random normal (seed {seed}): {shapes}", RANDOM_FLOAT_WARNING)


def feeds_for_tokens(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every graph input of `model` (LoadedModel or ModelProto) for token ids [batch, seq] (see token_feeds)."""
    proto = getattr(model, "proto", model)
    specs, vocab = input_specs(proto), vocab_sizes(proto)
    feeds, _ = token_feeds(specs, vocab, ids, cache_hints(proto, getattr(model, "path", None)))
    return check_inputs(feeds, proto, vocab)


def calibration_for(model, inputs=None, *, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                    seed: int = DEFAULT_SEED, warn: bool = True) -> Calibration:
    """Calibration inputs for `model` (a passes.support.onnx_io.LoadedModel, or an onnx ModelProto): `inputs` is a path
    (see load_calibration), a dict of arrays, a Calibration, or None (random; the warning goes to stderr when
    `warn`)."""
    proto = getattr(model, "proto", model)
    hints = cache_hints(proto, getattr(model, "path", None))
    vocab = vocab_sizes(proto)
    if isinstance(inputs, Calibration):
        return Calibration(check_inputs(inputs.feeds, proto, vocab, where=inputs.source),
                           inputs.source, inputs.warning, list(inputs.notes))
    if isinstance(inputs, Mapping):
        return Calibration(check_inputs(inputs, proto, vocab), "arrays given by the caller")
    if inputs is not None:
        return load_calibration(inputs, proto, vocab, hints)
    calib = random_inputs(proto, vocab, batch=batch, seq=seq, seed=seed, hints=hints)
    if warn and calib.warning:
        print(f"warning: {calib.warning}", file=sys.stderr)
    return calib


def token_count(feeds: Mapping[str, np.ndarray]) -> int:
    """Batch x sequence positions of the feeds: the size of the first rank>=2 input's first two axes (else 1 axis)."""
    arrays = list(feeds.values())
    for a in arrays:
        if a.ndim >= 2:
            return int(a.shape[0] * a.shape[1])
    return int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1

