"""The kinds of linear layer the FFN fusion reads and writes, behind one small interface.

Reading: `linear_producing(index, t)` parses t = input @ W (+ b) back from t, `linear_consuming` the single linear
layer reading t, `packed_gate_up` gate and up as two halves of one layer cut by Split. The op that holds the
weight is looked up in `LINEAR_READERS` (op type -> reader): MatMul with a constant weight (behind Identity,
Transpose(perm=[1,0]) and Cast), and Gemm(alpha=beta=1, transA=0, optional transB and bias C). A new kind of
linear layer (such as com.microsoft MatMulNBits) is one more reader, one more writer and its `Weights` access.

Values: `Weights` reads the effective weight values (transpose, cast and column slice applied) a row range at a
time from memory-mapped storage.

Writing: `write_linear` emits y = x @ W (+ b) for a new weight as MatMul (+ Add).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from passes.support.builder import NodeBuilder
from passes.support.errors import fail
from passes.support.graph import GraphIndex, attribute
from passes.support.onnx_io import NewTensor, np_dtype, tensor_array
from passes.support.patterns import (
    NoMatch,
    WeightRef,
    attribute_or_input,
    is_vector_weight,
    only_consumer,
    other_input,
    producer,
    weight_ref,
)


@dataclass
class Linear:
    """output = input @ weight (+ bias), computed by `nodes`."""
    input: str
    output: str          # after the bias, if any
    weight: WeightRef
    bias: WeightRef | None
    nodes: list[int]


# ---------------------------------------------------------------- readers: op type -> (weight, bias, nodes)

Reader = Callable[[GraphIndex, int, onnx.NodeProto, bool], tuple[WeightRef, "WeightRef | None", list[int]]]


def _read_matmul(index: GraphIndex, j: int, node: onnx.NodeProto, has_bias: bool):
    weight, nodes = weight_ref(index, node.input[1], index.node_label(j), rank=2)
    return weight, None, nodes


def _read_gemm(index: GraphIndex, j: int, node: onnx.NodeProto, has_bias: bool):
    label = index.node_label(j)
    if has_bias:
        raise NoMatch(label, "Gemm followed by a bias Add")
    if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        raise NoMatch(label, "Gemm with transA or alpha/beta != 1")
    weight, nodes = weight_ref(index, node.input[1], label, rank=2)
    if attribute(node, "transB", 0):
        weight = replace(weight, transposed=not weight.transposed)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias, bias_nodes = weight_ref(index, node.input[2], label, rank=1)
        nodes += bias_nodes
    return weight, bias, nodes


LINEAR_READERS: dict[str, Reader] = {"MatMul": _read_matmul, "Gemm": _read_gemm}
KINDS = " or ".join(LINEAR_READERS)


def linear_producing(index: GraphIndex, tensor: str, where: str) -> Linear:
    """tensor = input @ W (+ b): an optional bias Add, then one of LINEAR_READERS."""
    j, node = producer(index, tensor, where)
    bias, nodes = None, []
    if node.op_type == "Add":
        a, b = node.input
        for bias_name, mm_out in ((b, a), (a, b)):
            if index.constant_tensor(bias_name) is not None or is_vector_weight(index, bias_name):
                bias, bias_nodes = weight_ref(index, bias_name, index.node_label(j), rank=1)
                nodes += [j] + bias_nodes
                only_consumer(index, mm_out, index.node_label(j))
                j, node = producer(index, mm_out, index.node_label(j))
                break
        else:
            raise NoMatch(index.node_label(j), "Add before the activation has no constant bias operand")
    reader = LINEAR_READERS.get(node.op_type)
    if reader is None:
        raise NoMatch(index.node_label(j), f"expected {KINDS}, found {node.op_type}")
    weight, own_bias, weight_nodes = reader(index, j, node, bias is not None)
    bias = bias or own_bias
    if bias is not None and bias.shape != (weight.shape[1],):
        raise NoMatch(index.node_label(j), f"bias shape {bias.shape} does not match weight output size {weight.shape[1]}")
    return Linear(node.input[0], tensor, weight, bias, [j] + weight_nodes + nodes)


def linear_consuming(index: GraphIndex, tensor: str, where: str) -> Linear:
    """The single linear layer reading `tensor` as its first input, followed by an optional bias Add."""
    j, node = only_consumer(index, tensor, where)
    if node.op_type not in LINEAR_READERS or node.input[0] != tensor:
        raise NoMatch(index.node_label(j), f"down projection must be a {'/'.join(LINEAR_READERS)} reading '{tensor}' "
                                           f"as its first input, found {node.op_type}")
    out = node.output[0]
    users = index.consumer_ids(out)
    if len(users) == 1 and not index.is_graph_output(out) and node.op_type == "MatMul":
        k = users[0]
        add = index.node(k)
        if add.op_type == "Add" and is_vector_weight(index, other_input(add, out, index.node_label(k))):
            out = add.output[0]
    return linear_producing(index, out, where)


def packed_gate_up(index: GraphIndex, gate_out: str, up_out: str) -> tuple[Linear, Linear] | None:
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
    sizes = attribute_or_input(index, split, "split", 1, nodes)
    if sizes is None and not (len(split.input) > 1 and split.input[1]):
        sizes = [total // 2] * 2
    if sizes is None or len(sizes) != 2 or sizes[0] != sizes[1] or sum(sizes) != total:
        raise NoMatch(label, f"packed gate|up Split sizes {sizes} are not two equal halves of {total}")

    def half(tensor: str) -> Linear:
        c0 = list(split.output).index(tensor) * sizes[0]
        cols = (c0, c0 + sizes[0])
        bias = None if packed.bias is None else replace(packed.bias, columns=cols)
        return Linear(packed.input, tensor, replace(packed.weight, columns=cols), bias, nodes)
    return half(gate_out), half(up_out)


# ---------------------------------------------------------------- values

@dataclass
class Weights:
    """Reads effective weight values (transpose and cast applied) of one model, a row range at a time."""
    tensors: dict[str, TensorProto]
    base_dir: Path

    def rows(self, ref: WeightRef, r0: int, r1: int) -> np.ndarray:
        stored = tensor_array(self.tensors[ref.name], self.base_dir)
        rows = stored[:, r0:r1].T if ref.transposed else stored[r0:r1]
        if ref.columns is not None:
            rows = rows[:, ref.columns[0]:ref.columns[1]]
        return np.array(rows, dtype=np_dtype(ref.data_type))

    def vector(self, ref: WeightRef | None, size: int, dtype: np.dtype) -> np.ndarray:
        if ref is None:
            return np.zeros(size, dtype)
        value = tensor_array(self.tensors[ref.name], self.base_dir)
        if ref.columns is not None:
            value = value[ref.columns[0]:ref.columns[1]]
        return np.array(value, dtype=np_dtype(ref.data_type)).astype(dtype)

    def check(self, ref: WeightRef | None) -> None:
        """Refuse (UserError) an inline initializer whose data does not fill its dims: the model is corrupt.
        External data was checked against its file when the model was loaded."""
        tensor = None if ref is None else self.tensors[ref.name]
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
            return
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:
            fail(f"initializer '{ref.name}' is corrupt: its data does not fit dims {list(tensor.dims)} "
                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    def gain(self, gains: tuple[WeightRef, ...], size: int, dtype: np.dtype) -> np.ndarray:
        """The product of a norm's gains as one vector."""
        g = np.ones(size, dtype)
        for ref in gains:
            g *= self.vector(ref, size, dtype)
        return g


# ---------------------------------------------------------------- writer

def write_linear(build: NodeBuilder, x: str, name: str, weight: NewTensor, bias: NewTensor | None,
                 new: dict[str, NewTensor]) -> str:
    """y = x @ weight (+ bias) as MatMul (+ Add) named `name`/...; the new tensors join `new`. Returns y."""
    new[weight.name] = weight
    out = build.node("MatMul", [x, weight.name], f"{name}/MatMul")
    if bias is not None:
        new[bias.name] = bias
        out = build.node("Add", [out, bias.name], f"{name}/Add")
    return out
