"""python -m bench.latency ORIGINAL.onnx FUSED.onnx [--provider cuda|cpu] [--tokens 1,16,128,1024] [--batch 1]

Latency of two models side by side in one process, with onnxruntime io-binding on device buffers and CUDA
graphs where possible: warm-up, then the two models alternate run by run and each reports its median.
Graph kinds, recognised from the inputs:
  ffn     x [batch, seq, d]               -> tokens = seq
  prefill input_ids [batch, seq]          -> tokens = seq
  decode  input_ids [batch, 1] + past_*   -> one decode step with a KV cache of --past positions
Two numbers per model: the median of synchronous runs (what a caller waiting for each result sees) and
the median per-run time of runs queued back to back (device-bound; host overhead hidden).
The roofline floor for each model is max(weight bytes / copy bandwidth, matmul FLOPs / matmul rate), with
bandwidth and rate measured on the device (torch) when it is a GPU, where
  weight bytes = bytes of all initializers, FLOPs = 2 * batch * tokens * (elements of all 2-D MatMul weights).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from bench.batch_seq import parse_sizes
from bench.comparison import check_same_interface, model_interface
from passes.support.errors import fail, run_cli
from passes.support.graph_inputs import concrete_shape, input_specs
from passes.support.onnx_io import load_model, tensor_nbytes
from passes.support.report import table


@dataclass
class Device:
    name: str
    copy_bandwidth: float | None = None   # bytes/s, read + write, of a large device-to-device copy
    matmul_rate: float | None = None      # FLOP/s of a large fp16 matrix product


@dataclass
class ModelCost:
    weight_bytes: int
    matmul_params: int

    def floor_seconds(self, device: Device, tokens: int) -> float | None:
        if not device.copy_bandwidth or not device.matmul_rate:
            return None
        return max(self.weight_bytes / device.copy_bandwidth, 2 * tokens * self.matmul_params / device.matmul_rate)


def model_cost(path: Path) -> ModelCost:
    proto = load_model(path).proto
    weights = {t.name: t for t in proto.graph.initializer}
    matmul = sum(int(np.prod(weights[n.input[1]].dims)) for n in proto.graph.node
                 if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and len(weights[n.input[1]].dims) == 2)
    # an embedding lookup reads a few rows, not the table
    gather_bytes = sum(tensor_nbytes(weights[n.input[0]]) for n in proto.graph.node
                       if n.op_type == "Gather" and n.input[0] in weights)
    return ModelCost(sum(tensor_nbytes(t) for t in proto.graph.initializer) - gather_bytes, matmul)


def measure_device(provider: str) -> Device:
    """Copy bandwidth and fp16 matmul rate of GPU 0 through torch (warm-up, then the median of 10)."""
    if provider != "cuda":
        import platform
        return Device(platform.processor() or "cpu")
    import torch
    dev = torch.device("cuda")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.float16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.float16, device=dev)

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src))
    rate = 2 * 8192 ** 3 / timed(lambda: a @ b)
    name = torch.cuda.get_device_name(0)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return Device(name, bandwidth, rate)


def graph_kind(session) -> str:
    names = [i.name for i in session.get_inputs()]
    if "input_ids" not in names:
        return "ffn"
    return "decode" if any(n.startswith("past") for n in names) else "prefill"


def make_feeds(session, batch: int, tokens: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Timing inputs for one step of `tokens` new tokens after `past` cached ones (a decode graph gets one new
    token per row), shapes by passes.support.graph_inputs.concrete_shape: token ids in the vocabulary (the last
    axis of the first output), an all-ones attention mask, positions, N(0, 1) caches and hidden states."""
    rng = np.random.default_rng(seed)
    vocab = next((o.shape[-1] for o in session.get_outputs() if isinstance(o.shape[-1], int)), 1000)
    feeds = {}
    for spec in input_specs(session.get_inputs()):
        shape = concrete_shape(spec, batch, 1 if past else tokens, {}, past)
        lowered = spec.name.lower()
        if spec.elem_type in (TensorProto.INT64, TensorProto.INT32) and "mask" in lowered:
            feeds[spec.name] = np.ones(shape, spec.dtype)
        elif spec.elem_type in (TensorProto.INT64, TensorProto.INT32) and "position" in lowered:
            feeds[spec.name] = np.broadcast_to(past + np.arange(shape[-1], dtype=spec.dtype), shape).copy()
        elif spec.elem_type in (TensorProto.INT64, TensorProto.INT32):
            feeds[spec.name] = rng.integers(0, vocab, shape, dtype=spec.dtype)
        elif spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            fail(f"input '{spec.name}' has type {spec.type_name}, which this benchmark cannot generate")
    return feeds


