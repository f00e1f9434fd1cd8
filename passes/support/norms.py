"""Normalizations on the residual stream, recognized in one place, from either side:

  backward (`norm_producing`, the FFN matcher): h = n(x) * gains parsed back from h to x;
  forward (`normalized_tensors`, the stream finder): every tensor x that some normalization reads.

Forms: decomposed RMSNorm Pow(x, 2) | Mul(x, x) -> ReduceMean(-1) -> Add eps -> Sqrt -> Div | Reciprocal/Div(1,.)+Mul
(optionally on a float32 Cast of x), decomposed LayerNorm ReduceMean(x) -> Sub(x, .) (forward only: the FFN fusion
needs RMSNorm); the fused ops SimplifiedLayerNormalization, RMSNormalization, LayerNormalization; and the skip
forms SkipSimplifiedLayerNormalization / SkipLayerNormalization (com.microsoft), whose output 3 is x (input + skip)
and output 0 is n(x).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from passes.support.graph import GraphIndex, attribute
from passes.support.patterns import NoMatch, WeightRef, attribute_or_input, is_scalar, is_vector_weight, producer, weight_ref

SKIP_NORM = "SkipSimplifiedLayerNormalization"
RMS_NORMS = ("SimplifiedLayerNormalization", "RMSNormalization", SKIP_NORM)        # fused RMSNorm ops
FUSED_NORMS = ("SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization")   # n(x) from input 0
SKIP_NORMS = (SKIP_NORM, "SkipLayerNormalization")                                # x = output 3, n(x) = output 0


@dataclass(frozen=True)
class Norm:
    """h = n(x) * prod(gains); `kind` is "decomposed" or the fused op's type."""
    kind: str
    eps: float
    gains: tuple[WeightRef, ...]



# ---------------------------------------------------------------- backward: h = n(x) * gains -> x

def norm_producing(index: GraphIndex, hidden: str, where: str) -> tuple[str, str | None, Norm, list[int]]:
    """Parse h = n(x) * gains back to x. Returns x, the float32 Cast of x if any, the Norm and the nodes used."""
    gains, nodes = [], []
    tensor = hidden
    while True:
        j, node = producer(index, tensor, where)
        label = index.node_label(j)
        if node.op_type == "Cast":
            nodes.append(j)
            tensor = node.input[0]
            continue
        if node.op_type == "Mul" and not gains:
            a, b = node.input
            for const, var in ((b, a), (a, b)):
                if is_vector_weight(index, const):
                    gain, gain_nodes = weight_ref(index, const, label, rank=1)
                    gains.append(gain)
                    nodes += [j] + gain_nodes
                    tensor = var
                    break
            else:
                return _decomposed_norm(index, tensor, where, nodes, gains)
            continue
        if node.op_type in RMS_NORMS:
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
    gain, gain_nodes = weight_ref(index, node.input[scale_slot], label, rank=1)
    eps = float(attribute(node, "epsilon", 1e-5))
    return x, None, Norm(node.op_type, eps, tuple(gains) + (gain,)), nodes + [j] + gain_nodes


