"""The comparison bench.compare prints: both models run in onnxruntime (CPU) as two polygraphy OnnxrtRunners on the
same inputs (Comparator.run); polygraphy's SimpleCompareFunc checks every output elementwise (an element fails
when abs error > atol AND rel error > rtol, relative to the original); per output the error statistics and where
the largest error is; for a language model the next-token KL, top-1 agreement and perplexity
(passes.measure.change); and the verdict. Inputs come from passes.support.calibration (a file, or random inputs
made the one way every tool makes them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.measure.change import logits_output, next_token_metrics
from passes.support.calibration import Calibration, calibration_for, random_inputs
from passes.support.errors import fail
from passes.support.graph_inputs import value_dims, vocab_sizes
from passes.support.onnx_io import execution_providers, load_model
from passes.support.report import differences

DEFAULT_SHAPE = (1, 16)
DEFAULT_SEED = 1
# per-element tolerance (atol = rtol) by output type; float16/bfloat16 carry ~3 and ~2 significant digits
DEFAULT_TOLERANCE = {TensorProto.DOUBLE: 1e-3, TensorProto.FLOAT: 1e-3, TensorProto.FLOAT16: 1e-2,
                     TensorProto.BFLOAT16: 3e-2}
FALLBACK_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------- model interfaces

@dataclass
class TensorInfo:
    name: str
    elem_type: int
    dims: tuple | None  # per axis int, str (dim_param) or None (unknown); None: rank unknown (value_dims)

    @property
    def dtype_name(self) -> str:
        special = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}
        return special.get(self.elem_type) or TensorProto.DataType.Name(self.elem_type).lower()

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


def _tensor_infos(values, skip: set[str] = frozenset()) -> list[TensorInfo]:
    return [TensorInfo(v.name, v.type.tensor_type.elem_type, value_dims(v)) for v in values if v.name not in skip]


@dataclass
class Interface:
    path: Path
    model: object              # passes.support.onnx_io.LoadedModel (graph only, no weights)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    vocab: int | None          # rows of the embedding table gathered by an integer input, if any
    token_input: str | None    # that integer input

    @property
    def proto(self) -> onnx.ModelProto:
        return self.model.proto


def model_interface(path: Path) -> Interface:
    model = load_model(path)          # graph only; missing/corrupt files, unsafe external data -> UserError
    graph = model.proto.graph
    initializers = {t.name for t in graph.initializer}
    vocab = token_input = None
    vocabs = vocab_sizes(model.proto)     # token inputs -> rows of the embedding table they index
    if vocabs:
        token_input = "input_ids" if "input_ids" in vocabs else next(iter(vocabs))
        vocab = vocabs[token_input]
    return Interface(Path(path), model, _tensor_infos(graph.input, skip=initializers), _tensor_infos(graph.output),
                     vocab, token_input)


def check_same_interface(orig: Interface, fused: Interface) -> None:
    """The one rule for "these two models can be compared (bench.compare) or timed side by side (bench.latency)";
    anything else is a UserError naming the first difference. Both models must have

    - the same input names and the same output names (as sets: feeds and results go by name, so order does not
      matter; every output of the original is compared, so the fused model needs each one, and no others);
    - for each of those inputs and outputs, the same element type;
    - compatible shapes: the same rank where both ranks are known, and the same size on every axis that both
      models fix to a number (a fixed size against a dynamic or unknown one is compatible).
    """
    a_name, b_name = orig.path.name, fused.path.name
    for kind, a, b in (("input", orig.inputs, fused.inputs), ("output", orig.outputs, fused.outputs)):
        names_a, names_b = [t.name for t in a], [t.name for t in b]
        if set(names_a) != set(names_b):
            only = differences([(f"only {a_name} has", sorted(set(names_a) - set(names_b))),
                                (f"only {b_name} has", sorted(set(names_b) - set(names_a)))])
            fail(f"the models have different {kind}s ({only}); compare a model with its own fused version")
        by_name = {t.name: t for t in b}
        for t in a:
            u = by_name[t.name]
            if t.elem_type != u.elem_type:
                fail(f"{kind} '{t.name}' is {t.dtype_name} in {a_name} but {u.dtype_name} in {b_name}")
            if t.dims is None or u.dims is None:
                continue
            if len(t.dims) != len(u.dims):
                fail(f"{kind} '{t.name}' has rank {len(t.dims)} in {a_name} but {len(u.dims)} in {b_name}")
            for axis, (x, y) in enumerate(zip(t.dims, u.dims)):
                if isinstance(x, int) and isinstance(y, int) and x != y:
                    fail(f"{kind} '{t.name}' has size {x} on axis {axis} in {a_name} but {y} in {b_name}")


def is_language_model_output(out: TensorInfo, vocab: int | None) -> bool:
    if out.np_dtype.kind != "f" or (out.dims and len(out.dims) < 2):
        return False
    if out.name == "logits":
        return True
    return vocab is not None and bool(out.dims) and out.dims[-1] == vocab


# ------------------------------------------------------------------------------------------------- inputs

def comparison_inputs(iface: Interface, inputs: Path | None, shape: tuple[int, int], seed: int) -> tuple[Calibration, dict]:
    """The feeds (from the file, or random: passes.support.calibration.random_inputs) and their description."""
    if inputs is not None:
        calib = calibration_for(iface.model, Path(inputs), warn=False)
    else:
        calib = random_inputs(iface.proto, vocab_sizes(iface.proto), batch=shape[0], seq=shape[1], seed=seed)
    record = {"source": "file" if inputs is not None else "random", "description": calib.source,
              "notes": list(calib.notes), "iterations": 1,
              "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in calib.feeds.items()}}
    if inputs is not None:
        record["path"] = str(inputs)
    else:
        record.update(seed=seed, shape=list(shape), warning=calib.warning)
    return calib, record


# ------------------------------------------------------------------------------------------------- statistics

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


def output_statistics(iface: Interface, iterations, orig_runs, fused_runs, atols: dict, rtols: dict) -> dict:
    """Per output and iteration: polygraphy's error statistics, pass/fail, and where the largest error is."""
    report = {}
    for out in iface.outputs:
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
        report[out.name] = {"dtype": out.dtype_name, "atol": atols[out.name], "rtol": rtols[out.name],
                            "passed": all(r["passed"] for r in rows), "iterations": rows}
    return report


