"""ONNX export: onnxruntime logits == torch logits, dynamic shapes, external data, both exporters, determinism,
and the natural FFN form (names and op counts) that passes/ will match."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters.export import export_onnx, ort_cpu_runs_bf16
from models import PRESETS, build_preset, load_model
from models.checkpoint import save_checkpoint
from passes.support import onnx_io
from passes.support.errors import UserError
from tests.helpers import random_ids, rel_err, session

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(2, 9), (1, 17)]  # two batch/sequence sizes through one session: both axes are dynamic





def assert_matches(path: Path, model: torch.nn.Module, tol: float, shapes=SHAPES) -> None:
    """onnxruntime logits of `path` vs torch logits of `model` (fp32), for every shape in `shapes`."""
    sess = session(path)
    for shape in shapes:
        ids = random_ids(model.config.vocab_size, shape)
        (logits,) = sess.run(None, {"input_ids": ids.numpy()})
        assert logits.shape == (*shape, model.config.vocab_size)
        with torch.no_grad():
            expected = model(ids).numpy()
        assert rel_err(logits, expected) < tol, shape


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "smollm2-shape"])  # SmolLM2's size: test_smollm2_gguf_fp32
def test_preset_fp32(tmp_path, preset):
    model, _ = build_preset(preset)
    path = export_onnx(model, tmp_path / "m.onnx", "fp32")
    assert onnx.load(str(path)).ir_version == 10
    assert_matches(path, model, 1e-5)


@pytest.mark.parametrize("preset", ["puzzle-tiny", "puzzle-small"])
def test_preset_fp16_runs_in_ort_cpu(tmp_path, preset):
    model, _ = build_preset(preset)
    path = export_onnx(model, tmp_path / "m.onnx", "fp16")
    logits = session(path).run(None, {"input_ids": random_ids(model.config.vocab_size, (2, 9)).numpy()})[0]
    assert logits.dtype == np.float16
    assert_matches(path, model, 1e-2)  # fp16 graph vs fp32 torch


def test_bf16_export_is_valid(tmp_path):
    model, _ = build_preset("puzzle-tiny")
    path = export_onnx(model, tmp_path / "m.onnx", "bf16")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    gate = next(t for t in proto.graph.initializer if t.name == "layers.3.ffn.gate_proj.weight_t")
    assert gate.data_type == onnx.TensorProto.BFLOAT16
    if ort_cpu_runs_bf16():
        assert_matches(path, model, 5e-2)


def test_hf_llama_folder(tmp_path):
    model, _ = build_preset("llama-tiny")
    folder = save_checkpoint(model, tmp_path / "llama")
    path = export_onnx(load_model(str(folder)), tmp_path / "llama.onnx", "fp32")
    assert_matches(path, model, 1e-5)


def test_cli_exports_nemotron_folder_with_summary(tmp_path):
    """puzzle-small written as a nemotron-nas folder (per-layer widths, KV heads, no_ops), exported by the CLI."""
    model, _ = build_preset("puzzle-small")
    folder = save_checkpoint(model, tmp_path / "nemo")
    out = tmp_path / "out" / "nemo.onnx"
    out.parent.mkdir()          # the output's folder must exist (a missing one is refused: test_cli_behaviour)
    result = subprocess.run(
        [sys.executable, "-m", "exporters.export", str(folder), "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "attention-free layers: 9 (2-7, 11-13)" in result.stdout
    assert "onnxruntime CPU loads it" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["nemo.onnx"]  # no temporary files left
    assert_matches(out, model, 1e-5)


def test_export_onnx_refuses_a_missing_folder(tmp_path):
    model, _ = build_preset("puzzle-tiny")
    with pytest.raises(UserError, match=f"output folder {tmp_path / 'missing'} does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_smollm2_gguf_fp32(tmp_path):
    """The real SmolLM2 (tied embeddings): logits as torch's, and the 49152 x 576 table stored once (the lm_head
    reads its Transpose), so the weights are the model's parameter count, not 28 M more."""
    model = load_model("smollm2")
    path = export_onnx(model, tmp_path / "smollm2.onnx", "fp32")
    assert_matches(path, model, 1e-5, shapes=[(1, 24)])
    graph = onnx.load(str(path), load_external_data=False).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert stored == pytest.approx(model.num_parameters(), abs=10_000)
    assert [n.op_type for n in graph.node if n.name.startswith("/lm_head/")] == ["Transpose", "MatMul"]


