"""vLLM serving the checkpoint folders this project writes (nemotron-nas with its configuration code, or llama):

    python -m bench.serving tokens FOLDER [FOLDER ...] [--labels a,b] [--dtype float32] [--prompts 5] [--new 32]
    python -m bench.serving speed A B [--labels unfused,fused] [--batch 1,8,32,128] [--prompt 128] [--new 128] [--tp 2]

tokens: greedy generation by vLLM (offline `vllm.LLM`, prompts given as token ids: windows of the @pydoc text in
the folder's tokenizer) against this project's torch model of the same folder (models.loaders.load_model, same
dtype, same GPU): (1) the torch model's own greedy continuation, token by token (sequences identical, first
divergence); (2) the torch model run once over prompt + vLLM's tokens: top-1 agreement with vLLM's choice at every
generated position, and the largest |log-probability difference| of vLLM's chosen token.
speed: each folder in its own process, the same random prompt ids for both: decode latency per token at batch 1
and at every batch, ms per step = (T(new tokens) - T(1 token)) / (new - 1), and output throughput
batch x new / T(new tokens), median of --runs after one warm-up; prefix caching off, EOS ignored, decode steps in
CUDA graphs (vLLM's FULL_DECODE_ONLY; no torch.compile unless --compile, which is vLLM's default mode). B over A
side by side; JSON (and for speed a PNG) in --out.

vLLM runs a nemotron-nas folder's configuration code (trust_remote_code): only where that code is byte for byte the
configuration_decilm.py this project ships (models.checkpoint); any other folder with code is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.batch_seq import parse_sizes
from bench.results import write_result
from passes.support.errors import fail, run_cli
from passes.support.outputs import check_output
from passes.support.report import table


def needs_our_code(folder: Path) -> bool:
    """True when vLLM must run the folder's configuration code (config.json has an auto_map); refused unless the
    code is this project's configuration_decilm.py, unchanged."""
    from models.checkpoint import configuration_code
    config_path = folder / "config.json"
    if not config_path.is_file():
        fail(f"{folder}: no config.json (not a checkpoint folder)")
    if "auto_map" not in json.loads(config_path.read_text()):
        return False
    code = folder / "configuration_decilm.py"
    if not code.is_file() or code.read_text() != configuration_code():
        fail(f"{folder}: its config code is not this project's configuration_decilm.py; refusing to run it")
    return True


def engine_args(folder: Path, dtype: str, max_len: int, max_batch: int, graphs: bool, compile_: bool,
                tp: int = 1) -> dict:
    """vllm.LLM keyword arguments: `tp` GPUs (tensor parallelism), prefix caching off, decode CUDA graphs at the
    measured batch sizes."""
    args = {"model": str(folder), "dtype": dtype, "trust_remote_code": needs_our_code(folder), "seed": 0,
            "tensor_parallel_size": tp,
            "max_model_len": max_len, "max_num_seqs": max_batch, "enable_prefix_caching": False,
            "max_num_batched_tokens": max(8192, max_batch * max_len), "gpu_memory_utilization": 0.45}
    if not graphs:
        args["enforce_eager"] = True
    elif not compile_:
        args["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                      "cudagraph_capture_sizes": sorted({1, max_batch} | set(_graph_sizes(max_batch)))}
    return args


def _graph_sizes(max_batch: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch]


# ---------------------------------------------------------------- inside the vLLM process

def _vllm_tokens(llm, job: dict) -> dict:
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=job["new"], ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                         for o in outputs]}


def _timed(llm, prompts: list[list[int]], new: int, runs: int) -> float:
    """Median seconds of generating `new` tokens for every prompt at once."""
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, params, use_tqdm=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vllm_speed(llm, job: dict) -> dict:
    rows = {}
    for batch in job["batches"]:
        prompts = job["prompts"][:batch]
        full, first = _timed(llm, prompts, job["new"], job["runs"]), _timed(llm, prompts, 1, job["runs"])
        rows[str(batch)] = {"seconds": full, "prefill_seconds": first,
                            "ms_per_step": 1e3 * (full - first) / (job["new"] - 1),
                            "output_tokens_per_s": batch * job["new"] / full}
    return rows


