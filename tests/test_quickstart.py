"""The Quick start's main job on the fast path (--model puzzle-tiny): every step runs and the story is printed.
(The default, the real SmolLM2, runs the same CLIs on a bigger model: the README's first command.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_fast_path(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.quickstart", "--model", "puzzle-tiny", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "fuse.json").read_text())
    assert report["groups"] and report["after"]["sequential_ffn_depth"] < report["before"]["sequential_ffn_depth"]
    assert f"sequential FFN depth {report['before']['sequential_ffn_depth']} -> {report['after']['sequential_ffn_depth']}" \
        in proc.stdout
    for name in ("deps.png", "compare.json", "puzzle-tiny.engine", "puzzle-tiny.fused.engine"):
        assert (tmp_path / name).stat().st_size > 0, name
