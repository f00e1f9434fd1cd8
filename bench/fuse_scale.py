"""Fuse a model of realistic size and compare with copying the same bytes.

    python -m bench.fuse_scale [--preset llama8b-puzzle] [--workdir DIR] [--keep]

Writes a synthetic 8B-shaped fp16 model (hidden 4096, FFN 14336, 32 layers, attention removed from half of
them, ~15 GB of external data), then times in separate processes: `cp` of the model and its data, and
`python -m passes.fuse` (paper rule). Reports wall time, peak RSS of each process, and sizes. Goal: peak RSS
under 4 GB and wall time within 1.5x of cp. Page caches are dropped before each timed step when allowed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import write_result
from bench.synthetic import PRESETS, write
from passes.support.report import table


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _timed(cmd: list[str]) -> dict:
    """Run cmd under a fresh wrapper process; wall seconds and the peak RSS of cmd (its own children included)."""
    dropped = _drop_caches()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"command": " ".join(cmd), "seconds": round(wall, 2), "peak_rss_gb": round(peak_kb / 2**20, 3),
            "caches_dropped": dropped, "stdout": proc.stdout[-3000:]}


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuse_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama8b-puzzle")
    parser.add_argument("--workdir", help="folder for the models (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the models afterwards")
    parser.add_argument("--name", default="fuse_scale", help="result name")
    parser.add_argument("--out", default=".", help="folder for the JSON (default: the current folder)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fuse_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    src, copy, fused = work / "model.onnx", work / "copy" / "model.onnx", work / "model.fused.onnx"
    try:
        start = time.perf_counter()
        write(PRESETS[args.preset], src, mode="prefill", verify=False)
        generate_s = time.perf_counter() - start
        copy.parent.mkdir(exist_ok=True)
        cp = _timed(["cp", str(src), str(src) + ".data", str(copy.parent)])
        shutil.rmtree(copy.parent)
        fuse = _timed([sys.executable, "-m", "passes.fuse", str(src), "-o", str(fused), "--report", str(work / "report.json")])
        report = json.loads((work / "report.json").read_text())
        result = {
            "preset": args.preset,
            "config": PRESETS[args.preset].__dict__,
            "input_bytes": _size(src),
            "output_bytes": _size(fused),
            "generate_seconds": round(generate_s, 1),
            "cp": cp,
            "fuse": fuse,
            "fuse_over_cp": round(fuse["seconds"] / cp["seconds"], 3),
            "groups": report["groups"],
            "before": report["before"],
            "after": report["after"],
        }
        rows = [("cp model + data", cp["seconds"], cp["peak_rss_gb"]),
                ("passes.fuse (paper rule)", fuse["seconds"], fuse["peak_rss_gb"])]
        print(table(rows, header=("step", "seconds", "peak RSS GB")))
        print(f"input {result['input_bytes'] / 1e9:.2f} GB, output {result['output_bytes'] / 1e9:.2f} GB, "
              f"fuse/cp = {result['fuse_over_cp']:.2f}x, groups {report['groups']}")
        print(f"result: {write_result(args.name, result, args.out)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
