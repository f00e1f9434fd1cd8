"""python -m bench.engine MODEL.onnx -o MODEL.engine [--min 1x1] [--opt 1x128] [--max 8x1024]
                        [--workspace MIB] [--json OUT.json] [-v]

Build a TensorRT engine from an ONNX model with the TensorRT Python API: `import tensorrt` when it is installed
(an H100/A100 machine with NVIDIA's TensorRT), else TensorRT-RTX (`tensorrt_rtx_bindings`, same API; builds
ahead of time without a GPU, but its engines do not run on data-center GPUs such as Hopper).

- The network is created STRONGLY TYPED: the ONNX tensor types decide every precision (an fp16/bf16 export gives
  an fp16/bf16 engine); no FP16/BF16 builder flags are set.
- The ONNX file is parsed with `OnnxParser.parse_from_file`, which reads external data next to the model.
  A parse failure prints the parser's errors (node index, name, operator, message) and exits 2.
- Every dynamic input gets an optimization profile from --min/--opt/--max BATCHxSEQ: its batch dimension the batch,
  its sequence dimensions (new tokens, a KV cache's past, a mask's total length) the sequence, by the one rule
  every tool uses (passes.support.graph_inputs.dimension_role).
- Parsing and building run in a child process that Ctrl-C / SIGTERM stop at once (exit 130, nothing written);
  the serialized engine is written under a temporary name beside the output and renamed when the build is done.

Reported: parse and build time, engine size, and layer counts. `network_layers` is the number of layers of the
TensorRT network definition after parsing (before the builder's own fusions); it is available everywhere.
`engine_layers` comes from the engine inspector (`ICudaEngine.create_engine_inspector()`), which needs the
engine deserialized by a Runtime, i.e. a GPU this TensorRT can run on; where that fails (TensorRT-RTX on a
machine without a supported GPU) it is null and the reason is given.

Exit codes: 0 built, 2 bad input or usage (missing file, parse failure, build failure, no TensorRT installed).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.batch_seq import batch_seq_arg
from passes.support.errors import UserError, fail, run_cli
from passes.support.graph_inputs import InputSpec, dimension_role, input_specs
from passes.support.onnx_io import check_not_input, load_model
from passes.support.outputs import Staging, check_output

DEFAULT_MIN, DEFAULT_OPT, DEFAULT_MAX = (1, 1), (1, 128), (8, 1024)


# ------------------------------------------------------------------------------------------------ TensorRT

@dataclass
class TensorRT:
    module: object
    flavor: str          # "TensorRT" or "TensorRT-RTX"
    module_name: str

    @property
    def version(self) -> str:
        return getattr(self.module, "__version__", "?")


def import_tensorrt(prefer: str = "auto") -> TensorRT:
    """TensorRT when importable (prefer='auto' or 'tensorrt'), else TensorRT-RTX; UserError when neither is."""
    errors = []
    if prefer in ("auto", "tensorrt"):
        try:
            import tensorrt as trt  # NVIDIA's TensorRT (pip install tensorrt from pypi.nvidia.com)
            if hasattr(trt, "Builder"):
                return TensorRT(trt, "TensorRT", "tensorrt")
            errors.append("tensorrt: installed but has no Builder (an incomplete stub install?)")
        except ImportError as exc:
            errors.append(f"tensorrt: {exc}")
    if prefer in ("auto", "rtx"):
        try:
            import tensorrt_rtx_bindings as trt
            import tensorrt_rtx_libs  # noqa: F401  (loads the shared libraries the bindings need)
            return TensorRT(trt, "TensorRT-RTX", "tensorrt_rtx_bindings")
        except ImportError as exc:
            errors.append(f"tensorrt_rtx: {exc}")
    fail("no TensorRT found (" + "; ".join(errors) + "); install tensorrt (pip install tensorrt --extra-index-url "
         "https://pypi.nvidia.com) or tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


def _make_logger(trt, verbose: bool):
    """A TensorRT logger that keeps every message (for one-line errors) and prints errors (all with -v)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []
            self.mute = False

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            if self.mute:
                return
            if verbose or severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                print(f"  tensorrt [{str(severity).rsplit('.', 1)[-1].lower()}]: {msg}", file=sys.stderr)

        def errors_since(self, start: int) -> list[str]:
            return [m for s, m in self.messages[start:]
                    if s in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)]

    return Logger()


