"""Benchmark results: one JSON per run, with the machine, versions and exact command, where the user asks (--out)
or in the current folder; never inside the installed package. The results committed with the project were
written with --out bench/results (or bench/results/h200)."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

PACKAGES = ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "polygraphy", "numpy", "vllm", "transformers",
            "tensorrt", "tensorrt-rtx-cu13-bindings")


def environment() -> dict:
    """Machine and package versions, to store beside every measurement."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", _module_name(), *sys.argv[1:]]),
    }
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec and spec.name else sys.argv[0]


def write_result(name: str, data: dict, directory: str | Path | None = None) -> Path:
    """Write {environment, **data} to DIRECTORY/NAME.json (default: the current folder), atomically; returns it."""
    return result_json(Path(directory or ".") / f"{name}.json", data)


def result_json(path: str | Path, data: dict) -> Path:
    """Write {environment, **data} to `path`, atomically, mode 0644 (passes.support.outputs.write_json)."""
    from passes.support.outputs import write_json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, {"environment": environment(), **data})