def language_model_statistics(iface: Interface, feeds: dict, orig: dict, fused: dict, real_text: bool) -> dict | None:
    """KL, top-1 and (on real text) perplexity for the logits output, or None when the model has none. The logits
    output, among the outputs that look like a language model's (is_language_model_output): the one
    passes.measure.change.logits_output names (the output named 'logits'), else the first of them."""
    candidates = {o.name: o for o in iface.outputs if is_language_model_output(o, iface.vocab)}
    out = candidates[logits_output(list(candidates)) or next(iter(candidates))] if candidates else None
    if out is None or np.shape(orig[out.name]) != np.shape(fused[out.name]):
        return None
    token = iface.token_input or ("input_ids" if "input_ids" in feeds else None)
    ids = feeds.get(token) if real_text and token is not None else None
    if ids is not None and np.asarray(ids).size * np.shape(orig[out.name])[-1] != np.size(orig[out.name]):
        ids = None          # logits for some positions only (a decode graph's last token, say)
    mask_name = next((n for n in feeds if "attention_mask" in n), None)
    masks = [feeds.get(mask_name)] if ids is not None and mask_name else None
    lm = next_token_metrics([orig[out.name]], [fused[out.name]], None if ids is None else [ids], masks)
    lm = {"output": out.name, "vocab": int(np.shape(orig[out.name])[-1]), **lm}
    if ids is None:
        lm["perplexity_note"] = ("no perplexity: inputs are random token ids, not text" if not real_text
                                 else f"no perplexity: the inputs hold no '{token or 'input_ids'}'")
    return lm


def verdict(outputs: dict, lm: dict | None, max_kl: float | None, min_top1: float | None) -> tuple[bool, list[str]]:
    """(passed, the language-model gates that failed): every output within tolerance, and KL / top-1 within
    --max-kl / --min-top1 when given."""
    if lm is None and (max_kl is not None or min_top1 is not None):
        fail("--max-kl/--min-top1 need a language model (an output named 'logits' or with the vocabulary as last dim)")
    failures = []
    if lm is not None:
        if max_kl is not None and lm["kl_mean"] is not None and not lm["kl_mean"] <= max_kl:
            failures.append(f"KL {lm['kl_mean']:.4g} > --max-kl {max_kl:g}")
        if min_top1 is not None and lm["top1_agreement"] is not None and not lm["top1_agreement"] >= min_top1:
            failures.append(f"top-1 agreement {lm['top1_agreement']:.4f} < --min-top1 {min_top1:g}")
    return all(o["passed"] for o in outputs.values()) and not failures, failures


