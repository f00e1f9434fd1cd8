"""How the commands behave for a user: interrupts stop them at once and leave nothing behind, outputs are checked
before any work, results land where the user asked (never in the installed package), files get the usual
permissions, an empty plan says why, and text becomes an inputs file. Signals are sent to real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bench.synthetic import SyntheticConfig, write

REPO = Path(__file__).resolve().parents[1]
MODE = 0o666 & ~(lambda u: (os.umask(u), u)[1])(os.umask(0))


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A 30-layer synthetic model (FFN chains of 4 between attention layers), fp32, about 250 MB: one onnxruntime
    forward pass on 8 x 256 tokens takes seconds on 2 cores, long enough to interrupt in the middle."""
    folder = tmp_path_factory.mktemp("mid")
    config = SyntheticConfig(hidden=512, ffn_width=1536, heads=8, kv_heads=4, vocab=4096, layout="AFFFF" * 6, dtype="fp32")
    path = write(config, folder / "mid.onnx")
    ids = folder / "calib.npz"
    np.savez(ids, input_ids=np.random.default_rng(0).integers(0, 4096, (8, 256)).astype(np.int64))
    return path, ids


def start(*args: str) -> subprocess.Popen:
    """The CLI as a user starts it from a terminal: SIGINT at its default even when the tests run in a background
    job (which inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt)."""
    return subprocess.Popen([sys.executable, "-u", "-m", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after(proc: subprocess.Popen, marker: str, sig: int, delay: float) -> tuple[int, str, str, float]:
    """Wait for `marker` on the process's stdout, then `delay` seconds, send `sig`; returns (exit code, stdout,
    stderr, seconds from the signal to the exit)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    else:
        raise AssertionError(f"{marker!r} never printed: {''.join(seen)} {proc.stderr.read()}")
    time.sleep(delay)
    assert proc.poll() is None, "finished before the signal: make the work longer"
    sent = time.perf_counter()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + out, err, time.perf_counter() - sent


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fuse_interrupted_while_measuring_leaves_nothing(mid_model, tmp_path):
    model, ids = mid_model
    out = tmp_path / "out"
    out.mkdir()
    proc = start("passes.fuse", model, "-o", out / "fused.onnx", "--inputs", ids, "--report", out / "fuse.json")
    code, stdout, err, seconds = interrupt_after(proc, "measuring the change", signal.SIGINT, 0.5)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert seconds < 3, f"took {seconds:.1f} s to stop"
    assert leftovers(out) == [] and leftovers(model.parent) == ["calib.npz", "mid.onnx", "mid.onnx.data"]


def test_analyze_terminated_leaves_nothing(mid_model, tmp_path):
    model, ids = mid_model
    proc = start("passes.analyze", model, "--inputs", ids, "-o", tmp_path / "deps.json", "--plot", tmp_path / "deps.png")
    code, _, err, seconds = interrupt_after(proc, "measuring", signal.SIGTERM, 1.0)
    assert code == 130 and "error: interrupted" in err and seconds < 3
    assert leftovers(tmp_path) == []


def test_engine_build_stops_on_ctrl_c(mid_model, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    model, _ = mid_model
    proc = start("bench.engine", model, "-o", tmp_path / "m.engine", "--json", tmp_path / "m.json")
    code, _, err, seconds = interrupt_after(proc, "building", signal.SIGINT, 2.5)
    assert code == 130 and "error: interrupted" in err and seconds < 3, err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["passes.fuse", "{model}", "-o", "{tmp}"], "is a folder"),
    (["passes.fuse", "{model}", "-o", "{tmp}/missing/f.onnx"], "does not exist"),
    (["passes.fuse", "{model}", "-o", "{model}"], "would overwrite the input"),
    (["passes.analyze", "{model}", "-o", "{tmp}"], "is a folder"),
    (["passes.analyze", "{model}", "-o", "{tmp}/r.json", "--plot", "{tmp}/missing/h.png"], "does not exist"),
    (["passes.drop_attention", "{model}", "-o", "{model}", "--layers", "0"], "would overwrite the input"),
    (["passes.drop_attention", "{model}", "--rank", "--report", "{tmp}"], "is a folder"),
    (["bench.engine", "{model}", "-o", "{tmp}"], "is a folder"),
    (["bench.engine", "{model}", "-o", "{tmp}/m.engine", "--json", "{tmp}/missing/m.json"], "does not exist"),
    (["bench.compare", "{model}", "{model}", "--json", "{tmp}"], "is a folder"),
    (["bench.inputs", "--text", "@pydoc", "--tokenizer", "smollm2", "-o", "{tmp}/missing/c.npz"], "does not exist"),
    (["exporters.export", "puzzle-tiny", "-o", "{tmp}/missing/m.onnx"], "/missing does not exist"),
    (["exporters.export", "puzzle-tiny", "-o", "{tmp}/missing/g", "--runtime", "genai"], "/missing does not exist"),
    (["exporters.export", "puzzle-tiny", "-o", "{tmp}/missing/n", "--runtime", "nemotron-nas"],
     "/missing does not exist"),
    (["models.heal", "puzzle-tiny", "-o", "{tmp}/missing/h", "--drop", "1", "--steps", "1"], "/missing does not exist"),
    (["models.heal", "puzzle-tiny", "-o", "{tmp}/h", "--drop", "1", "--steps", "1", "--report", "{tmp}/missing/r.json"],
     "does not exist"),
])
def test_outputs_checked_before_any_work(mid_model, tmp_path, argv, message):
    model, _ = mid_model
    args = [a.format(model=model, tmp=tmp_path) for a in argv]
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.perf_counter() - began < 20
    assert leftovers(tmp_path) == []


def test_empty_auto_plan_says_why_and_writes_no_copy(mid_model, tmp_path):
    model, ids = mid_model
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(model), "-o", str(tmp_path / "f.onnx"), "--plan",
                           "auto", "--threshold", "0", "--inputs", str(ids), "--report", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to fuse: no group has every pair with M <= threshold 0; closest: " in proc.stdout
    assert "no model written" in proc.stdout and not (tmp_path / "f.onnx").exists()
    closest = json.loads((tmp_path / "r.json").read_text())["auto_plan"]["closest"]
    assert closest and all(c["m"] > 0 for c in closest)
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == oct(MODE)


def test_results_go_where_the_user_is(tmp_path):
    """bench.latency run from a work folder writes its JSON and PNG there, not into the package."""
    write(SyntheticConfig(hidden=64, ffn_width=128, heads=4, kv_heads=2, vocab=256, layout="AFFA", dtype="fp32"),
          tmp_path / "a.onnx")
    package = {p.name for p in (REPO / "bench" / "results").iterdir()}
    proc = subprocess.run([sys.executable, "-m", "bench.latency", "a.onnx", "a.onnx", "--provider", "cpu", "--tokens",
                           "4", "--runs", "3", "--warmup", "1", "--name", "here"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "here.json").is_file() and (tmp_path / "here.png").is_file()
    assert {p.name for p in (REPO / "bench" / "results").iterdir()} == package
    assert oct((tmp_path / "here.json").stat().st_mode & 0o777) == oct(MODE)


def test_inputs_from_text(foreign, tmp_path):
    """bench.inputs: the tokenizer of an HF folder and of an onnxruntime-genai folder, windows of the text in
    order, every graph input with --model, plain JSON token lists, and too little text refused."""
    model, paths = foreign
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. " * 200)
    from tests.foreign_models import tokenizer
    expected = tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "bench.inputs", "--text", str(text), *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    hf = paths["dynamo"].parent / "hf"
    assert run("--tokenizer", hf, "-o", tmp_path / "c.npz", "--rows", "2", "--seq", "16", "--offset", "5").returncode == 0
    ids = np.load(tmp_path / "c.npz")["input_ids"]
    assert ids.shape == (2, 16) and ids.ravel().tolist() == expected[5:37]
    genai = paths["genai"]
    proc = run("--tokenizer", genai.parent, "-o", tmp_path / "g.npz", "--rows", "2", "--seq", "16", "--model", genai)
    assert proc.returncode == 0, proc.stderr
    feeds = np.load(tmp_path / "g.npz")
    graph_inputs = {i.name for i in onnx.load(str(genai), load_external_data=False).graph.input}
    assert set(feeds.files) == graph_inputs and feeds["past_key_values.0.key"].shape[2] == 0
    assert run("--tokenizer", hf, "-o", tmp_path / "c.json", "--rows", "1", "--seq", "8").returncode == 0
    assert json.loads((tmp_path / "c.json").read_text()) == [expected[:8]]
    proc = run("--tokenizer", hf, "-o", tmp_path / "x.npz", "--rows", "1000", "--seq", "1000")
    assert proc.returncode == 2 and "needs 1000000" in proc.stderr and not (tmp_path / "x.npz").exists()