def test_external_data(tmp_path, monkeypatch):
    model, _ = build_preset("puzzle-tiny")
    path = export_onnx(model, tmp_path / "m.onnx", "fp32", external_data="always")
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size > 10 * path.stat().st_size
    assert_matches(path, model, 1e-5)
    export_onnx(model, path, "fp32", external_data="never")
    assert not data.exists()  # the stale weights file of the first export is gone
    assert_matches(path, model, 1e-5)
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 100_000)  # "auto" switches to external data above the limit
    export_onnx(model, path, "fp32")
    assert data.is_file()
    with pytest.raises(UserError, match="external-data auto"):
        export_onnx(model, tmp_path / "never.onnx", "fp32", external_data="never")


def ffn_nodes(graph: onnx.GraphProto, layer: int) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in graph.node if n.name.startswith(f"/layers.{layer}/")}


def check_natural_ffns(proto: onnx.ModelProto, config) -> None:
    """Every FFN layer is RMSNorm -> MatMul gate, MatMul up -> Sigmoid, Mul, Mul -> MatMul down -> residual Add."""
    graph = proto.graph
    ops = Counter(n.op_type for n in graph.node)
    ffn_layers = [i for i, w in enumerate(config.ffn_widths) if w is not None]
    attention_layers = [i for i, spec in enumerate(config.layers) if spec.attention]
    assert ops["Sigmoid"] == len(ffn_layers)
    assert ops["MatMul"] == 3 * len(ffn_layers) + 6 * len(attention_layers) + 1  # + q k v o, qk^T, pv; lm_head
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    d = config.hidden_size
    for i in ffn_layers:
        nodes = ffn_nodes(graph, i)
        gate, up, down = (nodes[f"/layers.{i}/ffn/{p}_proj/MatMul"] for p in ("gate", "up", "down"))
        m = config.ffn_widths[i]
        assert shapes[gate.input[1]] == [d, m] and shapes[up.input[1]] == [d, m] and shapes[down.input[1]] == [m, d]
        assert gate.input[1] == f"layers.{i}.ffn.gate_proj.weight_t"
        assert gate.input[0] == up.input[0]  # both read h = RMSNorm(x) * g
        sigmoid = nodes[f"/layers.{i}/ffn/Sigmoid"]
        silu = nodes[f"/layers.{i}/ffn/Mul"]
        product = nodes[f"/layers.{i}/ffn/Mul_1"]
        assert list(sigmoid.input) == [gate.output[0]] and set(silu.input) == {gate.output[0], sigmoid.output[0]}
        assert set(product.input) == {silu.output[0], up.output[0]} and down.input[0] == product.output[0]
        residual = nodes[f"/layers.{i}/Add"] if not config.layers[i].attention else nodes[f"/layers.{i}/Add_1"]
        assert down.output[0] in residual.input
        gain = nodes[f"/layers.{i}/ffn_norm/Mul_1"]
        assert gain.output[0] == gate.input[0] and f"layers.{i}.ffn_norm.weight" in gain.input
        assert nodes[f"/layers.{i}/ffn_norm/ReduceMean"].op_type == "ReduceMean"
        x = (set(residual.input) - {down.output[0]}).pop()  # the residual stream input of this FFN
        assert x in nodes[f"/layers.{i}/ffn_norm/Pow"].input or x in nodes[f"/layers.{i}/ffn_norm/Cast"].input


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_has_natural_ffns_with_readable_names(tmp_path, dtype):
    model, config = build_preset("puzzle-tiny")
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", dtype)))
    check_natural_ffns(proto, config)
    casts = [n.name for n in proto.graph.node if n.op_type == "Cast" and "/ffn_norm/" in n.name]
    assert len(casts) == (2 * 11 if dtype == "fp16" else 0)  # to float32 and back, per FFN norm


def test_dynamo_exporter(tmp_path):
    model, config = build_preset("puzzle-tiny")
    first = export_onnx(model, tmp_path / "a.onnx", "fp32", exporter="dynamo")
    second = export_onnx(model, tmp_path / "b.onnx", "fp32", exporter="dynamo")
    assert first.read_bytes() == second.read_bytes()
    proto = onnx.load(str(first))
    assert proto.ir_version == 10 and proto.opset_import[0].version == 18
    check_natural_ffns(proto, config)
    assert_matches(first, model, 1e-5)


def test_torchscript_export_is_deterministic(tmp_path):
    model, _ = build_preset("puzzle-tiny")
    first = export_onnx(model, tmp_path / "a.onnx", "fp16", external_data="always")
    second = export_onnx(build_preset("puzzle-tiny")[0], tmp_path / "b.onnx", "fp16", external_data="always")
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    assert first_bytes.replace(b"a.onnx.data", b"b.onnx.data") == second_bytes
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
