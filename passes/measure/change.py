"""Model-level change: how far a changed model (fused, attention dropped, healed) is from the original, on the
same inputs. One implementation for every tool (passes.fuse --plan auto, passes.drop_attention --rank,
bench.compare, the studies).

For every output: relative error |a - b| / |a| (Frobenius, float64) and max abs error. For language-model logits
[batch, seq, vocab]: mean over tokens of KL(p_original || p_changed) of the next-token distributions (log-softmax
in float64), top-1 agreement, and with the input ids the perplexity of both models (logits at t predict id t+1).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from passes.support.calibration import calibration_for
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel, execution_providers, load_model, ort_session, run_session

TOKEN_CHUNK = 256      # next-token metrics are computed this many tokens at a time (vocab-sized float64 rows)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_metrics(orig: list[np.ndarray], fused: list[np.ndarray], ids: list[np.ndarray] | None,
                       masks: list[np.ndarray | None] | None) -> dict:
    """KL(p_orig || p_fused) per token, top-1 agreement, and (with ids) the perplexity of both models.

    orig/fused: logits [batch, seq, vocab] per iteration. ids: input ids [batch, seq] per iteration; the logits
    at position t predict ids[t + 1] (masked by the attention mask, where one is given).
    """
    kl_all, agree, tokens = [], 0, 0
    nll_o = nll_f = 0.0
    predictions = 0
    for it, (lo, lf) in enumerate(zip(orig, fused)):
        vocab = lo.shape[-1]
        ro, rf = lo.reshape(-1, vocab), lf.reshape(-1, vocab)
        targets = valid = None
        if ids is not None:
            x = np.asarray(ids[it]).reshape(lo.shape[:-1])
            nxt = np.zeros_like(x)
            nxt[..., :-1] = x[..., 1:]
            ok = np.zeros(x.shape, bool)
            ok[..., :-1] = True
            if masks is not None and masks[it] is not None:
                m = np.asarray(masks[it]).reshape(x.shape).astype(bool)
                ok[..., :-1] &= m[..., :-1] & m[..., 1:]
            targets, valid = nxt.reshape(-1), ok.reshape(-1)
        for s in range(0, ro.shape[0], TOKEN_CHUNK):
            po, pf = log_softmax(ro[s:s + TOKEN_CHUNK]), log_softmax(rf[s:s + TOKEN_CHUNK])
            kl_all.append((np.exp(po) * (po - pf)).sum(-1))
            agree += int((po.argmax(-1) == pf.argmax(-1)).sum())
            tokens += po.shape[0]
            if targets is not None:
                t, v = targets[s:s + TOKEN_CHUNK], valid[s:s + TOKEN_CHUNK]
                rows = np.nonzero(v)[0]
                nll_o -= float(po[rows, t[rows]].sum())
                nll_f -= float(pf[rows, t[rows]].sum())
                predictions += len(rows)
    kl = np.concatenate(kl_all) if kl_all else np.zeros(0)
    result = {
        "tokens": tokens,
        "kl_mean": float(kl.mean()) if kl.size else None,
        "kl_median": float(np.median(kl)) if kl.size else None,
        "kl_max": float(kl.max()) if kl.size else None,
        "top1_agreement": agree / tokens if tokens else None,
        "top1_agree_count": agree,
    }
    if ids is not None:
        result["predictions"] = predictions
        if predictions:
            result["nll_original"] = nll_o / predictions
            result["nll_fused"] = nll_f / predictions
            result["perplexity_original"] = math.exp(nll_o / predictions)
            result["perplexity_fused"] = math.exp(nll_f / predictions)
    return result


def next_token_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> tuple[float, float]:
    """(mean KL(softmax(a) || softmax(b)) in nats, top-1 agreement) over all tokens of one pair of logits."""
    metrics = next_token_metrics([logits_a], [logits_b], None, None)
    return metrics["kl_mean"], metrics["top1_agreement"]


def logits_output(names: Sequence[str]) -> str | None:
    """The output holding next-token logits: the one named 'logits' (the name torch.onnx exports of transformers
    models, onnxruntime-genai's builder and our exporters give it); None when no output is so named. The one rule
    every tool uses."""
    return "logits" if "logits" in names else None


def measured_output(names: Sequence[str]) -> tuple[str, bool]:
    """(output, is_logits): the output a model-level change is measured on: the logits (next-token KL), else the
    first output (relative squared error)."""
    logits = logits_output(names)
    return (logits, True) if logits else (names[0], False)


def measure_change(original, changed, inputs=None, provider: str | None = "cpu") -> dict:
    """Run both models (LoadedModel or path) on the same calibration inputs (see calibration.calibration_for) and
    compare every output: relative error |a - b| / |a| (Frobenius, float64) and max abs error; for the logits
    (logits_output) also the mean KL(p_original || p_changed) of the next-token distributions and top-1 agreement."""
    original = original if isinstance(original, LoadedModel) else load_model(original)
    changed = changed if isinstance(changed, LoadedModel) else load_model(changed)
    calib = calibration_for(original, inputs)
    calibration_for(changed, calib)        # the changed model must take the same inputs
    results = []
    for model in (original, changed):
        session = ort_session(model.path, providers=execution_providers(provider))
        names = [o.name for o in session.get_outputs()]
        results.append(dict(zip(names, run_session(session, None, calib.feeds))))
        del session
    a_out, b_out = results
    original_path, fused_path = original.path, changed.path
    common = [n for n in a_out if n in b_out]
    if not common:
        fail(f"{fused_path} has none of the outputs of {original_path} ({', '.join(a_out)})")
    record: dict = {"inputs": calib.record(), "outputs": {}}
    for name in common:
        a = np.asarray(a_out[name], dtype=np.float64)
        b = np.asarray(b_out[name], dtype=np.float64)
        if a.shape != b.shape:
            record["outputs"][name] = {"error": f"shape {list(a.shape)} vs {list(b.shape)}"}
            continue
        denom = float(np.linalg.norm(a))
        rec = {"relative_error": float(np.linalg.norm(a - b) / denom) if denom else float(np.linalg.norm(a - b)),
               "max_abs_error": float(np.max(np.abs(a - b))) if a.size else 0.0}
        if name == logits_output(common) and a.ndim >= 2 and a.shape[-1] > 1:
            kl, top1 = next_token_agreement(a, b)
            rec.update(kl=kl, top1_agreement=top1)
            record["kl"], record["top1_agreement"] = kl, top1
        record["outputs"][name] = rec
    record["relative_error"] = max((r.get("relative_error", float("inf")) for r in record["outputs"].values()), default=None)
    return record


def change_summary(change: dict) -> str:
    """One or two lines for the fuse CLI."""
    parts = [f"relative output error {change['relative_error']:.3g}"] if change.get("relative_error") is not None else []
    if "kl" in change:
        parts.append(f"next-token KL {change['kl']:.4g} nats, top-1 agreement {change['top1_agreement']:.1%}")
    tokens = change["inputs"]["tokens"]
    return f"  change on {tokens} calibration tokens: " + ", ".join(parts)
