"""Healing throughput on one GPU (issue 24): training steps of models.heal on an 8B-shaped Puzzle model, and the
speed at which the teacher samples its training pool.

    python -m bench.heal_throughput train [--batch 32 --seq 1024 --micro-batch 4 --steps 3] --out bench/results/h200
    python -m bench.heal_throughput sample [--teacher smollm2-shape --rows 4096 --seq 256] --out bench/results/h200
    python -m bench.heal_throughput train --tiny        # the same on a CPU, at bench.shapes' mini size (smoke test)
    python -m bench.heal_throughput sample --tiny

train: teacher = bench.shapes' llama8b-puzzle (Llama-3.1-8B's shapes, attention removed in layers 8-23, random
weights, bf16 on a GPU); student = models.fused.drop_and_fuse(teacher, fuse="paper") (the paper's rule: FFN ordinals
7-22, 16 FFNs, into one); models.heal.build_trainer and train_step (KL to the teacher, AdamW, clipping), with
--student-dtype (default bf16 on a GPU: weights, gradients and AdamW moments, which is what fits one H200), bf16
autocast and activation checkpointing (--no-checkpoint-layers to turn it off), on random token batches of --batch x
--seq tokens, --micro-batch rows per forward/backward. --warm steps first, then --steps timed ones (CUDA
synchronized). Reported: tokens/s, MFU, peak memory (torch.cuda.max_memory_allocated, the models included).

MFU = (6 N_student + 2 N_teacher) x tokens/s / peak, where N = weights that enter a matrix product (all but the
input embedding table, a lookup; the head counted), the teacher's forward costs 2 N and the student's forward and
backward 6 N per token. Not counted: attention's score and value products, and the student's forward recomputed by
activation checkpointing (the hardware does that work on top). Peak: 989e12 FLOP/s, the dense bf16 rate of an
H100 / H200 (the spec sheets' 1979 assume sparsity); no MFU on other devices.

sample: tokens/s of models.sampling's decoders on the teacher (--teacher, default random weights at SmolLM2-135M's
shape; `smollm2` loads the real model): `cached` (PuzzleDecoder.forward_step, the cache grown by concatenation:
models.heal's sampler before issue 24), `static` (preallocated KV cache) and, on a GPU, `static+graph` (one step
replayed from a CUDA graph); --rows sequences of --seq tokens, one chunk; the share of tokens each decoder samples
equal to `cached`'s (the same generator: differences are rounding in bf16). Goal: 200,000 tokens/s for SmolLM2 on
the H200.

JSON (bench.results.write_result, with machine, versions and command) in --out: heal_8b_train.json (_nockpt without
checkpointing; heal_mini_train.json with --tiny) and heal_sampling.json (heal_sampling_tiny.json).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.results import write_result
from bench.shapes import random_model, shape
from models.fused import PAPER, drop_and_fuse, planned_groups
from models.heal import HealConfig, build_trainer, train_step
from models.heal_dist import Ranks
from models.loaders import load_model
from models.sampling import sample_pool
from passes.support.errors import run_cli

PEAK_BF16 = 989e12                   # dense bf16 FLOP/s of an H100 / H200 (SXM)
PEAK_GPUS = ("H100", "H200")
SAMPLE_GOAL = 200_000                # tokens/s, SmolLM2 on the H200 (issue 24)


def matmul_weights(model) -> int:
    """Weights that enter a matrix product: all but an untied input embedding table (a lookup)."""
    table = 0 if model.config.tie_word_embeddings else model.embed_tokens.weight.numel()
    return model.num_parameters() - table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(tiny: bool, device: torch.device, student_dtype: str):
    """(teacher, student): the llama8b-puzzle shape (mini-puzzle with --tiny), random weights, bf16 on a GPU; the
    student fused by the paper's rule in `student_dtype`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = random_model(shape("mini-puzzle" if tiny else "llama8b-puzzle"), dtype, device.type).to(device)
    teacher.requires_grad_(False)
    student = drop_and_fuse(teacher, [], PAPER)
    return teacher, student.to({"bf16": torch.bfloat16, "fp32": torch.float32}[student_dtype])


