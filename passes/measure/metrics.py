"""Analysis (measured between chains and plan): how much each FFN block changes the residual stream, and how much block j depends on block i.

On calibration inputs X (tokens = all batch x sequence positions; norms and cosines over the last axis), with
x_t the residual input of block t, h_t = FFN_t(n(x_t) g_t) its contribution and x'_t = x_t + h_t:
    cosdist_io[t] = mean_tokens 1 - cos(x_t, x'_t)
    ratio[t]      = mean_tokens |h_t| / |x_t|
    M[i][j]       = mean_tokens 1 - cos(h_j(X), h_j^(-i)(X))   for i < j (0 for j <= i)
where h_j^(-i) is block j's contribution when block i's contribution is removed (x'_i = x_i) and everything else
runs as usual. 1 - cos(a, b) is computed in float64 as |a/|a| - b/|b||^2 / 2 (no cancellation for small
distances); two zero vectors have distance 0, one zero vector distance 1.

How it is computed, frugally, through onnxruntime (passes.measure.runs.SuffixRuns): one base run of the graph
cut down to what the selected blocks need, with every x_t, h_t exposed; then one removal run per selected block i
that has a later block j to measure, of only the part of the graph downstream of block i, up to the last
contribution needed. The whole matrix costs about n/2 forward-pass equivalents for n blocks (the report's cost).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from onnx import TensorProto

from passes.ffn.plan import CandidateCost
from passes.ffn.structure import ModelStructure, model_structure
from passes.measure.change import measured_output
from passes.measure.predict import (
    PREDICTION_DEFINITION,
    PROBE_TOKENS,
    FFNProbe,
    candidate_spans,
    group_ends,
    output_change,
    pair_contributions,
    predict_costs,
)
from passes.measure.runs import Cost, SuffixRuns
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel, load_model
from passes.support.ranges import expand, parse_ranges
from passes.support.report import finite_or_none

SCOPES = ("all", "chains")

@dataclass
class Metrics:
    """Per-block metrics and the dependency matrix for `ordinals` (ascending).

    dependency[a][b] is M[ordinals[a]][ordinals[b]]: 0.0 for b <= a, None where it was not measured
    (scope "chains": pairs in different chains)."""
    ordinals: list[int]
    cosdist_io: list[float]
    ratio: list[float]
    dependency: list[list[float | None]]
    cost: Cost
    tokens: int = 0
    scope: str = "all"
    candidates: list[CandidateCost] = field(default_factory=list)   # predicted costs (passes.measure.predict)
    change_unit: str | None = None       # "kl" or "relative_squared_error": the unit of predicted_cost

    def max_m(self, first: int, last: int) -> float | None:
        """max M[i][j] over pairs i < j of first..last (None when a pair was not measured)."""
        run = range(first, last + 1)
        if not set(run) <= set(self.ordinals):
            return None
        values = [self.m(i, j) for i in run for j in run if i < j]
        return None if any(v is None for v in values) else max(values, default=0.0)

    def position(self, ordinal: int) -> int:
        return self.ordinals.index(ordinal)

    def m(self, i: int, j: int) -> float | None:
        """M[i][j] by ordinals (None when not measured)."""
        return self.dependency[self.position(i)][self.position(j)]

    def record(self) -> dict:
        """`metrics`, `dependency` and `cost` entries of the analyze report."""
        return {
            "metrics": {str(o): {"cosdist_io": finite_or_none(c), "ratio": finite_or_none(r)}
                        for o, c, r in zip(self.ordinals, self.cosdist_io, self.ratio)},
            "dependency": {"ordinals": list(self.ordinals), "scope": self.scope,
                           "matrix": [[finite_or_none(v) for v in row] for row in self.dependency]},
            "tokens": self.tokens,
            "cost": self.cost.record(),
            **({"candidates": {"unit": self.change_unit, "definition": PREDICTION_DEFINITION,
                               "groups": [{**c.record(), "max_m": finite_or_none(self.max_m(c.first, c.last))}
                                          for c in self.candidates]}} if self.candidates else {}),
        }


# ---------------------------------------------------------------- distances

def _unit_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1])
    norms = np.sqrt(np.einsum("td,td->t", a, a))
    return a / np.where(norms > 0, norms, 1.0)[:, None], norms


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token 1 - cos(a_t, b_t) over the last axis, in float64, as |a/|a| - b/|b||^2 / 2."""
    ua, na = _unit_rows(a)
    ub, nb = _unit_rows(b)
    diff = ua - ub
    dist = 0.5 * np.einsum("td,td->t", diff, diff)
    return np.where((na == 0) != (nb == 0), 1.0, dist)


