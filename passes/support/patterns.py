"""Sub-patterns every matcher is built from: constants behind Identity / Transpose / Cast (`WeightRef`), single
consumers, scalar constants. Each helper walks the graph from a tensor and returns what it found (with the node
indices it used) or raises `NoMatch` naming the node and the check that failed. They only read the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from passes.support.graph import GraphIndex, attribute


@dataclass(frozen=True)
class WeightRef:
    """A constant used by a block: initializer `name`, optionally read through Transpose(perm=[1,0]) and Cast.

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


class NoMatch(Exception):
    """A candidate that is not the pattern: `node` is where matching stopped, `check` the check that failed."""

    def __init__(self, node: str, check: str):
        super().__init__(check)
        self.node, self.check = node, check


def only_consumer(index: GraphIndex, tensor: str, where: str) -> tuple[int, onnx.NodeProto]:
    users = index.consumer_ids(tensor)
    if len(users) != 1 or index.is_graph_output(tensor):
        raise NoMatch(where, f"tensor '{tensor}' must feed exactly one node (has {len(users)} consumers"
                             f"{', and is a graph output' if index.is_graph_output(tensor) else ''})")
    return users[0], index.node(users[0])


def producer(index: GraphIndex, tensor: str, where: str) -> tuple[int, onnx.NodeProto]:
    found = index.producer_node(tensor)
    if found is None:
        raise NoMatch(where, f"tensor '{tensor}' is not produced by a node")
    return found


def other_input(node: onnx.NodeProto, tensor: str, where: str) -> str:
    ins = list(node.input)
    if len(ins) != 2 or tensor not in ins:
        raise NoMatch(where, f"{node.op_type} must take '{tensor}' and one other input")
    return ins[1] if ins[0] == tensor else ins[0]


def weight_ref(index: GraphIndex, tensor: str, where: str, rank: int) -> tuple[WeightRef, list[int]]:
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


def is_vector_weight(index: GraphIndex, tensor: str) -> bool:
    """True when `tensor` resolves (weight_ref) to a rank-1 initializer: a gain or a bias."""
    try:
        weight_ref(index, tensor, "", rank=1)
        return True
    except NoMatch:
        return False


def is_unused_elsewhere(index: GraphIndex, tensor: str, allowed: set[int]) -> bool:
    return not index.is_graph_output(tensor) and all(c in allowed for c in index.consumer_ids(tensor))


def attribute_or_input(index: GraphIndex, node: onnx.NodeProto, name: str, slot: int, nodes: list[int]):
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


def is_scalar(index: GraphIndex, tensor: str, expected: float) -> bool:
    value = index.small_constant(tensor, max_elements=1)
    return value is not None and float(value.reshape(())) == expected
