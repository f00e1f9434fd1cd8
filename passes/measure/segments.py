"""Segments: the graph cut at residual nodes, so that each part's weights are loaded once and every variant of
the run (a stream, passes.measure.streams) is pushed through it before the next part.

The cuts are residual nodes R_1 < ... < R_K (x' = R(x, a): an Add, or a skip normalization) in stream order.
A node n belongs to segment seg(n) = the largest k such that n depends on R_k, 0 when it depends on none (the
prologue: embedding, masks, rotary tables, the first sublayer's branch). Segment k >= 1 so begins with R_k and
holds what follows up to the next residual node: everything a node of segment k reads comes from segments
<= k or from the graph inputs, and every node that a change of R_k's inputs can reach lies in segments >= k.
Constant subgraphs (weight casts and transposes, a tied embedding's transpose) are repeated in each segment that
reads them. The cuts are the residual nodes the analysis needs (where runs depart or are observed), and as many
of the others as keep every segment's weights under SEGMENT_BYTES. Inside its segment R_k reads x and a from two
inputs of their own (X_SLOT, A_SLOT), so that a stream can hand R_k another x or a while every other reader of
those tensors sees what the stream computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import onnx
from onnx import helper

from passes.measure.runs import submodel, weight_bytes, weight_flops
from passes.support.graph import GraphIndex
from passes.support.onnx_io import placeholder

X_SLOT, A_SLOT = "__segment/x", "__segment/a"
SEGMENT_BYTES = 2 << 30     # residual nodes the analysis does not need are cut where a segment would pass this


@dataclass
class Segment:
    index: int
    nodes: list[int]                    # graph node indices in topological order (constant nodes included)
    inputs: list[str]                   # tensors its nodes read from earlier segments or the graph inputs
    slots: tuple[str, str] | None       # the tensors R_k reads as x and a (fed through X_SLOT and A_SLOT)
    outputs: list[str]                  # tensors made here that later segments read, or targets
    inits: list[str]
    residual: int | None                # R_k; None for the prologue
    ports: tuple[int, int] | None       # input slots of x and a on R_k
    flops: float                        # weight-MatMul FLOPs per token (passes.measure.runs.weight_flops)
    weight_bytes: int


@dataclass
class SegmentPlan:
    net: GraphIndex
    segments: list[Segment]             # 0 (prologue) .. K; segment k >= 1 starts at R_k
    last_reader: dict[str, int]         # tensor -> the last segment reading it (len(segments) for targets)
    targets: list[str]

    def segment_of(self, residual_node: int) -> int:
        for segment in self.segments:
            if segment.residual == residual_node:
                return segment.index
        raise ValueError(f"node {residual_node} is not a cut")


def _topological_order(net: GraphIndex, nodes: set[int]) -> list[int]:
    """`nodes` in an order where every producer comes before its readers: the graph's own order when it is one
    (ONNX asks for it), else Kahn's algorithm in graph order."""
    ordered = sorted(nodes)
    if all(net.producer.get(t, -1) < k for k in ordered for t in net.reads[k]):
        return ordered
    waiting = {k: {net.producer[t] for t in net.reads[k] if net.producer.get(t) in nodes} for k in ordered}
    order, ready = [], [k for k in ordered if not waiting[k]]
    while ready:
        k = ready.pop(0)
        order.append(k)
        for t in net.graph.node[k].output:
            for c in net.consumer_ids(t):
                if c in waiting and k in waiting[c]:
                    waiting[c].discard(k)
                    if not waiting[c]:
                        ready.append(c)
    if len(order) != len(ordered):
        raise ValueError("the graph has a cycle")
    return order


def _ancestors(net: GraphIndex, tensors: Sequence[str], nodes: Sequence[int] = ()) -> set[int]:
    """Every node needed to compute `tensors` and to run `nodes`."""
    found, stack = set(nodes), [t for k in nodes for t in net.reads[k]] + list(tensors)
    while stack:
        k = net.producer.get(stack.pop())
        if k is not None and k not in found:
            found.add(k)
            stack.extend(net.reads[k])
    return found


def plan_segments(net: GraphIndex, cuts: Mapping[int, tuple[int, int]], targets: Sequence[str],
                  more_cuts: Mapping[int, tuple[int, int]] | None = None, max_bytes: int = SEGMENT_BYTES) -> SegmentPlan:
    """Cut the part of the graph needed for `targets` and for running every cut (residual node -> (x port, a port))
    into segments (see the module docstring). Of `more_cuts` (every residual node of the stream, say), those in
    that part are cut too where the weights since the last cut would otherwise pass `max_bytes`, so a segment
    holds about one sublayer of a large model and no more sessions than `cuts` asks for on a small one."""
    required = _ancestors(net, targets, list(cuts))
    more = {r: ports for r, ports in (more_cuts or {}).items() if r in required and r not in cuts}
    if not more:
        return _plan(net, cuts, targets, required)
    kept, weights = dict(cuts), 0
    for segment in _plan(net, {**more, **cuts}, targets, required).segments:
        if segment.residual in more and weights + segment.weight_bytes > max_bytes:
            kept[segment.residual] = more[segment.residual]
        weights = segment.weight_bytes if segment.residual in kept else weights + segment.weight_bytes
    return _plan(net, kept, targets, required)


