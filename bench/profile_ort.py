"""Where does an onnxruntime run spend its time? Per-operator totals from onnxruntime's profiler, warm-up excluded.

    python -m bench.profile_ort MODEL.onnx [--provider cuda|cpu] [--batch 8] [--tokens 1] [--past 128] [--runs 5]
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from passes.support.errors import run_cli
from passes.support.onnx_io import load_model
from passes.support.report import table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_ort", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    load_model(args.model)   # refuses unreadable models and external data outside the model's folder
    if args.provider == "cuda":
        import torch  # noqa: F401  (CUDA libraries for onnxruntime-gpu)
    import onnxruntime as ort

    from bench.latency import graph_kind, make_feeds
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ort_profile_")) / "profile")
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(args.model, options, providers=providers)
    decode = graph_kind(session) == "decode"
    feeds = make_feeds(session, args.batch, args.tokens, args.past if decode else 0)
    warmup = 3
    for _ in range(warmup + args.runs):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    # keep only node events inside the timed runs (the warm-up runs allocate memory and pick kernels)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")[warmup:]
    by_op, by_node = collections.Counter(), collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") \
                and any(start <= event["ts"] <= end for start, end in windows):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    runs = len(windows)
    total = sum(by_op.values())
    print(f"{Path(args.model).name}: {args.provider}, batch {args.batch}, tokens {args.tokens}; "
          f"kernel time per run {total / runs:.0f} us (host-side launch time of each node, CUDA kernels are async)")
    print(table([(op, round(us / runs, 1), f"{us / total:.1%}") for op, us in by_op.most_common(args.top)],
                header=("op", "us per run", "share")))
    print(table([(name[:70], round(us / runs, 1)) for name, us in by_node.most_common(args.top)], header=("node", "us per run")))
    return 0


if __name__ == "__main__":
    run_cli(main)
