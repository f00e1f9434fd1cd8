"""python -m bench.compare ORIGINAL.onnx FUSED.onnx [--inputs FILE] [--shape BxS] [--atol A] [--rtol R]
                         [--max-kl K] [--min-top1 T] [--json OUT.json] [-v]

How far is the fused model from the original? Both models run in onnxruntime (CPU) as two polygraphy
`OnnxrtRunner`s on the same inputs (`Comparator.run`), and polygraphy's `SimpleCompareFunc` compares every output
(`Comparator.compare_accuracy`), the original being the reference (relative errors are |fused - original| /
|original|, as `polygraphy run FUSED.onnx --load-outputs original.json` computes them).

Printed per output: polygraphy's mean / median / max absolute and relative error, the verdict, and for a failing
output where its largest error is. For a language model (an output named `logits`, or whose last dimension is the
vocabulary): KL(p_original || p_fused) of the next-token distributions (log-softmax in float64, mean over all
tokens), top-1 agreement, and with `--inputs` holding `input_ids` (real text), the perplexity of both models on them.

Tolerances (per element, polygraphy's "elemwise" check: an element fails when its absolute error exceeds atol AND
its relative error exceeds rtol). Defaults depend on the output's type: float32/float64 1e-3, float16 1e-2,
bfloat16 3e-2; --atol/--rtol set both for every output. Fusion changes the math (the parallel form is an
approximation of the sequential one), so a fused model usually does NOT meet element tolerances: the point is to
measure how far it is. Language models are better judged by KL and top-1: gate on them with --max-kl/--min-top1
(and `--atol inf` to skip the element check).

Without --inputs the inputs are random, made by polygraphy's DataLoader (seed --seed): token ids (`input_ids`) in
[0, vocab-1], `attention_mask` all ones, `position_ids` 0..seq-1, floats in [0, 1]; dynamic dimensions are set by
--shape BATCHxSEQ (default 1x16). Random tokens are not text: real inputs (--inputs FILE.npz or polygraphy's
--save-inputs JSON) are better, and only they give a perplexity.

Exit codes: 0 within tolerance, 1 not (the failing output and where are printed), 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from bench.results import result_json
from passes.calibration import load_calibration, vocab_sizes
from passes.change import next_token_metrics
from passes.errors import fail, run_cli
from passes.onnx_io import load_model
from passes.outputs import check_output

DEFAULT_SHAPE = (1, 16)
DEFAULT_SEED = 1
# per-element tolerance (atol = rtol) by output type; float16/bfloat16 carry ~3 and ~2 significant digits
DEFAULT_TOLERANCE = {TensorProto.DOUBLE: 1e-3, TensorProto.FLOAT: 1e-3, TensorProto.FLOAT16: 1e-2,
                     TensorProto.BFLOAT16: 3e-2}
FALLBACK_TOLERANCE = 1e-3
BATCH_NAMES = ("batch",)
SEQ_NAMES = ("seq", "sequence", "len", "length", "token", "tokens", "time")


# ------------------------------------------------------------------------------------------- model interfaces

@dataclass
class TensorInfo:
    name: str
    elem_type: int
    dims: list          # int, str (dim_param) or None (unknown)

    @property
    def dtype_name(self) -> str:
        special = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}
        return special.get(self.elem_type) or TensorProto.DataType.Name(self.elem_type).lower()

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def _tensor_infos(values, skip: set[str] = frozenset()) -> list[TensorInfo]:
    infos = []
    for value in values:
        if value.name in skip:
            continue
        ttype = value.type.tensor_type
        dims = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
        infos.append(TensorInfo(value.name, ttype.elem_type, dims if dims is not None else []))
    return infos


@dataclass
class Interface:
    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    vocab: int | None          # rows of the embedding table gathered by an integer input, if any
    token_input: str | None    # that integer input
    proto: onnx.ModelProto     # graph only, no weights


def model_interface(path: Path) -> Interface:
    model = load_model(path)          # graph only; missing/corrupt files and missing external data -> UserError
    graph = model.proto.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = _tensor_infos(graph.input, skip=set(initializers))
    outputs = _tensor_infos(graph.output)
    vocab = token_input = None
    vocabs = vocab_sizes(model.proto)     # token inputs -> rows of the embedding table they index
    if vocabs:
        token_input = "input_ids" if "input_ids" in vocabs else next(iter(vocabs))
        vocab = vocabs[token_input]
    return Interface(path, inputs, outputs, vocab, token_input, model.proto)


def check_same_interface(orig: Interface, fused: Interface) -> None:
    """Both models must take the same inputs and give the same outputs (names, element types, ranks)."""
    for kind, a, b in (("input", orig.inputs, fused.inputs), ("output", orig.outputs, fused.outputs)):
        names_a, names_b = [t.name for t in a], [t.name for t in b]
        if set(names_a) != set(names_b):
            only_a = sorted(set(names_a) - set(names_b))
            only_b = sorted(set(names_b) - set(names_a))
            parts = []
            if only_a:
                parts.append(f"only {orig.path.name} has {', '.join(only_a)}")
            if only_b:
                parts.append(f"only {fused.path.name} has {', '.join(only_b)}")
            fail(f"the models have different {kind}s ({'; '.join(parts)}); compare a model with its own fused version")
        by_name = {t.name: t for t in b}
        for t in a:
            u = by_name[t.name]
            if t.elem_type != u.elem_type:
                fail(f"{kind} '{t.name}' is {t.dtype_name} in {orig.path.name} but {u.dtype_name} in {fused.path.name}")
            if t.dims and u.dims and len(t.dims) != len(u.dims):
                fail(f"{kind} '{t.name}' has rank {len(t.dims)} in {orig.path.name} but {len(u.dims)} in {fused.path.name}")


def is_language_model_output(out: TensorInfo, vocab: int | None) -> bool:
    if out.np_dtype.kind != "f" or (out.dims and len(out.dims) < 2):
        return False
    if out.name == "logits":
        return True
    return vocab is not None and bool(out.dims) and out.dims[-1] == vocab


# ------------------------------------------------------------------------------------------------- inputs

def parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ with positive integers, e.g. 1x16; got '{text}'")
    return int(parts[0]), int(parts[1])


def static_shape(info: TensorInfo, batch: int, seq: int) -> tuple[int, ...]:
    """Concrete shape for a graph input: static dims kept, dims named like batch/seq (else dims 0/1) set."""
    shape = []
    for k, d in enumerate(info.dims):
        if isinstance(d, int) and d > 0:
            shape.append(d)
            continue
        name = (d or "").lower()
        if any(n in name for n in BATCH_NAMES):
            shape.append(batch)
        elif any(n in name for n in SEQ_NAMES):
            shape.append(seq)
        elif k in (0, 1):
            shape.append(batch if k == 0 else seq)
        else:
            fail(f"input '{info.name}' has dynamic dimension {k} ('{d or '?'}') that is neither batch nor sequence; "
                 "give real inputs with --inputs")
    return tuple(shape)


def random_inputs(iface: Interface, batch: int, seq: int, seed: int) -> tuple[list[dict], dict]:
    """One feed dict from polygraphy's DataLoader, token ids inside the vocabulary; and a description of it."""
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader

    metadata = TensorMetadata()
    val_range: dict = {}
    described = {}
    for info in iface.inputs:
        shape = static_shape(info, batch, seq)
        metadata.add(info.name, info.np_dtype, shape)
        kind = info.np_dtype.kind
        if info.name == iface.token_input or (kind in "iu" and "input_ids" in info.name):
            if iface.vocab is None:
                fail(f"input '{info.name}' holds token ids but the vocabulary size cannot be found in the graph; "
                     "give real inputs with --inputs")
            val_range[info.name] = (0, iface.vocab - 1)
            what = f"token ids in [0, {iface.vocab - 1}]"
        elif kind in "iu" and "mask" in info.name:
            val_range[info.name] = (1, 1)
            what = "all ones"
        elif kind in "iu" and "position" in info.name:
            what = "0..seq-1"
        elif kind in "iu":
            fail(f"integer input '{info.name}' has no known meaning (not input_ids, attention_mask or position_ids); "
                 "give real inputs with --inputs")
        elif kind == "b":
            what = "random booleans"
        else:
            what = "uniform in [0, 1]"
        described[info.name] = {"dtype": info.dtype_name, "shape": list(shape), "values": what}
    loader = DataLoader(seed=seed, iterations=1, input_metadata=metadata, val_range=val_range)
    feed = dict(loader[0])
    for info in iface.inputs:
        if described[info.name]["values"] == "0..seq-1":
            shape = feed[info.name].shape
            feed[info.name] = np.broadcast_to(np.arange(shape[-1], dtype=info.np_dtype), shape).copy()
    return [feed], described


