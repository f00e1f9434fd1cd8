"""The kinds of linear layer the FFN fusion reads and writes, behind one small interface.

Reading: `linear_producing(index, t)` parses t = input @ W (+ b) back from t, `linear_consuming` the single linear
layer reading t, `packed_gate_up` gate and up as two halves of one layer cut by Split. The op that holds the
weight is looked up in `LINEAR_READERS` (op type -> reader):
  MatMul        a constant weight (WeightRef: behind Identity, Transpose(perm=[1,0]) and Cast);
  Gemm          alpha = beta = 1, transA = 0, optional transB and bias C;
  MatMulNBits   (com.microsoft) a block-quantized int4 / int8 weight (NBitsRef: B, scales, optional zero points,
                K, N, bits, block size, accuracy level; passes.support.nbits), optional bias, no g_idx.
A new kind of linear layer is one more reader, its `Weights` access and its writer (passes.ffn.rewrite).

Values: `Weights` reads the effective weight values (transpose, cast, column slice and dequantization applied) a
row range at a time from memory-mapped storage.

Writing: `write_linear` emits y = x @ W (+ b) for a new float weight as MatMul (+ Add), `write_nbits` for a new
quantized one as MatMulNBits (`write_nbits_pieces`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from passes.support import nbits
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


@dataclass(frozen=True)
class NBitsRef:
    """A MatMulNBits weight W [K, N] (passes.support.nbits): initializers `name` (B), `scales`, `zero_points`
    (None: symmetric), and the node's attributes. `columns` [c0, c1) selects a slice of N (a packed gate|up half)."""
    name: str
    scales: str
    zero_points: str | None
    k: int
    n: int
    bits: int
    block_size: int
    accuracy_level: int
    scale_type: int
    columns: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n if self.columns is None else self.columns[1] - self.columns[0])

    @property
    def data_type(self) -> int:
        return self.scale_type

    @property
    def quantization(self) -> tuple[int, int, bool]:
        """(bits, block size, symmetric): what weights fused into one MatMulNBits must share."""
        return self.bits, self.block_size, self.zero_points is None


Weight = WeightRef | NBitsRef


@dataclass
class Linear:
    """output = input @ weight (+ bias), computed by `nodes`."""
    input: str
    output: str          # after the bias, if any
    weight: Weight
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


def _read_matmul_nbits(index: GraphIndex, j: int, node: onnx.NodeProto, has_bias: bool):
    label = index.node_label(j)
    if node.domain != "com.microsoft":
        raise NoMatch(label, f"MatMulNBits of domain '{node.domain}' is not onnxruntime's")
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if has_bias and inputs[5]:
        raise NoMatch(label, "MatMulNBits with a bias input followed by a bias Add")
    if inputs[4]:
        raise NoMatch(label, "MatMulNBits with g_idx (act-order) cannot be concatenated block by block")
    bits, block_size = attribute(node, "bits", 4), attribute(node, "block_size")
    if bits not in (4, 8) or not block_size:
        raise NoMatch(label, f"MatMulNBits with bits={bits}, block_size={block_size} is not supported (bits 4 or 8)")
    for slot, what in ((1, "B"), (2, "scales")) + (((3, "zero points"),) if inputs[3] else ()):
        if inputs[slot] not in index.initializers:
            raise NoMatch(label, f"MatMulNBits {what} '{inputs[slot]}' is not an initializer")
    if inputs[3] and index.initializers[inputs[3]].data_type != TensorProto.UINT8:
        raise NoMatch(label, "MatMulNBits zero points of a float type are not supported (uint8 only)")
    weight = NBitsRef(inputs[1], inputs[2], inputs[3] or None, attribute(node, "K"), attribute(node, "N"), bits,
                      block_size, attribute(node, "accuracy_level", 0), index.initializers[inputs[2]].data_type)
    bias, nodes = None, []
    if inputs[5]:
        bias, nodes = weight_ref(index, inputs[5], label, rank=1)
    return weight, bias, nodes


