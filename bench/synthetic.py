"""Synthetic Puzzle-style models written straight to ONNX (no torch), at any size, weights streamed to disk.

A layer is "A" (attention + FFN), "F" (FFN only: attention no_op) or "a" (attention only). Graphs:
  prefill: input_ids [batch, seq] -> logits [batch, seq, vocab]
  decode:  input_ids [batch, 1], past_key_i / past_value_i [batch, kv_heads, past, head_dim]
           -> logits [batch, 1, vocab], present_key_i / present_value_i (past + 1)
  ffn:     x [batch, seq, d] -> x after k FFN blocks (no embedding, no attention)
Attention is causal GQA without rotary embeddings (latency and graph structure are what matter here).
Weights are drawn from a seeded pool of N(0, 0.02) values, so a 16 GB model is written at disk speed, one
32 MiB chunk of one weight in memory at a time (passes.support.onnx_io streams them into the external data).

    python -m bench.synthetic --preset llama8b-puzzle -o m.onnx
    python -m bench.synthetic --preset super49b --layers 40 -o super40.onnx    # 24.1 B parameters, 48 GB in bf16

`super49b` has Llama-3.3-Nemotron-Super-49B's shapes (hidden 8192, 64 heads, 8 KV heads, vocab 128256, 80
layers, 49.0 B parameters) with a Puzzle-like layout (not NVIDIA's exact block_configs): attention removed in
runs of 2-7 layers, more of them in the second half, and per-layer FFN widths from 7168 to 28672. With weights
N(0, 0.02) and unit norm gains, gate and up are N(0, 1.8^2) and an FFN adds about 0.02 sqrt(m) 2.4 = 4-8 (rms per
element) to the residual stream, attention less: about 60 after 80 layers (a random walk), far inside bf16's and
fp16's range. bf16 models are verified with onnx.checker only (onnxruntime's CPU kernels do not run bf16).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.support.errors import fail, run_cli
from passes.support.onnx_io import ModelOutput, NewTensor, np_dtype, save_model

DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
POOL_STRIDE = 4099            # a weight's row r starts this many values after row r - 1 in the pool


@dataclass(frozen=True)
class SyntheticConfig:
    hidden: int = 4096
    ffn_width: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    layout: str = "A" * 32           # one letter a layer
    dtype: str = "fp16"
    eps: float = 1e-5
    ffn_widths: tuple[int, ...] | None = None     # per layer (Puzzle); None: ffn_width everywhere

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def width(self, layer: int) -> int:
        return self.ffn_width if self.ffn_widths is None else self.ffn_widths[layer]

    def first(self, layers: int) -> "SyntheticConfig":
        """The first `layers` layers (then the final norm and lm_head, as in the full model)."""
        if not 1 <= layers <= len(self.layout):
            fail(f"--layers {layers}: the model has {len(self.layout)} layers")
        widths = None if self.ffn_widths is None else self.ffn_widths[:layers]
        return SyntheticConfig(**{**self.__dict__, "layout": self.layout[:layers], "ffn_widths": widths})

    def parameters(self) -> int:
        """Weights of the prefill graph: embedding, per layer attention (q, k, v, o, norm) and FFN (gate, up, down,
        norm), final norm, lm_head."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv + d
        ffn = sum(3 * d * self.width(i) + d for i, kind in enumerate(self.layout) if kind in "AF")
        return 2 * self.vocab * d + d + attention * sum(kind in "Aa" for kind in self.layout) + ffn


# Super-49B-like: attention removed in layers 12-14, 22-25, 33-36 (first half) and 42-47, 51-57, 61-66, 69-74, 77-78
SUPER49B_LAYOUT = "".join("F" if i in {*range(12, 15), *range(22, 26), *range(33, 37), *range(42, 48), *range(51, 58),
                                       *range(61, 67), *range(69, 75), 77, 78} else "A" for i in range(80))
SUPER49B_WIDTHS = tuple([28672, 14336, 21504, 7168] * 10 + [28672, 21504, 28672, 14336] * 10)

PRESETS = {
    # Llama-3.1-8B shapes, attention removed from the 16 middle layers (Puzzle removes it in runs):
    # 32 FFNs of which 17 form one chain, 16 attentions, ~15 GB in fp16.
    "llama8b-puzzle": SyntheticConfig(layout="A" * 8 + "F" * 16 + "A" * 8),
    # Llama-3.3-Nemotron-Super-49B shapes (see the module docstring): 80 FFNs, 42 attentions, 98 GB in bf16
    "super49b": SyntheticConfig(hidden=8192, heads=64, kv_heads=8, vocab=128256, layout=SUPER49B_LAYOUT,
                                ffn_widths=SUPER49B_WIDTHS, dtype="bf16"),
    "tiny": SyntheticConfig(hidden=64, ffn_width=128, heads=4, kv_heads=2, vocab=256, layout="AFFFFAFFA", dtype="fp32"),
}


