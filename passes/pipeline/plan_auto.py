"""Stage 4 (measured): choose groups from what the analysis measured on calibration inputs.

Budget rule (the default of `passes.fuse --plan auto`, `plan_by_budget`): every run of 2..max_group blocks
inside a chain gets a predicted cost (passes.pipeline.predict: the first-order output change of fusing it alone,
next-token KL for language models); a plan of disjoint groups is predicted to cost the sum. Chosen: the plan
that removes the most sequential FFN stages with predicted cost <= max_cost (ties: the cheaper), or, with a
target depth, the cheapest plan that reaches it. Exact under that additive model: a dynamic programme over each
chain's partitions (fewest stages for each cost), merged across chains.

M rule (`--threshold`, `plan_from_metrics`; the paper's metric, kept for comparison): inside each chain, fuse
runs of blocks in which every pair i < j has M[i][j] <= threshold. The last block of every chain stays unfused
(keep_last: the paper found fusing it hurts). Groups are built greedily left to right, each extended while the
next block keeps every pair under the threshold, has the same hidden size, element type and RMSNorm eps, and
the group stays within max_group blocks: the fewest groups the threshold allows.

`auto_plan` = calibration inputs -> passes.pipeline.analysis (M, and predicted costs for the budget rule, only
between blocks of one chain) -> one of the rules. The fuse CLI then measures the real change of the plan.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from passes.pipeline.analysis import Metrics, compute_metrics
from passes.pipeline.chains import Chain
from passes.pipeline.match import FFNBlock
from passes.pipeline.plan import Group
from passes.pipeline.predict import DEFAULT_MAX_GROUP, CandidateCost
from passes.pipeline.structure import ModelStructure
from passes.support.calibration import Calibration
from passes.support.errors import fail
from passes.support.onnx_io import LoadedModel

# Default for --threshold. Measured (fuse one group, compare next-token distributions on held-out inputs):
#   SmolLM2-135M with attention removed from layers 25-29 (real weights, pydoc text, 1024 tokens): pairs with
#   M = 0.056 / 0.070 / 0.082 / 0.088 gave KL 0.037 / 0.078 / 5.2 / 0.040; the triple 25-27 (max M 0.070) KL 0.18.
#   puzzle-tiny / puzzle-small presets (random weights): every group with max M <= 0.05 had KL <= 0.0063 and top-1
#   >= 0.83; groups with max M 0.06-0.08 had KL 0.004-0.026, top-1 0.63-0.86.
#   tests/residual_models stacks: M 0.09-0.20 everywhere (strongly coupled), relative output errors 12-45 %.
# 0.05 stays below every damaging case measured (the first at 0.070) and lets through what costs about as much
# as FACTS.md's two late SmolLM2 blocks run in parallel (KL 0.05, top-1 0.89) or less. Measure, never assume:
# the fuse CLI reports the KL and top-1 agreement of what it fused.
DEFAULT_THRESHOLD = 0.05
# Default budget of the budget rule: predicted next-token KL (nats) of the whole plan, what running two late
# SmolLM2 blocks in parallel costs. On SmolLM2 the predictions (calibration text) of pairs and triples were 0.9x-1.9x
# the KL measured on held-out text; the default plan on the ranked-8 drop, 16-17 + 25-26, was predicted 0.046 and
# measured 0.035 held out (bench/results/smollm2_prediction.json).
DEFAULT_MAX_COST = 0.05


@dataclass
class Candidate:
    span: tuple[int, int]
    max_dependency: float | None    # max M[i][j] over pairs i < j in the span (None: a pair was not measured)
    taken: bool
    reason: str

    def record(self) -> dict:
        rec = asdict(self)
        rec["span"] = list(self.span)
        if self.max_dependency is not None:
            rec["max_dependency"] = float(self.max_dependency)
        return rec


def plan_from_metrics(chains: Sequence[Chain], metrics: Metrics, threshold: float, max_group: int | None = None,
                      keep_last: bool = True, blocks: Sequence[FFNBlock] | None = None) -> tuple[list[Group], list[Candidate]]:
    """Groups inside chains whose pairwise M are all <= threshold (greedy, left to right, at most max_group
    blocks each, the last block of each chain excluded when keep_last), and every span considered:
    taken groups, and the extension that stopped each group (with the reason)."""
    if threshold < 0:
        fail(f"--threshold must be >= 0, got {threshold}")
    if max_group is not None and max_group < 2:
        fail(f"--max-group must be at least 2, got {max_group}")
    measured = set(metrics.ordinals)
    groups: list[Group] = []
    candidates: list[Candidate] = []

    def m(i: int, j: int) -> float | None:
        return metrics.m(i, j) if i in measured and j in measured else None

    def span_max(run: Sequence[int]) -> float | None:
        values = [m(i, j) for a, i in enumerate(run) for j in run[a + 1:]]
        if any(v is None for v in values):
            return None
        return max(values) if values else 0.0

    for chain in chains:
        ordinals = list(chain.ordinals)
        if keep_last and len(ordinals) >= 2:
            candidates.append(Candidate((ordinals[-1], ordinals[-1]), None, False,
                                        "last block of its chain, kept unfused (keep_last)"))
            ordinals = ordinals[:-1]
        a = 0
        while a < len(ordinals):
            z, reason, worst = a, None, None
            while z + 1 < len(ordinals):
                nxt = ordinals[z + 1]
                if max_group and z + 2 - a > max_group:
                    reason = f"would exceed --max-group {max_group}"
                    break
                if blocks is not None:
                    first, other = blocks[ordinals[a]], blocks[nxt]
                    if (first.hidden_size, first.data_type, first.norm.eps) != (other.hidden_size, other.data_type, other.norm.eps):
                        reason = f"block {nxt} differs in hidden size, element type or RMSNorm eps"
                        break
                deps = [(i, m(i, nxt)) for i in ordinals[a:z + 1]]
                if any(v is None for _, v in deps):
                    reason = f"M to block {nxt} not measured"
                    break
                i_worst, worst = max(deps, key=lambda p: p[1])
                if worst > threshold:
                    reason = f"M[{i_worst}][{nxt}] = {worst:.3g} > threshold {threshold:g}"
                    break
                z += 1
            run = ordinals[a:z + 1]
            if len(run) >= 2:
                groups.append(Group(run[0], run[-1]))
                candidates.append(Candidate((run[0], run[-1]), span_max(run), True,
                                            f"every pair M <= {threshold:g}"))
            if z + 1 < len(ordinals):
                extended = ordinals[a:z + 2]
                candidates.append(Candidate((extended[0], extended[-1]), span_max(extended), False, reason))
            a = z + 1
    return groups, candidates


def plan_by_budget(chains: Sequence[Chain], candidates: Sequence[CandidateCost], n_blocks: int,
                   max_cost: float | None = None, target_depth: int | None = None) -> tuple[list[Group], float, str | None]:
    """(groups, predicted cost, why empty): the plan with the fewest sequential FFN stages whose summed predicted
    cost is <= max_cost, or the cheapest plan with at most target_depth stages (see the module docstring)."""
    if (max_cost is None) == (target_depth is None):
        raise ValueError("give exactly one of max_cost and target_depth")
    price = {(c.first, c.last): c.predicted_cost for c in candidates if c.predicted_cost is not None}
    total: dict[int, tuple[float, list[Group]]] = {0: (0.0, [])}     # stages saved -> cheapest (cost, groups)
    for chain in chains:
        o = list(chain.ordinals)
        best: list[dict[int, tuple[float, list[Group]]]] = [{0: (0.0, [])}]
        for i in range(1, len(o) + 1):
            here = dict(best[i - 1])                                  # block o[i-1] stays alone
            for j in range(i - 1):                                    # or ends group o[j]..o[i-1]
                cost = price.get((o[j], o[i - 1]))
                if cost is None:
                    continue
                for saved, (c, groups) in best[j].items():
                    key, value = saved + i - 1 - j, (c + cost, groups + [Group(o[j], o[i - 1])])
                    if key not in here or value[0] < here[key][0]:
                        here[key] = value
            best.append(here)
        merged: dict[int, tuple[float, list[Group]]] = {}
        for s1, (c1, g1) in total.items():
            for s2, (c2, g2) in best[-1].items():
                if s1 + s2 not in merged or c1 + c2 < merged[s1 + s2][0]:
                    merged[s1 + s2] = (c1 + c2, g1 + g2)
        total = merged
    if target_depth is not None:
        need = n_blocks - target_depth
        able = [saved for saved in total if saved >= need]
        if not able:
            return [], 0.0, (f"no plan reaches FFN depth {target_depth}: at most {max(total)} of {n_blocks} stages can be "
                             f"removed inside the chains with groups of the allowed size")
        saved = min(able, key=lambda k: (total[k][0], k))
    else:
        able = [saved for saved, (c, _) in total.items() if c <= max_cost]
        saved = max(able, key=lambda k: (k, -total[k][0]))
        if saved == 0:
            cheapest = min((c for c in candidates if c.predicted_cost is not None), key=lambda c: c.predicted_cost, default=None)
            return [], 0.0, (f"no candidate group is predicted under the budget {max_cost:g}"
                             + (f"; cheapest: {cheapest.first}-{cheapest.last} ({cheapest.predicted_cost:.3g})" if cheapest else ""))
    cost, groups = total[saved]
    return sorted(groups, key=lambda g: g.first), cost, None


# ---------------------------------------------------------------- wiring for passes.fuse

def fusable_ordinals(chains: Sequence[Chain], keep_last: bool = True) -> list[int]:
    """Blocks that could be in a group: chains of >= 2 blocks (>= 3 with keep_last), without their last block."""
    out = []
    for chain in chains:
        ordinals = list(chain.ordinals)
        if keep_last:
            ordinals = ordinals[:-1]
        if len(ordinals) >= 2:
            out += ordinals
    return out


def auto_plan(model: LoadedModel, structure: ModelStructure, calib: Calibration, *, max_cost: float | None = None,
              target_depth: int | None = None, threshold: float | None = None, max_group: int | None = None,
              progress: bool = True) -> tuple[list[Group], dict]:
    """Measure the chains on `calib` and plan: by predicted cost under max_cost (default DEFAULT_MAX_COST) or to
    target_depth, or with `threshold` by the M rule. Returns the groups and a JSON-ready record (inputs, rule,
    metrics, dependency, candidates with predicted cost and max M, cost of the analysis)."""
    if threshold is not None:
        return _threshold_plan(model, structure, calib, threshold, max_group, progress)
    if max_cost is None and target_depth is None:
        max_cost = DEFAULT_MAX_COST
    longest = max_group or DEFAULT_MAX_GROUP
    record: dict = {"plan": "auto", "rule": "fewest sequential FFN stages with predicted cost <= max_cost"
                    if target_depth is None else "cheapest predicted plan with FFN depth <= target_depth",
                    "max_cost": max_cost, "target_depth": target_depth, "max_group": longest}
    ordinals = fusable_ordinals(structure.chains, keep_last=False)
    if not ordinals:
        record.update(groups=[], reason="no chain of 2 or more FFN blocks; nothing to measure")
        return [], record
    metrics = compute_metrics(model, calib.feeds, ordinals, scope="chains", progress=progress, blocks=structure.blocks,
                              chains=structure.chains, predict=longest)
    groups, cost, reason = plan_by_budget(structure.chains, metrics.candidates, len(structure.blocks), max_cost, target_depth)
    record.update(inputs=calib.record(), groups=[[g.first, g.last] for g in groups], predicted_cost=cost,
                  unit=metrics.change_unit, **({"reason": reason} if reason else {}), **metrics.record())
    return groups, record


def _threshold_plan(model, structure, calib, threshold, max_group, progress) -> tuple[list[Group], dict]:
    """The M rule (plan_from_metrics), with `closest`: the neighbouring pairs with the smallest M."""
    keep_last = True
    record: dict = {"plan": "auto", "threshold": threshold, "max_group": max_group, "keep_last": keep_last,
                    "rule": "greedy left-to-right maximal groups inside chains with every pair M[i][j] <= threshold"}
    ordinals = fusable_ordinals(structure.chains, keep_last)
    if not ordinals:
        record.update(groups=[], candidates=[], closest=[],
                      reason=f"no chain of {3 if keep_last else 2} or more FFN blocks; nothing to measure")
        return [], record
    metrics = compute_metrics(model, calib.feeds, ordinals, scope="chains", progress=progress,
                              blocks=structure.blocks, chains=structure.chains)
    groups, candidates = plan_from_metrics(structure.chains, metrics, threshold, max_group, keep_last, structure.blocks)
    measured = set(metrics.ordinals)
    pairs = sorted((metrics.m(i, i + 1), i) for i in metrics.ordinals if i + 1 in measured and metrics.m(i, i + 1) is not None)
    record.update(inputs=calib.record(), groups=[[g.first, g.last] for g in groups],
                  candidates=[c.record() for c in candidates],
                  closest=[{"span": [i, i + 1], "m": m} for m, i in pairs[:5]], **metrics.record())
    return groups, record