def worker(job_path: str, result_path: str) -> None:
    """Run one vLLM job (JSON in job_path: engine args, mode, prompts) and write its result to result_path."""
    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    import vllm
    from vllm import LLM
    llm = LLM(**job["engine"])
    loaded = time.perf_counter() - start
    result = (_vllm_tokens if job["mode"] == "tokens" else _vllm_speed)(llm, job)
    Path(result_path).write_text(json.dumps({"vllm": vllm.__version__, "load_seconds": loaded, "result": result}))


def run_vllm(job: dict) -> dict:
    """`worker` in a fresh Python process (vLLM holds the GPU until its process ends); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        code = f"from bench.serving import worker; worker({str(job_path)!r}, {str(result_path)!r})"
        env = {"VLLM_USE_FLASHINFER_SAMPLER": "0",     # greedy needs no top-k/top-p kernel; flashinfer not required
               **os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-c", code], env=env)
        if done.returncode != 0 or not result_path.is_file():
            fail(f"vLLM failed on {job['engine']['model']} (exit {done.returncode}; its log is above)")
        return json.loads(result_path.read_text())


# ---------------------------------------------------------------- tokens: vLLM against our torch model

def pydoc_prompts(folder: Path, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` token ids of the @pydoc text in the folder's tokenizer, spread over the text."""
    from models.loaders import load_tokenizer
    from models.text import pydoc_text
    tokenizer = load_tokenizer(str(folder))
    if tokenizer is None:
        fail(f"{folder}: no tokenizer files")
    ids = tokenizer(pydoc_text())["input_ids"]
    step = (len(ids) - length) // count
    return [list(ids[k * step:k * step + length]) for k in range(count)]


