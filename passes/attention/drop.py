"""Rewrite: remove sublayers from the residual stream (the Puzzle step that turns attention layers into no-ops).

Removing sublayer x' = x + a makes x' = x exactly:
  - an Add residual node goes; its readers read x (an Identity keeps x' where it is a graph output);
  - a skip normalization residual node (SkipSimplifiedLayerNormalization / SkipLayerNormalization with input and
    skip = x and a) becomes the plain normalization of x (SimplifiedLayerNormalization / LayerNormalization, same
    gain, beta and epsilon); its output 3 is replaced by x; a bias input belongs to the removed branch;
  - the branch's nodes go once nothing reads them (shared nodes such as masks, rotary tables and weights stay
    while another layer reads them), with the graph outputs only the branch produced (a decode graph's present
    key/value) and the graph inputs only it read (past key/value);
  - a skip normalization whose normalized output nobody reads any more (the removed sublayer's own norm, when it
    also carries the previous residual add) becomes Add(input, skip) (+ bias) for its output 3.
Every other node is untouched and keeps its name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from passes.attention.stream import Sublayer
from passes.support.builder import NodeBuilder
from passes.support.errors import fail
from passes.support.genai import beside_output
from passes.support.graph import attribute, default_opset, drop_unused, live_nodes
from passes.support.norms import SKIP_NORMS
from passes.support.onnx_io import LoadedModel, ModelOutput, stage_model
from passes.support.outputs import Staging


@dataclass
class Dropped:
    """What a removal took out of the graph's interface and how many nodes it changed."""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0


def drop_sublayers(model: LoadedModel, chosen: list[Sublayer]) -> tuple[ModelOutput, Dropped]:
    """The model with each chosen sublayer removed (x' = x)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    graph_outputs = {o.name for o in graph.output}
    bypass: dict[str, str] = {}                       # x' -> x
    candidates: set[int] = set()
    replaced: dict[int, list[onnx.NodeProto]] = {}
    identities: list[onnx.NodeProto] = []
    for s in chosen:
        node = graph.node[s.residual_node]
        x = s.residual_in
        if node.op_type == "Add":
            candidates.add(s.residual_node)
            bypass[node.output[0]] = x
        else:
            replaced[s.residual_node], constants = _plain_norm(node, x, s.data_type, default_opset(proto))
            graph.initializer.extend(constants)
            if len(node.output) > 3 and node.output[3]:
                bypass[node.output[3]] = x
        candidates.update(s.branch)
        candidates |= _feeders(graph, s.branch, s.residual_in)

    def resolve(name: str) -> str:
        while name in bypass:
            name = bypass[name]
        return name

    for name in bypass:
        if name in graph_outputs:   # keep the output's name: x' = Identity(x)
            identities.append(helper.make_node("Identity", [resolve(name)], [name], name=f"{name}/bypass"))
    local = {o for s in chosen for o in s.local_outputs}
    kept_outputs = [o for o in graph.output if o.name not in local]
    del graph.output[:]
    graph.output.extend(kept_outputs)

    old = list(graph.node)
    nodes = []
    for k, node in enumerate(old):
        nodes += replaced.get(k, [node])
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = resolve(name)
    nodes += identities
    position = {id(node): i for i, node in enumerate(nodes)}
    keep = live_nodes(nodes, {position[id(old[k])] for k in candidates if id(old[k]) in position},
                      {o.name for o in graph.output})
    removed = [n for i, n in enumerate(nodes) if i not in keep]
    kept = _unfuse_unread_skip_norms([n for i, n in enumerate(nodes) if i in keep], {o.name for o in graph.output})
    inputs_before = [i.name for i in graph.input]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused(graph, removed=removed)
    remaining = {i.name for i in graph.input}
    return (ModelOutput(proto, model.base_dir),
            Dropped([n for n in inputs_before if n not in remaining], sorted(local), len(old), len(graph.node)))


def _feeders(graph: onnx.GraphProto, branch: tuple[int, ...], x: str) -> set[int]:
    """Every node the branch reads from, directly or not, without looking past the stream tensor x: the branch's
    own constants, its cast of a shared mask, the shared mask and rotary tables themselves. Only those nobody
    else reads go with the branch (passes.support.graph.live_nodes decides)."""
    producer = {o: k for k, node in enumerate(graph.node) for o in node.output if o}
    found: set[int] = set()
    todo = [name for k in branch for name in graph.node[k].input if name]
    while todo:
        name = todo.pop()
        k = producer.get(name)
        if name == x or k is None or k in found or k in branch:
            continue
        found.add(k)
        todo.extend(i for i in graph.node[k].input if i)
    return found


def _plain_norm(node: onnx.NodeProto, x: str, data_type: int, opset: int) -> tuple[list[onnx.NodeProto], list]:
    """The normalization of x alone that a skip normalization residual node becomes (its output 0, its name):
    RMSNormalization (opset >= 23) or the decomposed RMSNorm times the gain, or LayerNormalization."""
    if any(node.output[k] for k in (1, 2) if len(node.output) > k):
        fail(f"{node.name}: the mean / inverse standard deviation outputs of this {node.op_type} are used; "
             f"removing its residual branch is not supported")
    eps = float(attribute(node, "epsilon", 1e-5))
    gain, out = node.input[2], node.output[0]
    if node.op_type == "SkipLayerNormalization":
        if opset < 17:
            fail(f"{node.name}: removing this branch needs LayerNormalization (opset >= 17); the model has opset {opset}")
        beta = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
        return [helper.make_node("LayerNormalization", [x, gain, *beta], [out], name=node.name, axis=-1, epsilon=eps)], []
    if opset >= 23:
        return [helper.make_node("RMSNormalization", [x, gain], [out], name=node.name, axis=-1, epsilon=eps)], []
    build = NodeBuilder(node.name)
    build.node("Mul", [build.rms_normalized(x, eps, data_type, opset), gain], "norm/Mul", output=out)
    return build.nodes, build.initializers


def _unfuse_unread_skip_norms(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """A skip normalization whose output 0 nobody reads computes only its output 3 = input + skip (+ bias)."""
    read = {name for node in nodes for name in node.input} | outputs
    result = []
    for node in nodes:
        if node.op_type in SKIP_NORMS and node.output[0] not in read and len(node.output) > 3 and node.output[3]:
            bias = node.input[4] if len(node.input) > 4 else ""
            total = node.output[3]
            if bias:
                partial = f"{node.name}/residual_sum"
                result.append(helper.make_node("Add", list(node.input[:2]), [partial], name=f"{node.name}/Add"))
                result.append(helper.make_node("Add", [partial, bias], [total], name=f"{node.name}/Add_bias"))
            else:
                result.append(helper.make_node("Add", list(node.input[:2]), [total], name=f"{node.name}/Add"))
        else:
            result.append(node)
    return result


def stage_dropped(model: LoadedModel, output: ModelOutput, out_path: Path, staging: Staging) -> tuple[Path, dict | None, str | None]:
    """Stage the model without the dropped sublayers (verified); an onnxruntime-genai folder's caches are
    renumbered and its config and tokenizer files written beside the output when it goes to another folder.
    Returns (the staged model's path, the files written beside it or None, a note or None)."""
    extra, note = beside_output(model, output.proto, Path(out_path), renumber=True)
    path = stage_model(output, Path(out_path), staging, protected={model.path} | model.external_files,
                       reference=model.path, extra_files=extra)
    return path, extra, note
