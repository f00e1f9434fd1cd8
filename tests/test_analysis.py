"""passes.measure.metrics / passes.support.calibration / passes.analyze against an independent torch computation.

The reference runs the torch ResidualStack layer by layer, recording each FFN's input x_t and contribution h_t,
and re-runs it with FFN i adding nothing for every removal; distances use 1 - a.b / (|a||b|) directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from passes.measure.metrics import compute_metrics, parse_block_spec
from passes.support.calibration import (
    calibration_for,
    check_inputs,
    load_calibration,
    load_inputs,
    random_inputs,
)
from passes.support.errors import UserError
from passes.support.graph_inputs import vocab_sizes
from passes.support.input_files import save_inputs_npz
from tests.residual_models import FFN, ResidualStack, TinyLM, export, export_lm

ROOT = Path(__file__).resolve().parents[1]
D = 32
LAYOUT = "FFAFFFAF"          # FFN ordinals 0-1 | 2-4 | 5: chains [0,1], [2,3,4], [5]
VOCAB = 50


# ---------------------------------------------------------------- the torch reference

def torch_trace(stack: ResidualStack, x: torch.Tensor, removed: int | None = None):
    """x_t and h_t of every FFN (by ordinal); FFN `removed` contributes nothing (x'_i = x_i)."""
    xs, hs, k = [], [], 0
    with torch.no_grad():
        for layer in stack.layers:
            if isinstance(layer, FFN):
                h = layer.contribution(x)
                xs.append(x.numpy().astype(np.float64))
                hs.append(h.numpy().astype(np.float64))
                x = x if k == removed else x + h
                k += 1
            else:
                x = layer(x)
    return xs, hs


def ref_cosdist(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.mean(1.0 - cos))


def torch_metrics(stack: ResidualStack, x: np.ndarray):
    xt = torch.from_numpy(x)
    xs, hs = torch_trace(stack, xt)
    n = len(xs)
    cosdist = [ref_cosdist(xs[t], xs[t] + hs[t]) for t in range(n)]
    ratio = [float(np.mean(np.linalg.norm(hs[t], axis=-1) / np.linalg.norm(xs[t], axis=-1))) for t in range(n)]
    matrix = np.zeros((n, n))
    for i in range(n):
        _, removed = torch_trace(stack, xt, removed=i)
        for j in range(i + 1, n):
            matrix[i, j] = ref_cosdist(hs[j], removed[j])
    return cosdist, ratio, matrix


def as_array(dependency) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in dependency], dtype=np.float64)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def f64(tmp_path_factory):
    """float64 stack exported to ONNX, calibration data and the torch reference metrics."""
    folder = tmp_path_factory.mktemp("f64")
    stack = ResidualStack(LAYOUT, d=D, seed=3)
    path = export(stack, folder / "stack64.onnx", dtype=torch.float64)
    x = np.random.default_rng(1).standard_normal((3, 9, D))
    npz = save_inputs_npz(folder / "calib.npz", {"x": x})
    return {"path": path, "stack": stack.double().eval(), "x": x, "npz": npz, "ref": torch_metrics(stack.double().eval(), x)}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    path = export_lm(TinyLM("FFFAFFF", seed=5, vocab=VOCAB, d=D), folder / "lm.onnx")
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(2, 12))
    return {"path": path, "folder": folder, "npz": save_inputs_npz(folder / "ids.npz", {"input_ids": ids}), "ids": ids}


# ---------------------------------------------------------------- metrics

def test_metrics_match_torch_float64(f64):
    feeds = load_inputs(f64["npz"], onnx.load(str(f64["path"])))
    metrics = compute_metrics(f64["path"], feeds, progress=False)
    cosdist, ratio, matrix = f64["ref"]
    assert metrics.ordinals == list(range(6))
    assert metrics.tokens == 3 * 9
    np.testing.assert_allclose(metrics.cosdist_io, cosdist, rtol=1e-5)
    np.testing.assert_allclose(metrics.ratio, ratio, rtol=1e-5)
    got = as_array(metrics.dependency)
    assert np.all(np.triu(matrix, 1)[np.triu_indices(6, 1)] > 1e-4)   # the reference is not trivially zero
    np.testing.assert_allclose(got, matrix, rtol=1e-5, atol=1e-12)
    # cost: one base run and one suffix run per block that has a later block
    assert metrics.cost.runs == 6
    assert 1.0 < metrics.cost.forward_pass_equivalents < 6.0
    assert all(0 < r["forward_pass_fraction"] <= 1 for r in metrics.cost.per_run)