LINEAR_READERS: dict[str, Reader] = {"MatMul": _read_matmul, "Gemm": _read_gemm, "MatMulNBits": _read_matmul_nbits}
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
    if len(users) == 1 and not index.is_graph_output(out) and node.op_type in ("MatMul", "MatMulNBits"):
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
    """Reads effective weight values (transpose and cast applied) of one model, a row range at a time (a
    MatMulNBits weight is dequantized whole for each call: its callers read all rows at once)."""
    tensors: dict[str, TensorProto]
    base_dir: Path

    def rows(self, ref: Weight, r0: int, r1: int) -> np.ndarray:
        if isinstance(ref, NBitsRef):
            return nbits.dequantize(self.quantized(ref), ref.columns)[r0:r1].astype(np_dtype(ref.data_type))
        stored = tensor_array(self.tensors[ref.name], self.base_dir)
        rows = stored[:, r0:r1].T if ref.transposed else stored[r0:r1]
        if ref.columns is not None:
            rows = rows[:, ref.columns[0]:ref.columns[1]]
        return np.array(rows, dtype=np_dtype(ref.data_type))

    def block(self, ref: WeightRef, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows r0:r1 and columns c0:c1 of the effective (float) weight, in float32."""
        stored = tensor_array(self.tensors[ref.name], self.base_dir)
        if ref.columns is not None:
            c0, c1 = c0 + ref.columns[0], c1 + ref.columns[0]
        part = stored[c0:c1, r0:r1].T if ref.transposed else stored[r0:r1, c0:c1]
        return np.asarray(part).astype(np_dtype(ref.data_type)).astype(np.float32)

    def vector(self, ref: WeightRef | None, size: int, dtype: np.dtype) -> np.ndarray:
        if ref is None:
            return np.zeros(size, dtype)
        value = tensor_array(self.tensors[ref.name], self.base_dir)
        if ref.columns is not None:
            value = value[ref.columns[0]:ref.columns[1]]
        return np.array(value, dtype=np_dtype(ref.data_type)).astype(dtype)

    def quantized(self, ref: NBitsRef) -> nbits.Quantized:
        """The stored MatMulNBits weight (all N columns) as arrays; UserError when they do not fit its attributes."""
        zp = None if ref.zero_points is None else tensor_array(self.tensors[ref.zero_points], self.base_dir)
        try:
            return nbits.from_arrays(tensor_array(self.tensors[ref.name], self.base_dir),
                                     tensor_array(self.tensors[ref.scales], self.base_dir), zp, ref.k, ref.n, ref.bits,
                                     ref.block_size)
        except ValueError as exc:
            fail(f"MatMulNBits weight '{ref.name}' is corrupt: {exc}")

    def check(self, ref: Weight | None) -> None:
        """Refuse (UserError) an inline initializer whose data does not fill its dims: the model is corrupt.
        External data was checked against its file when the model was loaded."""
        names = [] if ref is None else [ref.name] + ([ref.scales, ref.zero_points] if isinstance(ref, NBitsRef) else [])
        for name in filter(None, names):
            tensor = self.tensors[name]
            if tensor.data_location == TensorProto.EXTERNAL:
                continue
            try:
                numpy_helper.to_array(tensor)
            except Exception as exc:
                fail(f"initializer '{name}' is corrupt: its data does not fit dims {list(tensor.dims)} "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        if isinstance(ref, NBitsRef):
            self.quantized(ref)

    def gain(self, gains: tuple[WeightRef, ...], size: int, dtype: np.dtype) -> np.ndarray:
        """The product of a norm's gains as one vector."""
        g = np.ones(size, dtype)
        for ref in gains:
            g *= self.vector(ref, size, dtype)
        return g


# ---------------------------------------------------------------- writer

def write_nbits_pieces(build: NodeBuilder, x: str, name: str, parts: list, like: NBitsRef,
                       new: dict[str, NewTensor], output: str | None = None) -> str:
    """y = x @ [W_1 ; W_2 ; ...] for consecutive row pieces of one weight (one piece: x @ W_1) as one MatMulNBits
    per piece on the matching slice of x's last axis, the products summed; attributes and scale type of `like`.
    A part is an nbits.Quantized or anything with its k, n, bits, block_size and `tensors(prefix, scale_type)`
    (the B, scales and packed zero-point NewTensors), which join `new`. Returns y (`output` when given)."""
    if len(parts) == 1:
        return _write_nbits(build, x, name, parts[0], like, new, output)
    out, k0 = None, 0
    for k, q in enumerate(parts):
        piece = f"{name}/part_{k}"
        sliced = build.node("Slice", [x, build.const(f"{piece}/starts", np.array([k0], np.int64)),
                                      build.const(f"{piece}/ends", np.array([k0 + q.k], np.int64)),
                                      build.const(f"{piece}/axes", np.array([-1], np.int64))], f"{piece}/Slice")
        y = _write_nbits(build, sliced, piece, q, like, new)
        out = y if out is None else build.node("Add", [out, y], f"{name}/Sum_{k}", output if k == len(parts) - 1 else None)
        k0 += q.k
    return out


def _write_nbits(build: NodeBuilder, x: str, name: str, q, like: NBitsRef, new: dict[str, NewTensor],
                 output: str | None = None) -> str:
    tensors = q.tensors(f"{build.prefix}/{name}", like.scale_type)
    new.update({t.name: t for t in tensors})
    attrs = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
    if like.accuracy_level:
        attrs["accuracy_level"] = like.accuracy_level
    return build.node("MatMulNBits", [x] + [t.name for t in tensors], f"{name}/MatMulNBits", output,
                      domain="com.microsoft", **attrs)


def write_linear(build: NodeBuilder, x: str, name: str, weight: NewTensor, bias: NewTensor | None,
                 new: dict[str, NewTensor]) -> str:
    """y = x @ weight (+ bias) as MatMul (+ Add) named `name`/...; the new tensors join `new`. Returns y."""
    new[weight.name] = weight
    out = build.node("MatMul", [x, weight.name], f"{name}/MatMul")
    if bias is not None:
        new[bias.name] = bias
        out = build.node("Add", [out, bias.name], f"{name}/Add")
    return out
