"""passes.drop_attention: removing attention sublayers from exported language models.

Reference: the torch model with the same layers' attention switched off (layer.has_attention = False),
evaluated in torch, independently of the ONNX pass.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.export import export_onnx
from models.presets import build_preset
from passes.attention.stream import find_stream
from passes.drop_attention import main as drop_main
from passes.support.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, config = build_preset("puzzle-tiny")
    path = export_onnx(model, tmp_path_factory.mktemp("drop") / "tiny.onnx", "fp32")
    return model.eval(), config, Path(path)


def _ids(vocab: int, batch: int = 2, seq: int = 12) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, (batch, seq)).astype(np.int64)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_finds_attention_layers_by_name(tiny):
    _, config, path = tiny
    blocks = find_stream(onnx.load(str(path))).attention
    assert [b.layer for b in blocks] == [i for i, spec in enumerate(config.layers) if spec.attention]


@pytest.mark.parametrize("layers", [[1], [0, 1], [7, 8]])
def test_dropped_model_matches_torch_without_those_attentions(tiny, tmp_path, layers):
    model, config, path = tiny
    out = tmp_path / "dropped.onnx"
    spec = ",".join(map(str, layers))
    assert drop_main([str(path), "-o", str(out), "--layers", spec]) == 0
    ids = _ids(config.vocab_size)
    got = ort.InferenceSession(str(out)).run(None, {"input_ids": ids})[0]
    saved = [model.layers[i].has_attention for i in layers]
    try:
        for i in layers:
            model.layers[i].has_attention = False
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).double().numpy()
    finally:
        for i, flag in zip(layers, saved):
            model.layers[i].has_attention = flag
    with torch.no_grad():
        full = model(torch.from_numpy(ids)).double().numpy()
    assert _rel(got, want) < 1e-5
    assert _rel(got, full) > 1e-3          # the change is real


def test_other_layers_untouched(tiny, tmp_path):
    _, _, path = tiny
    out = tmp_path / "dropped.onnx"
    assert drop_main([str(path), "-o", str(out), "--layers", "1"]) == 0
    before, after = onnx.load(str(path)), onnx.load(str(out))
    kept = {n.name: n for n in after.graph.node}
    for node in before.graph.node:
        if "/layers.1/attn" in node.name or node.name in ("/layers.1/Add",):
            assert node.name not in kept, node.name
        elif node.name.startswith("/layers.") and not node.name.startswith("/layers.1/"):
            assert node.name in kept, f"{node.name} of another layer was removed"
            assert kept[node.name].op_type == node.op_type
    assert [b.layer for b in find_stream(after).attention] == [0, 7, 8]


def test_dropping_creates_an_ffn_chain_that_fuses(tiny, tmp_path):
    from passes.pipeline import fuse_file
    _, _, path = tiny
    out = tmp_path / "dropped.onnx"
    assert drop_main([str(path), "-o", str(out), "--layers", "1"]) == 0
    report = fuse_file(out, tmp_path / "fused.onnx").report
    assert report["chains"][0] == [0, 1, 2, 3, 4, 5, 6]   # layer 0's FFN now runs straight into layers 1-6


def test_rank_matches_torch_for_each_layer(tiny, tmp_path):
    """Each layer's KL and top-1 agreement when its attention alone is removed, against the torch model with that
    layer's attention switched off (KL of next-token distributions computed here in float64)."""
    model, config, path = tiny
    ids = _ids(config.vocab_size, 2, 32)
    inputs = tmp_path / "calib.npz"
    np.savez(inputs, input_ids=ids)
    report = tmp_path / "rank.json"
    assert drop_main([str(path), "--rank", "--inputs", str(inputs), "--report", str(report), "--plot", str(tmp_path / "r.png")]) == 0
    import json
    ranking = {r["layer"]: r for r in json.loads(report.read_text())["ranking"]}
    assert sorted(ranking) == [i for i, spec in enumerate(config.layers) if spec.attention]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.from_numpy(ids)).double(), -1)
    for layer, record in ranking.items():
        model.layers[layer].has_attention = False
        try:
            with torch.no_grad():
                without = torch.log_softmax(model(torch.from_numpy(ids)).double(), -1)
        finally:
            model.layers[layer].has_attention = True
        kl = float((full.exp() * (full - without)).sum(-1).mean())
        top1 = float((full.argmax(-1) == without.argmax(-1)).double().mean())
        assert record["kl_removed_alone"] == pytest.approx(kl, rel=1e-4, abs=1e-9), layer
        assert record["top1_removed_alone"] == pytest.approx(top1, abs=1e-9), layer
    cost = json.loads(report.read_text())["cost"]
    assert 1.0 < cost["forward_pass_equivalents"] < 1 + len(ranking)      # suffixes only, not a full pass per layer
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_graph_loses_that_layers_cache(tmp_path):
    from bench.synthetic import PRESETS, write
    path = write(PRESETS["tiny"], tmp_path / "decode.onnx", mode="decode")
    out = tmp_path / "dropped.onnx"
    assert drop_main([str(path), "-o", str(out), "--layers", "5"]) == 0
    model = onnx.load(str(out))
    assert "past_key_5" not in {i.name for i in model.graph.input}
    assert "present_value_5" not in {o.name for o in model.graph.output}
    assert "past_key_0" in {i.name for i in model.graph.input}