# ------------------------------------------------------------------------------------------------- metrics

def default_tolerance(elem_type: int) -> float:
    """Default atol = rtol for an output of this ONNX element type."""
    return DEFAULT_TOLERANCE.get(elem_type, FALLBACK_TOLERANCE)


def worst_element(orig: np.ndarray, fused: np.ndarray, atol: float, rtol: float) -> dict:
    """Where the largest absolute error is, and how many elements fail the elemwise check (same rule as polygraphy)."""
    o, f = np.asarray(orig, np.float64), np.asarray(fused, np.float64)
    diff = np.abs(f - o)
    ref = np.abs(o)
    ref = np.where(ref == 0, np.finfo(np.float64).eps, ref)   # polygraphy adds ~2.2e-16 to zeros
    rel = diff / ref
    nan = np.isnan(diff)
    bad = ((diff > atol) | nan) & ((rel > rtol) | np.isnan(rel))
    idx = np.unravel_index(int(np.nanargmax(np.where(nan, -1.0, diff))) if diff.size else 0, diff.shape) if diff.size else ()
    return {
        "max_abs_index": [int(i) for i in idx],
        "original_value": float(o[idx]) if diff.size else None,
        "fused_value": float(f[idx]) if diff.size else None,
        "mismatched_elements": int(bad.sum()),
        "nan_elements": int(nan.sum()),
        "total_elements": int(diff.size),
    }


