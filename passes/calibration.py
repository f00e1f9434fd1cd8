"""Calibration inputs for passes.analysis and the auto plan: load them from a file, validate them, or make them.

Sources:
  FILE.npz   one array per graph input, by name (np.savez; see `save_inputs_npz`);
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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.errors import fail

DEFAULT_BATCH = 4
DEFAULT_SEQ = 128
DEFAULT_SEED = 0
RANDOM_WARNING = ("no --inputs given: using random token ids; dependencies measured on random tokens differ from "
                  "those on real text, pass --inputs FILE.npz with real text for a plan you can trust")
RANDOM_FLOAT_WARNING = ("no --inputs given: using random normal inputs; pass --inputs FILE.npz with representative "
                        "data for a plan you can trust")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, element type (ONNX enum) and shape (int = fixed, str/None = dynamic)."""
    name: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None   # None: rank unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()


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


# ---------------------------------------------------------------- graph inputs

_ORT_TYPES = {f"tensor({name})": enum for name, enum in (
    ("float", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16),
    ("double", TensorProto.DOUBLE), ("int64", TensorProto.INT64), ("int32", TensorProto.INT32),
    ("int16", TensorProto.INT16), ("int8", TensorProto.INT8), ("uint8", TensorProto.UINT8),
    ("uint16", TensorProto.UINT16), ("uint32", TensorProto.UINT32), ("uint64", TensorProto.UINT64),
    ("bool", TensorProto.BOOL))}


def ort_type_to_onnx(type_string: str) -> int:
    """'tensor(float)' -> TensorProto.FLOAT."""
    if type_string not in _ORT_TYPES:
        raise ValueError(f"unsupported tensor type {type_string}")
    return _ORT_TYPES[type_string]


def input_specs(source) -> list[InputSpec]:
    """InputSpecs from an onnx ModelProto / GraphProto (inputs that are not initializers), onnxruntime NodeArgs
    (`session.get_inputs()`), or InputSpecs."""
    if isinstance(source, onnx.ModelProto):
        source = source.graph
    if isinstance(source, onnx.GraphProto):
        inits = {t.name for t in source.initializer}
        specs = []
        for vi in source.input:
            if vi.name in inits:
                continue
            tensor = vi.type.tensor_type
            shape = None
            if tensor.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
            specs.append(InputSpec(vi.name, tensor.elem_type, shape))
        return specs
    specs = []
    for item in source:
        if isinstance(item, InputSpec):
            specs.append(item)
        else:   # onnxruntime NodeArg
            shape = None if item.shape is None else tuple(item.shape)
            specs.append(InputSpec(item.name, ort_type_to_onnx(item.type), shape))
    return specs


def vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that are token ids -> vocabulary size.

    An input is a token input when it reaches (through Cast/Reshape/Flatten/Squeeze/Unsqueeze) the indices of a
    Gather whose data is an initializer: vocab = that table's row count. Otherwise, an integer input named
    like 'input_ids' gets the last axis of an output named 'logits', when it is fixed.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    int_inputs = [s for s in input_specs(graph) if s.elem_type in _INT_TYPES]
    logits_vocab = None
    for out in graph.output:
        if out.name == "logits" and out.type.tensor_type.HasField("shape"):
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                logits_vocab = int(dims[-1].dim_value)
    found = {}
    for spec in int_inputs:
        frontier, seen = [spec.name], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node in consumers.get(tensor, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor and node.input[0] in inits:
                    table = inits[node.input[0]]
                    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
                    if table.dims and axis in (0, -len(table.dims)):
                        rows = int(table.dims[0])
                        found[spec.name] = min(rows, found.get(spec.name, rows))
                elif node.op_type in ("Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity") and node.input[0] == tensor:
                    frontier.append(node.output[0])
        if spec.name not in found and logits_vocab and "input_ids" in spec.name:
            found[spec.name] = logits_vocab
    return found


_INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
              TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


# ---------------------------------------------------------------- loading

def load_inputs(path: str | os.PathLike, session_inputs, vocab: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Feeds {name: array} from FILE.npz or a polygraphy inputs JSON, cast and checked against `session_inputs`
    (an onnx ModelProto, `session.get_inputs()` or InputSpecs); `vocab` maps token inputs to their vocabulary size
    (default: found in the model when a ModelProto is given)."""
    return load_calibration(path, session_inputs, vocab).feeds


def load_calibration(path: str | os.PathLike, session_inputs, vocab: Mapping[str, int] | None = None) -> Calibration:
    """Like `load_inputs`, with the source description for reports. With a ModelProto as `session_inputs` and no
    `vocab`, the vocabulary comes from the model (see `vocab_sizes`)."""
    if vocab is None and isinstance(session_inputs, onnx.ModelProto):
        vocab = vocab_sizes(session_inputs)
    path = Path(path)
    if not path.exists():
        fail(f"inputs file {path}: no such file")
    if not path.is_file():
        fail(f"inputs file {path}: not a file")
    if path.stat().st_size == 0:
        fail(f"inputs file {path} is empty")
    notes: list[str] = []
    if _looks_like_zip(path):
        raw = _read_npz(path)
        source = f"{path} (npz)"
    else:
        raw = _read_polygraphy_json(path, notes)
        source = f"{path} (polygraphy inputs JSON)"
    feeds = check_inputs(raw, session_inputs, vocab, where=str(path))
    return Calibration(feeds, source, None, notes)


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        fail(f"inputs file {path} is not a readable .npz ({type(exc).__name__}: {_first_line(exc)})")
    if not arrays:
        fail(f"inputs file {path} holds no arrays")
    return arrays


def _read_polygraphy_json(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
    try:
        from polygraphy.json import load_json
    except ImportError:  # pragma: no cover - polygraphy is a dependency
        fail(f"inputs file {path} is not an .npz, and polygraphy (needed to read JSON inputs) is not installed")
    try:
        data = load_json(str(path))
    except Exception as exc:   # json, base64 and numpy errors
        fail(f"inputs file {path} is neither an .npz nor a polygraphy inputs JSON ({type(exc).__name__}: {_first_line(exc)})")
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(d, Mapping) for d in data):
        fail(f"inputs file {path}: expected a JSON list of feed dicts (polygraphy run --save-inputs), found {type(data).__name__}"
             f"{' (empty)' if isinstance(data, list) and not data else ''}")
    feeds = []
    for k, feed in enumerate(data):
        if not feed:
            fail(f"inputs file {path}: feed {k} is empty")
        bad = [name for name, value in feed.items() if not isinstance(value, np.ndarray)]
        if bad:
            fail(f"inputs file {path}: feed {k} input '{bad[0]}' is not an array")
        feeds.append(dict(feed))
    if len(feeds) == 1:
        return feeds[0]
    names = list(feeds[0])
    same_names = all(list(f) == names for f in feeds)
    stackable = same_names and all(
        f[n].ndim >= 1 and f[n].ndim == feeds[0][n].ndim and f[n].shape[1:] == feeds[0][n].shape[1:] for f in feeds for n in names)
    if stackable:
        notes.append(f"{len(feeds)} feeds concatenated along the first axis")
        return {n: np.concatenate([f[n] for f in feeds], axis=0) for n in names}
    notes.append(f"{len(feeds)} feeds with different shapes: only the first is used")
    return feeds[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "unreadable"


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
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"unknown {', '.join(repr(n) for n in extra)}")
        fail(f"{where}: input names do not match the model ({'; '.join(parts)}); the model takes {', '.join(repr(n) for n in expected)}")
    feeds = {}
    for spec in specs:
        array = np.asarray(raw[spec.name])
        feeds[spec.name] = _check_one(array, spec, vocab.get(spec.name), where)
    return feeds


def _check_one(array: np.ndarray, spec: InputSpec, vocab: int | None, where: str) -> np.ndarray:
    label = f"{where}: input '{spec.name}'"
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            fail(f"{label} has rank {array.ndim} (shape {list(array.shape)}), the model expects rank {len(spec.shape)} {_shape_text(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                fail(f"{label} has size {got} on axis {axis} (shape {list(array.shape)}), the model fixes it to {want} {_shape_text(spec.shape)}")
    if array.size == 0:
        fail(f"{label} is empty (shape {list(array.shape)})")
    kind = array.dtype.kind
    if spec.elem_type in _INT_TYPES:
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
    if spec.elem_type in _FLOAT_TYPES:
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


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


# ---------------------------------------------------------------- random inputs and files

def random_inputs(session_inputs, vocab: Mapping[str, int] | None = None, *, batch: int = DEFAULT_BATCH,
                  seq: int = DEFAULT_SEQ, seed: int = DEFAULT_SEED) -> Calibration:
    """Seeded random feeds: token ids uniform in [0, vocab) for token inputs, N(0, 1) for float inputs,
    ones for masks, 0..seq-1 for position inputs. Dynamic axis 0 gets `batch`, other dynamic axes `seq`."""
    specs = input_specs(session_inputs)
    vocab = dict(vocab or {})
    rng = np.random.default_rng(seed)
    feeds, floats = {}, False
    for spec in specs:
        if spec.shape is None:
            fail(f"input '{spec.name}' has unknown rank; pass --inputs")
        shape = tuple(d if isinstance(d, int) and d > 0 else (batch if axis == 0 else seq) for axis, d in enumerate(spec.shape))
        lowered = spec.name.lower()
        if spec.elem_type in _INT_TYPES:
            if spec.name in vocab:
                feeds[spec.name] = rng.integers(0, vocab[spec.name], size=shape).astype(spec.dtype)
            elif "mask" in lowered:
                feeds[spec.name] = np.ones(shape, spec.dtype)
            elif "position" in lowered:
                feeds[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
            else:
                fail(f"cannot make random values for integer input '{spec.name}' (no embedding table found, so the vocabulary "
                     f"is unknown); pass --inputs FILE.npz")
        elif spec.elem_type == TensorProto.BOOL:
            feeds[spec.name] = np.ones(shape, bool)
        elif spec.elem_type in _FLOAT_TYPES and spec.elem_type != TensorProto.BFLOAT16:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            floats = True
        else:
            fail(f"cannot make random values for input '{spec.name}' of type {spec.type_name}; pass --inputs FILE.npz")
    shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in feeds.items())
    if floats and not any(n in vocab for n in feeds):
        return Calibration(feeds, f"random normal (seed {seed}): {shapes}", RANDOM_FLOAT_WARNING)
    return Calibration(feeds, f"random tokens (seed {seed}): {shapes}", RANDOM_WARNING)


def calibration_for(model: onnx.ModelProto, inputs=None, *, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                    seed: int = DEFAULT_SEED, warn: bool = True) -> Calibration:
    """Calibration inputs for `model`: `inputs` is a path (npz / polygraphy JSON), a dict of arrays, a
    Calibration, or None (random; the warning goes to stderr when `warn`)."""
    if isinstance(inputs, Calibration):
        return Calibration(check_inputs(inputs.feeds, model, vocab_sizes(model), where=inputs.source),
                           inputs.source, inputs.warning, list(inputs.notes))
    if isinstance(inputs, Mapping):
        return Calibration(check_inputs(inputs, model, vocab_sizes(model)), "arrays given by the caller")
    if inputs is not None:
        return load_calibration(inputs, model, vocab_sizes(model))
    calib = random_inputs(model, vocab_sizes(model), batch=batch, seq=seq, seed=seed)
    if warn and calib.warning:
        print(f"warning: {calib.warning}", file=sys.stderr)
    return calib


def save_inputs_npz(path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> Path:
    """Write feeds {input name: array} to `path` exactly (no '.npz' appended), readable by --inputs."""
    path = Path(path)
    if not feeds:
        raise ValueError("no arrays to save")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(a) for name, a in feeds.items()})
    os.replace(tmp, path)
    return path


def token_count(feeds: Mapping[str, np.ndarray]) -> int:
    """Batch x sequence positions of the feeds: the size of the first rank>=2 input's first two axes (else 1 axis)."""
    arrays = list(feeds.values())
    for a in arrays:
        if a.ndim >= 2:
            return int(a.shape[0] * a.shape[1])
    return int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1