def test_block_subset_is_frugal_and_consistent(f64):
    feeds = {"x": f64["x"]}
    full = compute_metrics(f64["path"], feeds, progress=False)
    part = compute_metrics(f64["path"], feeds, [2, 3, 4], progress=False)
    assert part.ordinals == [2, 3, 4]
    for i in (2, 3, 4):
        for j in (2, 3, 4):
            assert part.m(i, j) == pytest.approx(full.m(i, j), rel=1e-9, abs=1e-15)
    # base run stops at block 4 and the removal runs at block 4: well under the full analysis
    assert part.cost.runs == 3
    assert part.cost.forward_pass_equivalents < 0.6 * full.cost.forward_pass_equivalents
    assert part.cost.per_run[0]["forward_pass_fraction"] < 1.0


def test_scope_chains_measures_only_inside_chains(f64):
    metrics = compute_metrics(f64["path"], {"x": f64["x"]}, scope="chains", progress=False)
    _, _, matrix = f64["ref"]
    got = as_array(metrics.dependency)
    chains = [[0, 1], [2, 3, 4], [5]]
    chain_of = {o: k for k, c in enumerate(chains) for o in c}
    for i in range(6):
        for j in range(i + 1, 6):
            if chain_of[i] == chain_of[j]:
                assert got[i, j] == pytest.approx(matrix[i, j], rel=1e-5)
            else:
                assert metrics.dependency[i][j] is None
    assert metrics.cost.forward_pass_equivalents < compute_metrics(f64["path"], {"x": f64["x"]}, progress=False).cost.forward_pass_equivalents


def test_float32_with_bias_matches_torch(tmp_path):
    stack = ResidualStack("FFFAFF", d=D, seed=7, bias=True)
    path = export(stack, tmp_path / "stack32.onnx")
    x = np.random.default_rng(4).standard_normal((2, 6, D)).astype(np.float32)
    metrics = compute_metrics(path, {"x": x}, progress=False)
    cosdist, ratio, matrix = torch_metrics(stack.float().eval(), x)
    np.testing.assert_allclose(metrics.cosdist_io, cosdist, rtol=1e-3)
    np.testing.assert_allclose(metrics.ratio, ratio, rtol=1e-4)
    np.testing.assert_allclose(as_array(metrics.dependency), matrix, rtol=2e-3, atol=1e-7)


def test_language_model_cut_feeds_boundary_tensors(lm):
    """The LM graph has an embedding Gather and attention with masks computed before the blocks; metrics equal the
    torch reference on the embedded tokens."""
    model = TinyLM("FFFAFFF", seed=5, vocab=VOCAB, d=D).eval()
    metrics = compute_metrics(lm["path"], {"input_ids": lm["ids"]}, progress=False)
    with torch.no_grad():
        x = model.embed(torch.from_numpy(lm["ids"])).numpy()
    cosdist, ratio, matrix = torch_metrics(model.stack, x.astype(np.float32))
    np.testing.assert_allclose(metrics.cosdist_io, cosdist, rtol=1e-3)
    np.testing.assert_allclose(as_array(metrics.dependency), matrix, rtol=2e-3, atol=1e-7)


def test_user_file_is_not_modified(f64):
    before = Path(f64["path"]).read_bytes()
    compute_metrics(f64["path"], {"x": f64["x"]}, [0, 1], progress=False)
    assert Path(f64["path"]).read_bytes() == before


def test_external_data_model(tmp_path, f64):
    proto = onnx.load(str(f64["path"]))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    metrics = compute_metrics(tmp_path / "ext.onnx", {"x": f64["x"]}, progress=False)
    np.testing.assert_allclose(as_array(metrics.dependency), f64["ref"][2], rtol=1e-5, atol=1e-12)


def test_parse_block_spec():
    assert parse_block_spec("3-5", 10) == [3, 4, 5]
    assert parse_block_spec("1,4,6-8", 10) == [1, 4, 6, 7, 8]
    for bad in ("5-3", "x", "1-2-3", "10", "", "2,"):
        with pytest.raises(UserError):
            parse_block_spec(bad, 10)


# ---------------------------------------------------------------- calibration

