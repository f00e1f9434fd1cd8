"""Stage 4 (measured): choose groups from the dependency matrix M, and measure what a fusion changed.

Rule (`plan_from_metrics`): inside each chain, fuse runs of blocks in which every pair i < j has
M[i][j] <= threshold (block j barely depends on block i, so both may read the same input). By default the last
block of every chain stays unfused (keep_last: the paper found fusing it hurts). Groups are built greedily left
to right, each extended while the next block keeps every pair under the threshold, has the same hidden size,
element type and RMSNorm eps, and the group stays within max_group blocks. Because a sub-run of an admissible run
is admissible too, this greedy partition uses the fewest groups (so the fewest sequential FFN stages) that the
threshold allows; it does not balance group sizes.

`auto_plan` = calibration inputs -> passes.pipeline.analysis (M measured only between blocks of one chain, and only for
the blocks that could be fused) -> plan_from_metrics. `measure_change` runs the original and fused models on the
same inputs and reports output errors and, for language models, the KL divergence and top-1 agreement of the
next-token distributions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from passes.pipeline.analysis import Metrics, compute_metrics
from passes.pipeline.chains import Chain
from passes.pipeline.match import FFNBlock
from passes.pipeline.plan import Group
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


def auto_plan(model: LoadedModel, structure: ModelStructure, calib: Calibration, threshold: float = DEFAULT_THRESHOLD,
              max_group: int | None = None, keep_last: bool = True, progress: bool = True) -> tuple[list[Group], dict]:
    """Measure M between blocks of each chain on `calib` and plan groups with plan_from_metrics. Returns the
    groups and a JSON-ready record (inputs, metrics, dependency, candidates, cost, and `closest`: the pairs of
    neighbouring blocks with the smallest M, the ones an empty plan was nearest to taking)."""
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
