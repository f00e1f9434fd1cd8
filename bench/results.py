"""Benchmark results: one JSON per run under bench/results/, with the machine, versions and exact command."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "polygraphy", "numpy",
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


def write_result(name: str, data: dict, directory: Path | None = None) -> Path:
    """Write {environment, **data} to DIRECTORY/NAME.json (default bench/results/) and return the path."""
    directory = Path(directory) if directory else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2, default=str) + "\n")
    return path