def norm_ratio(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-token |h_t| / |x_t| over the last axis (tokens with x_t = 0 give nan and are left out of means)."""
    _, nh = _unit_rows(h)
    _, nx = _unit_rows(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nx > 0, nh / np.where(nx > 0, nx, 1.0), np.nan)


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def parse_block_spec(spec: str, n_blocks: int) -> list[int]:
    """'3-10' or '1,4,6-9' -> sorted unique ordinals; malformed or out of range -> UserError."""
    if n_blocks == 0:
        fail("the model has no FFN blocks")
    ordinals = expand(parse_ranges(spec, "--blocks", "3-10 or 1,4,6-9"))
    if ordinals[-1] >= n_blocks:
        fail(f"block {ordinals[-1]} in --blocks '{spec}' is out of range: the model has {n_blocks} FFN blocks "
             f"(ordinals 0-{n_blocks - 1})")
    return ordinals


def compute_metrics(model: LoadedModel | str, feeds: Mapping[str, np.ndarray], ordinals: Sequence[int] | None = None, *,
                    scope: str = "all", progress: bool = True, structure: ModelStructure | None = None,
                    predict: int | None = None, probe_tokens: int = PROBE_TOKENS, provider: str | None = "cpu") -> Metrics:
    """cosdist_io, ratio and the dependency matrix M for `ordinals` (default: every FFN block) on `feeds`
    (already validated, see passes.support.calibration); `structure` is the model's (model_structure), found here when not given. scope "chains" measures M only between blocks of one chain.
    With `predict` = G, also the predicted cost of fusing every run of 2..G blocks of a chain among `ordinals`
    (passes.measure.predict), from the same runs plus suffix runs to the output for the blocks that end a run.
    `provider`: where onnxruntime runs (passes.support.onnx_io.resolve_provider)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    proto = model.proto
    structure = structure or model_structure(proto)
    blocks, chains = structure.blocks, structure.chains
    if not blocks:
        fail("the model has no FFN blocks to analyze")
    ordinals = sorted(set(range(len(blocks)) if ordinals is None else ordinals))
    if not ordinals:
        fail("no FFN blocks selected")
    if ordinals[-1] >= len(blocks) or ordinals[0] < 0:
        fail(f"block {ordinals[-1]} is out of range: the model has {len(blocks)} FFN blocks (ordinals 0-{len(blocks) - 1})")
    chain_of = {o: k for k, c in enumerate(chains or []) for o in c.ordinals}
    later: dict[int, list[int]] = {}
    for a, i in enumerate(ordinals):
        js = [j for j in ordinals[a + 1:] if scope == "all" or chain_of.get(j) == chain_of.get(i)]
        if js:
            later[i] = js
    spans = candidate_spans(chains, ordinals, predict, blocks) if predict else []
    ends = set(group_ends(spans))
    output, is_logits = measured_output([o.name for o in proto.graph.output]) if spans else (None, False)
    x_names = {o: blocks[o].residual_in for o in ordinals}
    h_names = {o: blocks[o].contribution for o in ordinals}
    bf16 = {name for b in blocks if b.data_type == TensorProto.BFLOAT16 for name in (b.residual_in, b.contribution)}
    removed = sorted(later)
    removals = [(blocks[i], [blocks[j].contribution for j in later[i]], f"remove {i}") for i in removed]
    removals += [(blocks[z], [output], f"pair {z - 1}-{z}", True) for z in sorted(ends)]
    base_targets = list(dict.fromkeys([*x_names.values(), *h_names.values(), *([output] if output else [])]))
    with SuffixRuns(model, feeds, base_targets, removals, float_names=bf16, progress=progress, provider=provider) as runs:
        base = runs.base()
        xs = {o: base[x_names[o]] for o in ordinals}
        hs = {o: base[h_names[o]] for o in ordinals}
        cosdist = [_mean(cosine_distance(xs[o], xs[o].astype(np.float64) + hs[o].astype(np.float64))) for o in ordinals]
        ratio = [_mean(norm_ratio(hs[o], xs[o])) for o in ordinals]
        tokens = int(hs[ordinals[0]].size // hs[ordinals[0]].shape[-1])
        pos = {o: a for a, o in enumerate(ordinals)}
        matrix: list[list[float | None]] = [[0.0 if b <= a else None for b in range(len(ordinals))] for a in range(len(ordinals))]
        for k, i in enumerate(removed):
            result = runs.removal(k)
            for j in later[i]:
                matrix[pos[i]][pos[j]] = _mean(cosine_distance(hs[j], result[blocks[j].contribution]))
        candidates = []
        if spans:
            probe = FFNProbe(model)
            pairs = pair_contributions(sorted(ends), blocks, xs, probe)
            change = {}
            for k, z in enumerate(sorted(ends), start=len(removed)):
                change[z] = output_change(base[output], runs.removal(k, pairs[z])[output], is_logits)
            candidates = predict_costs(spans, blocks, xs, hs, change, pairs, probe, probe_tokens)
            runs.charge("FFN probes", probe.flops / tokens, probe.seconds)
        cost = runs.cost()
    return Metrics(list(ordinals), cosdist, ratio, matrix, cost, tokens, scope, candidates,
                   ("kl" if is_logits else "relative_squared_error") if spans else None)
