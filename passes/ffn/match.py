"""Find: every pre-norm SwiGLU FFN block on the residual stream (the FFN fusion's first step).

A block computes, for residual input x (last dim d):
    n(x) = x / sqrt(mean(x^2, -1) + eps),   h = n(x) * g
    y    = (silu(h @ Wg + bg) * (h @ Wu + bu)) @ Wd + bd
    x'   = x + y
Recognized forms (torch.onnx TorchScript and dynamo exports, onnxruntime-optimized graphs):
  norm      Pow(x,2)|Mul(x,x) -> ReduceMean(-1) -> Add eps -> Sqrt -> Div | Reciprocal/Div(1,.)+Mul, optional Cast
            to float32 and back, gain Mul on either side; or SimplifiedLayerNormalization, RMSNormalization,
            SkipSimplifiedLayerNormalization (whose output 3 is x, the residual add of the block before it);
  SiLU      Mul(g, Sigmoid(g)) in either order, Swish(alpha=1), or com.microsoft QuickGelu(alpha=1) (what
            onnxruntime's QuickGeluFusion makes of Sigmoid+Mul);
  linear    MatMul with an initializer weight, possibly behind Transpose(perm=[1,0]) and/or Cast; optional
            bias Add; or Gemm(alpha=beta=1) on 2-D input; gate and up may be the two halves of one packed
            linear layer cut by Split(axis=-1) (what the rewrite writes with merge_gate_up);
  residual  Add(x, y) in either order, or the next SkipSimplifiedLayerNormalization(y, x) without bias.
Matching only reads the graph. Every Sigmoid/Swish/QuickGelu that does not lead to a complete block becomes a
`Rejection` naming the node and the check that failed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx
from onnx import TensorProto

from passes.ffn.linear import linear_consuming, linear_producing, packed_gate_up
from passes.support.graph import GraphIndex, attribute
from passes.support.norms import SKIP_NORM, Norm, norm_producing
from passes.support.patterns import NoMatch, WeightRef, float_source, is_unused_elsewhere, only_consumer, other_input


@dataclass(frozen=True)
class FFNBlock:
    ordinal: int
    residual_in: str                 # x, as the residual add reads it
    stream_in: str                   # the tensor entering the block: x, or the input of an identity Cast producing x
    residual_out: str                # x' = x + y ("" when the sum is never materialized)
    hidden: str                      # h
    contribution: str                # y = FFN(h), what the block adds to the residual stream
    norm: Norm
    gate: WeightRef
    up: WeightRef
    down: WeightRef
    gate_bias: WeightRef | None
    up_bias: WeightRef | None
    down_bias: WeightRef | None
    hidden_size: int                 # d
    width: int                       # m
    data_type: int                   # ONNX element type of x, h and the weights
    nodes: tuple[int, ...]           # node indices from the norm to y, in graph order
    node_names: tuple[str, ...]
    residual_node: int               # node computing x + y (an Add, or the next SkipSimplifiedLayerNormalization)
    residual_node_name: str
    residual_ports: tuple[int, int]  # input slots of x and y on the residual node


@dataclass(frozen=True)
class Rejection:
    node: str     # the activation node the candidate was anchored on, or the node where matching stopped
    check: str    # which check failed


@dataclass
class MatchResult:
    blocks: list[FFNBlock]
    rejections: list[Rejection]


def match_ffn_blocks(model: onnx.ModelProto, index: GraphIndex | None = None) -> MatchResult:
    """All FFN blocks in residual-stream (graph) order with ordinals, and why each other candidate failed."""
    index = index or GraphIndex.build(model.graph)
    constants = index.constant_nodes
    found, rejections = [], []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("Sigmoid", "Swish") and (node.op_type, node.domain) != ("QuickGelu", "com.microsoft"):
            continue
        try:
            found.append(_match_from_activation(index, i, constants))
        except NoMatch as miss:
            rejections.append(Rejection(f"{index.node_label(i)} (at {miss.node})", miss.check))
    found.sort(key=lambda b: b.residual_node)
    blocks = [_with_ordinal(b, k) for k, b in enumerate(found)]
    return MatchResult(blocks, rejections)


def _with_ordinal(block: FFNBlock, ordinal: int) -> FFNBlock:
    return replace(block, ordinal=ordinal)


# ---------------------------------------------------------------- the block

def _match_from_activation(index: GraphIndex, act_id: int, constants: frozenset[int]) -> FFNBlock:
    act = index.node(act_id)
    where = index.node_label(act_id)
    gate_out = act.input[0]
    if act.op_type in ("Swish", "QuickGelu"):
        # QuickGelu's alpha defaults to 1.702 (a GELU approximation); only alpha = 1 is SiLU
        if attribute(act, "alpha", 1.0 if act.op_type == "Swish" else 1.702) != 1.0:
            raise NoMatch(where, f"{act.op_type} with alpha != 1 is not SiLU")
        silu_id, silu_out = act_id, act.output[0]
        silu_nodes = [act_id]
    else:
        users = [k for k in index.consumer_ids(act.output[0])]
        if len(users) != 1 or index.node(users[0]).op_type != "Mul":
            raise NoMatch(where, "Sigmoid output must feed exactly one Mul (SiLU)")
        silu_id = users[0]
        if sorted(index.node(silu_id).input) != sorted([gate_out, act.output[0]]):
            raise NoMatch(index.node_label(silu_id), "Mul is not g * sigmoid(g)")
        silu_out = index.node(silu_id).output[0]
        silu_nodes = [act_id, silu_id]
    gate_users = set(index.consumer_ids(gate_out))
    if gate_users != set(silu_nodes) or index.is_graph_output(gate_out):
        raise NoMatch(where, f"gate tensor '{gate_out}' is used outside the SiLU")
    mul_id, mul = only_consumer(index, silu_out, index.node_label(silu_id))
    if mul.op_type != "Mul":
        raise NoMatch(index.node_label(mul_id), f"SiLU output must be multiplied by the up projection, found {mul.op_type}")
    up_out = other_input(mul, silu_out, index.node_label(mul_id))
    hidden_act = mul.output[0]

    packed = packed_gate_up(index, gate_out, up_out)
    if packed is not None:
        gate, up = packed
    else:
        gate = linear_producing(index, gate_out, where)
        up = linear_producing(index, up_out, index.node_label(mul_id))
    if gate.input != up.input:
        raise NoMatch(where, "gate and up projections read different tensors")
    if set(index.consumer_ids(up_out)) != {mul_id} or index.is_graph_output(up_out):
        raise NoMatch(index.node_label(mul_id), f"up tensor '{up_out}' is used outside the block")
    down = linear_consuming(index, hidden_act, index.node_label(mul_id))
    y = down.output

    hidden = gate.input
    stream, cast_out, norm, norm_nodes = norm_producing(index, hidden, where)
    x = stream

    r_id, r_node = only_consumer(index, y, index.node_label(down.nodes[0]))
    r_label = index.node_label(r_id)
    if r_node.op_type == "Add":
        x = other_input(r_node, y, r_label)
        if x not in (stream, cast_out) and float_source(index, x) != float_source(index, stream):
            raise NoMatch(r_label, "the down projection is not added to the block's own residual input")
        ports = (list(r_node.input).index(x), list(r_node.input).index(y))
        x_out = r_node.output[0]
    elif r_node.op_type == SKIP_NORM and sorted(r_node.input[:2]) == sorted([stream, y]) and not (len(r_node.input) > 3 and r_node.input[3]):
        ports = (list(r_node.input[:2]).index(x), list(r_node.input[:2]).index(y))
        x_out = r_node.output[3] if len(r_node.output) > 3 else ""
    else:
        raise NoMatch(r_label, f"the down projection must be added to the residual input x, found {r_node.op_type}")

    # shapes and types
    d, m = gate.weight.shape
    if up.weight.shape != (d, m) or down.weight.shape != (m, d):
        raise NoMatch(where, f"weight shapes gate {gate.weight.shape}, up {up.weight.shape}, down {down.weight.shape} are not [d,m],[d,m],[m,d]")
    if any(g.shape != (d,) for g in norm.gains):
        raise NoMatch(where, f"norm gain shape {[g.shape for g in norm.gains]} is not ({d},)")
    dtype = gate.weight.data_type
    if {up.weight.data_type, down.weight.data_type} != {dtype}:
        raise NoMatch(where, "gate, up and down weights have different element types")
    if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
        raise NoMatch(where, f"weights of type {TensorProto.DataType.Name(dtype)} are not supported")
    if x != stream and dtype != TensorProto.FLOAT:
        raise NoMatch(r_label, "the residual add reads the float32 Cast of x, but the block is not float32")

    nodes = sorted(set(norm_nodes + gate.nodes + up.nodes + silu_nodes + [mul_id] + down.nodes))
    for k in nodes:
        if norm.kind == SKIP_NORM and x in index.node(k).output or k in constants:
            continue   # the skip-norm also carries the previous residual add; weight casts may be shared
        for out in index.node(k).output:
            if out and out not in (x, y) and not is_unused_elsewhere(index, out, set(nodes)):
                raise NoMatch(index.node_label(k), f"intermediate tensor '{out}' is used outside the block")
    return FFNBlock(
        ordinal=-1, residual_in=x, stream_in=stream, residual_out=x_out, hidden=hidden, contribution=y, norm=norm,
        gate=gate.weight, up=up.weight, down=down.weight,
        gate_bias=gate.bias, up_bias=up.bias, down_bias=down.bias,
        hidden_size=d, width=m, data_type=dtype,
        nodes=tuple(nodes), node_names=tuple(index.node_label(k) for k in nodes),
        residual_node=r_id, residual_node_name=r_label, residual_ports=ports)