def test_calibration_validation(lm, tmp_path):
    proto = onnx.load(str(lm["path"]))
    vocab = vocab_sizes(proto)
    assert vocab == {"input_ids": VOCAB}
    ok = check_inputs({"input_ids": lm["ids"].astype(np.int32)}, proto, vocab)
    assert ok["input_ids"].dtype == np.int64
    cases = {
        "input names do not match": {"ids": lm["ids"]},
        "outside the vocabulary": {"input_ids": lm["ids"] + VOCAB},
        "expects integers": {"input_ids": lm["ids"] + 0.5},
        "has rank 1": {"input_ids": lm["ids"][0]},
        "is empty": {"input_ids": lm["ids"][:, :0]},
    }
    for expected, raw in cases.items():
        with pytest.raises(UserError, match=expected):
            check_inputs(raw, proto, vocab)
    stack = onnx.load(str(export(ResidualStack("FF", d=D), tmp_path / "s.onnx")))
    with pytest.raises(UserError, match="fixes it to 32"):
        check_inputs({"x": np.zeros((1, 2, 31), np.float32)}, stack)


def test_calibration_files(lm, tmp_path):
    from polygraphy.json import save_json
    proto = onnx.load(str(lm["path"]))
    vocab = vocab_sizes(proto)
    feeds = load_inputs(lm["npz"], proto, vocab)
    np.testing.assert_array_equal(feeds["input_ids"], lm["ids"])
    js = tmp_path / "inputs.json"
    save_json([{"input_ids": lm["ids"]}, {"input_ids": lm["ids"][:1]}], str(js))
    calib = load_calibration(js, proto, vocab)
    assert calib.feeds["input_ids"].shape == (3, 12) and "concatenated" in calib.notes[0]
    save_json([{"input_ids": lm["ids"]}, {"input_ids": lm["ids"][:, :3]}], str(js))
    assert load_calibration(js, proto, vocab).feeds["input_ids"].shape == (2, 12)
    for name, content in (("empty.npz", b""), ("garbage.npz", b"\x00\x01 not an archive"), ("list.json", b"[]"),
                          ("bad.json", b"{\"input_ids\": 3}")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError):
            load_inputs(tmp_path / name, proto, vocab)
    with pytest.raises(UserError, match="no such file"):
        load_inputs(tmp_path / "missing.npz", proto, vocab)


def test_random_inputs(lm, f64):
    proto = onnx.load(str(lm["path"]))
    a = random_inputs(proto, vocab_sizes(proto), batch=2, seq=7, seed=3)
    b = random_inputs(proto, vocab_sizes(proto), batch=2, seq=7, seed=3)
    np.testing.assert_array_equal(a.feeds["input_ids"], b.feeds["input_ids"])
    assert a.feeds["input_ids"].shape == (2, 7) and a.feeds["input_ids"].max() < VOCAB
    assert "random token ids" in a.warning and "real text" in a.warning
    floats = calibration_for(onnx.load(str(f64["path"])), None, batch=2, seq=4, warn=False)
    assert floats.feeds["x"].shape == (2, 4, D) and floats.feeds["x"].dtype == np.float64


