"""The sub-patterns FFN matching is built from (passes.pipeline.match): constant weights behind Transpose and Cast,
linear layers (MatMul / Gemm with an optional bias Add, or one packed gate|up layer cut by Split), and the
normalization h = n(x) * gains in its decomposed and fused forms. Each parser walks the graph from a tensor and
either returns what it found with the node indices it used, or raises NoMatch naming the node and the check that
failed. They only read the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto

from passes.support.graph import GraphIndex, attribute

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM_OPS = ("SimplifiedLayerNormalization", "RMSNormalization", SKIP_NORM)


@dataclass(frozen=True)
class WeightRef:
    """A constant used by the block: initializer `name`, optionally read through Transpose(perm=[1,0]) and Cast.

    The effective value is cast(transpose?(stored)); for matrices it is in MatMul layout [in, out]. `columns`
    [c0, c1) selects a slice of the last axis: the gate or up half of a packed gate|up weight or bias.
    """
    name: str
    dims: tuple[int, ...]
    transposed: bool = False
    cast_to: int | None = None
    stored_type: int = TensorProto.FLOAT
    columns: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(reversed(self.dims)) if self.transposed else tuple(self.dims)
        if self.columns is not None:
            shape = shape[:-1] + (self.columns[1] - self.columns[0],)
        return shape

    @property
    def data_type(self) -> int:
        return self.cast_to if self.cast_to is not None else self.stored_type


@dataclass(frozen=True)
class Norm:
    """h = n(x) * prod(gains); `kind` is "decomposed" or the fused op's type."""
    kind: str
    eps: float
    gains: tuple[WeightRef, ...]


class NoMatch(Exception):
    def __init__(self, node: str, check: str):
        super().__init__(check)
        self.node, self.check = node, check


# ---------------------------------------------------------------- helpers over the index

def only_consumer(index: GraphIndex, tensor: str, where: str) -> tuple[int, onnx.NodeProto]:
    users = index.consumer_ids(tensor)
    if len(users) != 1 or index.is_graph_output(tensor):
        raise NoMatch(where, f"tensor '{tensor}' must feed exactly one node (has {len(users)} consumers"
                             f"{', and is a graph output' if index.is_graph_output(tensor) else ''})")
    return users[0], index.node(users[0])


def _producer(index: GraphIndex, tensor: str, where: str) -> tuple[int, onnx.NodeProto]:
    found = index.producer_node(tensor)
    if found is None:
        raise NoMatch(where, f"tensor '{tensor}' is not produced by a node")
    return found


def other_input(node: onnx.NodeProto, tensor: str, where: str) -> str:
    ins = list(node.input)
    if len(ins) != 2 or tensor not in ins:
        raise NoMatch(where, f"{node.op_type} must take '{tensor}' and one other input")
    return ins[1] if ins[0] == tensor else ins[0]


def _weight(index: GraphIndex, tensor: str, where: str, rank: int) -> tuple[WeightRef, list[int]]:
    """Resolve a constant operand: initializer, optionally behind Identity, Transpose(perm=[1,0]) and Cast. Returns the nodes used."""
    used, transposed, cast_to = [], False, None
    while tensor not in index.initializers:
        found = index.producer_node(tensor)
        if found is None:
            raise NoMatch(where, f"'{tensor}' is not an initializer")
        j, node = found
        if node.op_type == "Identity":
            pass                      # torch.onnx stores equal initializers once, others read it through Identity
        elif node.op_type == "Cast" and cast_to is None:
            cast_to = attribute(node, "to")
        elif node.op_type == "Transpose" and not transposed and rank == 2 and list(attribute(node, "perm", [1, 0])) == [1, 0]:
            transposed = True
        else:
            raise NoMatch(where, f"weight '{tensor}' comes from {node.op_type}, not from an initializer")
        used.append(j)
        tensor = node.input[0]
    proto = index.initializers[tensor]
    if len(proto.dims) != rank:
        raise NoMatch(where, f"weight '{tensor}' has rank {len(proto.dims)}, expected {rank}")
    return WeightRef(tensor, tuple(proto.dims), transposed, cast_to, proto.data_type), used


