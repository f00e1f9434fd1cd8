"""bench.compare: polygraphy Comparator over original vs fused models; the polygraphy CLI equivalents of docs/verification.md."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bench import compare as bc
from bench import comparison
from passes.pipeline import fuse_file
from passes.support.calibration import random_inputs
from passes.support.errors import UserError
from passes.support.graph_inputs import vocab_sizes
from tests.residual_models import ResidualStack, TinyLM, export, export_lm

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
D = 32


def export_tiny_lm(path: Path) -> Path:
    return export_lm(TinyLM(vocab=VOCAB, d=D), path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    paths = {}
    export(ResidualStack("FFFFAF"), d / "stack.onnx")
    fuse_file(d / "stack.onnx", d / "stack.fused.onnx")
    export(ResidualStack("FFFFAF"), d / "stack16.onnx", dtype=torch.float16)
    fuse_file(d / "stack16.onnx", d / "stack16.fused.onnx")
    export_tiny_lm(d / "lm.onnx")
    fuse_file(d / "lm.onnx", d / "lm.fused.onnx")
    for name in ("stack", "stack.fused", "stack16", "stack16.fused", "lm", "lm.fused"):
        paths[name] = d / f"{name}.onnx"
    shutil.copy(d / "stack.onnx", d / "stack.copy.onnx")
    paths["stack.copy"] = d / "stack.copy.onnx"
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 12)).astype(np.int64)
    np.savez(d / "text.npz", input_ids=ids)
    paths["text"] = d / "text.npz"
    paths["dir"] = d
    return paths


def ort_run(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fused_stack_differs_reports_where_and_exit_1(models, tmp_path, capsys):
    out = tmp_path / "c.json"
    code = bc.main([str(models["stack"]), str(models["stack.fused"]), "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    assert "inputs: RANDOM" in text and "result: FAILED: y exceeds" in text
    report = json.loads(out.read_text())
    assert report["environment"]["versions"]["polygraphy"]
    row = report["outputs"]["y"]["iterations"][0]
    assert row["passed"] is False and report["exit_code"] == 1
    # polygraphy's statistics are the plain ones, recomputed here from independent onnxruntime runs
    proto = onnx.load(str(models["stack"]))
    feeds = random_inputs(proto, vocab_sizes(proto), batch=1, seq=16, seed=comparison.DEFAULT_SEED).feeds
    o = ort_run(models["stack"], feeds).astype(np.float64)
    f = ort_run(models["stack.fused"], feeds).astype(np.float64)
    diff = np.abs(f - o)
    assert row["mean_absdiff"] == pytest.approx(diff.mean(), rel=1e-5)
    assert row["max_absdiff"] == pytest.approx(diff.max(), rel=1e-5)
    assert row["median_absdiff"] == pytest.approx(np.median(diff), rel=1e-4)
    assert row["max_reldiff"] == pytest.approx((diff / np.abs(o)).max(), rel=1e-4)
    assert tuple(row["max_abs_index"]) == np.unravel_index(diff.argmax(), diff.shape)
    assert f"at {row['max_abs_index']}" in text
    assert row["mismatched_elements"] == int(((diff > 1e-3) & (diff / np.abs(o) > 1e-3)).sum())


def test_identical_model_passes_and_loose_tolerance_passes(models, capsys):
    assert bc.main([str(models["stack"]), str(models["stack.copy"])]) == 0
    assert "result: PASSED" in capsys.readouterr().out
    report = comparison.compare(models["stack"], models["stack.copy"])
    assert report["outputs"]["y"]["iterations"][0]["max_absdiff"] == 0.0
    assert bc.main([str(models["stack"]), str(models["stack.fused"]), "--atol", "100"]) == 0


def test_default_tolerance_depends_on_output_type(models):
    r16 = comparison.compare(models["stack16"], models["stack16.fused"], shape=(2, 4))
    y = r16["outputs"]["y"]
    assert y["dtype"] == "float16" and y["atol"] == y["rtol"] == 1e-2
    assert r16["inputs"]["tensors"]["x"] == {"dtype": "float16", "shape": [2, 4, 32]}
    assert comparison.compare(models["stack16"], models["stack16.fused"], shape=(2, 4), atol=0.5)["outputs"]["y"]["atol"] == 0.5
    assert comparison.default_tolerance(onnx.TensorProto.FLOAT) == 1e-3
    assert comparison.default_tolerance(onnx.TensorProto.FLOAT16) == 1e-2
    assert comparison.default_tolerance(onnx.TensorProto.BFLOAT16) == 3e-2


def test_language_model_metrics_match_independent_computation(models, tmp_path, capsys):
    out = tmp_path / "lm.json"
    code = bc.main([str(models["lm"]), str(models["lm.fused"]), "--inputs", str(models["text"]), "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1                      # fusion changes the math: element tolerances fail ...
    assert "KL(original || fused)" in text and "perplexity" in text
    lm = json.loads(out.read_text())["language_model"]
    ids = np.load(models["text"])["input_ids"]
    lo = torch.tensor(ort_run(models["lm"], {"input_ids": ids}), dtype=torch.float64)
    lf = torch.tensor(ort_run(models["lm.fused"], {"input_ids": ids}), dtype=torch.float64)
    po, pf = torch.log_softmax(lo, -1), torch.log_softmax(lf, -1)
    kl = (po.exp() * (po - pf)).sum(-1)
    assert lm["tokens"] == ids.size and lm["vocab"] == VOCAB
    assert lm["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-9, abs=1e-12)
    assert lm["kl_max"] == pytest.approx(kl.max().item(), rel=1e-9)
    assert lm["top1_agreement"] == pytest.approx((po.argmax(-1) == pf.argmax(-1)).double().mean().item())
    target = torch.tensor(ids[:, 1:])
    nll_o = -po[:, :-1].gather(-1, target[..., None]).mean().item()
    nll_f = -pf[:, :-1].gather(-1, target[..., None]).mean().item()
    assert lm["predictions"] == ids.shape[0] * (ids.shape[1] - 1)
    assert lm["perplexity_original"] == pytest.approx(np.exp(nll_o), rel=1e-9)
    assert lm["perplexity_fused"] == pytest.approx(np.exp(nll_f), rel=1e-9)
    assert lm["kl_mean"] > 0
    # ... and the language-model gates decide when the element check is switched off
    args = [str(models["lm"]), str(models["lm.fused"]), "--inputs", str(models["text"]), "--atol", "inf"]
    assert bc.main(args + ["--max-kl", str(lm["kl_mean"] * 2)]) == 0
    assert bc.main(args + ["--max-kl", str(lm["kl_mean"] / 2)]) == 1
    assert bc.main(args + ["--min-top1", "0"]) == 0
    with pytest.raises(UserError, match="--min-top1 must be in"):
        bc.main(args + ["--min-top1", "1.5"])
    capsys.readouterr()


def test_random_token_ids_stay_in_vocabulary_and_no_perplexity(models, capsys):
    iface = comparison.model_interface(models["lm"])
    assert iface.vocab == VOCAB and iface.token_input == "input_ids"
    calib, record = comparison.comparison_inputs(iface, None, (3, 40), seed=5)
    ids = calib.feeds["input_ids"]
    assert ids.shape == (3, 40) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() <= VOCAB - 1 and len(np.unique(ids)) > VOCAB // 2
    assert record["source"] == "random" and "random tokens" in record["description"]
    assert bc.main([str(models["lm"]), str(models["lm.fused"]), "--shape", "3x40", "--seed", "5"]) == 1
    text = capsys.readouterr().out
    assert "inputs: RANDOM" in text and "[3, 40]" in text
    assert "no perplexity: inputs are random token ids" in text


def test_bad_inputs_are_user_errors(models, tmp_path):
    with pytest.raises(UserError, match="different inputs"):
        comparison.compare(models["stack"], models["lm"])
    with pytest.raises(UserError, match="is float16 in stack16.onnx but float32"):
        comparison.compare(models["stack16"], models["stack.fused"])
    with pytest.raises(UserError, match="no such file"):
        comparison.compare(models["stack"], tmp_path / "missing.onnx")
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((1, 4), np.int64))
    with pytest.raises(UserError, match="input_ids"):
        comparison.compare(models["lm"], models["lm.fused"], inputs=tmp_path / "wrong.npz")
    np.savez(tmp_path / "oov.npz", input_ids=np.full((1, 4), VOCAB, np.int64))
    with pytest.raises(UserError, match="vocabulary"):
        comparison.compare(models["lm"], models["lm.fused"], inputs=tmp_path / "oov.npz")
    # the CLI: one line on stderr, exit 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "bench.compare", str(models["stack"]), str(models["lm"])],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: the models have different inputs") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_external_data_models(models, tmp_path, monkeypatch):
    ext = tmp_path / "ext"
    ext.mkdir()
    for name in ("lm", "lm.fused"):
        proto = onnx.load(str(models[name]))
        onnx.save(proto, str(ext / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.onnx.data", size_threshold=0)
    assert (ext / "lm.onnx").stat().st_size < (ext / "lm.onnx.data").stat().st_size
    monkeypatch.chdir(tmp_path)          # relative external data resolves next to the model, not the cwd
    inline = comparison.compare(models["lm"], models["lm.fused"], inputs=models["text"])
    external = comparison.compare(ext / "lm.onnx", ext / "lm.fused.onnx", inputs=models["text"])
    assert external["language_model"]["kl_mean"] == inline["language_model"]["kl_mean"]
    assert external["outputs"]["logits"]["iterations"][0]["max_absdiff"] == \
        inline["outputs"]["logits"]["iterations"][0]["max_absdiff"]


def polygraphy_cli() -> list[str]:
    beside = Path(sys.executable).parent / "polygraphy"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("polygraphy")
    if found is None:
        pytest.skip("the polygraphy command-line tool is not installed")
    return [found]


def test_polygraphy_cli_equivalents_from_the_docs(models, tmp_path, capsys):
    """The commands of docs/verification.md, run as written, on our original and fused models."""
    poly = polygraphy_cli()
    run = lambda *args: subprocess.run([*poly, "run", *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
    saved = run(models["lm"], "--onnxrt", "--input-shapes", "input_ids:[1,16]", "--val-range", f"input_ids:[0,{VOCAB - 1}]",
                "--save-inputs", "inputs.json", "--save-outputs", "original_outputs.json")
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-2000:]
    compare = [*poly, "run", str(models["lm.fused"]), "--onnxrt", "--load-inputs", "inputs.json",
               "--load-outputs", "original_outputs.json"]
    procs = {tol: subprocess.Popen(compare + ["--atol", tol, "--rtol", tol], cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for tol in ("1e-3", "1e3")}
    done = {tol: (p.communicate()[0], p.returncode) for tol, p in procs.items()}
    strict, loose = (subprocess.CompletedProcess(compare, code, out) for out, code in done.values())
    assert strict.returncode == 1, strict.stdout[-2000:]          # fused is an approximation: fails at 1e-3
    assert "FAILED | Output: 'logits'" in strict.stdout
    assert loose.returncode == 0, loose.stdout[-2000:]
    # bench.compare accepts polygraphy's inputs JSON and reports the same statistics polygraphy printed
    code = bc.main([str(models["lm"]), str(models["lm.fused"]), "--inputs", str(tmp_path / "inputs.json"),
                    "--json", str(tmp_path / "c.json")])
    assert code == 1
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["inputs"]["tensors"]["input_ids"]["shape"] == [1, 16]
    row = report["outputs"]["logits"]["iterations"][0]
    log = strict.stdout
    polygraphy_max = float(re.search(r"Absolute Difference \| Stats: mean=([-0-9.e+]+).*?max=([-0-9.e+]+)", log).group(2))
    polygraphy_mean = float(re.search(r"Absolute Difference \| Stats: mean=([-0-9.e+]+)", log).group(1))
    assert row["max_absdiff"] == pytest.approx(polygraphy_max, rel=1e-4)
    assert row["mean_absdiff"] == pytest.approx(polygraphy_mean, rel=1e-4)
    assert "perplexity" in capsys.readouterr().out
