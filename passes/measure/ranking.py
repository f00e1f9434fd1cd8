"""Measurement: what removing each sublayer alone would cost, without running the whole model per sublayer.

Per sublayer s (x' = x + a) on calibration inputs, tokens = batch x sequence positions:
    cosdist = mean_tokens 1 - cos(x, x')        ratio = mean_tokens |a| / |x|
    kl      = mean_tokens KL(p(X) || p_{-s}(X))  top1 = fraction of tokens whose argmax is unchanged
where p is the model's next-token distribution and p_{-s} the model with a replaced by zeros (x' = x, exactly the
removal passes.attention.drop makes). One base run exposes every x, a and the logits; each removal then runs only the part
of the graph downstream of s (passes.measure.runs.SuffixRuns), so ranking n sublayers costs 1 + sum of the suffix
fractions forward-pass equivalents, about n/2 + 1 when the lm_head is small.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from onnx import TensorProto

from passes.attention.stream import Sublayer
from passes.measure.change import logits_output, next_token_agreement
from passes.measure.metrics import cosine_distance, norm_ratio
from passes.measure.runs import Cost, SuffixRuns
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel


def rank_sublayers(model: LoadedModel, sublayers: Sequence[Sublayer], feeds: Mapping[str, np.ndarray], *,
                   progress: bool = True, provider: str | None = "cpu") -> tuple[list[dict], Cost]:
    """One record per sublayer (layer, cosdist, ratio, kl_removed_alone, top1_removed_alone), in stream order,
    and what the measurement cost."""
    graph = model.proto.graph
    logits = logits_output([o.name for o in graph.output])
    if logits is None:
        fail("--rank measures next-token KL: the model needs an output named 'logits' "
             f"(it has {', '.join(o.name for o in graph.output)})")
    logits_type = next(o.type.tensor_type.elem_type for o in graph.output if o.name == logits)
    float_names = {name for s in sublayers if s.data_type == TensorProto.BFLOAT16 for name in (s.residual_in, s.contribution)}
    if logits_type == TensorProto.BFLOAT16:
        float_names.add(logits)
    base_targets = list(dict.fromkeys([logits, *(t for s in sublayers for t in (s.residual_in, s.contribution))]))
    removals = [(s, [logits], f"remove layer {s.layer}") for s in sublayers]
    records = []
    with SuffixRuns(model, feeds, base_targets, removals, float_names=float_names, progress=progress, provider=provider,
                    desc="removing one sublayer at a time") as runs:
        base = runs.base()
        for k, s in enumerate(sublayers):
            x, a = base[s.residual_in], base[s.contribution]
            kl, top1 = next_token_agreement(base[logits], runs.removal(k)[logits])
            records.append({"layer": s.layer, "kind": s.kind, "residual_node": s.residual_node_name,
                            "cosdist": float(np.nanmean(cosine_distance(x, x.astype(np.float64) + a))),
                            "ratio": float(np.nanmean(norm_ratio(a, x))),
                            "kl_removed_alone": kl, "top1_removed_alone": top1})
        cost = runs.cost()
    return records, cost
