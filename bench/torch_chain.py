"""Torch reference: a chain of k pre-norm SwiGLU FFNs against the one fused FFN, CUDA graphs, one GPU.

    python -m bench.torch_chain [--shapes 576x1536x8,4096x14336x4] [--tokens 1,16,128,1024] [--dtype fp16]

sequential: x <- x + FFN_t(n(x) g_t) for t = 1..k;   fused: x + (silu(h Wg*) * (h Wu*)) Wd*, h = n(x).
Each variant is captured once in a CUDA graph and replayed; the median of --runs replays (CUDA events) is
reported with the HBM floor (weight bytes / measured copy bandwidth). Shapes: SmolLM2-135M (576 x 1536, 8 blocks), Llama-8B (4096 x 14336, 4) and one TP8 shard of Llama-405B (16384 x 6656, 4).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from bench.batch_seq import parse_sizes
from bench.cuda_graphs import capture
from bench.results import write_result
from passes.support.report import table


def _rmsnorm(x, eps=1e-5):
    import torch
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _graph_time(fn, runs: int) -> float:
    import torch
    graph, _ = capture(fn)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def measure(d: int, m: int, k: int, tokens: list[int], dtype, runs: int, bandwidth: float) -> list[dict]:
    import torch
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: (torch.randn(*s, device="cuda", generator=gen) * 0.02).to(dtype)
    gains = [1 + 0.1 * torch.randn(d, device="cuda", generator=gen) for _ in range(k)]
    wg, wu, wd = [rand(d, m) for _ in range(k)], [rand(d, m) for _ in range(k)], [rand(m, d) for _ in range(k)]
    wg_f = torch.cat([(g[:, None] * w.float()).to(dtype) for g, w in zip(gains, wg)], 1)
    wu_f = torch.cat([(g[:, None] * w.float()).to(dtype) for g, w in zip(gains, wu)], 1)
    wd_f = torch.cat(wd, 0)
    gains = [g.to(dtype) for g in gains]
    weight_bytes = 3 * k * d * m * torch.tensor([], dtype=dtype).element_size()
    out = []
    for t in tokens:
        x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
        y = torch.empty_like(x)

        def sequential():
            h = x
            for g, a, b, c in zip(gains, wg, wu, wd):
                n = _rmsnorm(h) * g
                gate = n @ a
                h = h + (torch.nn.functional.silu(gate) * (n @ b)) @ c
            y.copy_(h)

        def fused():
            n = _rmsnorm(x)
            gate = n @ wg_f
            y.copy_(x + (torch.nn.functional.silu(gate) * (n @ wu_f)) @ wd_f)

        seq_us, fused_us = _graph_time(sequential, runs), _graph_time(fused, runs)
        out.append({"d": d, "m": m, "k": k, "tokens": t, "sequential_us": seq_us, "fused_us": fused_us,
                    "speedup": seq_us / fused_us, "weight_bytes": weight_bytes,
                    "hbm_floor_us": weight_bytes / bandwidth * 1e6})
    del wg, wu, wd, wg_f, wu_f, wd_f
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_chain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="576x1536x8,4096x14336x4,16384x6656x4", help="d x m x k, comma-separated")
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=".", help="folder for the JSON (default: the current folder)")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: bench.torch_chain needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench.latency import measure_device
    device = measure_device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tokens = parse_sizes(args.tokens, "--tokens")
    records = []
    for shape in args.shapes.split(","):
        d, m, k = (int(v) for v in shape.split("x"))
        records += measure(d, m, k, tokens, dtype, args.runs, device.copy_bandwidth)
    rows = [(f"{r['d']}x{r['m']}x{r['k']}", r["tokens"], round(r["sequential_us"], 1), round(r["fused_us"], 1),
             f"{r['speedup']:.2f}x", round(r["hbm_floor_us"], 1)) for r in records]
    print(f"torch CUDA graphs, {device.name}, copy {device.copy_bandwidth / 1e12:.2f} TB/s, "
          f"matmul {device.matmul_rate / 1e12:.0f} TFLOP/s")
    print(table(rows, header=("d x m x k", "tokens", "sequential us", "fused us", "speedup", "HBM floor us")))
    result = {"device": device.__dict__, "dtype": args.dtype, "results": records}
    print(f"result: {write_result('torch_chain', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