# ---------------------------------------------------------------- the CLI

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "passes.analyze", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_report_and_plots(lm, tmp_path):
    out, heat = tmp_path / "report.json", tmp_path / "heat.png"
    done = run_cli(lm["path"], "--inputs", lm["npz"], "--blocks", "0-4", "-o", out, "--plot", heat)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [b["ordinal"] for b in report["blocks"]] == list(range(6))
    assert all(b["nodes"] and b["width"] for b in report["blocks"])
    assert report["chains"] == [[0, 1, 2], [3, 4, 5]]
    assert report["dependency"]["ordinals"] == [0, 1, 2, 3, 4]
    matrix = report["dependency"]["matrix"]
    assert len(matrix) == 5 and matrix[0][1] > 0 and matrix[1][0] == 0
    assert set(report["metrics"]) == {"0", "1", "2", "3", "4"}
    assert report["metrics"]["2"]["cosdist_io"] > 0 and report["metrics"]["2"]["ratio"] > 0
    runs = [r["run"] for r in report["cost"]["per_run"]]
    # base, removals of 0-3 (M), one suffix run per candidate end (1, 2, 4: blocks 0-4 inside chains [0-2] [3-5]), probes
    assert runs == ["base", "remove 0", "remove 1", "remove 2", "remove 3", "pair 0-1", "pair 1-2", "pair 3-4", "FFN probes"]
    assert report["cost"]["forward_pass_equivalents"] > 1
    spans = [c["span"] for c in report["candidates"]["groups"]]
    assert spans == [[0, 1], [0, 2], [1, 2], [3, 4]] and report["candidates"]["unit"] == "kl"
    assert all(c["predicted_cost"] > 0 and c["max_m"] is not None for c in report["candidates"]["groups"])
    assert "candidate groups, cheapest first" in done.stdout
    assert report["inputs"]["shapes"] == {"input_ids": [2, 12]} and "warning" not in report["inputs"]
    assert "M[t][t+1]" in done.stdout and "forward-pass equivalents" in done.stdout
    for png in (heat, tmp_path / "heat_blocks.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        import matplotlib.image
        assert matplotlib.image.imread(str(png)).ndim == 3


def test_cli_random_tokens_warn(lm, tmp_path):
    out = tmp_path / "r.json"
    done = run_cli(lm["path"], "-o", out, "--batch", "1", "--seq", "8", "--blocks", "3-5")
    assert done.returncode == 0, done.stderr
    assert "random token ids" in done.stderr and "real text" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1     # the warning only: no progress bar when not a terminal
    report = json.loads(out.read_text())
    assert report["inputs"]["source"].startswith("random tokens") and "real text" in report["inputs"]["warning"]


def test_cli_bad_inputs_exit_2(lm, tmp_path):
    folder = tmp_path
    np.savez(folder / "wrong_name.npz", ids=lm["ids"])
    np.savez(folder / "oov.npz", input_ids=lm["ids"] + 1000)
    np.savez(folder / "float.npz", input_ids=lm["ids"] * 0.5 + 0.25)
    np.savez(folder / "rank.npz", input_ids=lm["ids"][None])
    (folder / "empty.npz").write_bytes(b"")
    (folder / "junk.json").write_text("not json at all")
    no_ffn = folder / "no_ffn.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(no_ffn))
    out = folder / "r.json"
    cases = [
        ((lm["path"], "--inputs", folder / "wrong_name.npz"), "input names do not match"),
        ((lm["path"], "--inputs", folder / "oov.npz"), "outside the vocabulary"),
        ((lm["path"], "--inputs", folder / "float.npz"), "expects integers"),
        ((lm["path"], "--inputs", folder / "rank.npz"), "rank"),
        ((lm["path"], "--inputs", folder / "empty.npz"), "empty"),
        ((lm["path"], "--inputs", folder / "junk.json"), "neither an .npz nor a polygraphy"),
        ((lm["path"], "--blocks", "4-9"), "out of range"),
        ((no_ffn,), "no FFN blocks"),
    ]
    for args, expected in cases:
        done = run_cli(*args, "-o", out)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert not out.exists()


def test_skip_simplified_layernorm_graph(lm, tmp_path):
    """onnxruntime-optimized form: the residual add of block t is the next block's SkipSimplifiedLayerNormalization;
    removing block t feeds that node zeros. Metrics equal those of the plain export."""
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    from passes.ffn.match import match_ffn_blocks
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(lm["path"])))
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    rename = {}
    for node in list(proto.graph.node):   # drop float->float Casts, so onnxruntime's norm fusions match
        if node.op_type == "Cast" and node.attribute[0].i == types.get(node.input[0]) == onnx.TensorProto.FLOAT:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            proto.graph.node.remove(node)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    model = OnnxModel(proto)
    FusionSimplifiedLayerNormalization(model).apply()
    model.prune_graph()
    FusionSkipSimplifiedLayerNormalization(model).apply()
    model.prune_graph()
    model.topological_sort()
    path = tmp_path / "skip.onnx"
    onnx.save(model.model, str(path))
    kinds = {model.model.graph.node[b.residual_node].op_type for b in match_ffn_blocks(model.model).blocks}
    assert "SkipSimplifiedLayerNormalization" in kinds
    feeds = {"input_ids": lm["ids"]}
    plain = compute_metrics(lm["path"], feeds, progress=False)
    fused = compute_metrics(path, feeds, progress=False)
    np.testing.assert_allclose(as_array(fused.dependency), as_array(plain.dependency), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(fused.cosdist_io, plain.cosdist_io, rtol=1e-4)


def test_passes_do_not_import_torch():
    code = ("import sys, passes.analyze, passes.measure.metrics, passes.support.calibration, passes.pipeline, passes.measure.plots; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0


def test_load_inputs_with_session_inputs_and_model(lm, tmp_path):
    import onnxruntime as ort
    session = ort.InferenceSession(str(lm["path"]), providers=["CPUExecutionProvider"])
    feeds = load_inputs(lm["npz"], session.get_inputs(), {"input_ids": VOCAB})
    assert feeds["input_ids"].shape == (2, 12)
    bad = save_inputs_npz(tmp_path / "oov.npz", {"input_ids": lm["ids"] + VOCAB})
    with pytest.raises(UserError, match="outside the vocabulary"):
        load_inputs(bad, onnx.load(str(lm["path"])))           # vocabulary found in the model
