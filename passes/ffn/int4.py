"""The fused FFN when its linear layers are MatMulNBits (int4 / int8 block-quantized, passes.support.nbits).

gate / up: W*_g = [diag(g_a) Wg_a | ... | diag(g_z) Wg_z] concatenated along N. The concatenation is exact in the
quantized domain; the gains are not: diag(g) W changes every block's range, so each member whose gain is not all
ones is dequantized, multiplied by its gain in float32 and quantized again with onnxruntime's own kernel (same
bits, block size, symmetric or not). `Requantized` says what that costs, relative to diag(g) W.
down: Wd* = [Wd_a ; ... ; Wd_z] concatenated along K, exact when every member's width is a whole number of
blocks (check_groups refuses other groups).

The form, by rule (measured on one H200, onnxruntime-gpu 1.31.1, CUDA graphs, fp16 activations, random int4
weights of a Puzzle-8B group of 16 FFNs, d 4096, m 14336; bench/results/h200/int4_shapes.json):
  - long K: onnxruntime's MatMulNBits kernel falls off a cliff when a column holds too many blocks: at one token
    K = 229,376 took 1,145 us at block 32 (7,168 blocks), 1,139 us at block 64 (3,584), 289 us at block 128
    (1,792); K = 114,688 took 1,166 us at block 32 (3,584) and 283 us at block 64 (1,792); K = 57,344 at block 32
    (1,792) 302 us. So a MatMulNBits whose K holds more than MAX_K_BLOCKS blocks is written as the fewest equal
    pieces of whole blocks with at most that many each (`k_pieces`), each on its slice of the input, products
    summed (16 unfused down projections: 379 us).
  - gate and up are one MatMulNBits (N = 2 sum m) cut by Split (MERGE_GATE_UP): the fused gate alone (N =
    229,376) took 252 us against 418 us for 16 unfused ones, and in onnxruntime-genai decode (Puzzle-8B, batch 1)
    the merged form ran 1.114x the unfused model against 1.093x for separate gate and up
    (bench/results/h200/genai_int4_puzzle_fusion*.json).
The rewrite applies both to fused groups; `quantize_matmuls` applies the K rule to any model it quantizes (a
fused model quantized afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto

from passes.ffn.linear import NBitsRef, Weights, write_nbits_pieces
from passes.ffn.match import FFNBlock
from passes.support import nbits
from passes.support.builder import NodeBuilder
from passes.support.graph import GraphIndex, drop_unused, live_nodes
from passes.support.onnx_io import LoadedModel, ModelOutput, NewTensor, initializer_map, np_dtype
from passes.support.patterns import NoMatch, WeightRef, weight_ref

MAX_K_BLOCKS = 1_792    # most quantization blocks along K in one MatMulNBits (see the module docstring)
MERGE_GATE_UP = True    # int4 groups: one packed gate|up MatMulNBits (see the module docstring)


@dataclass(frozen=True)
class Requantized:
    """A member whose gain was folded by requantization, and the relative error |Q(diag(g) W) - diag(g) W| / |diag(g) W|
    (Frobenius, W the dequantized original)."""
    ordinal: int
    projection: str
    relative_error: float


def member_weight(weights: Weights, ref: NBitsRef) -> nbits.Quantized:
    """The stored weight, with a packed gate|up half's columns selected."""
    q = weights.quantized(ref)
    if ref.columns is None:
        return q
    c0, c1 = ref.columns
    return replace(q, b=q.b[c0:c1], scales=q.scales[c0:c1],
                   zero_points=None if q.zero_points is None else q.zero_points[c0:c1])


def fused_gate_up(members: list[FFNBlock], weights: Weights, which: tuple[str, ...]
                  ) -> tuple[nbits.Quantized, list[Requantized]]:
    """[diag(g_a) W_a | ... | diag(g_z) W_z] over the projections in `which`, in that order, and what requantizing
    the gains cost."""
    parts, requantized = [], []
    for proj in which:
        for block in members:
            ref: NBitsRef = getattr(block, proj)
            q = member_weight(weights, ref)
            gain = weights.gain(block.norm.gains, block.hidden_size, np.float32)
            if np.all(gain == 1):
                parts.append(q)
                continue
            folded = nbits.dequantize(q) * gain[:, None]
            q = nbits.quantize(folded, ref.bits, ref.block_size, ref.zero_points is None, q.scales.dtype)
            error = np.linalg.norm(nbits.dequantize(q) - folded) / max(float(np.linalg.norm(folded)), 1e-30)
            requantized.append(Requantized(block.ordinal, proj, float(error)))
            parts.append(q)
    return nbits.concat_n(parts), requantized


