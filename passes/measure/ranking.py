"""Measurement: what removing each sublayer alone would cost, without running the whole model per sublayer.

Per sublayer s (x' = x + a) on calibration inputs, tokens = batch x sequence positions:
    cosdist = mean_tokens 1 - cos(x, x')        ratio = mean_tokens |a| / |x|
    kl      = mean_tokens KL(p(X) || p_{-s}(X))  top1 = fraction of tokens whose argmax is unchanged
where p is the model's next-token distribution and p_{-s} the model with a replaced by zeros (x' = x, exactly the
removal passes.attention.drop makes). One base run gives every x, a and the logits; each removal then runs only the
part of the graph after s, so ranking n sublayers costs 1 + the sum of those fractions in forward-pass equivalents,
about n/2 + 1 when the lm_head is small. Executions as in passes.measure.metrics: "segments" (each segment's
weights loaded once, every removal pushed through it; KL taken where the logits are) or "suffix" (one session
per removal).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from onnx import TensorProto

from passes.attention.stream import Sublayer
from passes.measure.change import logits_output, next_token_agreement
from passes.measure.metrics import EXECUTIONS, cosine_distance, norm_ratio
from passes.measure.runs import Cost, SuffixRuns
from passes.measure.streams import BASE, Observation, Stream, StreamRuns
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel


def rank_sublayers(model: LoadedModel, sublayers: Sequence[Sublayer], feeds: Mapping[str, np.ndarray], *,
                   progress: bool = True, provider: str | None = "cpu", execution: str = "segments") -> tuple[list[dict], Cost]:
    """One record per sublayer (layer, cosdist, ratio, kl_removed_alone, top1_removed_alone), in stream order,
    and what the measurement cost."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}")
    graph = model.proto.graph
    logits = logits_output([o.name for o in graph.output])
    if logits is None:
        fail("--rank measures next-token KL: the model needs an output named 'logits' "
             f"(it has {', '.join(o.name for o in graph.output)})")
    rank = _rank_segments if execution == "segments" else _rank_suffix
    stats, changes, cost = rank(model, sublayers, feeds, logits, progress, provider)
    records = [{"layer": s.layer, "kind": s.kind, "residual_node": s.residual_node_name, "cosdist": cosdist, "ratio": ratio,
                "kl_removed_alone": kl, "top1_removed_alone": top1}
               for s, (cosdist, ratio), (kl, top1) in zip(sublayers, stats, changes)]
    return records, cost


def _rank_suffix(model, sublayers, feeds, logits, progress, provider) -> tuple[list, list, Cost]:
    """(cosdist, ratio) and (KL, top-1) per sublayer from a base run and one suffix run per removal."""
    logits_type = next(o.type.tensor_type.elem_type for o in model.proto.graph.output if o.name == logits)
    float_names = {name for s in sublayers if s.data_type == TensorProto.BFLOAT16 for name in (s.residual_in, s.contribution)}
    if logits_type == TensorProto.BFLOAT16:
        float_names.add(logits)
    base_targets = list(dict.fromkeys([logits, *(t for s in sublayers for t in (s.residual_in, s.contribution))]))
    removals = [(s, [logits], f"remove layer {s.layer}") for s in sublayers]
    stats, changes = [], []
    with SuffixRuns(model, feeds, base_targets, removals, float_names=float_names, progress=progress, provider=provider,
                    desc="removing one sublayer at a time") as runs:
        base = runs.base()
        for k, s in enumerate(sublayers):
            x, a = base[s.residual_in], base[s.contribution]
            changes.append(next_token_agreement(base[logits], runs.removal(k)[logits]))
            stats.append((float(np.nanmean(cosine_distance(x, x.astype(np.float64) + a))), float(np.nanmean(norm_ratio(a, x)))))
        cost = runs.cost()
    return stats, changes, cost


def _rank_segments(model, sublayers, feeds, logits, progress, provider) -> tuple[list, list, Cost]:
    """(cosdist, ratio) and (KL, top-1) per sublayer from segment-major streams: the base run and one removal
    stream per sublayer, to the logits."""
    streams = [Stream(f"remove layer {s.layer}", s.residual_node, None) for s in sublayers]
    runs = StreamRuns(model, feeds, sublayers, streams, [logits], provider=provider, progress=progress,
                      desc="removing one sublayer at a time")
    stats, changes, base_logits = {}, {}, None
    for event in runs:
        if isinstance(event, Observation):
            if event.label == BASE:
                cos, ratio = runs.reduce.residual(event.x, event.a)
                stats[event.site] = (float(np.nanmean(cos)), float(np.nanmean(ratio)))
        elif event.label == BASE:
            base_logits = event.values[logits]
        else:
            changes[event.label] = runs.reduce.next_token(base_logits, event.values[logits])
    return [stats[s.residual_node] for s in sublayers], [changes[s.label] for s in streams], runs.cost()