def torch_check(folder: Path, dtype: str, prompts: list[list[int]], served: dict, new: int) -> dict:
    """Our model's greedy continuation vs vLLM's, and our log-probabilities of vLLM's tokens (teacher forced)."""
    import torch

    from models.loaders import load_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(str(folder), getattr(torch, dtype)).to(device)
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        ours = ids
        for _ in range(new):
            ours = torch.cat([ours, model(ours)[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = torch.cat([ids, torch.tensor(served["tokens"], device=device)], dim=1)
        logprobs = torch.log_softmax(model(theirs)[:, ids.shape[1] - 1:-1].float(), dim=-1)
    ours, theirs = ours[:, ids.shape[1]:].cpu(), theirs[:, ids.shape[1]:].cpu()
    chosen = logprobs.gather(-1, theirs.to(device)[..., None])[..., 0].cpu()
    same = (ours == theirs)
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in same]
    return {"sequences_identical": int(same.all(dim=1).sum()), "sequences": len(prompts),
            "tokens_equal": round(float(same.float().mean()), 4), "first_divergence": first,
            "top1_agreement_teacher_forced": round(float((logprobs.argmax(-1).cpu() == theirs).float().mean()), 4),
            "max_abs_logprob_diff": float((chosen - torch.tensor(served["logprobs"])).abs().max())}


def tokens(args, folders: list[Path], labels: list[str]) -> dict:
    rows, report = [], {}
    for folder, label in zip(folders, labels):
        prompts = pydoc_prompts(folder, args.prompts, args.prompt)
        engine = engine_args(folder, args.dtype, args.prompt + args.new + 8, len(prompts), False, False, args.tp)
        served = run_vllm({"mode": "tokens", "engine": engine, "prompts": prompts, "new": args.new})
        check = torch_check(folder, args.dtype, prompts, served["result"], args.new)
        report[label] = {"folder": str(folder), "vllm": served["vllm"], "load_seconds": round(served["load_seconds"], 1),
                         "prompts": prompts, "vllm_tokens": served["result"]["tokens"], **check}
        rows.append((label, f"{check['sequences_identical']}/{check['sequences']}", check["tokens_equal"],
                     check["top1_agreement_teacher_forced"], f"{check['max_abs_logprob_diff']:.2e}"))
    print(table(rows, ("folder", "identical", "tokens equal", "top-1 (forced)", "max |dlogprob|")))
    return {"mode": "tokens", "dtype": args.dtype, "prompt_tokens": args.prompt, "new_tokens": args.new,
            "folders": report}


# ---------------------------------------------------------------- speed: A and B side by side

def speed(args, folders: list[Path], labels: list[str]) -> dict:
    import random
    batches = parse_sizes(args.batch, "--batch")
    rng = random.Random(0)
    prompts = [[rng.randrange(args.vocab_limit) for _ in range(args.prompt)] for _ in range(max(batches))]
    measured = {}
    for folder, label in zip(folders, labels):
        engine = engine_args(folder, args.dtype, args.prompt + args.new + 8, max(batches), True, args.compile, args.tp)
        engine["skip_tokenizer_init"] = True
        measured[label] = run_vllm({"mode": "speed", "engine": engine, "prompts": prompts, "batches": batches,
                                    "new": args.new, "runs": args.runs})
        measured[label]["folder"] = str(folder)
    a, b = labels
    rows, ratios = [], {}
    for batch in map(str, batches):
        ra, rb = measured[a]["result"][batch], measured[b]["result"][batch]
        ratios[batch] = {"decode_speedup": ra["ms_per_step"] / rb["ms_per_step"],
                         "throughput_ratio": rb["output_tokens_per_s"] / ra["output_tokens_per_s"]}
        rows.append((batch, ra["ms_per_step"], rb["ms_per_step"], ratios[batch]["decode_speedup"],
                     ra["output_tokens_per_s"], rb["output_tokens_per_s"], ratios[batch]["throughput_ratio"]))
    print(table(rows, ("batch", f"{a} ms/step", f"{b} ms/step", "speedup", f"{a} tok/s", f"{b} tok/s", "ratio")))
    return {"mode": "speed", "dtype": args.dtype, "prompt_tokens": args.prompt, "new_tokens": args.new,
            "runs": args.runs, "tensor_parallel_size": args.tp,
            "cuda_graphs": "vLLM compile mode default (VLLM_COMPILE)" if args.compile
            else "FULL_DECODE_ONLY, compilation mode NONE", "labels": labels, "folders": measured, "ratios": ratios}


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    a, b = result["labels"]
    batches = list(result["ratios"])
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(batches))
    ax.bar([i - 0.2 for i in x], [result["ratios"][k]["decode_speedup"] for k in batches], 0.4, label="decode step speedup")
    ax.bar([i + 0.2 for i in x], [result["ratios"][k]["throughput_ratio"] for k in batches], 0.4, label="throughput ratio")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), batches)
    ax.set_xlabel("batch")
    ax.set_ylabel(f"{b} over {a}")
    ax.set_title(f"vLLM {result['folders'][a]['vllm']}: {b} vs {a}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("tokens", "speed"))
    parser.add_argument("folders", nargs="+", type=Path, help="checkpoint folders (speed: exactly two, A then B)")
    parser.add_argument("--labels", help="names of the folders in the table (default: the folder names)")
    parser.add_argument("--dtype", default=None, help="vLLM / torch dtype (default: float32 for tokens, bfloat16 for speed)")
    parser.add_argument("--prompts", type=int, default=5, help="tokens: number of prompts")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32 for tokens, 128 for speed)")
    parser.add_argument("--new", type=int, default=None, help="generated tokens (default 32 for tokens, 128 for speed)")
    parser.add_argument("--batch", default="1,8,32,128", help="speed: batch sizes")
    parser.add_argument("--runs", type=int, default=3, help="speed: timed generations per batch (median)")
    parser.add_argument("--vocab-limit", type=int, default=256, help="speed: prompt ids drawn below this")
    parser.add_argument("--compile", action="store_true", help="speed: vLLM's default torch.compile mode")
    parser.add_argument("--tp", type=int, default=1, help="GPUs per model (vLLM tensor_parallel_size)")
    parser.add_argument("--name", default=None, help="result name (default vllm_<mode>)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON (and PNG)")
    args = parser.parse_args(argv)
    name = args.name or f"vllm_{args.mode}"
    check_output(args.out / f"{name}.json", "result")
    labels = args.labels.split(",") if args.labels else [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        fail(f"--labels names {len(labels)} folders, {len(args.folders)} given")
    if args.mode == "speed" and len(args.folders) != 2:
        fail("speed compares exactly two folders (A then B)")
    for folder in args.folders:
        needs_our_code(folder)
    default = 32 if args.mode == "tokens" else 128
    args.prompt, args.new = args.prompt or default, args.new or default
    if args.new < 2 or args.tp < 1:
        fail("--new must be at least 2 and --tp at least 1")
    args.dtype = args.dtype or ("float32" if args.mode == "tokens" else "bfloat16")
    result = (tokens if args.mode == "tokens" else speed)(args, args.folders, labels)
    print(f"result: {write_result(name, result, args.out)}")
    if args.mode == "speed":
        print(f"plot: {plot(result, args.out / f'{name}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