def k_pieces(k: int, block_size: int, max_blocks: int | None = None) -> list[tuple[int, int]]:
    """[k0, k1) row ranges: the fewest pieces of whole blocks with at most max_blocks blocks each (default
    MAX_K_BLOCKS; sizes as equal as blocks allow, the last may be shorter); one piece when K fits."""
    max_blocks = MAX_K_BLOCKS if max_blocks is None else max_blocks
    blocks = nbits.n_blocks(k, block_size)
    count = -(-blocks // max(1, max_blocks))
    per = -(-blocks // count) * block_size
    return [(k0, min(k, k0 + per)) for k0 in range(0, k, per)]


def fused_down(members: list[FFNBlock], weights: Weights) -> list[nbits.Quantized]:
    """[Wd_a ; ... ; Wd_z] along K, as the pieces of k_pieces."""
    whole = nbits.concat_k([member_weight(weights, b.down) for b in members])
    return [nbits.slice_k(whole, k0, k1) for k0, k1 in k_pieces(whole.k, whole.block_size)]


# ---------------------------------------------------------------- quantizing a float model

@dataclass(frozen=True)
class QuantConfig:
    """Weight-only block quantization of MatMul weights, with the defaults of onnxruntime-genai's model builder
    `-p int4` (block 32, symmetric, accuracy_level 4, every MatMul with a constant weight, lm_head included;
    Gather embeddings stay float). `exclude`: node names left in float."""
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    exclude: tuple[str, ...] = ()


CHUNK_BYTES = 64 << 20       # float32 bytes of weight columns quantized at a time


def quantize_matmuls(model: LoadedModel, config: QuantConfig = QuantConfig()) -> tuple[ModelOutput, list[str]]:
    """The model with every MatMul x @ W (W a constant 2-D float weight [K, N], read through Identity, Transpose,
    Cast) replaced by MatMulNBits of W block-quantized by onnxruntime's kernel (passes.support.nbits.quantize,
    what its MatMulNBitsQuantizer runs), column chunk by column chunk from memory-mapped storage as the model is
    written; a K above MAX_K becomes k_pieces. Returns the output and the names of the nodes quantized."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    index = GraphIndex.build(model.proto.graph)
    weights = Weights(initializer_map(model.proto), model.base_dir)
    output = ModelOutput(proto, model.base_dir)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    weight_nodes: set[int] = set()         # Transpose / Cast / Identity nodes that fed the float weights
    for i, node in enumerate(model.proto.graph.node):
        found = _quantizable(index, node, config)
        if found is None:
            continue
        ref, used = found
        weight_nodes.update(used)
        build = NodeBuilder(node.name or f"/quantized_{i}")
        quantized = _ColumnQuantizer(weights, ref, config)
        parts = [quantized.piece(k0, k1) for k0, k1 in k_pieces(ref.shape[0], config.block_size)]
        like = NBitsRef("", "", None, ref.shape[0], ref.shape[1], config.bits, config.block_size, config.accuracy_level,
                        ref.data_type)
        write_nbits_pieces(build, node.input[0], f"Q{config.bits}", parts, like, output.new_tensors, node.output[0])
        replaced[i] = build.nodes
        proto.graph.initializer.extend(build.initializers)
    old_nodes = list(model.proto.graph.node)
    nodes, position = [], {}
    for i, node in enumerate(old_nodes):
        position[i] = len(nodes)
        nodes += replaced.get(i, [node])
    candidates = {position[i] for i in weight_nodes if i not in replaced}
    keep = live_nodes(nodes, candidates, {o.name for o in proto.graph.output})
    unused = [nodes[k] for k in candidates if k not in keep]
    del proto.graph.node[:]
    proto.graph.node.extend(node for k, node in enumerate(nodes) if k in keep)
    for tensor in output.new_tensors.values():
        proto.graph.initializer.append(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    drop_unused(proto.graph, removed=[old_nodes[i] for i in replaced] + unused)
    return output, [model.proto.graph.node[i].name for i in sorted(replaced)]


class _ColumnQuantizer:
    """One float weight W [K, N], quantized column chunk by column chunk (CHUNK_BYTES of float32 at a time) when
    the model is written; `piece(k0, k1)` is rows k0:k1 (whole blocks), for write_nbits_pieces."""

    def __init__(self, weights: Weights, ref: WeightRef, config: QuantConfig):
        self.weights, self.ref, self.config = weights, ref, config

    def piece(self, k0: int, k1: int) -> "_Piece":
        return _Piece(self, k0, k1)


@dataclass
class _Piece:
    source: _ColumnQuantizer
    k0: int
    k1: int

    @property
    def k(self) -> int:
        return self.k1 - self.k0

    @property
    def n(self) -> int:
        return self.source.ref.shape[1]

    @property
    def bits(self) -> int:
        return self.source.config.bits

    @property
    def block_size(self) -> int:
        return self.source.config.block_size

    def _chunks(self):
        src, config = self.source, self.source.config
        step = max(1, CHUNK_BYTES // (4 * self.k))
        for c0 in range(0, self.n, step):
            w = src.weights.block(src.ref, self.k0, self.k1, c0, min(self.n, c0 + step))
            yield nbits.quantize(w, config.bits, config.block_size, config.symmetric, np_dtype(src.ref.data_type))

    def tensors(self, prefix: str, scale_type: int) -> list[NewTensor]:
        """B, scales and zero points; B's pass keeps the (small) scales and zero points for the other two."""
        kept: dict[str, list] = {}

        def b_chunks():
            scales, zps = [], []
            for q in self._chunks():
                scales.append(q.scales)
                zps.append(q.zero_points)
                yield q.b
            kept.update(scales=scales, zero_points=zps)

        def scale_chunks():
            return iter(kept.get("scales") or [q.scales for q in self._chunks()])

        def zp_chunks():
            return iter(nbits.pack(z, self.bits, 1 << (self.bits - 1))
                        for z in (kept.get("zero_points") or [q.zero_points for q in self._chunks()]))

        blocks = nbits.n_blocks(self.k, self.block_size)
        return nbits.stored_tensors(prefix, (self.n, blocks, self.block_size * self.bits // 8), (self.n, blocks),
                                    scale_type, not self.source.config.symmetric, self.bits, b_chunks, scale_chunks,
                                    zp_chunks)


def _quantizable(index: GraphIndex, node: onnx.NodeProto, config: QuantConfig) -> tuple[WeightRef, list[int]] | None:
    """The MatMul's constant float weight and the nodes it is read through, or None."""
    if node.op_type != "MatMul" or node.name in config.exclude or len(node.input) != 2:
        return None
    try:
        ref, used = weight_ref(index, node.input[1], node.name, rank=2)
    except NoMatch:
        return None
    return (ref, used) if ref.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16) else None
