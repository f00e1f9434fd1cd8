"""Tensor-parallel FFN fusion: k Megatron-sharded FFNs (k all-reduces) against the one fused FFN (one all-reduce).

    python -m bench.tp                       # all visible GPUs; shapes 8b,70b,405b; k 2,4,8; tokens 1,8,32,128
    python -m bench.tp --quick               # 8b,405b; k=4; tokens 1,32 (well under 3 minutes on one H200)
    python -m bench.tp --world-size 8 --shapes 405b --k 4 --tokens 1 --out "$OUT"
    python -m bench.tp --emulate-tp 8        # one GPU doing one rank's share of TP8 (FFN width m/8)
    python -m bench.tp --backend gloo --device cpu --world-size 2 --shapes tiny --out DIR --no-save   # CPU test
    python -m bench.tp --plot a.json b.json --out DIR                 # one plot from several runs
    python -m bench.tp --predict tp_w1_emu8.json tp_w2.json --out DIR # TP8 from one rank's share + measured all-reduces

Math. Block i (i = 1..k) is a pre-norm SwiGLU FFN with gain g_i, gate G_i and up U_i (m x d), down D_i (d x m):
    FFN_i(x) = D_i (silu(G_i n_i) * (U_i n_i)),   n_i = g_i * xh,   xh = x / sqrt(mean(x^2) + eps).
  Sequential chain:  x_i = x_{i-1} + FFN_i(x_{i-1}),  output x_k.
  Fused (FFN fusion, the parallel form):  y = x + sum_i FFN_i(x) = x + D (silu(G xh) * (U xh)), with
    G = [G_1 diag(g_1); ...; G_k diag(g_k)]  (k*m x d, each gain folded into its block's columns), U likewise,
    D = [D_1 ... D_k]  (d x k*m).
  Tensor parallelism over W ranks (Megatron), c = m / W: rank r holds rows r*c:(r+1)*c of G_i and U_i
  (column-parallel) and the same columns of D_i (row-parallel), computes the partial sum
  p_r = D_i[:, r] (silu(G_i[r] n) * (U_i[r] n)), and an all-reduce (sum over ranks) gives FFN_i(x) on every rank.
  The sequential chain has k all-reduces on its critical path; the fused FFN, whose rank r holds its c rows of
  every block (k*c rows, block after block), has one. Fusing removes k-1 all-reduces and k-1 sequential steps.
  Gate and up are one merged GEMM per block ([gate; up] rows) unless --split-gate-up.

Measured per (shape, k, tokens T), for seq and fused, each step captured whole in a CUDA graph (on CPU: eager),
median over --iters replays timed with CUDA events, then the maximum over ranks:
  total_us      the step with its all-reduces;
  gemm_us       the same step without all-reduce (norms, GEMMs, SiLU, residual adds: everything but communication);
  allreduce_us  the all-reduces alone (k for seq, 1 for fused) on [T, d] tensors.
  speedup = seq total / fused total; gemm_speedup = seq gemm / fused gemm (the number that matters on one GPU);
  allreduce share = allreduce_us / total_us.

Numerics: rank 0 computes, in float32 from the same unsharded weights, the sequential chain, the parallel form
x + sum_i FFN_i(n_i(x)), and the unsharded fused FFN on the gain-folded weights (block by block: a GEMM over the
concatenated width is the sum of the blocks' GEMMs). The sharded fused output (of the CUDA graph itself) must be
within --tol (1e-2) of both, as ||out - ref|| / ||ref||; the sharded seq output must be within --seq-tol (3e-2) of
the chain (a bf16 chain rounds its residual stream k times and each block amplifies earlier errors: about 1e-2 at
k=8 on CPU; a sharding bug gives errors of order 1). The weights make each FFN's output about as large as x, so
the residual cannot hide an FFN error; the FFN-only errors ||(out - x) - (ref - x)|| / ||ref - x|| go to the JSON.

Weights are random, deterministic in (seed, block), the same for every world size; every rank draws a whole
block on its device and keeps its slice. Memory per rank: the seq shards are built, timed and freed; then the
fused shard is built block by block from freshly drawn blocks (seq and fused weights never coexist), so a rank
needs k*3*d*m/W weight bytes plus one unsharded block (plus float32 scratch for the reference on rank 0);
configurations that do not fit in a rank's free memory are skipped with the reason printed.

Results: one JSON through bench.results.write_result (rewritten after each shape and k, so a crash keeps what was
measured) and a PNG of speedup vs tokens, in --out DIR (default: the current folder; none with --no-save). NVLink multicast
stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set below, before
torch is imported (children inherit them); no symmetric memory is used. Works under torchrun too.
"""
from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.batch_seq import parse_sizes  # noqa: E402
from bench.cuda_graphs import capture  # noqa: E402
from bench.results import write_result  # noqa: E402
from bench.tp_model import Reference, block_weights, fuse_shards, fused_step, rel_err, seq_step, shard  # noqa: E402
from bench.tp_report import format_prediction, format_table, goal_lines, plot, predict  # noqa: E402