def is_unused_elsewhere(index: GraphIndex, tensor: str, allowed: set[int]) -> bool:
    return not index.is_graph_output(tensor) and all(c in allowed for c in index.consumer_ids(tensor))


# ---------------------------------------------------------------- linear layers

@dataclass
class _Linear:
    input: str
    output: str          # after the bias, if any
    weight: WeightRef
    bias: WeightRef | None
    nodes: list[int]


def linear_producing(index: GraphIndex, tensor: str, where: str) -> _Linear:
    """tensor = input @ W (+ b)."""
    j, node = _producer(index, tensor, where)
    bias, nodes = None, []
    if node.op_type == "Add":
        a, b = node.input
        for bias_name, mm_out in ((b, a), (a, b)):
            if index.constant_tensor(bias_name) is not None or _resolves_to_initializer(index, bias_name):
                bias, bias_nodes = _weight(index, bias_name, index.node_label(j), rank=1)
                nodes += [j] + bias_nodes
                only_consumer(index, mm_out, index.node_label(j))
                j, node = _producer(index, mm_out, index.node_label(j))
                break
        else:
            raise NoMatch(index.node_label(j), "Add before the activation has no constant bias operand")
    label = index.node_label(j)
    if node.op_type == "MatMul":
        weight, weight_nodes = _weight(index, node.input[1], label, rank=2)
    elif node.op_type == "Gemm":
        if bias is not None:
            raise NoMatch(label, "Gemm followed by a bias Add")
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            raise NoMatch(label, "Gemm with transA or alpha/beta != 1")
        weight, weight_nodes = _weight(index, node.input[1], label, rank=2)
        if attribute(node, "transB", 0):
            weight = WeightRef(weight.name, weight.dims, not weight.transposed, weight.cast_to, weight.stored_type)
        if len(node.input) > 2 and node.input[2]:
            bias, bias_nodes = _weight(index, node.input[2], label, rank=1)
            weight_nodes += bias_nodes
    else:
        raise NoMatch(label, f"expected MatMul or Gemm, found {node.op_type}")
    if bias is not None and bias.shape != (weight.shape[1],):
        raise NoMatch(label, f"bias shape {bias.shape} does not match weight output size {weight.shape[1]}")
    return _Linear(node.input[0], tensor, weight, bias, [j] + weight_nodes + nodes)


