"""The com.microsoft MatMulNBits format (onnxruntime's weight-only int4 / int8 MatMul) in numpy: unpack, dequantize,
quantize (onnxruntime's own block quantizer) and concatenate in the quantized domain.

Y = A @ W (+ bias) with W [K, N] stored column by column, in blocks of `block_size` rows along K:
    B            uint8 [N, n_blocks, block_size * bits / 8]: the values q, two 4-bit values a byte, low nibble first
    scales       [N, n_blocks] or flat [N * n_blocks], of A's float type
    zero_points  optional uint8 [N, ceil(n_blocks * bits / 8)] (or flat), packed like B; absent: 2^(bits - 1)
    W[b * block_size + j, n] = (q[n, b, j] - zp[n, b]) * scale[n, b]     (rows past K pad the last block)
Concatenating two such weights along N (rows of B, scales and zero points) is exact; along K it is exact when every
part's K is a whole number of blocks (the blocks of each column are simply laid end to end).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from passes.support.onnx_io import NewTensor


@dataclass(frozen=True)
class Quantized:
    """One MatMulNBits weight as arrays: b [N, n_blocks, blob], scales [N, n_blocks], zero points [N, n_blocks]
    (unpacked, one value each) or None (symmetric: 2^(bits - 1))."""
    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return self.b.shape[0]

    def tensors(self, prefix: str, scale_type: int) -> list[NewTensor]:
        """The MatMulNBits initializers: B, scales ([N, n_blocks], of `scale_type`) and packed zero points."""
        return stored_tensors(prefix, self.b.shape, self.scales.shape, scale_type, self.zero_points is not None,
                              self.bits, lambda: iter([self.b]), lambda: iter([self.scales]),
                              lambda: iter([pack(self.zero_points, self.bits, 1 << (self.bits - 1))]))


def stored_tensors(prefix: str, b_shape, scales_shape, scale_type: int, zero_points: bool, bits: int,
                   b_chunks, scale_chunks, zp_chunks) -> list[NewTensor]:
    """NewTensors named PREFIX.weight_Q{bits}, .weight_scales, .weight_zp (the model builder's names)."""
    tensors = [NewTensor(f"{prefix}.weight_Q{bits}", tuple(b_shape), TensorProto.UINT8, b_chunks),
               NewTensor(f"{prefix}.weight_scales", tuple(scales_shape), scale_type, scale_chunks)]
    if zero_points:
        zp_shape = (scales_shape[0], -(-scales_shape[1] * bits // 8))
        tensors.append(NewTensor(f"{prefix}.weight_zp", zp_shape, TensorProto.UINT8, zp_chunks))
    return tensors


def n_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., bytes] -> uint8 [..., count] values of `bits` bits, lowest bits first."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    values = np.stack([(packed >> (bits * i)) & mask for i in range(per_byte)], axis=-1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


def pack(values: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """uint8 [..., count] values of `bits` bits -> uint8 [..., ceil(count * bits / 8)], lowest bits first; the
    unused slots of the last byte hold `fill` (onnxruntime pads zero points with 2^(bits - 1))."""
    per_byte = 8 // bits
    count = values.shape[-1]
    padded = np.full((*values.shape[:-1], -(-count // per_byte) * per_byte), fill, np.uint8)
    padded[..., :count] = values
    grouped = padded.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint16)
    return sum(grouped[..., i] << (bits * i) for i in range(per_byte)).astype(np.uint8)


def from_arrays(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                block_size: int) -> Quantized:
    """A Quantized from MatMulNBits' stored inputs (any of the layouts onnxruntime accepts); ValueError when their
    sizes do not fit K, N, bits and block_size."""
    blocks = n_blocks(k, block_size)
    sizes = {"B": (np.size(b), n * blocks * (block_size * bits // 8)), "scales": (np.size(scales), n * blocks)}
    if zero_points is not None:
        sizes["zero points"] = (np.size(zero_points), n * -(-blocks * bits // 8))
    for what, (have, want) in sizes.items():
        if have != want:
            raise ValueError(f"{what} holds {have} values, K={k}, N={n}, bits={bits}, block_size={block_size} need {want}")
    b = np.asarray(b, np.uint8).reshape(n, blocks, -1)
    scales = np.asarray(scales).reshape(n, blocks)
    zp = None
    if zero_points is not None:
        zp = unpack(np.asarray(zero_points, np.uint8).reshape(n, -1), bits, blocks)
    return Quantized(b, scales, zp, k, bits, block_size)


def dequantize(q: Quantized, columns: tuple[int, int] | None = None) -> np.ndarray:
    """W [K, N] (or the columns c0:c1 of it) in float32."""
    c0, c1 = columns or (0, q.n)
    values = unpack(q.b[c0:c1], q.bits, q.block_size).astype(np.float32)           # [n, blocks, block_size]
    zero = np.float32(1 << (q.bits - 1)) if q.zero_points is None else q.zero_points[c0:c1, :, None].astype(np.float32)
    w = (values - zero) * q.scales[c0:c1, :, None].astype(np.float32)
    return w.reshape(c1 - c0, -1)[:, :q.k].T


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype: np.dtype) -> Quantized:
    """Block-quantize W [K, N] with onnxruntime's own kernel (what its MatMulNBitsQuantizer and the model
    builder run): round to nearest, scale per block of one column; symmetric: zero point 2^(bits - 1). With fp16
    scales the kernel runs in fp16, as onnxruntime's quantizer does for an fp16 weight (bit for bit)."""
    from onnxruntime.capi import _pybind_state as ort_c

    k, n = w.shape
    blocks = n_blocks(k, block_size)
    half = np.dtype(scale_dtype) == np.float16
    kind = np.float16 if half else np.float32
    packed = np.zeros((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), kind)
    zp = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    kernel = {4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]
    kernel(packed, np.ascontiguousarray(w, kind), scales, zp, block_size, n, k, symmetric)
    return Quantized(packed, scales.astype(scale_dtype), None if symmetric else unpack(zp, bits, blocks), k, bits, block_size)


def concat_n(parts: list[Quantized]) -> Quantized:
    """[W_1 | W_2 | ...] along N: exact."""
    first = parts[0]
    if any((p.k, p.bits, p.block_size) != (first.k, first.bits, first.block_size) for p in parts):
        raise ValueError("weights concatenated along N must share K, bits and block size")
    zps = [p.zero_points for p in parts]
    zp = None if all(z is None for z in zps) else np.concatenate([_zero_points(p) for p in parts])
    return Quantized(np.concatenate([p.b for p in parts]), np.concatenate([p.scales for p in parts]), zp,
                     first.k, first.bits, first.block_size)


def concat_k(parts: list[Quantized]) -> Quantized:
    """[W_1 ; W_2 ; ...] along K: exact when every part's K is a whole number of blocks."""
    first = parts[0]
    if any((p.n, p.bits, p.block_size) != (first.n, first.bits, first.block_size) for p in parts):
        raise ValueError("weights concatenated along K must share N, bits and block size")
    if any(p.k % p.block_size for p in parts[:-1]):
        raise ValueError("every part but the last must hold whole blocks along K")
    zps = [p.zero_points for p in parts]
    zp = None if all(z is None for z in zps) else np.concatenate([_zero_points(p) for p in parts], axis=1)
    return Quantized(np.concatenate([p.b for p in parts], axis=1), np.concatenate([p.scales for p in parts], axis=1), zp,
                     sum(p.k for p in parts), first.bits, first.block_size)


def slice_k(q: Quantized, k0: int, k1: int) -> Quantized:
    """Rows k0:k1 of W (both on block boundaries, or k1 = K): exact."""
    if k0 % q.block_size or (k1 % q.block_size and k1 != q.k):
        raise ValueError(f"rows {k0}:{k1} are not on the {q.block_size}-row block grid")
    b0, b1 = k0 // q.block_size, n_blocks(k1, q.block_size)
    zp = None if q.zero_points is None else q.zero_points[:, b0:b1]
    return Quantized(q.b[:, b0:b1], q.scales[:, b0:b1], zp, k1 - k0, q.bits, q.block_size)


def _zero_points(q: Quantized) -> np.ndarray:
    return q.zero_points if q.zero_points is not None else np.full(q.scales.shape, 1 << (q.bits - 1), np.uint8)
