"""The Puzzle steps in torch: a PuzzleDecoder with attention removed from some layers and FFN groups fused, with
the same numerics as the ONNX passes (passes.drop_attention, passes.fuse), for healing and for checkpoints.

Dropping attention in layer i sets its attention to a no-op (x' = x). Fusing FFN group [a, z] (FFN ordinals: the
t-th layer that has an FFN is ordinal t; every layer between the group's first and last FFN must be
attention-free, as in the ONNX chain) replaces it by one FFN of width sum(m_t) at the group's last layer, reading
the group's input x:
    x + (silu(n(x) Wg*) * (n(x) Wu*)) Wd*,   Wg* = [diag(g_a) Wg_a | ... | diag(g_z) Wg_z], Wu* likewise,
    Wd* = [Wd_a ; ... ; Wd_z],   n(x) = x / sqrt(mean(x^2) + eps), norm gain 1
and makes the layers it absorbed empty (attention and FFN no-ops; the group's first layer keeps its attention).
This is how Llama-3.1-Nemotron-Ultra-253B's config expresses its fused FFNs: a layer with attention no_op and a
large FFN after a run of fully empty layers.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from models.config import DecoderConfig
from models.decoder import PuzzleDecoder
from passes.ffn.chains import Chain
from passes.ffn.plan import paper_rule
from passes.support.errors import UserError
from passes.support.ranges import expand, parse_ranges

PAPER = "paper"     # --fuse paper


def ffn_layers(config: DecoderConfig) -> list[int]:
    """Layer index of each FFN ordinal."""
    return [i for i, spec in enumerate(config.layers) if spec.ffn_width is not None]


def ffn_chains(config: DecoderConfig) -> list[Chain]:
    """The chains of the model, as passes.ffn.chains finds them in its exported graph: maximal runs of FFN ordinals
    with no attention between one FFN and the next (layers after the first FFN up to the next FFN, inclusive)."""
    where, chains, run = ffn_layers(config), [], []
    for t, layer in enumerate(where):
        if run and any(config.layers[i].attention for i in range(where[t - 1] + 1, layer + 1)):
            chains.append(Chain(tuple(run)))
            run = []
        run.append(t)
    return chains + [Chain(tuple(run))] if run else chains


def without_attention(config: DecoderConfig, dropped: list[int]) -> DecoderConfig:
    """A copy of `config` with the attention of layers `dropped` removed (UserError: a layer without attention)."""
    layers = list(config.layers)
    for i in dropped:
        if not 0 <= i < len(layers) or not layers[i].attention:
            raise UserError(f"layer {i} has no attention to drop")
        layers[i] = replace(layers[i], attention=False, num_kv_heads=None)
    return replace(copy.deepcopy(config), layers=layers)


def planned_groups(config: DecoderConfig, groups: list[tuple[int, int]] | str) -> list[tuple[int, int]]:
    """`groups` as given, or for PAPER the paper's rule (passes.ffn.plan.paper_rule) on the chains of `config`
    (the model after dropping attention)."""
    if groups == PAPER:
        return [(g.first, g.last) for g in paper_rule(ffn_chains(config))]
    return list(groups)


def parse_changes(drop: str | None, fuse: str | None) -> tuple[list[int], list[tuple[int, int]] | str]:
    """The --drop LAYERS and --fuse GROUPS of models.heal and exporters.export as drop_and_fuse takes them: layers
    whose attention is removed ("5-7,17-18" -> [5, 6, 7, 17, 18]) and FFN groups of ordinals ("4-6,16-17" ->
    [(4, 6), (16, 17)]), or PAPER ("paper": the paper's rule on the chains left after dropping); None or "" gives
    nothing. A malformed range is a UserError naming the option."""
    dropped = expand(parse_ranges(drop, "--drop", "5-7,17-18")) if drop else []
    if fuse == PAPER:
        return dropped, PAPER
    groups = parse_ranges(fuse, "--fuse", "4-6,16-17 or paper") if fuse else []
    return dropped, groups


def drop_and_fuse(model: PuzzleDecoder, dropped: list[int] = (),
                  groups: list[tuple[int, int]] | str = ()) -> PuzzleDecoder:
    """A new PuzzleDecoder (the input is left as it is): attention removed in layers `dropped`, then every FFN
    group (a, z) of ordinals fused (PAPER: passes.ffn.plan.paper_rule on the chains after dropping). Refused
    (UserError): a layer without attention in `dropped`, a group out of range, overlapping, or with attention (or
    another FFN) between its first and last FFN."""
    config = without_attention(model.config, dropped)
    layers = list(config.layers)
    groups = planned_groups(config, groups)
    where = ffn_layers(config)
    taken: set[int] = set()
    plan = []
    for a, z in sorted(groups):
        if not 0 <= a < z < len(where):
            raise UserError(f"group {a}-{z} is out of range: the model has {len(where)} FFN blocks")
        if taken & set(range(a, z + 1)):
            raise UserError(f"group {a}-{z} overlaps another group")
        taken |= set(range(a, z + 1))
        first, last = where[a], where[z]
        if any(layers[i].attention for i in range(first + 1, last + 1)):
            raise UserError(f"group {a}-{z} is not one chain: attention sits between its blocks (drop it first)")
        plan.append((a, z, first, last))
        width = sum(layers[where[t]].ffn_width for t in range(a, z + 1))
        for i in range(first, last):
            layers[i] = replace(layers[i], ffn_width=None)
        for i in range(first + 1, last):
            layers[i] = replace(layers[i], attention=False, num_kv_heads=None)
        layers[last] = replace(layers[last], attention=False, ffn_width=width, num_kv_heads=None)
    config.layers = layers
    source = model.state_dict()
    with torch.device("meta"):
        student = PuzzleDecoder(config)
    state = {}
    fused_layers = {last: (a, z) for a, z, _, last in plan}
    for name, param in student.state_dict().items():
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else None
        if layer in fused_layers and ".ffn" in name:
            state[name] = _fused_parameter(name, source, where, *fused_layers[layer])
        else:
            state[name] = source[name].clone()
    student.load_state_dict(state, assign=True)
    return student.eval()


def _fused_parameter(name: str, source: dict, where: list[int], a: int, z: int) -> torch.Tensor:
    """A parameter of the fused FFN (at the group's last layer) from the group's blocks, gains folded in float32."""
    members = [where[t] for t in range(a, z + 1)]
    if name.endswith("ffn_norm.weight"):
        return torch.ones_like(source[f"layers.{members[0]}.ffn_norm.weight"])
    dtype = source[f"layers.{members[0]}.ffn.gate_proj.weight"].dtype
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        proj = name.rsplit(".", 2)[-2]
        return torch.cat([(source[f"layers.{i}.ffn.{proj}.weight"].float() * source[f"layers.{i}.ffn_norm.weight"].float())
                          .to(dtype) for i in members])
    if name.endswith("down_proj.weight"):
        return torch.cat([source[f"layers.{i}.ffn.down_proj.weight"] for i in members], dim=1)
    raise KeyError(name)