# ------------------------------------------------------------------------------------------------ shapes

def profile_shapes(spec: InputSpec, mins, opts, maxs) -> dict[str, list[int]]:
    """min/opt/max shapes for one dynamic network input (BATCHxSEQ each), by passes.support.graph_inputs' rule
    for dimensions: the batch from the flags' batch, the sequence (new tokens, a KV cache's past, a mask's total)
    from their sequence, fixed dims kept."""
    out = {"min": [], "opt": [], "max": []}
    for axis, d in enumerate(spec.shape or ()):
        role = dimension_role(spec, axis)
        for key, source in (("min", mins), ("opt", opts), ("max", maxs)):
            if role == "fixed":
                out[key].append(int(d))
            elif role == "batch":
                out[key].append(int(source[0]))
            elif role in ("seq", "past", "total"):
                out[key].append(int(source[1]))
            else:
                fail(f"input '{spec.name}' has dynamic dimension {axis} ('{d or '?'}') that is neither batch nor "
                     f"sequence; export the model with it fixed")
    return out


# ------------------------------------------------------------------------------------------------ building

def build_engine(model_path: str | Path, engine_path: str | Path, *, min_shape=DEFAULT_MIN, opt_shape=DEFAULT_OPT,
                 max_shape=DEFAULT_MAX, workspace_mib: int | None = None, inspect: bool = True,
                 prefer: str = "auto", verbose: bool = False) -> dict:
    """Parse, build and write an engine; returns the report (see the module docstring).

    The model and the output are checked here; parsing and building run in a child process (TensorRT's logger
    callback swallows KeyboardInterrupt, so a build in this process would not stop on Ctrl-C), which writes the
    engine under a temporary name; SIGINT / SIGTERM stop the child at once, and the engine appears only when the
    build succeeded."""
    model_path, engine_path = Path(model_path), Path(engine_path)
    if not (min_shape[0] <= opt_shape[0] <= max_shape[0] and min_shape[1] <= opt_shape[1] <= max_shape[1]):
        fail(f"profile must satisfy min <= opt <= max per dimension; got min {min_shape[0]}x{min_shape[1]}, "
             f"opt {opt_shape[0]}x{opt_shape[1]}, max {max_shape[0]}x{max_shape[1]}")
    check_output(engine_path, "output", model_path)
    model = load_model(model_path)   # checks the file and its external data without reading the weights
    check_not_input(engine_path, {model.path} | model.external_files)
    specs = {spec.name: spec for spec in input_specs(model.proto)}
    del model
    with Staging() as staging:
        report = run_in_child(_build, model_path, staging.path(engine_path), engine_path, specs,
                              min_shape, opt_shape, max_shape, workspace_mib, inspect, prefer, verbose)
        staging.publish()
    return report


