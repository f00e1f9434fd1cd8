"""Rewrite (the FFN fusion's last step): replace each planned group of FFN blocks by one wide FFN.

For a group a..z with residual input x (the group's first block input):
    x_out = x + (silu(h @ Wg* + bg*) * (h @ Wu* + bu*)) @ Wd* + sum_t bd_t,     h = n(x)
    Wg* = [diag(g_a) Wg_a | ... | diag(g_z) Wg_z]     (gains folded in float32, then cast to the weight type)
    Wu* = [diag(g_a) Wu_a | ... | diag(g_z) Wu_z]
    Wd* = [Wd_a ; ... ; Wd_z]
which equals the parallel form x + sum_t FFN_t(n(x) * g_t) exactly (up to float rounding).
With merge_gate_up (always for MatMulNBits groups: passes.ffn.int4.MERGE_GATE_UP), one MatMul with [Wg* | Wu*]
is followed by Split(gate, up): gate first.

The residual node of the group's last block is kept (its name too) and re-pointed at x and the fused output;
the blocks' own nodes are removed once nothing reads them; every other node is untouched. New weights are
`NewTensor`s produced row-chunk by row-chunk from memory-mapped sources when the model is written.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.ffn import int4
from passes.ffn.int4 import Requantized
from passes.ffn.linear import NBitsRef, Weights, write_linear, write_nbits_pieces
from passes.ffn.match import FFNBlock
from passes.ffn.plan import Group
from passes.support.builder import NodeBuilder
from passes.support.graph import GraphIndex, default_opset, drop_unused, live_nodes
from passes.support.norms import RMS_NORMS, SKIP_NORM
from passes.support.onnx_io import CHUNK_BYTES, LoadedModel, ModelOutput, NewTensor, initializer_map, np_dtype


def _accumulate_dtype(data_type: int) -> np.dtype:
    return np.dtype(np.float64 if data_type == TensorProto.DOUBLE else np.float32)


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _gate_up_tensor(name: str, members: list[FFNBlock], weights: Weights, which: tuple[str, ...]) -> NewTensor:
    """[diag(g_a) W_a | ... | diag(g_z) W_z] over the projections in `which` ("gate", "up"), in that order."""
    d = members[0].hidden_size
    dtype = np_dtype(members[0].data_type)
    acc = _accumulate_dtype(members[0].data_type)
    total = sum(b.width for b in members) * len(which)

    def chunks() -> Iterator[np.ndarray]:
        gains = [weights.gain(b.norm.gains, b.hidden_size, acc) for b in members]
        step = _rows_per_chunk(total * dtype.itemsize)
        for r0 in range(0, d, step):
            r1 = min(d, r0 + step)
            parts = [(gains[k][r0:r1, None] * weights.rows(getattr(b, proj), r0, r1).astype(acc)).astype(dtype)
                     for proj in which for k, b in enumerate(members)]
            yield np.concatenate(parts, axis=1)

    return NewTensor(name, (d, total), members[0].data_type, chunks)


def _down_tensor(name: str, members: list[FFNBlock], weights: Weights) -> NewTensor:
    """[Wd_a ; ... ; Wd_z], stacked along the input axis."""
    d = members[0].hidden_size
    dtype = np_dtype(members[0].data_type)

    def chunks() -> Iterator[np.ndarray]:
        step = _rows_per_chunk(d * dtype.itemsize)
        for b in members:
            for r0 in range(0, b.width, step):
                yield weights.rows(b.down, r0, min(b.width, r0 + step))

    return NewTensor(name, (sum(b.width for b in members), d), members[0].data_type, chunks)


def _bias_tensor(name: str, members: list[FFNBlock], weights: Weights, which: tuple[str, ...]) -> NewTensor | None:
    """Concatenated gate/up biases (zeros where a block has none); for "down", the sum of the down biases."""
    if not any(getattr(b, f"{proj}_bias") for b in members for proj in which):
        return None
    dtype = np_dtype(members[0].data_type)
    acc = _accumulate_dtype(members[0].data_type)
    if which == ("down",):
        d = members[0].hidden_size
        value = sum(weights.vector(b.down_bias, d, acc) for b in members).astype(dtype)
    else:
        value = np.concatenate([weights.vector(getattr(b, f"{proj}_bias"), b.width, acc)
                                for proj in which for b in members]).astype(dtype)
    return NewTensor(name, value.shape, members[0].data_type, lambda: iter([value]))


def _fused_ffn_nodes(prefix: str, members: list[FFNBlock], weights: Weights, opset: int,
                     merge_gate_up: bool, normalized: str | None = None
                     ) -> tuple[list[onnx.NodeProto], list[TensorProto], dict[str, NewTensor], str, list[Requantized]]:
    """Nodes, small initializers and new weight tensors of the fused FFN; returns its output (y) and the gains
    folded by requantization (int4 groups) too. With `normalized` (n(x) made by the first block's own normalization
    op, its gain set to ones) no norm is added."""
    x = members[0].residual_in
    T = members[0].data_type
    m_total = sum(b.width for b in members)
    build = NodeBuilder(prefix)
    node, const = build.node, build.const
    new: dict[str, NewTensor] = {}
    requantized: list[Requantized] = []

    def projection(input_, name, which):
        out, notes = _projection(build, input_, name, members, weights, which, new)
        requantized.extend(notes)
        return out

    # h = n(x) with a unit gain (each block's gain is folded into its weights)
    if normalized is None:
        n = build.rms_normalized(x, members[0].norm.eps, T, opset)
        h = node("Mul", [n, const("norm/weight", np.ones(members[0].hidden_size, np_dtype(T)))], "norm/Mul")
    else:
        h = normalized

    if merge_gate_up:
        gate_up = projection(h, "gate_up", ("gate", "up"))
        gate, up = f"{prefix}/gate_up/Split_output_0", f"{prefix}/gate_up/Split_output_1"
        if opset >= 13:
            split = helper.make_node("Split", [gate_up, const("gate_up/split", np.array([m_total, m_total], np.int64))],
                                     [gate, up], name=f"{prefix}/gate_up/Split", axis=-1)
        else:
            split = helper.make_node("Split", [gate_up], [gate, up], name=f"{prefix}/gate_up/Split", axis=-1, split=[m_total, m_total])
        build.nodes.append(split)
    else:
        gate = projection(h, "gate", ("gate",))
        up = projection(h, "up", ("up",))
    silu = node("Mul", [gate, node("Sigmoid", [gate], "act/Sigmoid")], "act/Mul")
    act = node("Mul", [silu, up], "act/Mul_1")
    y = projection(act, "down", ("down",))
    return build.nodes, build.initializers, new, y, requantized


def _projection(build: NodeBuilder, x: str, name: str, members: list[FFNBlock], weights: Weights,
                which: tuple[str, ...], new: dict[str, NewTensor]) -> tuple[str, list[Requantized]]:
    """x @ (the members' `which` projections fused) + their biases, in the kind of linear layer the members
    use: MatMul of a new float weight, or MatMulNBits (passes.ffn.int4: down in pieces whose products are
    summed). Returns the output and the gains folded by requantization."""
    prefix = build.prefix
    bias = _bias_tensor(f"{prefix}/{name}.bias", members, weights, which)
    ref = getattr(members[0], which[0])
    if not isinstance(ref, NBitsRef):
        tensor = (_down_tensor(f"{prefix}/down.weight", members, weights) if which == ("down",) else
                  _gate_up_tensor(f"{prefix}/{name}.weight", members, weights, which))
        return write_linear(build, x, name, tensor, bias, new), []
    if which == ("down",):
        parts, notes = int4.fused_down(members, weights), []
    else:
        fused, notes = int4.fused_gate_up(members, weights, which)
        parts = [fused]
    out = write_nbits_pieces(build, x, name, parts, ref, new)
    if bias is not None:
        new[bias.name] = bias
        out = build.node("Add", [out, bias.name], f"{name}/Add")
    return out, notes


def _reusable_norm(index: GraphIndex, block: FFNBlock) -> int | None:
    """The block's normalization op (SimplifiedLayerNormalization, RMSNormalization, SkipSimplifiedLayerNormalization)
    when its output 0 is the block's h with its one gain as the op's scale and nothing but the block's own gate and
    up projections read h: then that op, with a unit gain, computes the group's n(x) (onnxruntime's fused kernel;
    a skip norm keeps adding the previous residual). None for any other form (a decomposed norm: the fused FFN
    gets its own)."""
    found = index.producer_node(block.hidden)
    if found is None or block.norm.kind not in RMS_NORMS or len(block.norm.gains) != 1:
        return None
    k, node = found
    if node.op_type != block.norm.kind or node.output[0] != block.hidden:
        return None
    if node.input[2 if node.op_type == SKIP_NORM else 1] != block.norm.gains[0].name:
        return None
    if index.is_graph_output(block.hidden) or not set(index.consumer_ids(block.hidden)) <= set(block.nodes):
        return None
    return k


def packs_gate_up(members: list[FFNBlock], merge_gate_up: bool) -> bool:
    """Whether the fused group's gate and up are one packed MatMul cut by Split: when asked, and always for
    MatMulNBits groups (passes.ffn.int4.MERGE_GATE_UP)."""
    return merge_gate_up or (int4.MERGE_GATE_UP and isinstance(members[0].gate, NBitsRef))


def group_prefixes(graph: onnx.GraphProto, groups: list[Group]) -> dict[Group, str]:
    """Name prefix of each group's new nodes and tensors: /fused_ffn_a_z, or /fused_ffn_a_z_vK when the graph
    already has names under that prefix (a model fused before), so new names never collide with existing ones."""
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
            {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken = {name.split("/")[1] for name in names if name.startswith("/fused_ffn_")}
    prefixes = {}
    for group in groups:
        base = f"fused_ffn_{group.first}_{group.last}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_v{k}"
        prefixes[group] = f"/{name}"
    return prefixes


def fuse_groups(model: LoadedModel, blocks: list[FFNBlock], groups: list[Group], *,
                merge_gate_up: bool = False) -> tuple[ModelOutput, dict[Group, list[Requantized]]]:
    """A new model in which every group is one wide FFN, and per group the gains folded by requantization (int4
    groups; passes.ffn.int4). Groups must have passed plan.check_groups."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    weights = Weights(initializer_map(model.proto), model.base_dir)
    opset = default_opset(proto)
    insert_before: dict[int, list[onnx.NodeProto]] = {}
    candidates: set[int] = set()
    output = ModelOutput(proto, model.base_dir)
    prefixes = group_prefixes(graph, groups)
    index = GraphIndex.build(model.proto.graph)
    requantized: dict[Group, list[Requantized]] = {}
    for group in groups:
        members = [blocks[o] for o in group.ordinals]
        for b in members:
            for ref in (b.gate, b.up, b.down, b.gate_bias, b.up_bias, b.down_bias, *b.norm.gains):
                weights.check(ref)
        prefix = prefixes[group]
        norm_node = _reusable_norm(index, members[0])
        normalized = None
        if norm_node is not None:     # the first block's fused norm computes n(x) for the group: its gain becomes ones
            ones = numpy_helper.from_array(np.ones(members[0].hidden_size, np_dtype(members[0].data_type)), f"{prefix}/norm/weight")
            graph.initializer.append(ones)
            op = graph.node[norm_node]
            op.input[2 if op.op_type == SKIP_NORM else 1] = ones.name
            normalized = members[0].hidden
        nodes, small, new, y, notes = _fused_ffn_nodes(prefix, members, weights, opset,
                                                       packs_gate_up(members, merge_gate_up), normalized)
        requantized[group] = notes
        last = members[-1]
        insert_before[last.residual_node] = nodes
        residual = graph.node[last.residual_node]
        residual.input[last.residual_ports[0]] = members[0].residual_in
        residual.input[last.residual_ports[1]] = y
        graph.initializer.extend(small)
        for tensor in new.values():
            graph.initializer.append(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
        output.new_tensors.update(new)
        for b in members:
            candidates.update(b.nodes)
        candidates.update(b.residual_node for b in members[:-1])

    old_nodes = list(graph.node)
    fused_reads = {name for new_nodes in insert_before.values() for node in new_nodes for name in node.input}
    keep = live_nodes(old_nodes, candidates, {o.name for o in graph.output} | fused_reads)
    ordered = []
    for i, node in enumerate(old_nodes):
        ordered += insert_before.get(i, [])
        if i in keep:
            ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    drop_unused(graph, removed=[old_nodes[i] for i in range(len(old_nodes)) if i not in keep])
    return output, requantized