class BoundModel:
    """An onnxruntime session with inputs and outputs bound to fixed device buffers (CUDA-graph ready)."""

    def __init__(self, path: Path, provider: str, cuda_graph: bool):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal from the other model
        if provider == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1" if cuda_graph else "0"})]
        else:
            providers = ["CPUExecutionProvider"]
        self.path, self.provider, self.cuda_graph = path, provider, cuda_graph
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = "cuda" if provider == "cuda" else "cpu"

    def bind(self, feeds: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort
        self.binding = self.session.io_binding()
        self.inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in feeds.items()}
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        # learn the output shapes with a plain run, then bind preallocated outputs so graph replays can reuse them
        outputs = self.session.run(None, feeds)
        self.outputs = {}
        for meta, value in zip(self.session.get_outputs(), outputs):
            self.outputs[meta.name] = ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype, self.device, 0)
            self.binding.bind_ortvalue_output(meta.name, self.outputs[meta.name])

    def run(self) -> float:
        """Seconds for one synchronous run: what a caller waiting for each result sees, host overhead included."""
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter() - start

    def run_pipelined(self, n: int = 10) -> float:
        """Seconds per run over n runs queued back to back without waiting in between (device-bound time)."""
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        start = time.perf_counter()
        for _ in range(n):
            self.session.run_with_iobinding(self.binding, options)
        self.binding.synchronize_outputs()
        return (time.perf_counter() - start) / n


def _bound(path: Path, provider: str, cuda_graph: bool, feeds) -> BoundModel:
    """Bind with CUDA graphs; fall back to plain io-binding when the graph cannot be captured."""
    try:
        model = BoundModel(path, provider, cuda_graph)
        model.bind(feeds)
        for _ in range(3):
            model.run()
        return model
    except Exception as exc:
        if not cuda_graph:
            raise
        print(f"  note: CUDA graph capture failed for {path.name} ({str(exc).splitlines()[0][:120]}); "
              f"timing without CUDA graphs", file=sys.stderr)
        model = BoundModel(path, provider, False)
        model.bind(feeds)
        return model


