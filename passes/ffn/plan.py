"""Plan: which contiguous runs ("groups") of each chain to fuse, and the check that a group can be fused.

A group [a, z] (written "a-z") is fused into one FFN: x + sum_{t=a..z} FFN_t(n(x) * g_t).
Plans come from the user (`--groups`), from the paper's rule, or from what passes.measure measured; the rules
here are policies over plain data (chains, blocks, measured numbers) and never run a model:

Budget rule (the default of `passes.fuse --plan auto`, `plan_by_budget`): every run of 2..max_group blocks
inside a chain gets a predicted cost (`CandidateCost`, from passes.measure.predict: the first-order output
change of fusing it alone, next-token KL for language models); a plan of disjoint groups is predicted to cost the
sum. Chosen: the plan that removes the most sequential FFN stages with predicted cost <= max_cost (ties: the
cheaper), or, with a target depth, the cheapest plan that reaches it. Exact under that additive model: a dynamic
programme over each chain's partitions (fewest stages for each cost), merged across chains.

M rule (`--threshold`, `plan_from_metrics`; the paper's metric, kept for comparison): inside each chain, fuse
runs of blocks in which every pair i < j has M[i][j] <= threshold. The last block of every chain stays unfused
(keep_last: the paper found fusing it hurts). Groups are built greedily left to right, each extended while the
next block keeps every pair under the threshold, has the same hidden size, element type and RMSNorm eps, and
the group stays within max_group blocks: the fewest groups the threshold allows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

from passes.ffn.chains import Chain
from passes.ffn.match import FFNBlock
from passes.support.errors import fail
from passes.support.ranges import parse_ranges
from passes.support.report import finite_or_none

DEFAULT_MAX_GROUP = 8        # longest candidate group predicted (passes.fuse --max-group overrides it)


@dataclass(frozen=True)
class Group:
    first: int
    last: int

    @property
    def ordinals(self) -> range:
        return range(self.first, self.last + 1)

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_groups(spec: str) -> list[Group]:
    """'2-5,7-9' -> [Group(2, 5), Group(7, 9)]; malformed specs and single blocks are a UserError."""
    groups = []
    for first, last in parse_ranges(spec, "--groups", "2-5,7-9"):
        if last == first:
            fail(f"group '{first}' in --groups must span at least two blocks (FIRST-LAST with FIRST < LAST)")
        groups.append(Group(first, last))
    return groups


def check_groups(groups: list[Group], chains: list[Chain], blocks: list[FFNBlock]) -> None:
    """Groups must be in range, disjoint, inside one chain, and share eps, hidden size and element type."""
    chain_of = {o: c for c in chains for o in c.ordinals}
    taken: dict[int, Group] = {}
    for group in groups:
        if group.last >= len(blocks):
            known = f"{len(blocks)} FFN blocks (ordinals 0-{len(blocks) - 1})" if blocks else "no FFN blocks"
            fail(f"group {group} is out of range: the model has {known}")
        for o in group.ordinals:
            if o in taken:
                fail(f"groups {taken[o]} and {group} overlap at block {o}")
            taken[o] = group
        if chain_of[group.first] is not chain_of[group.last]:
            chain = chain_of[group.first]
            fail(f"group {group} leaves its chain {chain.first}-{chain.last}: something other than an FFN "
                 f"(attention, a graph output or another consumer) sits between blocks")
        reason = why_not_fusable([blocks[o] for o in group.ordinals])
        if reason:
            fail(f"group {group} {reason}")


def why_not_fusable(members: Sequence[FFNBlock]) -> str | None:
    """Why one FFN cannot replace these consecutive blocks exactly, or None: they must share hidden size, element
    type and RMSNorm eps; int4 / int8 (MatMulNBits) projections must share one kind of linear layer and one
    quantization (bits, block size, symmetric or not) per projection, and every width but the last must be a whole
    number of the down projection's blocks (the down weights are laid end to end along K)."""
    for attr, what in (("hidden_size", "hidden size"), ("data_type", "element type")):
        if len({getattr(b, attr) for b in members}) > 1:
            return f"mixes blocks of different {what}"
    if len({b.norm.eps for b in members}) > 1:
        return f"mixes RMSNorm eps values {sorted({b.norm.eps for b in members})}: fusion needs one shared norm"
    for projections in (("gate", "up"), ("down",)):
        refs = [getattr(b, p) for b in members for p in projections]
        kinds = {getattr(r, "quantization", None) for r in refs}
        if len(kinds) > 1:
            shown = ", ".join("float" if k is None else f"{k[0]}-bit block {k[1]}{' symmetric' if k[2] else ''}"
                              for k in sorted(kinds, key=str))
            return f"mixes {'/'.join(projections)} projections of different kinds or quantizations ({shown})"
    down = members[0].down
    if getattr(down, "quantization", None):
        for b in members[:-1]:
            if b.width % down.block_size:
                return (f"cannot be fused exactly: block {b.ordinal}'s width {b.width} is not a multiple of the down "
                        f"projection's quantization block size {down.block_size}")
    return None


def split_evenly(ordinals: tuple[int, ...], max_group: int | None) -> list[Group]:
    """Split a run into the fewest groups of at most max_group blocks, sizes differing by at most one."""
    if len(ordinals) < 2:
        return []
    count = 1 if not max_group else math.ceil(len(ordinals) / max_group)
    size, extra = divmod(len(ordinals), count)
    groups, start = [], 0
    for k in range(count):
        n = size + (1 if k < extra else 0)
        if n >= 2:
            groups.append(Group(ordinals[start], ordinals[start + n - 1]))
        start += n
    return groups


def paper_rule(chains: list[Chain], max_group: int | None = None) -> list[Group]:
    """The paper's plan: in every chain of >= 3 blocks fuse all but the last block, in groups of <= max_group."""
    groups = []
    for chain in chains:
        if len(chain) >= 3:
            groups += split_evenly(chain.ordinals[:-1], max_group)
    return groups


# ---------------------------------------------------------------- measured plans

class Dependencies(Protocol):
    """What the M rule reads of a measurement (passes.measure.metrics.Metrics): the measured ordinals and M[i][j]."""
    ordinals: list[int]

    def m(self, i: int, j: int) -> float | None: ...


@dataclass
class CandidateCost:
    """A candidate group a..z (FFN ordinals inside one chain) and what fusing it alone is predicted to cost."""
    first: int
    last: int
    predicted_cost: float | None      # s_z * E|delta|^2 (None: the pair z-1..z changes nothing, no scale)
    relative_error: float             # E|delta|^2 / E|x'_z|^2: the group's error at its output, relative
    sensitivity: float | None         # s_z

    def record(self) -> dict:
        return {"span": [self.first, self.last], "predicted_cost": finite_or_none(self.predicted_cost),
                "relative_error": finite_or_none(self.relative_error), "sensitivity": finite_or_none(self.sensitivity)}


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


def plan_from_metrics(chains: Sequence[Chain], metrics: Dependencies, threshold: float, max_group: int | None = None,
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
                    why = why_not_fusable(blocks[ordinals[a]:nxt + 1])
                    if why:
                        reason = f"adding block {nxt}: the group {why}"
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
