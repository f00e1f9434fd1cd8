"""Stage 4 (measured): choose groups from the dependency matrix M, and measure what a fusion changed.

Rule (`plan_from_metrics`): inside each chain, fuse runs of blocks in which every pair i < j has
M[i][j] <= threshold (block j barely depends on block i, so both may read the same input). By default the last
block of every chain stays unfused (keep_last: the paper found fusing it hurts). Groups are built greedily left
to right, each extended while the next block keeps every pair under the threshold, has the same hidden size,
element type and RMSNorm eps, and the group stays within max_group blocks. Because a sub-run of an admissible run
is admissible too, this greedy partition uses the fewest groups (so the fewest sequential FFN stages) that the
threshold allows; it does not balance group sizes.

`auto_plan` = calibration inputs -> passes.analysis (M measured only between blocks of one chain, and only for
the blocks that could be fused) -> plan_from_metrics. `measure_change` runs the original and fused models on the
same inputs and reports output errors and, for language models, the KL divergence and top-1 agreement of the
next-token distributions.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence


from passes.analysis import Metrics, compute_metrics
from passes.calibration import Calibration, calibration_for
from passes.chains import Chain, find_chains
from passes.errors import fail
from passes.graph import GraphIndex
from passes.match import FFNBlock, match_ffn_blocks
from passes.onnx_io import load_model
from passes.plan import Group

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


def _fmt(v: float | None) -> str:
    return "unmeasured" if v is None else f"{v:.3g}"


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


def auto_plan(model_path: str | os.PathLike, inputs=None, threshold: float = DEFAULT_THRESHOLD,
              max_group: int | None = None, keep_last: bool = True, progress: bool = True) -> tuple[list[Group], dict]:
    """Measure M between blocks of each chain on calibration `inputs` (path to .npz / polygraphy JSON, dict of
    arrays, a passes.calibration.Calibration, or None for random tokens with a warning) and plan groups with
    plan_from_metrics. Returns the groups and a JSON-ready record (inputs, metrics, dependency, candidates, cost)."""
    model = load_model(model_path)
    index = GraphIndex.build(model.proto.graph)
    blocks = match_ffn_blocks(model.proto, index).blocks
    chains = find_chains(blocks, index)
    record: dict = {"plan": "auto", "threshold": threshold, "max_group": max_group, "keep_last": keep_last,
                    "rule": "greedy left-to-right maximal groups inside chains with every pair M[i][j] <= threshold"}
    if not blocks:
        fail(f"{model_path}: no FFN blocks found, nothing to plan")
    ordinals = fusable_ordinals(chains, keep_last)
    if not ordinals:
        record.update(groups=[], candidates=[], reason=f"no chain of {3 if keep_last else 2} or more FFN blocks; nothing to measure")
        return [], record
    calib = calibration_for(model.proto, inputs)
    metrics = compute_metrics(model, calib.feeds, ordinals, scope="chains", progress=progress, blocks=blocks, chains=chains)
    groups, candidates = plan_from_metrics(chains, metrics, threshold, max_group, keep_last, blocks)
    record.update(inputs=calib.record(), groups=[[g.first, g.last] for g in groups],
                  candidates=[c.record() for c in candidates], **metrics.record())
    return groups, record


# ---------------------------------------------------------------- the fuse CLI's --plan auto

def _threshold(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got '{text}'")
    return value


def add_cli_arguments(parser) -> None:
    """--plan, --inputs and --threshold for `python -m passes.fuse`."""
    parser.add_argument("--plan", choices=("paper", "auto"),
                        help="paper: every chain of >= 3 blocks but its last block (the default without --groups); "
                             "auto: measure the dependency matrix M on --inputs and fuse runs whose pairs all have "
                             "M <= --threshold, the last block of each chain kept")
    parser.add_argument("--inputs", help="calibration inputs, FILE.npz (one array per graph input) or a polygraphy "
                                         "--save-inputs JSON, for --plan auto and to measure the change the fusion makes "
                                         "(default for --plan auto: random token ids, with a warning)")
    parser.add_argument("--threshold", type=_threshold,
                        help=f"--plan auto: largest M[i][j] allowed inside a group (default {DEFAULT_THRESHOLD})")


def plan_for_cli(args, model_path) -> tuple[list[Group] | None, str | None, dict, Calibration | None]:
    """From parsed fuse arguments: (groups or None, plan name or None, extra report entries, calibration or None).
    Calibration is loaded (and validated, and the random-tokens warning printed) once, for the plan and for
    measure_change; it is None when neither --plan auto nor --inputs was given."""
    if args.plan is not None and args.groups is not None:
        fail("--plan and --groups are exclusive: give the groups, or let --plan choose them")
    if args.threshold is not None and args.plan != "auto":
        fail("--threshold only applies to --plan auto")
    calib = None
    if args.plan == "auto" or args.inputs is not None:
        calib = calibration_for(load_model(model_path).proto, args.inputs)
    if args.plan != "auto":
        return None, ("paper rule" if args.plan == "paper" else None), {}, calib
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    groups, record = auto_plan(model_path, calib, threshold, args.max_group)
    return groups, f"auto (M <= {threshold:g})", {"auto_plan": record}, calib
