"""Fusing a model: stage 5 (passes.pipeline.rewrite) over a loaded model and its structure, with the record every report
shares; and `fuse_file`, the whole pipeline in one call (load, match, chains, plan, rewrite, verify, write)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from passes.pipeline.match import match_ffn_blocks
from passes.pipeline.plan import Group, check_groups, paper_rule
from passes.pipeline.rewrite import fuse_groups, group_prefixes
from passes.pipeline.structure import ModelStructure, model_structure
from passes.support.errors import fail
from passes.support.genai import beside_output
from passes.support.onnx_io import LoadedModel, ModelOutput, load_model, save_model
from passes.support.outputs import Staging
from passes.support.report import count


@dataclass
class Fusion:
    output: ModelOutput
    groups: list[Group]
    report: dict     # structure, groups, fused (width, prefix, replaced nodes), before / after counts


def fuse_model(model: LoadedModel, structure: ModelStructure, groups: list[Group], *, max_group: int | None = None,
               merge_gate_up: bool = False) -> Fusion:
    """The model with every group fused (groups are checked first: UserError when one is not fusable)."""
    check_groups(groups, structure.chains, structure.blocks)
    if max_group is not None and any(len(g) > max_group for g in groups):
        fail(f"group {next(g for g in groups if len(g) > max_group)} has more than --max-group {max_group} blocks")
    prefixes = group_prefixes(model.proto.graph, groups)
    output = fuse_groups(model, structure.blocks, groups, merge_gate_up=merge_gate_up)
    blocks = structure.blocks
    report = {
        "merge_gate_up": merge_gate_up,
        **structure.record(),
        "groups": [[g.first, g.last] for g in groups],
        "fused": [{"group": [g.first, g.last], "width": sum(blocks[o].width for o in g.ordinals), "prefix": prefixes[g],
                   "replaced_nodes": [n for o in g.ordinals for n in blocks[o].node_names]} for g in groups],
        "before": asdict(count(model.proto, blocks)),
        "after": asdict(count(output.proto, match_ffn_blocks(output.proto).blocks)),
    }
    return Fusion(output, groups, report)


def write_fused(model: LoadedModel, fusion: Fusion, out_path: Path, *, external: bool | None = None,
                staging: Staging | None = None) -> Path:
    """Write the fused model (verified; with an onnxruntime-genai folder's config and tokenizer files beside it
    when the input came with them and the output goes to another folder). See onnx_io.save_model for staging."""
    genai_files, _ = beside_output(model, fusion.output.proto, Path(out_path), renumber=False)
    return save_model(fusion.output, Path(out_path), external=external, protected={model.path} | model.external_files,
                      reference=model.path, extra_files=genai_files, staging=staging)


def fuse_file(model_path: str | Path, out_path: str | Path, *, groups: list[Group] | None = None,
              max_group: int | None = None, merge_gate_up: bool = False, external: bool | None = None) -> Fusion:
    """Load the model, fuse `groups` (default: the paper's rule), write it to out_path; returns the fusion."""
    model = load_model(model_path)
    structure = model_structure(model.proto)
    groups = paper_rule(structure.chains, max_group) if groups is None else groups
    fusion = fuse_model(model, structure, groups, max_group=max_group, merge_gate_up=merge_gate_up)
    write_fused(model, fusion, Path(out_path), external=external)
    return fusion