class _Builder:
    """Collects nodes and weight placeholders; weights come from a shared pool of random values."""

    def __init__(self, cfg: SyntheticConfig, seed: int = 0):
        self.cfg = cfg
        self.T = DTYPES[cfg.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.new: dict[str, NewTensor] = {}
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np_dtype(self.T))
        self.pool2 = np.concatenate([self.pool, self.pool])     # rows that run past the pool's end read on from its start
        self.cursor = 0

    def node(self, op, inputs, name, n_out=1, **attrs):
        outs = [f"{name}_output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, dims, fill=None):
        """A [rows, cols] weight streamed from the pool (or constant `fill`): element (r, c) is
        pool[(start + POOL_STRIDE r + c) % len(pool)]."""
        dtype, start = np_dtype(self.T), self.cursor
        self.cursor = (self.cursor + 7919 * dims[-1]) % len(self.pool)
        rows_per_chunk = max(1, (32 << 20) // (dims[-1] * dtype.itemsize))

        def chunks():
            cols = dims[-1]
            rows = dims[0] if len(dims) == 2 else 1
            for r0 in range(0, rows, rows_per_chunk):
                n = min(rows, r0 + rows_per_chunk) - r0
                yield np.full((n, cols), fill, dtype) if fill is not None else self.pool_rows(start + POOL_STRIDE * r0, n, cols)

        self.new[name] = NewTensor(name, tuple(dims), self.T, chunks)
        self.inits.append(TensorProto(name=name, data_type=self.T, dims=dims))
        return name

    def pool_rows(self, offset: int, rows: int, cols: int) -> np.ndarray:
        """[rows, cols] with element (r, c) = pool[(offset + POOL_STRIDE r + c) % len(pool)], copied from strided views
        of the doubled pool (no index arrays: a 48 GB model is written at disk speed)."""
        size, out, r = len(self.pool), np.empty((rows, cols), self.pool.dtype), 0
        while r < rows:
            o = (offset + POOL_STRIDE * r) % size
            run = min(rows - r, (size - 1 - o) // POOL_STRIDE + 1)     # rows starting before the pool's end
            out[r:r + run] = np.lib.stride_tricks.as_strided(self.pool2[o:], (run, cols),
                                                             (POOL_STRIDE * self.pool2.itemsize, self.pool2.itemsize))
            r += run
        return out

    # ---------------------------------------------------------------- blocks
    def rmsnorm(self, x, prefix):
        c = self.cfg
        xf = self.node("Cast", [x], f"{prefix}/Cast", to=TensorProto.FLOAT) if self.T != TensorProto.FLOAT else x
        sq = self.node("Pow", [xf, self.const(f"{prefix}/two", np.float32(2))], f"{prefix}/Pow")
        ms = self.node("ReduceMean", [sq], f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
        var = self.node("Add", [ms, self.const(f"{prefix}/eps", np.float32(c.eps))], f"{prefix}/Add")
        n = self.node("Div", [xf, self.node("Sqrt", [var], f"{prefix}/Sqrt")], f"{prefix}/Div")
        if self.T != TensorProto.FLOAT:
            n = self.node("Cast", [n], f"{prefix}/Cast_1", to=self.T)
        gain = self.weight(f"{prefix}.weight", [c.hidden], fill=1.0)
        return self.node("Mul", [n, gain], f"{prefix}/Mul")

    def ffn(self, x, prefix, width):
        d = self.cfg.hidden
        h = self.rmsnorm(x, f"{prefix}/ffn_norm")
        g = self.node("MatMul", [h, self.weight(f"{prefix}.mlp.gate_proj", [d, width])], f"{prefix}/mlp/gate_proj/MatMul")
        u = self.node("MatMul", [h, self.weight(f"{prefix}.mlp.up_proj", [d, width])], f"{prefix}/mlp/up_proj/MatMul")
        s = self.node("Mul", [g, self.node("Sigmoid", [g], f"{prefix}/mlp/Sigmoid")], f"{prefix}/mlp/Mul")
        a = self.node("Mul", [s, u], f"{prefix}/mlp/Mul_1")
        y = self.node("MatMul", [a, self.weight(f"{prefix}.mlp.down_proj", [width, d])], f"{prefix}/mlp/down_proj/MatMul")
        return self.node("Add", [x, y], f"{prefix}/Add_1")

    def attention(self, x, prefix, past=None):
        """Causal GQA. past=(past_key, past_value) for a decode step; returns (x', (present_key, present_value)).

        K and V heads are repeated to all query heads with Tile (constant repeats, no shape arithmetic), so every
        attention MatMul is a plain batched product and the graph stays capturable in a CUDA graph."""
        c = self.cfg
        d, hd, kvh, grp = c.hidden, c.head_dim, c.kv_heads, c.heads // c.kv_heads
        h = self.rmsnorm(x, f"{prefix}/attn_norm")
        q = self.node("MatMul", [h, self.weight(f"{prefix}.self_attn.q_proj", [d, d])], f"{prefix}/self_attn/q_proj/MatMul")
        k = self.node("MatMul", [h, self.weight(f"{prefix}.self_attn.k_proj", [d, kvh * hd])], f"{prefix}/self_attn/k_proj/MatMul")
        v = self.node("MatMul", [h, self.weight(f"{prefix}.self_attn.v_proj", [d, kvh * hd])], f"{prefix}/self_attn/v_proj/MatMul")

        def heads(t, n, name):   # [b, s, n*hd] -> [b, n, s, hd]
            shape = self.const(f"{prefix}/shape_{name}", np.array([0, 0, n, hd], np.int64))
            return self.node("Transpose", [self.node("Reshape", [t, shape], f"{prefix}/Reshape_{name}")],
                             f"{prefix}/Transpose_{name}", perm=[0, 2, 1, 3])

        q, k, v = heads(q, c.heads, "q"), heads(k, kvh, "k"), heads(v, kvh, "v")
        if past is not None:
            k = self.node("Concat", [past[0], k], f"{prefix}/Concat_k", axis=2)
            v = self.node("Concat", [past[1], v], f"{prefix}/Concat_v", axis=2)
        present = (k, v)
        group_axis = self.const(f"{prefix}/axes_group", np.array([2], np.int64))
        repeats = self.const(f"{prefix}/repeats", np.array([1, 1, grp, 1, 1], np.int64))
        all_heads = self.const(f"{prefix}/shape_heads", np.array([0, c.heads, -1, hd], np.int64))

        def repeat_kv(t, name):  # [b, kvh, t, hd] -> [b, heads, t, hd], each KV head serving grp query heads
            t = self.node("Tile", [self.node("Unsqueeze", [t, group_axis], f"{prefix}/Unsqueeze_{name}"), repeats], f"{prefix}/Tile_{name}")
            return self.node("Reshape", [t, all_heads], f"{prefix}/Reshape_rep_{name}")

        k, v = repeat_kv(k, "k"), repeat_kv(v, "v")
        kt = self.node("Transpose", [k], f"{prefix}/Transpose_kt", perm=[0, 1, 3, 2])
        scores = self.node("MatMul", [q, kt], f"{prefix}/MatMul_qk")        # [b, heads, s, total]
        scale = self.const(f"{prefix}/scale", np.array(hd ** -0.5, np_dtype(self.T)))
        scores = self.node("Mul", [scores, scale], f"{prefix}/Mul_scale")
        if past is None:
            scores = self.node("Add", [scores, self.mask], f"{prefix}/Add_mask")
        probs = self.node("Softmax", [scores], f"{prefix}/Softmax", axis=-1)
        a = self.node("MatMul", [probs, v], f"{prefix}/MatMul_pv")          # [b, heads, s, hd]
        a = self.node("Transpose", [a], f"{prefix}/Transpose_out", perm=[0, 2, 1, 3])
        a = self.node("Reshape", [a, self.const(f"{prefix}/shape_out", np.array([0, 0, d], np.int64))], f"{prefix}/Reshape_out")
        o = self.node("MatMul", [a, self.weight(f"{prefix}.self_attn.o_proj", [d, d])], f"{prefix}/self_attn/o_proj/MatMul")
        return self.node("Add", [x, o], f"{prefix}/Add"), present

    def causal_mask(self, ids):
        """Additive [s, s] mask: -inf above the diagonal (from the runtime sequence length)."""
        seq = self.node("Gather", [self.node("Shape", [ids], "/mask/Shape"), self.const("/mask/one", np.array(1, np.int64))], "/mask/Gather")
        ss = self.node("Concat", [self.node("Unsqueeze", [seq, self.const("/mask/zero", np.array([0], np.int64))], "/mask/Unsqueeze")] * 2,
                       "/mask/Concat", axis=0)
        low = np.finfo(np.float16).min if self.T == TensorProto.FLOAT16 else -1e30
        full = self.node("ConstantOfShape", [ss], "/mask/ConstantOfShape",
                         value=numpy_helper.from_array(np.array([low], np_dtype(self.T))))
        return self.node("Trilu", [full, self.const("/mask/k", np.array(1, np.int64))], "/mask/Trilu", upper=1)


def build(cfg: SyntheticConfig, mode: str = "prefill", seed: int = 0) -> tuple[onnx.ModelProto, dict[str, NewTensor]]:
    """The ONNX graph (weights as placeholders) and the streamed weights of a synthetic model."""
    b = _Builder(cfg, seed)
    T, d = b.T, cfg.hidden
    inputs, outputs = [], []
    if mode == "ffn":
        x = "x"
        inputs.append(helper.make_tensor_value_info("x", T, ["batch", "seq", d]))
    else:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
        x = b.node("Gather", [b.weight("model.embed_tokens", [cfg.vocab, d]), "input_ids"], "/embed_tokens/Gather")
        if mode == "prefill":
            b.mask = b.causal_mask("input_ids")
    for i, kind in enumerate(cfg.layout):
        prefix = f"/layers.{i}"
        if kind in "Aa" and mode != "ffn":
            past = None
            if mode == "decode":
                past = (f"past_key_{i}", f"past_value_{i}")
                for name in past:
                    inputs.append(helper.make_tensor_value_info(name, T, ["batch", cfg.kv_heads, "past", cfg.head_dim]))
            x, present = b.attention(x, prefix, past)
            if mode == "decode":
                for name, tensor in zip((f"present_key_{i}", f"present_value_{i}"), present):
                    b.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"{prefix}/{name}"))
                    outputs.append(helper.make_tensor_value_info(name, T, ["batch", cfg.kv_heads, "total", cfg.head_dim]))
        if kind in "AF":
            x = b.ffn(x, prefix, cfg.width(i))
    if mode == "ffn":
        b.nodes.append(helper.make_node("Identity", [x], ["y"], name="/output/Identity"))
        outputs.insert(0, helper.make_tensor_value_info("y", T, ["batch", "seq", d]))
    else:
        h = b.rmsnorm(x, "/norm")
        b.node("MatMul", [h, b.weight("lm_head", [d, cfg.vocab])], "/lm_head/MatMul")
        b.nodes[-1].output[0] = "logits"
        outputs.insert(0, helper.make_tensor_value_info("logits", T, ["batch", "seq", cfg.vocab]))
    graph = helper.make_graph(b.nodes, f"synthetic_{mode}", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ffn-fusion bench.synthetic")
    model.ir_version = 10
    return model, b.new


def write(cfg: SyntheticConfig, path: str | Path, mode: str = "prefill", seed: int = 0, verify: bool = True) -> Path:
    """Write the model with external data; verified by onnx.checker and, unless it is bf16 (no CPU kernels), an
    onnxruntime session."""
    model, new = build(cfg, mode, seed)
    full = verify and cfg.dtype != "bf16"
    path = save_model(ModelOutput(model, Path(path).parent, new), path, external=True, verify=full)
    if verify and not full:
        onnx.checker.check_model(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layout", help="override the layer layout (letters A, F, a)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--ffn-width", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--mode", choices=("prefill", "decode", "ffn"), default="prefill")
    parser.add_argument("--layers", type=int, help="write only the first N layers (then the final norm and lm_head)")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    overrides = {k: v for k, v in (("layout", args.layout), ("hidden", args.hidden), ("ffn_width", args.ffn_width),
                                   ("vocab", args.vocab), ("dtype", args.dtype)) if v is not None}
    if args.layout is not None or args.ffn_width is not None:
        overrides["ffn_widths"] = None
    cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    if set(cfg.layout) - set("AFa"):
        fail(f"layout '{cfg.layout}' may only contain A (attention+FFN), F (FFN only), a (attention only)")
    if args.layers is not None:
        cfg = cfg.first(args.layers)
    start = time.perf_counter()
    path = write(cfg, args.output, args.mode)
    print(f"wrote {path} ({cfg.layout.count('A') + cfg.layout.count('a')} attention, "
          f"{cfg.layout.count('A') + cfg.layout.count('F')} FFN layers, hidden {cfg.hidden}, {cfg.dtype}, "
          f"{cfg.parameters() / 1e9:.3g} B parameters) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