def packed_gate_up(index: GraphIndex, gate_out: str, up_out: str) -> tuple[_Linear, _Linear] | None:
    """gate and up as the two equal halves of one linear layer, cut by Split(axis=-1); None if not this form."""
    found = index.producer_node(gate_out)
    if found is None or found[1].op_type != "Split" or index.producer_node(up_out) != found:
        return None
    j, split = found
    label = index.node_label(j)
    if len(split.output) != 2 or attribute(split, "axis", 0) != -1:
        raise NoMatch(label, "a packed gate|up Split must cut the last axis (axis=-1) into two outputs")
    packed = linear_producing(index, split.input[0], label)
    total = packed.weight.shape[1]
    nodes = packed.nodes + [j]
    sizes = _attribute_or_input(index, split, "split", 1, nodes)
    if sizes is None and not (len(split.input) > 1 and split.input[1]):
        sizes = [total // 2] * 2
    if sizes is None or len(sizes) != 2 or sizes[0] != sizes[1] or sum(sizes) != total:
        raise NoMatch(label, f"packed gate|up Split sizes {sizes} are not two equal halves of {total}")

    def half(tensor: str) -> _Linear:
        c0 = list(split.output).index(tensor) * sizes[0]
        cols = (c0, c0 + sizes[0])
        bias = None if packed.bias is None else replace(packed.bias, columns=cols)
        return _Linear(packed.input, tensor, replace(packed.weight, columns=cols), bias, nodes)
    return half(gate_out), half(up_out)


def _resolves_to_initializer(index: GraphIndex, tensor: str) -> bool:
    try:
        _weight(index, tensor, "", rank=1)
        return True
    except NoMatch:
        return False


def linear_consuming(index: GraphIndex, tensor: str, where: str) -> _Linear:
    """The single linear layer reading `tensor`, followed by an optional bias Add."""
    j, node = only_consumer(index, tensor, where)
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != tensor:
        raise NoMatch(index.node_label(j), f"down projection must be a MatMul/Gemm reading '{tensor}' as its first input, found {node.op_type}")
    out = node.output[0]
    users = index.consumer_ids(out)
    if len(users) == 1 and not index.is_graph_output(out) and node.op_type == "MatMul":
        k = users[0]
        add = index.node(k)
        if add.op_type == "Add" and _resolves_to_initializer(index, other_input(add, out, index.node_label(k))):
            out = add.output[0]
    return linear_producing(index, out, where)


# ---------------------------------------------------------------- normalization

def norm_producing(index: GraphIndex, hidden: str, where: str) -> tuple[str, str | None, Norm, list[int]]:
    """Parse h = n(x) * gains back to x. Returns x, the float32 Cast of x if any, the Norm and the nodes used."""
    gains, nodes = [], []
    tensor = hidden
    while True:
        j, node = _producer(index, tensor, where)
        label = index.node_label(j)
        if node.op_type == "Cast":
            nodes.append(j)
            tensor = node.input[0]
            continue
        if node.op_type == "Mul" and not gains:
            a, b = node.input
            for const, var in ((b, a), (a, b)):
                if _resolves_to_initializer(index, const):
                    gain, gain_nodes = _weight(index, const, label, rank=1)
                    gains.append(gain)
                    nodes += [j] + gain_nodes
                    tensor = var
                    break
            else:
                return _decomposed_norm(index, tensor, where, nodes, gains)
            continue
        if node.op_type in NORM_OPS:
            return _fused_norm_op(index, j, node, tensor, nodes, gains)
        return _decomposed_norm(index, tensor, where, nodes, gains)


def _fused_norm_op(index, j, node, tensor, nodes, gains):
    label = index.node_label(j)
    if node.op_type == SKIP_NORM:
        if len(node.input) > 3 and node.input[3]:
            raise NoMatch(label, "SkipSimplifiedLayerNormalization with a bias input")
        if tensor != node.output[0] or len(node.output) < 4 or not node.output[3]:
            raise NoMatch(label, "SkipSimplifiedLayerNormalization must expose the residual sum (output 3)")
        if any(index.consumer_ids(o) or index.is_graph_output(o) for o in node.output[1:3] if o):
            raise NoMatch(label, "SkipSimplifiedLayerNormalization mean/inv_std outputs are used")
        x = node.output[3]
        scale_slot = 2
    else:
        if len(node.output) > 1 and any(index.consumer_ids(o) or index.is_graph_output(o) for o in node.output[1:] if o):
            raise NoMatch(label, f"{node.op_type} auxiliary outputs are used")
        x = node.input[0]
        scale_slot = 1
    if attribute(node, "axis", -1) != -1:
        raise NoMatch(label, f"{node.op_type} normalizes over axis {attribute(node, 'axis')}, not -1")
    gain, gain_nodes = _weight(index, node.input[scale_slot], label, rank=1)
    eps = float(attribute(node, "epsilon", 1e-5))
    return x, None, Norm(node.op_type, eps, tuple(gains) + (gain,)), nodes + [j] + gain_nodes


def _decomposed_norm(index, tensor, where, nodes, gains):
    """tensor = xf * (1 / sqrt(mean(xf^2) + eps)) or xf / sqrt(...), xf = x or Cast(x, float32)."""
    j, node = _producer(index, tensor, where)
    label = index.node_label(j)
    if node.op_type == "Div":
        xf, sqrt_out = node.input
        nodes.append(j)
    elif node.op_type == "Mul":
        nodes.append(j)
        xf = sqrt_out = None
        for r, other in ((node.input[1], node.input[0]), (node.input[0], node.input[1])):
            found = index.producer_node(r)
            if found and found[1].op_type == "Reciprocal":
                xf, sqrt_out = other, found[1].input[0]
                nodes.append(found[0])
                break
            if found and found[1].op_type == "Div" and _is_scalar(index, found[1].input[0], 1.0):
                xf, sqrt_out = other, found[1].input[1]
                nodes.append(found[0])
                if index.producer_node(found[1].input[0]):
                    nodes.append(index.producer[found[1].input[0]])   # the Constant 1, else left dangling
                break
        if xf is None:
            raise NoMatch(label, "Mul is neither a gain (constant operand) nor x * 1/sqrt(...)")
    else:
        raise NoMatch(label, f"expected the RMSNorm scaling (Mul/Div), found {node.op_type}")
    j, sqrt = _producer(index, sqrt_out, label)
    if sqrt.op_type != "Sqrt":
        raise NoMatch(index.node_label(j), f"expected Sqrt, found {sqrt.op_type}")
    nodes.append(j)
    j, add = _producer(index, sqrt.input[0], index.node_label(j))
    label = index.node_label(j)
    if add.op_type != "Add":
        raise NoMatch(label, f"expected Add eps, found {add.op_type}")
    nodes.append(j)
    eps = mean_out = None
    for e, m in ((add.input[1], add.input[0]), (add.input[0], add.input[1])):
        value = index.small_constant(e, max_elements=1)
        if value is not None:
            eps, mean_out = float(value.reshape(())), m
            if index.producer_node(e):
                nodes.append(index.producer[e])
            break
    if eps is None:
        raise NoMatch(label, "Add before Sqrt has no scalar eps constant")
    j, mean = _producer(index, mean_out, label)
    label = index.node_label(j)
    if mean.op_type != "ReduceMean":
        raise NoMatch(label, f"expected ReduceMean, found {mean.op_type}")
    axes = _attribute_or_input(index, mean, "axes", 1, nodes)
    if axes is None or list(np.ravel(axes)) != [-1] or attribute(mean, "keepdims", 1) != 1:
        raise NoMatch(label, f"ReduceMean must reduce axis -1 with keepdims (axes={axes})")
    nodes.append(j)
    j, square = _producer(index, mean.input[0], label)
    label = index.node_label(j)
    if square.op_type == "Pow" and square.input[0] == xf and _is_scalar(index, square.input[1], 2.0):
        if index.producer_node(square.input[1]):
            nodes.append(index.producer[square.input[1]])
    elif not (square.op_type == "Mul" and list(square.input) == [xf, xf]):
        raise NoMatch(label, f"expected Pow(x, 2) or Mul(x, x) of the normalized tensor, found {square.op_type}")
    nodes.append(j)
    x, cast_out = xf, None
    found = index.producer_node(xf)
    if found and found[1].op_type == "Cast":
        if attribute(found[1], "to") != TensorProto.FLOAT:
            raise NoMatch(index.node_label(found[0]), "normalization input Cast is not to float32")
        x, cast_out = found[1].input[0], xf
        nodes.append(found[0])
    return x, cast_out, Norm("decomposed", eps, tuple(gains)), nodes


def _attribute_or_input(index: GraphIndex, node: onnx.NodeProto, name: str, slot: int, nodes: list[int]):
    """A list-valued setting given as attribute `name` (older opsets) or as constant input `slot` (newer ones);
    the Constant node producing the input joins `nodes`. None when absent or not constant."""
    value = attribute(node, name)
    if value is None and len(node.input) > slot and node.input[slot]:
        constant = index.small_constant(node.input[slot])
        value = None if constant is None else constant.tolist()
        if index.producer_node(node.input[slot]):
            nodes.append(index.producer[node.input[slot]])
    return value


def float_source(index: GraphIndex, tensor: str) -> str:
    """s for tensor = Cast(s, to=float32), else tensor. Two float32 Casts of one tensor hold the same values
    (onnxruntime's CPU fp16 graphs add one for the residual Add beside the norm's own)."""
    found = index.producer_node(tensor)
    if found is not None and found[1].op_type == "Cast" and attribute(found[1], "to") == TensorProto.FLOAT:
        return found[1].input[0]
    return tensor


def _is_scalar(index: GraphIndex, tensor: str, expected: float) -> bool:
    value = index.small_constant(tensor, max_elements=1)
    return value is not None and float(value.reshape(())) == expected
