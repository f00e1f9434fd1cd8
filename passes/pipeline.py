"""The FFN-fusion pipeline in one call: match -> chains -> (measure) -> plan -> rewrite -> verify -> write.

`Plan` says how the groups are chosen: explicit `groups`, the paper's rule ("paper": every chain of >= 3 blocks
but its last block, in groups of at most max_group), or "auto" (measured on calibration inputs by passes.measure:
the fewest sequential FFN stages whose predicted next-token KL stays under max_kl, or the cheapest plan reaching
target_depth, or with `threshold` the paper's M rule). `choose_groups` applies a plan to a loaded model,
`fuse_model` rewrites the groups (passes.ffn.rewrite) with the record every report shares, `stage_fused` stages
the result verified, and `fuse_file` does all of it for a path. The fuse CLI and Python callers use these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from passes.ffn.match import match_ffn_blocks
from passes.ffn.plan import (
    DEFAULT_MAX_COST,
    DEFAULT_MAX_GROUP,
    Group,
    check_groups,
    fusable_ordinals,
    paper_rule,
    plan_by_budget,
    plan_from_metrics,
)
from passes.ffn.rewrite import fuse_groups, group_prefixes, packs_gate_up
from passes.ffn.structure import ModelStructure, count, model_structure
from passes.measure.metrics import compute_metrics
from passes.support.calibration import Calibration, calibration_for
from passes.support.errors import fail
from passes.support.genai import beside_output
from passes.support.onnx_io import LoadedModel, ModelOutput, load_model, stage_model
from passes.support.outputs import Staging

RULES = ("groups", "paper", "auto")


@dataclass(frozen=True)
class Plan:
    """How to choose the groups (see the module docstring); at most one of max_kl, target_depth, threshold."""
    rule: str = "paper"
    groups: tuple[Group, ...] = ()
    max_group: int | None = None
    max_kl: float | None = None
    target_depth: int | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        budgets = [v for v in (self.max_kl, self.target_depth, self.threshold) if v is not None]
        if budgets and self.rule != "auto" or len(budgets) > 1:
            raise ValueError("max_kl, target_depth and threshold are exclusive and belong to rule 'auto'")

    def describe(self, auto: dict | None = None) -> str:
        """How the report names the plan."""
        if self.rule == "groups":
            return "--groups"
        if self.rule == "paper":
            return "paper rule"
        if self.threshold is not None:
            return f"auto (M <= {self.threshold:g})"
        if self.target_depth is not None:
            return f"auto (FFN depth <= {self.target_depth})"
        return f"auto (predicted {(auto or {}).get('unit') or 'change'} <= {(auto or {}).get('max_cost', DEFAULT_MAX_COST):g})"


@dataclass
class Chosen:
    groups: list[Group]
    plan: str                  # Plan.describe()
    auto: dict | None          # what --plan auto measured (None for the other rules)


@dataclass
class Fusion:
    output: ModelOutput
    groups: list[Group]
    report: dict     # structure, groups, fused (width, prefix, replaced nodes), before / after counts


def choose_groups(model: LoadedModel, structure: ModelStructure, plan: Plan, calib: Calibration | None = None, *,
                  progress: bool = True, provider: str | None = "cpu") -> Chosen:
    """The groups `plan` picks on this model (rule "auto" measures on `calib`, which it then needs, with
    onnxruntime on `provider`)."""
    if plan.rule == "groups":
        return Chosen(list(plan.groups), plan.describe(), None)
    if plan.rule == "paper":
        return Chosen(paper_rule(structure.chains, plan.max_group), plan.describe(), None)
    if calib is None:
        raise ValueError("rule 'auto' needs calibration inputs")
    groups, auto = auto_plan(model, structure, calib, max_cost=plan.max_kl, target_depth=plan.target_depth,
                             threshold=plan.threshold, max_group=plan.max_group, progress=progress, provider=provider)
    return Chosen(groups, plan.describe(auto), auto)


def fuse_model(model: LoadedModel, structure: ModelStructure, groups: list[Group], *, max_group: int | None = None,
               merge_gate_up: bool = False) -> Fusion:
    """The model with every group fused (groups are checked first: UserError when one is not fusable)."""
    check_groups(groups, structure.chains, structure.blocks)
    if max_group is not None and any(len(g) > max_group for g in groups):
        fail(f"group {next(g for g in groups if len(g) > max_group)} has more than --max-group {max_group} blocks")
    prefixes = group_prefixes(model.proto.graph, groups)
    output, requantized = fuse_groups(model, structure.blocks, groups, merge_gate_up=merge_gate_up)
    blocks = structure.blocks
    report = {
        "merge_gate_up": merge_gate_up,
        **structure.record(),
        "groups": [[g.first, g.last] for g in groups],
        "fused": [{"group": [g.first, g.last], "width": sum(blocks[o].width for o in g.ordinals), "prefix": prefixes[g],
                   "packed_gate_up": packs_gate_up([blocks[o] for o in g.ordinals], merge_gate_up),
                   "replaced_nodes": [n for o in g.ordinals for n in blocks[o].node_names]} for g in groups],
        **({"requantized": [{"group": [g.first, g.last], **asdict(r)} for g, notes in requantized.items() for r in notes]}
           if any(requantized.values()) else {}),
        "before": asdict(count(model.proto, blocks)),
        "after": asdict(count(output.proto, match_ffn_blocks(output.proto).blocks)),
    }
    return Fusion(output, groups, report)


def stage_fused(model: LoadedModel, fusion: Fusion, out_path: Path, staging: Staging, *,
                external: bool | None = None) -> Path:
    """Stage the fused model for out_path (verified; with an onnxruntime-genai folder's config and tokenizer files
    beside it when the input came with them and the output goes to another folder); returns the staged model's
    path (onnx_io.stage_model)."""
    genai_files, _ = beside_output(model, fusion.output.proto, Path(out_path), renumber=False)
    return stage_model(fusion.output, Path(out_path), staging, external=external,
                       protected={model.path} | model.external_files, reference=model.path, extra_files=genai_files)


def fuse_file(model_path: str | Path, out_path: str | Path, *, plan: Plan | None = None, groups: list[Group] | None = None,
              inputs=None, merge_gate_up: bool = False, external: bool | None = None) -> Fusion:
    """Load the model, choose the groups by `plan` (default: the paper's rule; `groups` is short for
    Plan("groups", groups); rule "auto" measures on `inputs`), fuse them and write the model to out_path."""
    if groups is not None:
        plan = Plan("groups", tuple(groups))
    plan = plan or Plan()
    model = load_model(model_path)
    structure = model_structure(model.proto)
    calib = calibration_for(model, inputs) if plan.rule == "auto" else None
    chosen = choose_groups(model, structure, plan, calib)
    fusion = fuse_model(model, structure, chosen.groups, max_group=plan.max_group, merge_gate_up=merge_gate_up)
    with Staging() as staging:
        stage_fused(model, fusion, Path(out_path), staging, external=external)
        staging.publish()
    return fusion


# ---------------------------------------------------------------- --plan auto: measure, then a rule of passes.ffn.plan

def auto_plan(model: LoadedModel, structure: ModelStructure, calib: Calibration, *, max_cost: float | None = None,
              target_depth: int | None = None, threshold: float | None = None, max_group: int | None = None,
              progress: bool = True, provider: str | None = "cpu") -> tuple[list[Group], dict]:
    """Measure the chains on `calib` and plan: by predicted cost under max_cost (default DEFAULT_MAX_COST) or to
    target_depth, or with `threshold` by the M rule. Returns the groups and a JSON-ready record (inputs, rule,
    metrics, dependency, candidates with predicted cost and max M, cost of the analysis)."""
    if threshold is not None:
        return _threshold_plan(model, structure, calib, threshold, max_group, progress, provider)
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
    metrics = compute_metrics(model, calib.feeds, ordinals, scope="chains", progress=progress, structure=structure, predict=longest,
                              provider=provider)
    groups, cost, reason = plan_by_budget(structure.chains, metrics.candidates, len(structure.blocks), max_cost, target_depth)
    record.update(inputs=calib.record(), groups=[[g.first, g.last] for g in groups], predicted_cost=cost,
                  unit=metrics.change_unit, **({"reason": reason} if reason else {}), **metrics.record())
    return groups, record


def _threshold_plan(model, structure, calib, threshold, max_group, progress, provider) -> tuple[list[Group], dict]:
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
                              structure=structure, provider=provider)
    groups, candidates = plan_from_metrics(structure.chains, metrics, threshold, max_group, keep_last, structure.blocks)
    measured = set(metrics.ordinals)
    pairs = sorted((metrics.m(i, i + 1), i) for i in metrics.ordinals if i + 1 in measured and metrics.m(i, i + 1) is not None)
    record.update(inputs=calib.record(), groups=[[g.first, g.last] for g in groups],
                  candidates=[c.record() for c in candidates],
                  closest=[{"span": [i, i + 1], "m": m} for m, i in pairs[:5]], **metrics.record())
    return groups, record