SHAPES = {  # name: (hidden d, FFN width m)
    "tiny": (64, 128),
    "8b": (4096, 14336),      # Llama-3.1-8B
    "70b": (8192, 28672),     # Llama-3.1-70B
    "405b": (16384, 53248),   # Llama-3.1-405B
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK = {"shapes": "8b,405b", "k": "4", "tokens": "1,32"}
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------- timing
class Ctx:
    """Per-rank state: rank, world, device, whether CUDA graphs are used, replay counts."""

    def __init__(self, rank, world, device, graphs, iters, warmup):
        self.rank, self.world, self.device = rank, world, device
        self.cuda = device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.iters, self.warmup = iters, warmup

    def sync(self):
        """All ranks meet (an all-reduce: it also initializes NCCL before any capture) and the device idles."""
        t = torch.ones(1, device=self.device)
        dist.all_reduce(t)
        if self.cuda:
            torch.cuda.synchronize()

    def agree(self, value: float, op=dist.ReduceOp.MIN) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def time(self, fn):
        """(median microseconds of one call of fn, its output): a CUDA-graph replay timed with events on GPU,
        fn itself with perf_counter on CPU. All ranks start together; collectives keep them in step."""
        self.sync()
        if not self.cuda:
            out = None
            for _ in range(self.warmup):
                out = fn()
            times = []
            for _ in range(self.iters):
                start = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - start) * 1e6)
            return statistics.median(times), out
        holder = {}
        if self.graphs:
            graph, holder["out"] = capture(fn)
            run = graph.replay
        else:
            graph = None

            def run():
                holder["out"] = fn()
        for _ in range(self.warmup):
            run()
        self.sync()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for start, end in zip(starts, ends):
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        out = holder["out"].clone() if isinstance(holder.get("out"), torch.Tensor) else None
        del graph, holder
        return statistics.median(times), out


def graphs_work(ctx: Ctx) -> bool:
    """Whether an all-reduce captured in a CUDA graph replays correctly here (else: fall back to eager timing)."""
    ok = True
    try:
        buf = torch.ones(1024, device=ctx.device)
        graph, _ = capture(lambda: dist.all_reduce(buf))
        buf.fill_(1.0)
        graph.replay()
        torch.cuda.synchronize()
        ok = bool((buf == ctx.world).all())
        del graph
    except Exception as exc:  # noqa: BLE001 -- any failure means: time eagerly
        print(f"[rank {ctx.rank}] CUDA graph capture of an all-reduce failed: {exc!r}", flush=True)
        ok = False
    return ctx.agree(ok) > 0