@pytest.mark.parametrize("args, message", [
    (["--layers", "3"], "layer 3 has no attention"),
    (["--layers", "40"], "layer 40 has no attention"),
    (["--layers", "1-x"], "malformed range '1-x' in --layers"),
    ([], "give -o OUT.onnx --layers SPEC"),
])
def test_bad_input_exits_2(tiny, tmp_path, args, message):
    _, _, path = tiny
    out = tmp_path / "never.onnx"
    cmd = [sys.executable, "-m", "passes.drop_attention", str(path), *(["-o", str(out)] if args else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_model_without_attention_is_refused(tmp_path):
    from bench.synthetic import SyntheticConfig, write
    path = write(SyntheticConfig(hidden=32, ffn_width=64, heads=2, kv_heads=1, vocab=64, layout="FFF", dtype="fp32"),
                 tmp_path / "ffn.onnx")
    with pytest.raises(UserError, match="no attention sublayers"):
        drop_main([str(path), "--rank"])


def _opset23_layer(path: Path, d: int = 16, m: int = 24):
    """x -> RMSNormalization -> q, k, v -> ONNX Attention (opset 23) -> o_proj -> SkipSimplifiedLayerNormalization
    (residual x + a, output 3) -> SwiGLU FFN -> Add. Returns the weights for a numpy reference."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
               for name, shape in (("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d)),
                                   ("wg", (d, m)), ("wu", (d, m)), ("wd", (m, d)))}
    weights["g1"], weights["g2"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32), (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    node = helper.make_node
    nodes = [node("RMSNormalization", ["x", "g1"], ["h"], axis=-1, epsilon=1e-5),
             *(node("MatMul", ["h", f"w{t}"], [t]) for t in "qkv"),
             node("Attention", ["q", "k", "v"], ["o"], is_causal=1, q_num_heads=2, kv_num_heads=2),
             node("MatMul", ["o", "wo"], ["a"]),
             node("SkipSimplifiedLayerNormalization", ["x", "a", "g2"], ["h2", "", "", "x2"], domain="com.microsoft", epsilon=1e-5),
             node("MatMul", ["h2", "wg"], ["g"]), node("MatMul", ["h2", "wu"], ["u"]), node("Sigmoid", ["g"], ["sg"]),
             node("Mul", ["g", "sg"], ["silu"]), node("Mul", ["silu", "u"], ["p"]), node("MatMul", ["p", "wd"], ["y"]),
             node("Add", ["x2", "y"], ["out"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", d])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23),
                                                                     helper.make_opsetid("com.microsoft", 1)]), str(path))
    return weights


def test_opset23_attention_and_skip_norm_residual(tmp_path):
    """ONNX's own Attention op is found, and removing it turns the skip normalization that adds it into
    RMSNormalization of x alone: out = x + FFN(n(x) g2), computed here in numpy."""
    weights = _opset23_layer(tmp_path / "layer.onnx")
    out = tmp_path / "dropped.onnx"
    assert drop_main([str(tmp_path / "layer.onnx"), "-o", str(out), "--layers", "0"]) == 0
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Attention" not in ops and "SkipSimplifiedLayerNormalization" not in ops and "RMSNormalization" in ops
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    h = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * weights["g2"]
    g = h @ weights["wg"]
    want = x64 + (g / (1 + np.exp(-g)) * (h @ weights["wu"])) @ weights["wd"]
    assert _rel(got, want) < 1e-5
