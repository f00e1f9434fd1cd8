"""Analysis (measured between chains and plan): how much each FFN block changes the residual stream, and how much block j depends on block i.

On calibration inputs X (tokens = all batch x sequence positions; norms and cosines over the last axis), with
x_t the residual input of block t, h_t = FFN_t(n(x_t) g_t) its contribution and x'_t = x_t + h_t:
    cosdist_io[t] = mean_tokens 1 - cos(x_t, x'_t)
    ratio[t]      = mean_tokens |h_t| / |x_t|
    M[i][j]       = mean_tokens 1 - cos(h_j(X), h_j^(-i)(X))   for i < j (0 for j <= i)
where h_j^(-i) is block j's contribution when block i's contribution is removed (x'_i = x_i) and everything else
runs as usual. 1 - cos(a, b) is computed in float64 as |a/|a| - b/|b||^2 / 2 (no cancellation for small
distances); two zero vectors have distance 0, one zero vector distance 1.

How it is computed, frugally, through onnxruntime: one base run of the graph cut down to what the selected blocks
need, and one removal run per selected block i that has a later block j to measure, of only the part of the
graph after block i, up to the last contribution needed: about n/2 forward-pass equivalents for n blocks (the
report's cost). Two executions give the same numbers:
  segments (default, passes.measure.streams): the graph cut at residual nodes into segments of about one
      sublayer; each segment's session is made once and every run (a stream) goes through it before the next,
      so the weights are read once; distances are taken where the values are, as the streams pass (M's of
      one site together, in as few runs as fit: passes.measure.reductions.Reductions.cosines).
  suffix (passes.measure.runs.SuffixRuns): every x_t, h_t exposed by the base run, then one session per removal
      over the rest of the graph (the weights read about n/2 times).
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
    forward_needed,
    group_ends,
    output_change,
    pair_contributions,
    predict_costs,
    probe_forward,
    probe_rows,
)
from passes.measure.reductions import zero_rule
from passes.measure.runs import Cost, SuffixRuns
from passes.measure.streams import BASE, ZERO, Observation, Source, Stream, StreamRuns
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel, load_model
from passes.support.ranges import expand, parse_ranges
from passes.support.report import finite_or_none

SCOPES = ("all", "chains")
EXECUTIONS = ("segments", "suffix")
PROBES = "FFN probes"

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
    return zero_rule(0.5 * np.einsum("td,td->t", diff, diff), na, nb)


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


@dataclass
class AnalysisRequest:
    """What one analysis measures: blocks `ordinals`; for each block i with later blocks to measure, later[i];
    the candidate spans and the output their changes are measured on."""
    model: LoadedModel
    structure: ModelStructure
    ordinals: list[int]
    scope: str
    later: dict[int, list[int]]
    spans: list[tuple[int, int]]
    output: str | None
    is_logits: bool
    probe_tokens: int

    @property
    def ends(self) -> list[int]:
        return group_ends(self.spans)

    def matrix(self) -> list[list[float | None]]:
        n = len(self.ordinals)
        return [[0.0 if b <= a else None for b in range(n)] for a in range(n)]

    def metrics(self, stats: Mapping[int, tuple[float, float]], matrix, cost: Cost, tokens: int,
                candidates: list[CandidateCost]) -> Metrics:
        return Metrics(list(self.ordinals), [stats[o][0] for o in self.ordinals], [stats[o][1] for o in self.ordinals],
                       matrix, cost, tokens, self.scope, candidates,
                       ("kl" if self.is_logits else "relative_squared_error") if self.spans else None)


def compute_metrics(model: LoadedModel | str, feeds: Mapping[str, np.ndarray], ordinals: Sequence[int] | None = None, *,
                    scope: str = "all", progress: bool = True, structure: ModelStructure | None = None,
                    predict: int | None = None, probe_tokens: int = PROBE_TOKENS, provider: str | None = "cpu",
                    execution: str = "segments") -> Metrics:
    """cosdist_io, ratio and the dependency matrix M for `ordinals` (default: every FFN block) on `feeds`
    (already validated, see passes.support.calibration); `structure` is the model's (model_structure), found here when not given. scope "chains" measures M only between blocks of one chain.
    With `predict` = G, also the predicted cost of fusing every run of 2..G blocks of a chain among `ordinals`
    (passes.measure.predict), from the same runs plus runs to the output for the blocks that end a run.
    `provider`: where onnxruntime runs (passes.support.onnx_io.resolve_provider); `execution`: "segments" or
    "suffix" (see the module docstring)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}")
    request = analysis_request(model, ordinals, scope=scope, structure=structure, predict=predict, probe_tokens=probe_tokens)
    run = _segment_metrics if execution == "segments" else _suffix_metrics
    return run(request, feeds, progress, provider)


