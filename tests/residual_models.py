"""Small Puzzle-style residual-stream models in torch, written independently of models/, for testing the passes.

`ResidualStack` maps x [batch, seq, d] -> x after a sequence of layers: "F" = pre-norm SwiGLU FFN block (own
width, own norm gain), "A" = a pre-norm causal self-attention block. `parallel_reference` evaluates the
same stack with chosen FFN groups in the parallel form x + sum_t FFN_t(n(x) * g_t), in float64.
"""
from __future__ import annotations

import atexit
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * n.to(x.dtype)


class FFN(nn.Module):
    def __init__(self, d: int, m: int, eps: float, bias: bool = False):
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.gate = nn.Linear(d, m, bias=bias)
        self.up = nn.Linear(d, m, bias=bias)
        self.down = nn.Linear(m, d, bias=bias)

    def contribution(self, x):
        h = self.norm(x)
        g = self.gate(h)
        return self.down(g * torch.sigmoid(g) * self.up(h))

    def forward(self, x):
        return x + self.contribution(x)


class Attention(nn.Module):
    def __init__(self, d: int, eps: float, heads: int = 2):
        super().__init__()
        self.norm = RMSNorm(d, eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        a = torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v
        return x + self.out(a.transpose(1, 2).reshape(b, s, d))


class ResidualStack(nn.Module):
    def __init__(self, layout: str, d: int = 32, widths: list[int] | None = None, eps: float = 1e-5,
                 seed: int = 0, bias: bool = False, eps_per_ffn: list[float] | None = None):
        super().__init__()
        torch.manual_seed(seed)
        n_ffn = layout.count("F")
        widths = widths or [48 + 16 * (k % 4) for k in range(n_ffn)]
        eps_per_ffn = eps_per_ffn or [eps] * n_ffn
        layers, k = [], 0
        for kind in layout:
            if kind == "F":
                layers.append(FFN(d, widths[k], eps_per_ffn[k], bias))
                k += 1
            else:
                layers.append(Attention(d, eps))
        self.layers = nn.ModuleList(layers)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.3 / p.shape[1] ** 0.5 * 3)

    @property
    def ffns(self) -> list[FFN]:
        return [layer for layer in self.layers if isinstance(layer, FFN)]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def parallel_reference(stack: ResidualStack, x: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    """The stack with each FFN group [a, z] run in parallel form, x + sum_t FFN_t(n(x) g_t), in float64.
    `stack` itself is left as it is (a float64 copy is evaluated)."""
    stack = copy.deepcopy(stack).double()
    x = x.double()
    ffn_ordinal = {id(f): k for k, f in enumerate(stack.ffns)}
    start_of = {a: z for a, z in groups}
    with torch.no_grad():
        skip_until = -1
        for layer in stack.layers:
            k = ffn_ordinal.get(id(layer))
            if k is not None and k <= skip_until:
                continue
            if k is not None and k in start_of:
                z = start_of[k]
                x = x + sum(stack.ffns[t].contribution(x) for t in range(k, z + 1))
                skip_until = z
            else:
                x = layer(x)
    return x


def export(stack: nn.Module, path, *, dtype=torch.float32, dynamo: bool = False, opset: int = 17, d: int = 32):
    """Export to ONNX with dynamic batch and sequence; IR version 10 so onnxruntime loads it."""
    import onnx
    stack = stack.to(dtype).eval()
    example = torch.randn(2, 5, d, dtype=dtype)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(stack, (example,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: batch, 1: seq}}, opset_version=max(opset, 18),
                          external_data=False, verbose=False)
    else:
        torch.onnx.export(stack, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}}, opset_version=opset)
    model = onnx.load(str(path))
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- helpers shared by the tests of the passes

REPO = Path(__file__).resolve().parents[1]
_EXPORTS: dict[tuple, tuple[ResidualStack, Path]] = {}
_EXPORT_DIR: Path | None = None


def cached_export(layout: str, *, dynamo: bool = False, dtype=torch.float32, opset: int = 17,
                  **stack_args) -> tuple[ResidualStack, Path]:
    """ResidualStack(layout, **stack_args) exported once per test process (dynamo exports take seconds).

    Returns a private copy of the stack (in `dtype`) and the path of the shared export: treat it as read-only."""
    global _EXPORT_DIR
    key = (layout, dynamo, str(dtype), opset, tuple(sorted((k, repr(v)) for k, v in stack_args.items())))
    if key not in _EXPORTS:
        if _EXPORT_DIR is None:
            _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="residual_exports_"))
            atexit.register(shutil.rmtree, _EXPORT_DIR, ignore_errors=True)
        stack = ResidualStack(layout, **stack_args)
        path = export(stack, _EXPORT_DIR / f"model_{len(_EXPORTS)}.onnx", dtype=dtype, dynamo=dynamo,
                      opset=opset, d=stack_args.get("d", 32))
        _EXPORTS[key] = (stack, path)
    stack, path = _EXPORTS[key]
    return copy.deepcopy(stack), path



def ort_run(model, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    """Run a model (path, bytes or ModelProto) in onnxruntime on the CPU."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_fuse_cli(*args, cwd=REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """python -m passes.fuse ARGS in a subprocess (the exit-code contract), with the repository on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "passes.fuse", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class TinyLM(nn.Module):
    """input_ids [batch, seq] -> logits [batch, seq, vocab]: embedding, a ResidualStack, an LM head."""

    def __init__(self, layout: str = "FFFFAF", seed: int = 0, vocab: int = 64, d: int = 32):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d)
        self.stack = ResidualStack(layout, d=d, seed=seed)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        return self.head(self.stack(self.embed(input_ids)))


def export_lm(model: TinyLM, path) -> Path:
    """TorchScript export with dynamic batch and sequence, IR version 10."""
    import onnx
    model = model.eval()
    torch.onnx.export(model, (torch.zeros(2, 5, dtype=torch.int64),), str(path), dynamo=False,
                      input_names=["input_ids"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
    proto = onnx.load(str(path))
    proto.ir_version = 10
    onnx.save(proto, str(path))
    return Path(path)