def time_side_by_side(models: list[BoundModel], warmup: int, runs: int, pipelined: bool = False) -> list[list[float]]:
    """Alternate the models run by run (AB, then BA, ...) so drift hits both alike; per-run seconds."""
    measure = (lambda m: m.run_pipelined()) if pipelined else (lambda m: m.run())
    for _ in range(warmup):
        for m in models:
            measure(m)
    samples: list[list[float]] = [[] for _ in models]
    for r in range(runs):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for k in order:
            samples[k].append(measure(models[k]))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[1])
    parser.add_argument("original")
    parser.add_argument("fused")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokens", default="1,16,128,1024", help="sequence lengths (ffn and prefill graphs)")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8,32")
    parser.add_argument("--past", type=int, default=128, help="KV-cache length for decode graphs")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--name", help="result name (default: latency_<fused model>)")
    parser.add_argument("--out", default=".", help="folder for the JSON and PNG (default: the current folder)")
    parser.add_argument("--label", help="a short label for tables and plots")
    args = parser.parse_args(argv)
    paths = [Path(args.original), Path(args.fused)]
    # missing or corrupt files, external data outside the model's folder, models that cannot be compared: exit 2
    # before any work
    check_same_interface(*(model_interface(p) for p in paths))

    if args.provider == "cuda":
        try:
            import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
        except ImportError:
            pass
    import onnxruntime as ort
    available = ort.get_available_providers()
    wanted = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[args.provider]
    if wanted not in available:
        fail(f"provider {args.provider} is not available here (available: {', '.join(available)}); "
             f"for cuda install onnxruntime-gpu on a machine with an NVIDIA GPU")
    tokens, batches = parse_sizes(args.tokens, "--tokens"), parse_sizes(args.batch, "--batch")

    device = measure_device(args.provider)
    costs = [model_cost(p) for p in paths]
    rows, records = [], []
    kind = graph_kind(BoundModel(paths[0], "cpu", False).session)
    token_list = [1] if kind == "decode" else tokens
    for batch in batches:
        for t in token_list:
            feeds = None
            models = []
            for p in paths:
                if feeds is None:
                    session = BoundModel(p, "cpu", False).session
                    feeds = make_feeds(session, batch, t, args.past if kind == "decode" else 0)
                models.append(_bound(p, args.provider, args.provider == "cuda" and not args.no_cuda_graph, feeds))
            samples = time_side_by_side(models, args.warmup, args.runs)
            queued = time_side_by_side(models, 2, max(5, args.runs // 5), pipelined=True)
            med = [statistics.median(s) for s in samples]
            qmed = [statistics.median(s) for s in queued]
            floors = [c.floor_seconds(device, batch * t) for c in costs]
            record = {"batch": batch, "tokens": t, "kind": kind,
                      "original_us": med[0] * 1e6, "fused_us": med[1] * 1e6, "speedup": med[0] / med[1],
                      "queued_original_us": qmed[0] * 1e6, "queued_fused_us": qmed[1] * 1e6,
                      "queued_speedup": qmed[0] / qmed[1],
                      "cuda_graph": [m.cuda_graph for m in models],
                      "floor_original_us": floors[0] and floors[0] * 1e6, "floor_fused_us": floors[1] and floors[1] * 1e6,
                      "spread_us": [(np.percentile(s, 90) - np.percentile(s, 10)) * 1e6 for s in samples]}
            records.append(record)
            rows.append((batch, t, round(record["original_us"], 1), round(record["fused_us"], 1),
                         f"{record['speedup']:.2f}x", round(qmed[0] * 1e6, 1), round(qmed[1] * 1e6, 1),
                         f"{record['queued_speedup']:.2f}x",
                         "-" if floors[1] is None else round(floors[1] * 1e6, 1),
                         "-" if floors[1] is None else f"{floors[1] / qmed[1] * 100:.0f}%"))
            del models
    label = args.label or Path(args.fused).stem
    print(f"{label}: {kind} graph, provider {args.provider}, {device.name}")
    print(table(rows, header=("batch", "tokens", "original us", "fused us", "speedup", "queued orig", "queued fused",
                              "queued speedup", "fused floor us", "floor/queued")))
    print("  (us: median per run; 'queued': runs issued back to back, synchronizing once per 10, i.e. device-bound time)")
    result = {"label": label, "kind": kind, "provider": args.provider, "device": asdict(device),
              "models": {"original": str(paths[0]), "fused": str(paths[1])},
              "weight_bytes": {"original": costs[0].weight_bytes, "fused": costs[1].weight_bytes},
              "runs": args.runs, "warmup": args.warmup, "past": args.past if kind == "decode" else None,
              "results": records}
    from bench.results import write_result
    name = args.name or f"latency_{label}"
    print(f"result: {write_result(name, result, args.out)}; plot: {plot_latency(result, Path(args.out) / f'{name}.png')}")
    return 0


def plot_latency(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = result["results"]
    x_key = "batch" if result["kind"] == "decode" else "tokens"
    xs = [r[x_key] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["original_us"] for r in recs], "o-", label="original")
    ax.plot(xs, [r["fused_us"] for r in recs], "s-", label="fused")
    if recs[0]["floor_fused_us"]:
        ax.plot(xs, [r["floor_fused_us"] for r in recs], "k--", label="roofline floor (fused)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("latency (us, median)")
    ax.set_title(f"{result['label']} ({result['provider']}, {result['device']['name']})", fontsize=9)
    for r, x in zip(recs, xs):
        ax.annotate(f"{r['speedup']:.2f}x", (x, r["fused_us"]), textcoords="offset points", xytext=(0, -12), fontsize=7)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    run_cli(main)