def analysis_request(model: LoadedModel | str, ordinals: Sequence[int] | None = None, *, scope: str = "all",
                     structure: ModelStructure | None = None, predict: int | None = None,
                     probe_tokens: int = PROBE_TOKENS) -> AnalysisRequest:
    """What compute_metrics measures (its arguments checked): the blocks, the removals, the candidate spans."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    structure = structure or model_structure(model.proto)
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
    output, is_logits = measured_output([o.name for o in model.proto.graph.output]) if spans else (None, False)
    return AnalysisRequest(model, structure, ordinals, scope, later, spans, output, is_logits, probe_tokens)


def _suffix_metrics(req: AnalysisRequest, feeds: Mapping[str, np.ndarray], progress: bool, provider: str | None) -> Metrics:
    """The metrics from a base run and one suffix run per removal and per group end (passes.measure.runs)."""
    blocks, ordinals, output = req.structure.blocks, req.ordinals, req.output
    bf16 = {name for b in blocks if b.data_type == TensorProto.BFLOAT16 for name in (b.residual_in, b.contribution)}
    removed = sorted(req.later)
    removals = [(blocks[i], [blocks[j].contribution for j in req.later[i]], f"remove {i}") for i in removed]
    removals += [(blocks[z], [output], f"pair {z - 1}-{z}", True) for z in req.ends]
    base_targets = list(dict.fromkeys([*(blocks[o].residual_in for o in ordinals), *(blocks[o].contribution for o in ordinals),
                                       *([output] if output else [])]))
    with SuffixRuns(req.model, feeds, base_targets, removals, float_names=bf16, progress=progress, provider=provider) as runs:
        base = runs.base()
        xs = {o: base[blocks[o].residual_in] for o in ordinals}
        hs = {o: base[blocks[o].contribution] for o in ordinals}
        stats = {o: (_mean(cosine_distance(xs[o], xs[o].astype(np.float64) + hs[o].astype(np.float64))),
                     _mean(norm_ratio(hs[o], xs[o]))) for o in ordinals}
        tokens = int(hs[ordinals[0]].size // hs[ordinals[0]].shape[-1])
        pos = {o: a for a, o in enumerate(ordinals)}
        matrix = req.matrix()
        for k, i in enumerate(removed):
            result = runs.removal(k)
            for j in req.later[i]:
                matrix[pos[i]][pos[j]] = _mean(cosine_distance(hs[j], result[blocks[j].contribution]))
        candidates = []
        if req.spans:
            probe = FFNProbe(req.model)
            pairs = pair_contributions(req.ends, blocks, xs, probe)
            change = {z: output_change(base[output], runs.removal(k, pairs[z])[output], req.is_logits)
                      for k, z in enumerate(req.ends, start=len(removed))}
            rows = probe_rows(tokens, req.probe_tokens)

            def flat(v: np.ndarray) -> np.ndarray:
                return np.asarray(v).reshape(-1, v.shape[-1])[rows]

            x_rows, h_rows = {o: flat(xs[o]) for o in ordinals}, {o: flat(hs[o]) for o in ordinals}
            forward = {(z - 1, z): flat(pairs[z]) for z in req.ends}
            forward.update(probe_forward(forward_needed(req.spans), blocks, x_rows, probe))
            candidates = predict_costs(req.spans, x_rows, h_rows, forward, change)
            runs.charge(PROBES, probe.flops / tokens, probe.seconds, probe.bytes_read)
        cost = runs.cost()
    return req.metrics(stats, matrix, cost, tokens, candidates)


def metric_streams(req: AnalysisRequest) -> tuple[list[Stream], dict[str, tuple]]:
    """The streams of an analysis (see _segment_metrics) and the role of each: ("remove", i), ("pair", z) or
    ("probe", (a, t))."""
    r = {o: req.structure.blocks[o].residual_node for o in req.ordinals}
    role: dict[str, tuple] = {f"remove {i}": ("remove", i) for i in req.later}
    streams = [Stream(f"remove {i}", r[i], r[req.later[i][-1]]) for i in sorted(req.later)]
    for z in req.ends:
        streams.append(Stream(f"pair {z - 1}-{z}", r[z], None, a=Source(f"remove {z - 1}", r[z], "a")))
        role[streams[-1].label] = ("pair", z)
    for t, sources in forward_needed(req.spans).items():
        for a in sources:
            streams.append(Stream(f"probe {a}-{t}", r[t - 1], r[t], a=ZERO, x=Source(BASE, r[a], "x"), part=PROBES))
            role[streams[-1].label] = ("probe", (a, t))
    return streams, role


def _segment_metrics(req: AnalysisRequest, feeds: Mapping[str, np.ndarray], progress: bool, provider: str | None) -> Metrics:
    """The metrics from segment-major streams (passes.measure.streams): the base run, one removal stream per
    block with later blocks to measure, one stream per group end in which that block's contribution is the one
    it makes after the previous block's removal (F_z(x_{z-1}): the fused pair) to the output, and one stream
    per F_t(x_a) a longer group needs (block t - 1 handed x_a and no contribution)."""
    blocks, ordinals, spans = req.structure.blocks, req.ordinals, req.spans
    streams, role = metric_streams(req)
    runs = StreamRuns(req.model, feeds, [blocks[o] for o in ordinals], streams, [req.output] if spans else [],
                      net=req.structure.index, provider=provider, progress=progress)
    ordinal = {blocks[o].residual_node: o for o in ordinals}
    pos = {o: a for a, o in enumerate(ordinals)}
    in_spans = {o for a, z in spans for o in range(a, z + 1)}
    matrix, stats, x_rows, h_rows, forward, change = req.matrix(), {}, {}, {}, {}, {}
    base_at = base_out = rows = None
    tokens = 0
    pending: list[tuple[int, int, object]] = []     # (i, j, h_j^(-i)) seen at base_at's site, M[i][j] not yet taken

    def measure_pending() -> None:
        """M[i][j] of the pending contributions: their cosines against the base's, in as few runs as fit."""
        if not pending:
            return
        for (i, j, _), distance in zip(pending, runs.reduce.cosines(base_at.a, [h for *_, h in pending])):
            matrix[pos[i]][pos[j]] = _mean(distance)
        pending.clear()

    for event in runs:
        if isinstance(event, Observation):
            o = ordinal[event.site]
            kind, which = role.get(event.label, (BASE, None))
            if kind == BASE:        # the base passes each site first: what was pending there is complete
                measure_pending()
                base_at = event
                if rows is None:
                    tokens = int(np.prod(event.a.shape()[:-1]))
                    rows = probe_rows(tokens, req.probe_tokens)
                cos, ratio = runs.reduce.residual(event.x, event.a)
                stats[o] = (_mean(cos), _mean(ratio))
                if o in in_spans:
                    x_rows[o], h_rows[o] = runs.reduce.rows(event.x, rows), runs.reduce.rows(event.a, rows)
            elif kind == "remove" and o in req.later[which]:
                pending.append((which, o, event.a))
                if len(pending) == runs.reduce.cosine_batch(event.a):    # a big model's values are not held
                    measure_pending()
                if o in req.ends and o == which + 1:
                    forward[which, o] = runs.reduce.rows(event.a, rows)
            elif kind == "probe":
                forward[which] = runs.reduce.rows(event.a, rows)
        elif event.label == BASE:
            base_out = event.values[req.output]
        else:
            change[role[event.label][1]] = _output_change(runs, base_out, event.values[req.output], req.is_logits)
    measure_pending()
    candidates = predict_costs(spans, x_rows, h_rows, forward, change) if spans else []
    return req.metrics(stats, matrix, runs.cost(), tokens, candidates)


def _output_change(runs: StreamRuns, base, changed, logits: bool) -> float:
    """passes.measure.predict.output_change of two output values, the KL computed where they are."""
    if logits:
        return runs.reduce.next_token(base, changed)[0]
    return output_change(runs.reduce.host(base), runs.reduce.host(changed), False)