def _plan(net: GraphIndex, cuts: Mapping[int, tuple[int, int]], targets: Sequence[str], required: set[int]) -> SegmentPlan:
    """plan_segments with exactly these cuts, over the `required` nodes."""
    order = _topological_order(net, required)
    position = {k: p for p, k in enumerate(order)}
    residuals = sorted(cuts, key=position.__getitem__)
    number = {r: k + 1 for k, r in enumerate(residuals)}
    constant = net.constant_nodes
    seg: dict[int, int] = {}
    members: list[list[int]] = [[] for _ in range(len(residuals) + 1)]
    for k in order:
        if k in constant:
            continue
        seg[k] = max((seg.get(net.producer.get(t), 0) for t in net.reads[k]), default=0)
        if k in number:
            if seg[k] >= number[k]:
                raise ValueError(f"residual node {net.node_label(k)} depends on a later cut")
            seg[k] = number[k]
        members[seg[k]].append(k)
    parts = [_segment_reads(net, nodes, residuals[i - 1] if i else None, cuts, constant) for i, nodes in enumerate(members)]
    last_reader = {t: i for i, (inputs, slots, _, _) in enumerate(parts) for t in (*inputs, *(slots or ()))}
    last_reader.update({t: len(members) for t in targets})
    flops = weight_flops(net)
    segments = []
    for index, (inputs, slots, inits, nodes) in enumerate(parts):
        residual = residuals[index - 1] if index else None
        made = {o for k in members[index] for o in net.node(k).output if o}
        nodes = sorted(nodes, key=position.__getitem__)
        segments.append(Segment(index, nodes, inputs, slots, sorted(t for t in made if last_reader.get(t, -1) > index),
                                inits, residual, cuts.get(residual), sum(flops[k] for k in nodes), weight_bytes(net, inits)))
    return SegmentPlan(net, segments, last_reader, list(targets))


def _segment_reads(net: GraphIndex, members: list[int], residual: int | None, cuts: Mapping[int, tuple[int, int]],
                   constant: frozenset[int]) -> tuple[list[str], tuple[str, str] | None, list[str], list[int]]:
    """(inputs, slots, initializers, nodes with the constant subgraphs they read) of one segment."""
    inside, stack, slots = set(members), [], None
    for k in members:
        if k == residual:
            node, ports = net.node(k), cuts[k]
            slots = (node.input[ports[0]], node.input[ports[1]])
            stack.extend(t for i, t in enumerate(node.input) if t and i not in ports)
        else:
            stack.extend(net.reads[k])
    inputs, inits, nodes, seen = [], set(), list(members), set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        k = net.producer.get(t)
        if t in net.initializers or t in net.sparse_initializers:
            inits.add(t)
        elif k in constant and k not in inside:
            inside.add(k)
            nodes.append(k)
            stack.extend(net.reads[k])
        elif k not in inside:
            inputs.append(t)
    return sorted(inputs), slots, sorted(inits), nodes


def segment_model(proto: onnx.ModelProto, plan: SegmentPlan, index: int, types: Mapping[str, int]) -> onnx.ModelProto:
    """The model of segment `index`: its inputs typed by `types` (element types of the values fed), R's x and a
    read from X_SLOT and A_SLOT, its outputs exposed."""
    net, segment = plan.net, plan.segments[index]
    nodes = []
    for k in segment.nodes:
        node = net.node(k)
        if k == segment.residual:
            node = onnx.NodeProto()
            node.CopyFrom(net.node(k))
            node.input[segment.ports[0]], node.input[segment.ports[1]] = X_SLOT, A_SLOT
        nodes.append(node)
    inputs = [net.inputs[t] if t in net.inputs else helper.make_tensor_value_info(t, types[t], None) for t in segment.inputs]
    if segment.slots is not None:
        inputs += [helper.make_tensor_value_info(slot, types[t], None) for slot, t in zip((X_SLOT, A_SLOT), segment.slots)]
    outputs = [helper.ValueInfoProto(name=t) for t in segment.outputs]
    return submodel(proto, net, f"segment_{index}", nodes, inputs, outputs, segment.inits)


def inferred_types(proto: onnx.ModelProto) -> dict[str, int]:
    """The element types of the graph's tensors as ONNX shape inference finds them, on a copy that leaves big
    inline weights out (passes.support.onnx_io.placeholder); {} where inference fails. Tensors it cannot type (the
    outputs of an op it does not know, and what follows from them) are absent."""
    light = onnx.ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    for field in ("node", "input", "output", "sparse_initializer"):     # value_info left out: it may be stale
        getattr(light.graph, field).extend(getattr(proto.graph, field))
    light.graph.initializer.extend(placeholder(t) for t in proto.graph.initializer)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:       # onnx raises its own errors, and others, for graphs it cannot read
        return {}
    values = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