# ------------------------------------------------------------------------------------------------- running

def _quiet_polygraphy(verbose: bool) -> None:
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(3 if not verbose else 2)
    except Exception:
        pass


def compare(original: Path, fused: Path, *, inputs: Path | None = None, shape: tuple[int, int] = DEFAULT_SHAPE,
            seed: int = DEFAULT_SEED, atol: float | None = None, rtol: float | None = None,
            max_kl: float | None = None, min_top1: float | None = None, verbose: bool = False) -> dict:
    """Run both models through polygraphy's Comparator and measure the difference. Returns the report dict."""
    import warnings
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:   # polygraphy < 0.50
        from polygraphy.comparator import CompareFunc
        SimpleCompareFunc = CompareFunc.simple

    start = time.perf_counter()
    original, fused = Path(original), Path(fused)
    if original.resolve() == fused.resolve():
        fail(f"both arguments are {original}; give the original and the fused model")
    orig_if, fused_if = model_interface(original), model_interface(fused)
    check_same_interface(orig_if, fused_if)
    _quiet_polygraphy(verbose)

    if inputs is not None:
        # .npz or polygraphy JSON, checked against the graph inputs (names, types, ranks, token ids in the vocabulary)
        calib = load_calibration(Path(inputs), orig_if.proto.graph, vocab_sizes(orig_if.proto))
        feeds = [calib.feeds]
        input_desc = {"source": "file", "path": str(inputs), "description": calib.source, "notes": list(calib.notes),
                      "iterations": len(feeds),
                      "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in feeds[0].items()}}
    else:
        feeds, described = random_inputs(orig_if, shape[0], shape[1], seed)
        input_desc = {"source": "random", "generator": "polygraphy DataLoader", "seed": seed,
                      "shape": list(shape), "iterations": 1, "tensors": described}

    out_dtypes = {o.name: o.elem_type for o in orig_if.outputs}
    atols = {n: atol if atol is not None else default_tolerance(d) for n, d in out_dtypes.items()}
    rtols = {n: rtol if rtol is not None else default_tolerance(d) for n, d in out_dtypes.items()}

    runners = []
    for name, path in (("original", original), ("fused", fused)):
        runners.append(OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_start = time.perf_counter()
            results = Comparator.run(runners, data_loader=feeds)
            run_s = time.perf_counter() - run_start
        except Exception as exc:   # PolygraphyException, or onnxruntime's own (load or run failures)
            hint = ""
            if _uses_bfloat16(orig_if.proto) or _uses_bfloat16(fused_if.proto):
                hint = ("; the models use bfloat16, which onnxruntime's CPU provider may not implement: "
                        "compare fp32 or fp16 exports of the same model")
            name = "" if isinstance(exc, PolygraphyException) else f"{type(exc).__name__}: "
            fail(f"onnxruntime could not run the models: {name}{_first_line(exc)}{hint}")
        compare_func = SimpleCompareFunc(atol=atols, rtol=rtols, check_error_stat="elemwise")
        # (1, 0): fused against original, so relative errors are relative to the original's values
        accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)], compare_func=compare_func)

    per_pair = accuracy[0]
    pair = next(iter(per_pair.keys()))
    iterations = per_pair[pair]
    orig_runs, fused_runs = results["original"], results["fused"]

    report_outputs: dict = {}
    for out in orig_if.outputs:
        rows = []
        for it, per_output in enumerate(iterations):
            stats = per_output.get(out.name)
            o, f = orig_runs[it][out.name], fused_runs[it][out.name]
            row = {"iteration": it, "shape": list(np.shape(o))}
            if stats is None:
                row.update({"passed": False, "error": "not compared (shape mismatch?)"})
            else:
                row.update({k: getattr(stats, k) for k in ("mean_absdiff", "median_absdiff", "max_absdiff",
                                                          "mean_reldiff", "median_reldiff", "max_reldiff")})
                row["passed"] = bool(stats)
            if np.shape(o) == np.shape(f):
                row.update(worst_element(o, f, atols[out.name], rtols[out.name]))
            else:
                row["passed"] = False
                row["error"] = f"shapes differ: original {list(np.shape(o))}, fused {list(np.shape(f))}"
            rows.append(row)
        report_outputs[out.name] = {"dtype": out.dtype_name, "atol": atols[out.name], "rtol": rtols[out.name],
                                    "passed": all(r["passed"] for r in rows), "iterations": rows}

    lm = None
    lm_out = next((o for o in orig_if.outputs if o.name == "logits" and is_language_model_output(o, orig_if.vocab)), None) \
        or next((o for o in orig_if.outputs if is_language_model_output(o, orig_if.vocab)), None)
    if lm_out is not None and all(np.shape(orig_runs[i][lm_out.name]) == np.shape(fused_runs[i][lm_out.name])
                                  for i in range(len(feeds))):
        token_name = orig_if.token_input or ("input_ids" if "input_ids" in feeds[0] else None)
        real_ids = inputs is not None and token_name is not None and token_name in feeds[0]
        ids = [feed[token_name] for feed in feeds] if real_ids else None
        mask_name = next((n for n in feeds[0] if "attention_mask" in n), None)
        masks = [feed.get(mask_name) for feed in feeds] if real_ids and mask_name else None
        ok_shape = ids is None or all(np.asarray(i).size * np.shape(orig_runs[k][lm_out.name])[-1]
                                      == np.size(orig_runs[k][lm_out.name]) for k, i in enumerate(ids))
        lm = next_token_metrics([orig_runs[i][lm_out.name] for i in range(len(feeds))],
                                [fused_runs[i][lm_out.name] for i in range(len(feeds))],
                                ids if ok_shape else None, masks if ok_shape else None)
        lm = {"output": lm_out.name, "vocab": int(np.shape(orig_runs[0][lm_out.name])[-1]), **lm}
        if ids is None:
            lm["perplexity_note"] = ("no perplexity: inputs are random token ids, not text" if inputs is None
                                     else f"no perplexity: the inputs hold no '{token_name or 'input_ids'}'")
        lm["thresholds"] = {"max_kl": max_kl, "min_top1": min_top1}
        lm_failures = []
        if max_kl is not None and lm["kl_mean"] is not None and not lm["kl_mean"] <= max_kl:
            lm_failures.append(f"KL {lm['kl_mean']:.4g} > --max-kl {max_kl:g}")
        if min_top1 is not None and lm["top1_agreement"] is not None and not lm["top1_agreement"] >= min_top1:
            lm_failures.append(f"top-1 agreement {lm['top1_agreement']:.4f} < --min-top1 {min_top1:g}")
        lm["failures"] = lm_failures
        lm["passed"] = not lm_failures
    elif max_kl is not None or min_top1 is not None:
        fail("--max-kl/--min-top1 need a language model (an output named 'logits' or with the vocabulary as last dim)")

    passed = all(o["passed"] for o in report_outputs.values()) and (lm is None or lm["passed"])
    return {
        "tool": "bench.compare",
        "original": str(original),
        "fused": str(fused),
        "runtime": "onnxruntime CPUExecutionProvider via polygraphy OnnxrtRunner",
        "check": "polygraphy SimpleCompareFunc elemwise: an element fails when abs error > atol and rel error > rtol;"
                 " rel error = |fused - original| / |original|",
        "inputs": input_desc,
        "outputs": report_outputs,
        "language_model": lm,
        "polygraphy_passed": bool(accuracy),
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "inference_s": round(run_s, 4),
        "elapsed_s": round(time.perf_counter() - start, 4),
    }


