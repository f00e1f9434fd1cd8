"""python -m bench.generate A_DIR B_DIR [--batch 1,8,32] [--prompt 128] [--new 128] [--runs 3] [--out DIR]

Per-token decode latency through the onnxruntime-genai runtime, two model folders side by side (A the reference,
B the variant: the builder's and ours, unfused and fused, ...). For each batch size: random prompt token ids
(the same for A and B), then greedy generation of --new tokens; both models are loaded together and generate
alternately, --runs times each, after one warm-up generation. Reported per model: milliseconds per generated
token (the median step, generate_next_token timed with the Python loop, as an application sees it), the HBM floor
(weight bytes plus the KV cache read at the mean context, over the copy bandwidth measured on this GPU) and the
share of it reached; and B's greedy-token agreement with A (fraction of generated positions equal, first
divergence). CUDA graphs where the runtime supports them (batch 1: onnxruntime-genai's GroupQueryAttention refuses
a batched prompt with graphs); --no-cuda-graph turns them off. JSON + PNG in --out (default: the current folder).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.batch_seq import parse_sizes
from bench.results import write_result
from passes.support.errors import fail, run_cli
from passes.support.report import table


def folder_facts(folder: Path) -> dict:
    """Weight bytes and the decoder's cache shape, from the folder's genai_config.json and files."""
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        fail(f"{folder}: no genai_config.json (not an onnxruntime-genai folder)")
    model = json.loads(config_path.read_text())["model"]
    decoder = model["decoder"]
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))
    return {"weight_bytes": weights, "caches": decoder["num_hidden_layers"], "kv_heads": decoder["num_key_value_heads"],
            "head_size": decoder["head_size"], "vocab_size": model["vocab_size"]}


def load(folder: Path, provider: str, cuda_graph: bool):
    import onnxruntime_genai as og
    config = og.Config(str(folder))
    config.clear_providers()
    if provider == "cuda":
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if cuda_graph else "0")
    return og.Model(config)


def generate(model, prompt: np.ndarray, new: int) -> tuple[list[float], np.ndarray]:
    """Greedy generation of `new` tokens after `prompt` [batch, length]; (seconds per step, sequences)."""
    import onnxruntime_genai as og
    batch, length = prompt.shape
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=batch, max_length=length + new, min_length=length + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    steps = []
    while not generator.is_done():
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - start)
    return steps, np.stack([np.asarray(generator.get_sequence(b)) for b in range(batch)])


def agreement(a: np.ndarray, b: np.ndarray, prompt: int) -> dict:
    """B's generated tokens against A's: fraction of positions equal, and where rows first diverge (median)."""
    ga, gb = a[:, prompt:], b[:, prompt:]
    n = min(ga.shape[1], gb.shape[1])
    same = ga[:, :n] == gb[:, :n]
    first = [int(np.argmin(row)) if not row.all() else n for row in same]
    return {"equal_fraction": float(same.mean()), "first_divergence_median": float(np.median(first)), "tokens": int(n)}


def hbm_floor_ms(facts: dict, batch: int, context: float, itemsize: int, bandwidth: float) -> float:
    """(weights + K and V of every cache at `context` positions, read once per step) / bandwidth, in ms."""
    kv = 2 * facts["caches"] * batch * facts["kv_heads"] * facts["head_size"] * context * itemsize
    return (facts["weight_bytes"] + kv) / bandwidth * 1e3


def measure(folders: list[Path], batch: int, args, graphs: bool, vocab: int) -> dict:
    rng = np.random.default_rng(batch)
    high = min(args.vocab_limit, vocab)
    prompt = rng.integers(min(100, high // 2), high, size=(batch, args.prompt), dtype=np.int64)
    models = [load(f, args.provider, graphs) for f in folders]
    for model in models:                                    # warm-up (and CUDA-graph capture)
        generate(model, prompt, min(args.new, 8))
    per_step = [[], []]
    sequences = [None, None]
    for _ in range(args.runs):
        for k, model in enumerate(models):
            steps, seqs = generate(model, prompt, args.new)
            per_step[k].append(statistics.median(steps[1:] or steps))
            sequences[k] = seqs
    del models
    return {"batch": batch, "cuda_graph": graphs, "ms_per_token": [statistics.median(s) * 1e3 for s in per_step],
            "runs_ms": [[round(v * 1e3, 4) for v in s] for s in per_step],
            "agreement": agreement(sequences[0], sequences[1], args.prompt)}


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    rows = result["results"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, color) in enumerate(((result["labels"][0], "tab:blue"), (result["labels"][1], "tab:orange"))):
        ax.bar(x + (k - 0.5) * 0.35, [r["ms_per_token"][k] for r in rows], 0.35, label=label, color=color)
    ax.plot(x, [r["floor_ms"][0] for r in rows], "k_", markersize=30, mew=2, label="HBM floor (A)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x", (i, max(r["ms_per_token"])), ha="center", xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(x, [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("ms per generated token")
    ax.set_title(result["title"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="reference folder (onnxruntime-genai)")
    parser.add_argument("b", type=Path, help="variant folder")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="generated tokens per row")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per model and batch")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--vocab-limit", type=int, default=32000, help="prompt token ids are drawn below this (and below the vocabulary size)")
    parser.add_argument("--labels", default="A,B", help="names of the two folders in the table and plot")
    parser.add_argument("--name", default="generate", help="result name")
    parser.add_argument("--out", default=".", help="folder for the JSON and PNG (default: the current folder)")
    args = parser.parse_args(argv)
    folders = [args.a, args.b]
    facts = [folder_facts(f) for f in folders]
    batches = parse_sizes(args.batch, "--batch")
    if args.provider == "cuda":
        from bench.latency import measure_device
        device = measure_device("cuda")
        bandwidth, device_name = device.copy_bandwidth, device.name
    else:
        bandwidth, device_name = float("nan"), "cpu"
    labels = args.labels.split(",")
    itemsize = 2
    rows, records = [], []
    for batch in batches:
        graphs = args.provider == "cuda" and not args.no_cuda_graph and batch == 1
        r = measure(folders, batch, args, graphs, min(f["vocab_size"] for f in facts))
        context = args.prompt + args.new / 2
        r["floor_ms"] = [hbm_floor_ms(f, batch, context, itemsize, bandwidth) for f in facts]
        r["share_of_floor"] = [fl / ms for fl, ms in zip(r["floor_ms"], r["ms_per_token"])]
        r["speedup"] = r["ms_per_token"][0] / r["ms_per_token"][1]
        records.append(r)
        rows.append((batch, "on" if graphs else "off", round(r["ms_per_token"][0], 3), round(r["ms_per_token"][1], 3),
                     f"{r['speedup']:.3f}x", round(r["floor_ms"][0], 3), f"{r['share_of_floor'][0]:.0%}",
                     round(r["floor_ms"][1], 3), f"{r['share_of_floor'][1]:.0%}", f"{r['agreement']['equal_fraction']:.1%}"))
        print(f"batch {batch}: {labels[0]} {r['ms_per_token'][0]:.3f} ms/token, {labels[1]} {r['ms_per_token'][1]:.3f} "
              f"ms/token ({r['speedup']:.3f}x)", flush=True)
    print(table(rows, header=("batch", "graphs", f"{labels[0]} ms", f"{labels[1]} ms", "B speedup", "floor A",
                              "A/floor", "floor B", "B/floor", "greedy agree")))
    result = {"labels": labels, "folders": [str(f) for f in folders], "facts": facts, "device": device_name,
              "bandwidth_bytes_per_s": bandwidth, "prompt": args.prompt, "new": args.new, "runs": args.runs,
              "provider": args.provider, "title": f"{labels[0]} vs {labels[1]}: onnxruntime-genai, {device_name}, "
                                                   f"prompt {args.prompt}, {args.new} new tokens", "results": records}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"result: {write_result(args.name, result, out)}; plot: {plot(result, out / f'{args.name}.png')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