def _decomposed_norm(index, tensor, where, nodes, gains):
    """tensor = xf * (1 / sqrt(mean(xf^2) + eps)) or xf / sqrt(...), xf = x or Cast(x, float32)."""
    j, node = producer(index, tensor, where)
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
            if found and found[1].op_type == "Div" and is_scalar(index, found[1].input[0], 1.0):
                xf, sqrt_out = other, found[1].input[1]
                nodes.append(found[0])
                if index.producer_node(found[1].input[0]):
                    nodes.append(index.producer[found[1].input[0]])   # the Constant 1, else left dangling
                break
        if xf is None:
            raise NoMatch(label, "Mul is neither a gain (constant operand) nor x * 1/sqrt(...)")
    else:
        raise NoMatch(label, f"expected the RMSNorm scaling (Mul/Div), found {node.op_type}")
    j, sqrt = producer(index, sqrt_out, label)
    if sqrt.op_type != "Sqrt":
        raise NoMatch(index.node_label(j), f"expected Sqrt, found {sqrt.op_type}")
    nodes.append(j)
    j, add = producer(index, sqrt.input[0], index.node_label(j))
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
    j, mean = producer(index, mean_out, label)
    label = index.node_label(j)
    if mean.op_type != "ReduceMean":
        raise NoMatch(label, f"expected ReduceMean, found {mean.op_type}")
    axes = attribute_or_input(index, mean, "axes", 1, nodes)
    if axes is None or list(np.ravel(axes)) != [-1] or attribute(mean, "keepdims", 1) != 1:
        raise NoMatch(label, f"ReduceMean must reduce axis -1 with keepdims (axes={axes})")
    nodes.append(j)
    j, square = producer(index, mean.input[0], label)
    label = index.node_label(j)
    if not squares(index, square, xf):
        raise NoMatch(label, f"expected Pow(x, 2) or Mul(x, x) of the normalized tensor, found {square.op_type}")
    nodes.append(j)
    if square.op_type == "Pow" and index.producer_node(square.input[1]):
        nodes.append(index.producer[square.input[1]])
    x, cast_out = xf, None
    found = index.producer_node(xf)
    if found and found[1].op_type == "Cast":
        if attribute(found[1], "to") != TensorProto.FLOAT:
            raise NoMatch(index.node_label(found[0]), "normalization input Cast is not to float32")
        x, cast_out = found[1].input[0], xf
        nodes.append(found[0])
    return x, cast_out, Norm("decomposed", eps, tuple(gains)), nodes


def squares(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """node computes tensor^2: Pow(tensor, 2) or Mul(tensor, tensor) (the first step of a decomposed RMSNorm)."""
    return (node.op_type == "Pow" and node.input[0] == tensor and is_scalar(index, node.input[1], 2.0)) or \
           (node.op_type == "Mul" and list(node.input) == [tensor, tensor])


# ---------------------------------------------------------------- forward: which tensors are normalized

def float_casts(index: GraphIndex, x: str) -> list[str]:
    """Outputs of the float32 Casts of x."""
    return [index.node(c).output[0] for c in index.consumer_ids(x)
            if index.node(c).op_type == "Cast" and attribute(index.node(c), "to") == TensorProto.FLOAT]


def _decomposed_entry(index: GraphIndex, tensor: str) -> list[int]:
    """Nodes starting a decomposed RMSNorm / LayerNorm of `tensor`: tensor^2 feeding ReduceMean, or ReduceMean(t)
    feeding Sub(t, .)."""
    entries = []
    for c in index.consumer_ids(tensor):
        node = index.node(c)
        outs = [index.node(k) for k in index.consumer_ids(node.output[0])] if node.output else []
        if squares(index, node, tensor) and any(o.op_type == "ReduceMean" for o in outs):
            entries.append(c)
        elif node.op_type == "ReduceMean" and node.input[0] == tensor and \
                any(o.op_type == "Sub" and o.input[0] == tensor for o in outs):
            entries.append(c)
    return entries


def normalized_tensors(index: GraphIndex):
    """(x, seed tensors from which n(x) flows, nodes of the normalization that belong to the branch), each
    normalization once (a float32 Cast of x is normalized as x)."""
    for k, node in enumerate(index.graph.node):
        if node.op_type in FUSED_NORMS and node.input:
            yield node.input[0], [node.output[0]], [k]
        elif node.op_type in SKIP_NORMS and len(node.output) > 3 and node.output[3]:
            yield node.output[3], [node.output[0]], []
    claimed: set[int] = set()
    candidates = [i.name for i in index.graph.input] + [o for node in index.graph.node for o in node.output if o]
    for x in dict.fromkeys(candidates):
        for source in [x, *float_casts(index, x)]:
            entries = [e for e in _decomposed_entry(index, source) if e not in claimed]
            if entries:
                claimed.update(entries)
                nodes = entries + ([index.producer[source]] if source != x else [])
                yield x, [index.node(e).output[0] for e in entries], nodes