def _uses_bfloat16(proto: onnx.ModelProto) -> bool:
    g = proto.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    return any(t.data_type == TensorProto.BFLOAT16 for t in g.initializer) \
        or any(v.type.tensor_type.elem_type == TensorProto.BFLOAT16 for v in values) \
        or any(a.name == "to" and a.i == TensorProto.BFLOAT16 for n in g.node if n.op_type == "Cast" for a in n.attribute)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------------- printing

def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.4g}"


def orig_if_has_tokens(inputs_record: dict) -> bool:
    return any("token ids" in t["values"] for t in inputs_record["tensors"].values())


def format_report(r: dict) -> str:
    lines = [f"bench.compare: {r['original']} vs {r['fused']}  (onnxruntime CPU, polygraphy Comparator; "
             f"{r['elapsed_s']:.2f} s)"]
    inp = r["inputs"]
    if inp["source"] == "random":
        desc = "; ".join(f"{n} {t['dtype']} {t['shape']} {t['values']}" for n, t in inp["tensors"].items())
        lines.append(f"  inputs: RANDOM (polygraphy DataLoader, seed {inp['seed']}, --shape {inp['shape'][0]}x{inp['shape'][1]}): "
                     f"{desc}")
        if orig_if_has_tokens(inp):
            lines.append("          random tokens are not text: real text (--inputs FILE) is better, and only it gives a perplexity")
        else:
            lines.append("          real inputs (--inputs FILE) are better")
    else:
        desc = "; ".join(f"{n} {t['dtype']} {t['shape']}" for n, t in inp["tensors"].items())
        notes = f" ({'; '.join(inp['notes'])})" if inp.get("notes") else ""
        lines.append(f"  inputs: {inp['path']}: {desc}{notes}")
    lines.append("  check: per element, fails when abs error > atol AND rel error > rtol (rel to the original; polygraphy elemwise)")
    multi = any(len(o["iterations"]) > 1 for o in r["outputs"].values())
    header = ["output"] + (["iter"] if multi else []) + ["atol", "rtol", "mean abs", "median abs", "max abs",
                                                         "mean rel", "median rel", "max rel", "result"]
    table = [header]
    for name, o in r["outputs"].items():
        for row in o["iterations"]:
            table.append([name] + ([str(row["iteration"])] if multi else []) + [
                _g(o["atol"]), _g(o["rtol"]), _g(row.get("mean_absdiff")), _g(row.get("median_absdiff")),
                _g(row.get("max_absdiff")), _g(row.get("mean_reldiff")), _g(row.get("median_reldiff")),
                _g(row.get("max_reldiff")), "ok" if row["passed"] else "FAILED"])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
    failing = [(name, o, row) for name, o in r["outputs"].items() for row in o["iterations"] if not row["passed"]]
    for name, o, row in failing:
        it = f" (iteration {row['iteration']})" if multi else ""
        if "error" in row:
            lines.append(f"  {name}{it}: {row['error']}")
        else:
            lines.append(f"  {name}{it}: {row['mismatched_elements']:,} of {row['total_elements']:,} elements outside "
                         f"tolerance; largest abs error {_g(row['max_absdiff'])} at {row['max_abs_index']} "
                         f"(original {_g(row['original_value'])}, fused {_g(row['fused_value'])})")
    lm = r["language_model"]
    if lm is not None:
        lines.append(f"  language model ('{lm['output']}', vocab {lm['vocab']}, {lm['tokens']} tokens):")
        lines.append(f"    KL(original || fused)  mean {_g(lm['kl_mean'])}  median {_g(lm['kl_median'])}  max {_g(lm['kl_max'])}"
                     "  (nats per token, next-token distributions)")
        lines.append(f"    top-1 agreement        {lm['top1_agreement']:.4f} ({lm['top1_agree_count']}/{lm['tokens']})")
        if "perplexity_original" in lm:
            lines.append(f"    perplexity             original {lm['perplexity_original']:.4g}   fused {lm['perplexity_fused']:.4g}"
                         f"   ({lm['predictions']} next-token predictions on the given input_ids)")
        else:
            lines.append(f"    ({lm.get('perplexity_note', 'no perplexity')})")
    if r["passed"]:
        lines.append("result: PASSED (within tolerance)")
    else:
        reasons, named = [], set()
        for name, o, row in failing:   # the first failing iteration of each output
            if name in named:
                continue
            named.add(name)
            it = f" iteration {row['iteration']}" if multi else ""
            if "error" in row:
                reasons.append(f"{name}{it}: {row['error']}")
            else:
                reasons.append(f"{name}{it} exceeds atol {_g(o['atol'])}/rtol {_g(o['rtol'])} "
                               f"(max abs error {_g(row['max_absdiff'])} at {row['max_abs_index']})")
        if lm is not None:
            reasons += lm["failures"]
        lines.append("result: FAILED: " + "; ".join(reasons))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, help="the original ONNX model (the reference)")
    parser.add_argument("fused", type=Path, help="the fused ONNX model")
    parser.add_argument("--inputs", type=Path, help=".npz (one array per input) or polygraphy inputs JSON "
                                                     "(polygraphy run --save-inputs); default: random")
    parser.add_argument("--shape", type=parse_shape, default=DEFAULT_SHAPE, metavar="BATCHxSEQ",
                        help="dynamic batch and sequence for random inputs (default 1x16)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for random inputs (default 1)")
    parser.add_argument("--atol", type=float, help="absolute tolerance for every output "
                                                   "(default by type: fp32 1e-3, fp16 1e-2, bf16 3e-2)")
    parser.add_argument("--rtol", type=float, help="relative tolerance for every output (same defaults)")
    parser.add_argument("--max-kl", type=float, help="language models: also fail when mean KL exceeds this")
    parser.add_argument("--min-top1", type=float, help="language models: also fail when top-1 agreement is below this")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write every number to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show polygraphy's and onnxruntime's logs")
    args = parser.parse_args(argv)
    for flag in ("atol", "rtol", "max_kl"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        fail(f"--min-top1 must be in [0, 1], got {args.min_top1}")
    if args.json is not None:
        check_output(args.json, "--json", args.original, args.fused, suffix=".json")
    report = compare(args.original, args.fused, inputs=args.inputs, shape=args.shape, seed=args.seed,
                     atol=args.atol, rtol=args.rtol, max_kl=args.max_kl, min_top1=args.min_top1, verbose=args.verbose)
    print(format_report(report))
    if args.json is not None:
        print(f"  json: {result_json(args.json, report)}")
    return report["exit_code"]


if __name__ == "__main__":
    run_cli(main)
