"""--provider on the commands that run a model (analyze, fuse --plan auto / --inputs, drop_attention --rank,
bench.compare): cpu gives the numbers of the library's default, auto resolves to what this onnxruntime has, and
cuda where onnxruntime has no CUDA execution provider is refused before any work, one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from passes.analyze import main as analyze_main
from passes.measure.metrics import compute_metrics
from passes.support.onnx_io import resolve_provider
from tests.residual_models import TinyLM, export_lm
from tests.test_foreign_forms import quiet

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("provider")
    path = export_lm(TinyLM(layout="AFFFAFFF"), folder / "lm.onnx")
    np.savez(folder / "ids.npz", input_ids=np.random.default_rng(0).integers(0, 64, (2, 16)))
    return path, folder / "ids.npz"


def test_auto_is_what_onnxruntime_has():
    assert resolve_provider("auto") == resolve_provider(None) == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_provider("cpu") == "cpu"


def test_cpu_provider_gives_the_librarys_numbers(lm, tmp_path):
    path, ids = lm
    report = tmp_path / "r.json"
    assert quiet(analyze_main, [path, "--inputs", ids, "-o", report, "--provider", "cpu"]) == 0
    record = json.loads(report.read_text())
    assert record["cost"]["provider"] == "cpu"
    metrics = compute_metrics(path, dict(np.load(ids)), progress=False)
    np.testing.assert_array_equal(np.array(record["dependency"]["matrix"], dtype=float),
                                  np.array([[np.nan if v is None else v for v in row] for row in metrics.dependency], dtype=float))


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has a CUDA execution provider")
@pytest.mark.parametrize("argv", [
    ["passes.analyze", "{model}", "-o", "{tmp}/r.json", "--provider", "cuda"],
    ["passes.fuse", "{model}", "-o", "{tmp}/f.onnx", "--plan", "auto", "--provider", "cuda"],
    ["passes.drop_attention", "{model}", "--rank", "--provider", "cuda"],
    ["bench.compare", "{model}", "{model}", "--provider", "cuda"],
])
def test_cuda_without_a_gpu_is_refused_before_any_work(lm, tmp_path, argv):
    path, _ = lm
    args = [a.format(model=path, tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no CUDA execution provider" in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or os.cpu_count() < 2, reason="Linux, 2+ CPUs")
def test_onnxruntime_threads_follow_a_taskset_confinement():
    """Confined to one CPU (as by `taskset -c 0`), sessions run one thread; unconfined, onnxruntime's default."""
    code = ("import os; from passes.support.onnx_io import confined_cpus as c; free = c(); "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(free, c())")
    free, confined = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout.split()
    unconfined = len(os.sched_getaffinity(0)) == os.cpu_count()
    assert (free == "None") == unconfined and confined == "1"


def test_every_run_goes_through_one_runner_thread(lm, monkeypatch):
    """Runs, with feeds or an IOBinding, return what session.run returns, on one long-lived thread (not one per
    run), and an error in a run reaches the caller; a session whose last run took under QUICK_SECONDS runs on the
    calling thread instead (the same results), one whose last run took longer on the runner thread again."""
    import threading

    from passes.support import onnx_io
    from passes.support.onnx_io import ort_session, run_session
    path, ids = lm
    session = ort_session(path)
    feeds = {"input_ids": np.load(ids)["input_ids"]}
    names = [o.name for o in session.get_outputs()]
    ran_on = []
    real_run = session.run
    session.run = lambda *args: ran_on.append(threading.current_thread().name) or real_run(*args)
    monkeypatch.setattr(onnx_io, "QUICK_SECONDS", 0.0)           # every run counts as long
    first = run_session(session, names, feeds)
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", feeds["input_ids"])
    for name in names:
        binding.bind_output(name)
    run_session(session, None, None, binding=binding)
    again = [v.numpy() for v in binding.get_outputs()]
    threads = {t.ident for t in threading.enumerate() if t.name.startswith("onnxruntime-run")}
    with pytest.raises(Exception, match="Unexpected input data type"):
        run_session(session, names, {"input_ids": feeds["input_ids"].astype(np.float32)})
    assert len(threads) == 1 and threads == {t.ident for t in threading.enumerate() if t.name.startswith("onnxruntime-run")}
    monkeypatch.setattr(onnx_io, "QUICK_SECONDS", 60.0)          # every run counts as quick: the calling thread
    quick = run_session(session, names, feeds)
    monkeypatch.setattr(onnx_io, "QUICK_SECONDS", 0.0)
    run_session(session, names, feeds)
    assert [name.split("_")[0] for name in ran_on] == ["onnxruntime-run", "onnxruntime-run", threading.current_thread().name,
                                                       "onnxruntime-run"]
    for a, b, c, d in zip(first, again, quick, real_run(names, feeds)):
        np.testing.assert_array_equal(a, d)
        np.testing.assert_array_equal(b, d)
        np.testing.assert_array_equal(c, d)


@pytest.mark.skipif(HAS_CUDA, reason="an onnxruntime without the CUDA provider")
def test_shared_arena_is_declined_where_onnxruntime_cannot_make_one():
    """share_cuda_arena answers False instead of raising; sessions asking for the shared arena then run on their
    own (every CPU analysis in tests/test_stream_analysis.py does)."""
    from passes.support.onnx_io import share_cuda_arena
    assert share_cuda_arena() is False