def run_in_child(function, *args):
    """function(*args) in a spawned child process that ignores SIGINT; returns its result, re-raises its
    UserError as a UserError here; an interrupt here terminates the child and propagates."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, args), daemon=True)
    child.start()
    send.close()
    try:
        while not receive.poll(0.1):
            if not child.is_alive() and not receive.poll():
                raise RuntimeError(f"the build process died (exit code {child.exitcode})")
        kind, value = receive.recv()
    except BaseException:
        child.terminate()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
        raise
    child.join()
    if kind == "user":
        fail(value)
    if kind == "bug":
        raise RuntimeError(f"the build process failed:\n{value}")
    return value


def _child(send, function, args) -> None:
    import signal
    import traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent decides; it terminates this process
    try:
        send.send(("ok", function(*args)))
    except UserError as exc:
        send.send(("user", str(exc)))
    except BaseException:
        send.send(("bug", traceback.format_exc()))


def _build(model_path: Path, temporary: Path, engine_path: Path, specs: dict, min_shape, opt_shape, max_shape,
           workspace_mib, inspect: bool, prefer: str, verbose: bool) -> dict:
    """Parse and build in this (child) process; the engine goes to `temporary`; returns the report."""
    start = time.perf_counter()
    rt = import_tensorrt(prefer)
    trt = rt.module
    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)

    t0 = time.perf_counter()
    logger.mute = not verbose    # parse errors are printed below from the parser's own error records
    try:
        ok = parser.parse_from_file(str(model_path))
    finally:
        logger.mute = False
    parse_s = time.perf_counter() - t0
    if not ok:
        print(f"TensorRT's ONNX parser ({rt.flavor} {rt.version}) rejected {model_path}:", file=sys.stderr)
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            print(f"  node {err.node()} '{_call(err, 'node_name')}' ({_call(err, 'node_operator')}): "
                  f"{err.desc()} [{err.code()}]", file=sys.stderr)
        first = parser.get_error(0) if parser.num_errors else None
        where = (f"; first at node {first.node()} '{_call(first, 'node_name')}' ({_call(first, 'node_operator')})"
                 if first is not None else "")
        fail(f"{model_path}: TensorRT could not parse the model ({parser.num_errors} error(s){where})")

    types = Counter(str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers))
    layers = [{"name": network.get_layer(i).name, "type": str(network.get_layer(i).type).rsplit(".", 1)[-1]}
              for i in range(network.num_layers)]
    inputs = [network.get_input(i) for i in range(network.num_inputs)]

    config = builder.create_builder_config()
    try:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED   # per-layer detail for the inspector
    except AttributeError:
        pass
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profiles = {}
    dynamic = [t for t in inputs if any(d < 0 for d in t.shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            if tensor.is_shape_tensor:
                fail(f"input '{tensor.name}' is a shape tensor; bench.engine only sets profiles for data inputs")
            spec = specs.get(tensor.name) or InputSpec(tensor.name, 0, tuple(d if d >= 0 else None for d in tensor.shape))
            shapes = profile_shapes(spec, min_shape, opt_shape, max_shape)
            profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
            profiles[tensor.name] = shapes
        config.add_optimization_profile(profile)

    mark = len(logger.messages)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        errors = logger.errors_since(mark)
        fail(f"{model_path}: TensorRT could not build an engine"
             + (f": {errors[-1].strip().splitlines()[0]}" if errors else " (run with -v for the builder's log)"))
    data = memoryview(serialized)
    with open(temporary, "wb") as f:
        f.write(data)
    engine_bytes = data.nbytes

    inspector = {"ok": False, "reason": "not attempted (--no-inspect)"}
    engine_layers = None
    engine_layer_info = None
    if inspect:
        inspector, engine_layers, engine_layer_info = _inspect(trt, logger, serialized)
    del serialized, data

    return {
        "tool": "bench.engine",
        "model": str(model_path),
        "engine": str(engine_path),
        "tensorrt": {"flavor": rt.flavor, "module": rt.module_name, "version": rt.version},
        "strongly_typed": True,
        "inputs": {t.name: {"shape": list(t.shape), "dtype": str(t.dtype).rsplit(".", 1)[-1]} for t in inputs},
        "outputs": {network.get_output(i).name: {"dtype": str(network.get_output(i).dtype).rsplit(".", 1)[-1]}
                    for i in range(network.num_outputs)},
        "profiles": profiles,
        "workspace_mib": workspace_mib,
        "parse_s": round(parse_s, 4),
        "build_s": round(build_s, 4),
        "engine_bytes": engine_bytes,
        "network_layers": network.num_layers,
        "network_layer_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "network_matmul_layers": types.get("MATRIX_MULTIPLY", 0),
        "engine_layers": engine_layers,
        "layer_count": {"value": engine_layers if engine_layers is not None else network.num_layers,
                        "method": "engine inspector (layers of the built engine)" if engine_layers is not None
                        else "network definition (network.num_layers after ONNX parsing, before builder fusions)"},
        "inspector": inspector,
        "engine_layer_info": engine_layer_info,
        "network_layer_list": layers,
        "elapsed_s": round(time.perf_counter() - start, 4),
    }


def _call(obj, method: str):
    fn = getattr(obj, method, None)
    try:
        return fn() if fn is not None else "?"
    except Exception:
        return "?"


def _inspect(trt, logger, serialized):
    """Deserialize the engine and read its layers with the engine inspector; (status, count, info)."""
    mark = len(logger.messages)
    logger.mute = True   # a failed deserialization (no supported GPU) logs CUDA errors we report in one line
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(serialized)
    except Exception as exc:
        engine, error = None, f"{type(exc).__name__}: {exc}"
    else:
        error = None
    finally:
        logger.mute = False
    if engine is None:
        errors = logger.errors_since(mark)
        reason = error or (errors[0].strip().splitlines()[0] if errors else "deserialize_cuda_engine returned None")
        cuda = re.search(r"cudaError \d+: [^)]*", reason)
        if cuda:    # e.g. no GPU / no driver: "cudaError 35: CUDA driver version is insufficient ..."
            reason = cuda.group(0)
        return {"ok": False, "reason": f"engine could not be deserialized here, so no engine inspector: {reason}"}, None, None
    try:
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        info = json.loads(text)
    except Exception as exc:
        return {"ok": False, "reason": f"engine inspector failed: {type(exc).__name__}: {exc}"}, None, None
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    count = info.get("NbLayers") if isinstance(info, dict) and "NbLayers" in info else len(layers)
    return {"ok": True, "reason": None}, int(count), layers


# ------------------------------------------------------------------------------------------------ CLI

def format_report(r: dict) -> str:
    t = r["tensorrt"]
    lines = [f"bench.engine: {r['model']} -> {r['engine']}  ({t['flavor']} {t['version']}, strongly typed; "
             f"{r['elapsed_s']:.2f} s)"]
    for name, shapes in r["profiles"].items():
        lines.append(f"  profile {name}: min {shapes['min']}  opt {shapes['opt']}  max {shapes['max']}")
    if not r["profiles"]:
        lines.append("  profile: none (all inputs static)")
    lines.append(f"  parse {r['parse_s']:.2f} s, build {r['build_s']:.2f} s, engine {r['engine_bytes'] / 1e6:.2f} MB")
    top = ", ".join(f"{k.lower()} {v}" for k, v in list(r["network_layer_types"].items())[:6])
    lines.append(f"  network layers: {r['network_layers']} (matmul {r['network_matmul_layers']}; {top})")
    if r["engine_layers"] is not None:
        lines.append(f"  engine layers: {r['engine_layers']} (engine inspector)")
    else:
        reason = r["inspector"]["reason"]
        lines.append(f"  engine layers: not available ({reason if len(reason) <= 160 else reason[:157] + '...'})")
    lines.append(f"  layer count: {r['layer_count']['value']} by {r['layer_count']['method']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="ONNX model (external data next to it is read)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.engine", help="engine file to write")
    parser.add_argument("--min", type=batch_seq_arg, default=DEFAULT_MIN, metavar="BxS", help="profile minimum (default 1x1)")
    parser.add_argument("--opt", type=batch_seq_arg, default=DEFAULT_OPT, metavar="BxS", help="profile optimum (default 1x128)")
    parser.add_argument("--max", type=batch_seq_arg, default=DEFAULT_MAX, metavar="BxS", help="profile maximum (default 8x1024)")
    parser.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit in MiB (default: TensorRT's)")
    parser.add_argument("--tensorrt", choices=("auto", "tensorrt", "rtx"), default="auto",
                        help="which TensorRT to use (default auto: tensorrt if importable, else TensorRT-RTX)")
    parser.add_argument("--no-inspect", action="store_true", help="do not deserialize the engine for the inspector")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write the report (with per-layer info, the "
                                                                      "machine and versions) here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print TensorRT's whole log")
    args = parser.parse_args(argv)
    if args.workspace is not None and args.workspace <= 0:
        fail(f"--workspace must be positive, got {args.workspace}")
    check_output(args.output, "output", args.model)
    if args.json is not None:
        check_output(args.json, "--json", args.model, args.output, suffix=".json")
    print(f"bench.engine: building {args.output} from {args.model} (Ctrl-C stops the build) ...", flush=True)
    report = build_engine(args.model, args.output, min_shape=args.min, opt_shape=args.opt, max_shape=args.max,
                          workspace_mib=args.workspace, inspect=not args.no_inspect, prefer=args.tensorrt,
                          verbose=args.verbose)
    print(format_report(report))
    if args.json is not None:
        from bench.results import result_json
        print(f"  json: {result_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