# ----------------------------------------------------------------------------------------------- one (shape, k)
def bytes_per_rank(d, m, k, world, itemsize, rank0: bool) -> int:
    """Peak device bytes of one rank: its weights (seq or fused), one unsharded block and its shard while they are
    drawn, on rank 0 float32 scratch for the reference, and 1 GiB for activations, graphs and the CUDA context."""
    weights = k * 3 * d * (m // world) * itemsize
    block = 3 * d * (m + m // world) * itemsize
    ref = d * m * (4 + itemsize) if rank0 else 0
    return weights + block + ref + GIB


def run_shape_k(ctx: Ctx, args, label, d, m, k, tokens, dtype, x_all) -> list[dict]:
    """Time and check seq vs fused for one shape and k at every token count; rows on rank 0 (others: [])."""
    rank, world = ctx.rank, ctx.world
    base = {"shape": label, "d": d, "m": m, "m_per_rank": m // world, "k": k, "world": world,
            "emulated_tp": args.emulate_tp, "dtype": args.dtype, "backend": args.backend, "graphs": ctx.graphs,
            "split_gate_up": args.split_gate_up}
    need = bytes_per_rank(d, m, k, world, dtype.itemsize, rank == 0)
    base["bytes_per_rank"] = need
    reason = None
    if m % world:
        reason = f"FFN width {m} not divisible by world size {world}"
    elif ctx.cuda:
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        fits = ctx.agree(need <= 0.95 * free)
        if not fits:
            reason = f"needs ~{need / GIB:.1f} GiB per rank, a rank has {free / GIB:.1f} GiB free"
    if reason:
        if rank == 0:
            print(f"[{label} k={k}] skipped: {reason}", flush=True)
        return [{**base, "tokens": t, "skipped": reason} for t in tokens] if rank == 0 else []

    split = args.split_gate_up
    ref = Reference(x_all) if rank == 0 else None
    seq_blocks = []
    for i in range(k):                                         # phase A: seq shards (+ reference on rank 0)
        block = block_weights(d, m, i, args.seed, dtype, ctx.device)
        seq_blocks.append(shard(block, rank, world))
        if ref is not None:
            ref.add(block)
        del block
    results = {t: {} for t in tokens}
    for t in tokens:
        x = x_all[:t].clone()
        r = results[t]
        r["seq_gemm"], _ = ctx.time(lambda: seq_step(x, seq_blocks, False, split))
        buf = torch.zeros(t, d, dtype=dtype, device=ctx.device)
        r["seq_ar"], _ = ctx.time(lambda: [dist.all_reduce(buf) for _ in range(k)])
        r["seq_total"], r["seq_out"] = ctx.time(lambda: seq_step(x, seq_blocks, True, split))
    del seq_blocks
    if ctx.cuda:
        torch.cuda.empty_cache()
    # phase B: the fused shard, built from each block's shard as the blocks are drawn again
    w1, w2 = fuse_shards((shard(block_weights(d, m, i, args.seed, dtype, ctx.device), rank, world)
                          for i in range(k)), k)
    for t in tokens:
        x = x_all[:t].clone()
        r = results[t]
        r["fused_gemm"], _ = ctx.time(lambda: fused_step(x, w1, w2, False, split))
        buf = torch.zeros(t, d, dtype=dtype, device=ctx.device)
        r["fused_ar"], _ = ctx.time(lambda: dist.all_reduce(buf))
        r["fused_total"], r["fused_out"] = ctx.time(lambda: fused_step(x, w1, w2, True, split))
    del w1, w2
    if ctx.cuda:
        torch.cuda.empty_cache()

    rows = []
    keys = ("seq_gemm", "seq_ar", "seq_total", "fused_gemm", "fused_ar", "fused_total")
    for t in tokens:
        r = results[t]
        worst = torch.tensor([r[key] for key in keys], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)           # the slowest rank sets the pace
        if rank != 0:
            continue
        us = dict(zip(keys, worst.tolist()))
        refs, x = ref.deltas(t), x_all[:t]
        pairs = {"seq_vs_seq_ref": ("seq_out", "seq"), "fused_vs_fused_ref": ("fused_out", "fused"),
                 "fused_vs_parallel_ref": ("fused_out", "par")}
        errs = {key: rel_err(r[out], x, refs[ref_key]) for key, (out, ref_key) in pairs.items()}
        errs_ffn = {key: rel_err(r[out], x, refs[ref_key], ffn_only=True) for key, (out, ref_key) in pairs.items()}
        tols = {"seq_vs_seq_ref": args.seq_tol, "fused_vs_fused_ref": args.tol, "fused_vs_parallel_ref": args.tol}
        row = {**base, "tokens": t,
               "seq": {"gemm_us": us["seq_gemm"], "allreduce_us": us["seq_ar"], "total_us": us["seq_total"]},
               "fused": {"gemm_us": us["fused_gemm"], "allreduce_us": us["fused_ar"], "total_us": us["fused_total"]},
               "speedup": us["seq_total"] / us["fused_total"],
               "gemm_speedup": us["seq_gemm"] / us["fused_gemm"],
               "allreduce_share_seq": us["seq_ar"] / us["seq_total"],
               "allreduce_share_fused": us["fused_ar"] / us["fused_total"],
               "rel_err": errs, "tol": tols, "rel_err_ffn_only": errs_ffn,
               "check_passed": all(errs[key] < tols[key] for key in errs)}
        rows.append(row)
        print(f"[{label} k={k} T={t} W={world}] seq {us['seq_total']:.1f} us (gemm {us['seq_gemm']:.1f}, "
              f"all-reduce {us['seq_ar']:.1f}) | fused {us['fused_total']:.1f} us (gemm {us['fused_gemm']:.1f}, "
              f"all-reduce {us['fused_ar']:.1f}) | speedup {row['speedup']:.3f}x, gemm-only "
              f"{row['gemm_speedup']:.3f}x | rel err seq {errs['seq_vs_seq_ref']:.1e} fused "
              f"{max(errs['fused_vs_fused_ref'], errs['fused_vs_parallel_ref']):.1e} "
              f"{'ok' if row['check_passed'] else 'FAILED'}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- reporting
def out_dirs(args) -> list[Path]:
    return [] if args.no_save else [Path(args.out)]


def save(args, name, data) -> list[Path]:
    return [write_result(name, data, directory) for directory in out_dirs(args)]


# ----------------------------------------------------------------------------------------------- processes
def worker(rank: int, args, init_method: str, local_rank: int | None = None) -> int:
    """One rank: init the process group, run the sweep, rank 0 reports. Returns the exit code."""
    world = args.world_size
    local_rank = rank if local_rank is None else local_rank
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    torch.set_float32_matmul_precision("highest")             # the float32 reference must not use TF32
    dist.init_process_group(args.backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=args.timeout))
    try:
        return sweep(rank, world, device, args)
    finally:
        dist.destroy_process_group()


def sweep(rank, world, device, args) -> int:
    started = time.perf_counter()
    ctx = Ctx(rank, world, device, not args.no_graphs, args.iters, args.warmup)
    ctx.sync()
    if ctx.graphs:
        ctx.graphs = graphs_work(ctx)
        if not ctx.graphs and rank == 0:
            print("WARNING: all-reduce in a CUDA graph does not work here; timing eagerly (graphs: false)", flush=True)
    dtype = DTYPES[args.dtype]
    tokens, ks = parse_sizes(args.tokens, "--tokens"), parse_sizes(args.k, "--k")
    name = args.name or (f"tp_w{world}" + (f"_emu{args.emulate_tp}" if args.emulate_tp > 1 else "")
                         + ("_quick" if args.quick else ""))
    if rank == 0:
        gpu = torch.cuda.get_device_name(device) if ctx.cuda else "cpu"
        print(f"bench.tp: world {world} ({args.backend}, {gpu}), dtype {args.dtype}, graphs {ctx.graphs}, "
              f"shapes {args.shapes}, k {ks}, tokens {tokens}, iters {args.iters}", flush=True)
    gen = torch.Generator(device=device)
    rows = []
    meta = {"args": vars(args), "world_size": world, "graphs": ctx.graphs, "shapes": {},
            "timing": "median over --iters replays per rank (CUDA events around each CUDA-graph replay), "
                      "max over ranks",
            "env": {name: os.environ.get(name) for name in
                    ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}}
    if ctx.cuda:
        meta["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 -- informative only
            pass
    for label in args.shapes.split(","):
        d, m = SHAPES[label]
        if args.emulate_tp > 1:
            if m % args.emulate_tp:
                raise SystemExit(f"--emulate-tp {args.emulate_tp} does not divide {label}'s FFN width {m}")
            m, label = m // args.emulate_tp, f"{label}/tp{args.emulate_tp}"
        meta["shapes"][label] = {"d": d, "m": m}
        gen.manual_seed(args.seed + d)
        x_all = torch.randn(max(tokens), d, generator=gen, device=device, dtype=dtype)
        for k in ks:
            rows += run_shape_k(ctx, args, label, d, m, k, tokens, dtype, x_all)
            if rank == 0:
                save(args, name, {**meta, "rows": rows, "complete": False})
    code = 0
    if rank == 0:
        checked = [r for r in rows if not r.get("skipped")]
        passed = all(r["check_passed"] for r in checked)
        goals = goal_lines(rows)
        png = [plot(rows, directory / f"{name}.png") for directory in out_dirs(args)]
        paths = save(args, name, {**meta, "rows": rows, "complete": True, "checks_passed": passed,
                                  "goal": goals, "plots": [str(p) for p in png if p],
                                  "seconds": round(time.perf_counter() - started, 1)})
        print()
        print(format_table(rows))
        for line in goals:
            print(line)
        print(f"numerical check (fused rel err < {args.tol}, seq < {args.seq_tol}) on {len(checked)} configurations: "
              f"{'passed' if passed else 'FAILED'}")
        print(f"results: {', '.join(map(str, paths)) or '(not saved)'}; plots: "
              f"{', '.join(str(p) for p in png if p) or 'none'}; {time.perf_counter() - started:.0f} s", flush=True)
        code = 0 if passed else 1
    return code


def _spawned(rank: int, args, init_method: str):
    code = worker(rank, args, init_method)
    if code:
        sys.exit(code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.tp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: visible GPUs; 1 on CPU)")
    p.add_argument("--shapes", default="8b,70b,405b", help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--k", default="2,4,8", help="FFNs per fused group, comma list")
    p.add_argument("--tokens", default="1,8,32,128", help="tokens per step, comma list")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default nccl on GPU, gloo on CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    p.add_argument("--emulate-tp", type=int, default=1,
                   help="FFN width m/N: each GPU does one rank's share of TP(N x world) (for one-GPU machines)")
    p.add_argument("--split-gate-up", action="store_true", help="separate gate and up GEMMs (default: one merged)")
    p.add_argument("--no-graphs", action="store_true", help="time eagerly instead of replaying CUDA graphs")
    p.add_argument("--iters", type=int, default=100, help="timed replays per measurement (median)")
    p.add_argument("--warmup", type=int, default=10, help="untimed replays before timing")
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative error of the fused output")
    p.add_argument("--seq-tol", type=float, default=3e-2, help="largest relative error of the sequential chain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300, help="seconds before a stuck collective aborts")
    p.add_argument("--name", default=None, help="result name (default tp_w<world>[_emu<N>][_quick])")
    p.add_argument("--out", default=".", help="folder for the JSON and PNG (default: the current folder)")
    p.add_argument("--no-save", action="store_true", help="write no JSON or PNG")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="only plot rows of these result files together")
    p.add_argument("--predict", nargs=2, metavar=("EMULATED_JSON", "MEASURED_JSON"),
                   help="only predict TP N from an --emulate-tp N run and a multi-GPU run (see predict())")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.k, args.tokens = QUICK["shapes"], QUICK["k"], QUICK["tokens"]
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but CUDA is not available")
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.world_size is None:
        args.world_size = torch.cuda.device_count() if args.device == "cuda" else 1
    if args.device == "cuda" and args.world_size > torch.cuda.device_count():
        p.error(f"--world-size {args.world_size} but {torch.cuda.device_count()} GPUs are visible")
    for label in args.shapes.split(","):
        if label not in SHAPES:
            p.error(f"unknown shape {label!r}; choose from {','.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        rows = [r for f in args.plot for r in json.loads(Path(f).read_text())["rows"]]
        paths = [plot(rows, d / f"{args.name or 'tp_combined'}.png") for d in out_dirs(args)]
        print(f"plots: {', '.join(str(p) for p in paths if p) or 'none'}")
        return 0
    if args.predict:
        emulated, measured = (json.loads(Path(f).read_text())["rows"] for f in args.predict)
        rows = predict(emulated, measured)
        if not rows:
            print("no (shape, k, tokens) in both files", file=sys.stderr)
            return 2
        print(format_prediction(rows))
        name = args.name or f"tp_predict_tp{rows[0]['tp']}"
        paths = save(args, name, {"sources": args.predict, "model": predict.__doc__, "rows": rows})
        print(f"results: {', '.join(map(str, paths))}")
        return 0
    if {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= os.environ.keys():   # launched by torchrun
        args.world_size = int(os.environ["WORLD_SIZE"])
        return worker(int(os.environ["RANK"]), args, "env://", int(os.environ["LOCAL_RANK"]))
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    if args.world_size == 1:
        return worker(0, args, init_method)
    try:
        mp.spawn(_spawned, args=(args, init_method), nprocs=args.world_size, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        print(f"bench.tp failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