def train(args) -> dict:
    """Time --warm + --steps training steps; returns the record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student_dtype = args.student_dtype or ("bf16" if device.type == "cuda" else "fp32")
    teacher, student = _models(args.tiny, device, student_dtype)
    config = HealConfig(teacher="llama8b-puzzle", output=".", batch=args.batch, seq=args.seq, micro_batch=args.micro_batch,
                        student_dtype=student_dtype, checkpoint_layers=args.checkpoint_layers, device=str(device))
    trainer = build_trainer(config, teacher, student, [], device, Ranks())
    gen, seconds, losses = torch.Generator().manual_seed(0), [], []
    for step in range(args.warm + args.steps):
        batch = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), generator=gen)
        _sync(device)
        start = time.perf_counter()
        losses.append(train_step(trainer, batch, 1e-5))
        _sync(device)
        seconds.append(time.perf_counter() - start)
        print(f"step {step}: {seconds[-1]:.2f} s, loss {losses[-1]:.4f}", flush=True)
    timed = seconds[args.warm:]
    tokens_per_s = args.batch * args.seq * len(timed) / sum(timed)
    flops_per_token = 6 * matmul_weights(student) + 2 * matmul_weights(teacher)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = PEAK_BF16 if gpu and any(name in gpu for name in PEAK_GPUS) else None
    return {"teacher": {"shape": "mini-puzzle" if args.tiny else "llama8b-puzzle", "parameters": teacher.num_parameters(),
                        "dtype": str(next(teacher.parameters()).dtype)},
            "student": {"rule": "paper", "groups": planned_groups(teacher.config, PAPER),
                        "ffn_widths": [s.ffn_width for s in student.config.layers],
                        "parameters": student.num_parameters(), "dtype": student_dtype},
            "settings": {"batch": args.batch, "seq": args.seq, "micro_batch": args.micro_batch, "warm": args.warm,
                         "steps": args.steps, "checkpoint_layers": args.checkpoint_layers,
                         "autocast_bf16": device.type == "cuda"},
            "step_seconds": seconds, "losses": losses, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token, "peak_flops": peak,
            "mfu": tokens_per_s * flops_per_token / peak if peak else None,
            "mfu_counting": "(6 N_student + 2 N_teacher) x tokens/s / 989e12, N = weights in matrix products (input "
                            "embedding table excluded, head included); attention score/value products and the forward "
                            "recomputed by activation checkpointing not counted",
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "mfu_goal": 0.35}


def sample(args) -> dict:
    """Time each decoder on one chunk of --rows x --seq tokens; returns the record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model("puzzle-tiny" if args.tiny else args.teacher).eval().requires_grad_(False)
    teacher = teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    decoders = [("cached", False, False), ("static", True, False)] + \
        ([("static+graph", True, True)] if device.type == "cuda" else [])
    sample_pool(teacher, 8, 8, device, 8, 1, autocast)                   # warm-up: kernels, handles
    results, reference = [], None
    for name, static, graphs in decoders:
        _sync(device)
        start = time.perf_counter()
        pool = sample_pool(teacher, args.rows, args.seq, device, args.rows, 0, autocast, static=static, graphs=graphs)
        _sync(device)
        seconds = time.perf_counter() - start
        reference = pool if reference is None else reference
        results.append({"decoder": name, "seconds": seconds, "tokens_per_s": args.rows * (args.seq - 1) / seconds,
                        "same_tokens_as_cached": (pool == reference).float().mean().item()})
        print(f"{name}: {results[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    return {"teacher": "puzzle-tiny" if args.tiny else args.teacher, "rows": args.rows, "seq": args.seq,
            "dtype": str(next(teacher.parameters()).dtype), "results": results, "goal_tokens_per_s": SAMPLE_GOAL}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heal_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("train", "sample"))
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models (smoke test)")
    parser.add_argument("--batch", type=int, help="train: rows per step (default 32, 4 with --tiny)")
    parser.add_argument("--seq", type=int, help="tokens per row (train: 1024, sample: 256; 64 / 32 with --tiny)")
    parser.add_argument("--micro-batch", type=int, help="train: rows per forward/backward (default 4, 2 with --tiny)")
    parser.add_argument("--warm", type=int, default=2, help="train: untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="train: timed steps")
    parser.add_argument("--student-dtype", choices=("fp32", "bf16"), help="train: default bf16 on a GPU, else fp32")
    parser.add_argument("--checkpoint-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="train: activation checkpointing (default on)")
    parser.add_argument("--teacher", default="smollm2-shape", help="sample: the teacher (preset, smollm2, folder)")
    parser.add_argument("--rows", type=int, help="sample: sequences sampled at once (default 4096, 16 with --tiny)")
    parser.add_argument("--out", default=".", help="folder for the JSON (default: the current folder)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 32)
    args.micro_batch = args.micro_batch or (2 if tiny else 4)
    args.seq = args.seq or {("train", False): 1024, ("train", True): 64, ("sample", False): 256,
                            ("sample", True): 32}[args.what, tiny]
    args.rows = args.rows or (16 if tiny else 4096)
    if args.what == "train":
        name = f"heal_{'mini' if tiny else '8b'}_train{'' if args.checkpoint_layers else '_nockpt'}"
        record = train(args)
        print(f"{record['tokens_per_s']:,.0f} tokens/s" + (f", MFU {record['mfu']:.1%}" if record["mfu"] else "") +
              (f", peak memory {record['peak_memory_gib']:.1f} GiB" if record["peak_memory_gib"] else ""))
    else:
        name, record = f"heal_sampling{'_tiny' if tiny else ''}", sample(args)
    print(f"result: {write_result(name, record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