# ------------------------------------------------------------------------------------------------- running

def _quiet_polygraphy(verbose: bool) -> None:
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(3 if not verbose else 2)
    except Exception:
        pass


def run_both(original: Interface, fused: Interface, feeds: dict, atols: dict, rtols: dict, verbose: bool,
             provider: str | None = "cpu"):
    """polygraphy: both models on the feeds (Comparator.run) and the elementwise check of fused against
    original (Comparator.compare_accuracy). Returns (results, accuracy, seconds)."""
    import warnings

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException
    _quiet_polygraphy(verbose)
    runners = [OnnxrtRunner(SessionFromOnnx(str(iface.path), providers=execution_providers(provider)), name=name)
               for name, iface in (("original", original), ("fused", fused))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            start = time.perf_counter()
            results = Comparator.run(runners, data_loader=[feeds])
            seconds = time.perf_counter() - start
        except Exception as exc:   # PolygraphyException, or onnxruntime's own (load or run failures)
            hint = ""
            if _uses_bfloat16(original.proto) or _uses_bfloat16(fused.proto):
                hint = ("; the models use bfloat16, which onnxruntime's CPU provider may not implement: "
                        "compare fp32 or fp16 exports of the same model")
            name = "" if isinstance(exc, PolygraphyException) else f"{type(exc).__name__}: "
            fail(f"onnxruntime could not run the models: {name}{_first_line(exc)}{hint}")
        compare_func = SimpleCompareFunc(atol=atols, rtol=rtols, check_error_stat="elemwise")
        # (1, 0): fused against original, so relative errors are relative to the original's values
        accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)], compare_func=compare_func)
    return results, accuracy, seconds


def compare(original: Path, fused: Path, *, inputs: Path | None = None, shape: tuple[int, int] = DEFAULT_SHAPE,
            seed: int = DEFAULT_SEED, atol: float | None = None, rtol: float | None = None,
            max_kl: float | None = None, min_top1: float | None = None, verbose: bool = False,
            provider: str | None = "cpu") -> dict:
    """Inputs, both runs (onnxruntime on `provider`), statistics and verdict; returns the report dict."""
    start = time.perf_counter()
    original, fused = Path(original), Path(fused)
    if original.resolve() == fused.resolve():
        fail(f"both arguments are {original}; give the original and the fused model")
    orig_if, fused_if = model_interface(original), model_interface(fused)
    check_same_interface(orig_if, fused_if)
    calib, input_record = comparison_inputs(orig_if, inputs, shape, seed)
    out_types = {o.name: o.elem_type for o in orig_if.outputs}
    atols = {n: atol if atol is not None else default_tolerance(t) for n, t in out_types.items()}
    rtols = {n: rtol if rtol is not None else default_tolerance(t) for n, t in out_types.items()}
    results, accuracy, run_s = run_both(orig_if, fused_if, calib.feeds, atols, rtols, verbose, provider)
    iterations = next(iter(accuracy[0].values()))
    outputs = output_statistics(orig_if, iterations, results["original"], results["fused"], atols, rtols)
    lm = language_model_statistics(orig_if, calib.feeds, results["original"][0], results["fused"][0], inputs is not None)
    passed, lm_failures = verdict(outputs, lm, max_kl, min_top1)
    if lm is not None:
        lm.update(thresholds={"max_kl": max_kl, "min_top1": min_top1}, failures=lm_failures, passed=not lm_failures)
    return {
        "tool": "bench.compare",
        "original": str(original),
        "fused": str(fused),
        "runtime": "onnxruntime CPUExecutionProvider via polygraphy OnnxrtRunner",
        "check": "polygraphy SimpleCompareFunc elemwise: an element fails when abs error > atol and rel error > rtol;"
                 " rel error = |fused - original| / |original|",
        "inputs": input_record,
        "outputs": outputs,
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
