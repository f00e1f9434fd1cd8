"""bench.engine: TensorRT (or TensorRT-RTX, which builds without a GPU) engines for original and fused models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bench import engine as be
from passes.pipeline import fuse_file
from passes.support.errors import UserError
from tests.residual_models import ResidualStack, export

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trt_available():
    try:
        return be.import_tensorrt()
    except UserError as exc:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx is importable: {exc}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    out = {}
    for tag, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        export(ResidualStack("FFFFAF", seed=1), d / f"stack_{tag}.onnx", dtype=dtype)
        result = fuse_file(d / f"stack_{tag}.onnx", d / f"stack_{tag}.fused.onnx")
        out[tag] = (d / f"stack_{tag}.onnx", d / f"stack_{tag}.fused.onnx", result.report)
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def built(trt_available, models):
    """Engines for the original and fused model in fp32 and fp16 (small profiles: a build takes ~0.5 s)."""
    reports = {}
    for tag in ("fp32", "fp16"):
        original, fused, fuse_report = models[tag]
        for kind, path in (("original", original), ("fused", fused)):
            reports[tag, kind] = be.build_engine(path, path.with_suffix(".engine"), min_shape=(1, 1),
                                                 opt_shape=(1, 16), max_shape=(2, 64))
        reports[tag, "fuse"] = fuse_report
    return reports


@pytest.mark.parametrize("tag", ["fp32", "fp16"])
def test_fused_engine_has_fewer_layers(built, models, tag):
    original, fused = built[tag, "original"], built[tag, "fused"]
    fuse = built[tag, "fuse"]
    assert fuse["after"]["ffn_blocks"] < fuse["before"]["ffn_blocks"]        # the model really was fused
    # the same counting method for both, and it is stated
    assert original["layer_count"]["method"] == fused["layer_count"]["method"]
    assert fused["network_layers"] < original["network_layers"]
    if original["engine_layers"] is None:       # TensorRT-RTX without a GPU: the count is the network's
        assert original["layer_count"]["method"].startswith("network definition")
        assert fused["layer_count"]["value"] < original["layer_count"]["value"]
    # every ONNX MatMul becomes one TensorRT matrix-multiply layer: the fusion removed exactly these
    assert original["network_matmul_layers"] == fuse["before"]["matmuls"]
    assert fused["network_matmul_layers"] == fuse["after"]["matmuls"]
    if original["engine_layers"] is None:
        assert "deserialized" in original["inspector"]["reason"] or "inspector" in original["inspector"]["reason"]
    else:   # a TensorRT that can run here: the inspector counted the built engine's layers
        assert fused["engine_layers"] <= original["engine_layers"]


@pytest.mark.parametrize("tag", ["fp32", "fp16"])
def test_engine_files_profiles_and_types(built, models, tag):
    for kind, path in (("original", models[tag][0]), ("fused", models[tag][1])):
        report = built[tag, kind]
        engine = Path(report["engine"])
        assert engine.is_file() and engine.stat().st_size == report["engine_bytes"] > 0
        assert report["strongly_typed"] is True
        assert report["profiles"] == {"x": {"min": [1, 1, 32], "opt": [1, 16, 32], "max": [2, 64, 32]}}
        # strongly typed: the ONNX type decides the precision
        assert report["inputs"]["x"]["dtype"] == ("HALF" if tag == "fp16" else "FLOAT")
        assert report["build_s"] > 0 and report["network_layers"] == len(report["network_layer_list"])
    leftovers = [p.name for p in models["dir"].iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bench.engine", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_json(trt_available, models, tmp_path, capsys):
    fused = models["fp16"][1]
    assert be.main([str(fused), "-o", str(tmp_path / "f.engine"), "--min", "1x1", "--opt", "1x8", "--max", "2x32",
                    "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "network layers:" in out and "layer count:" in out
    report = json.loads((tmp_path / "f.json").read_text())
    assert "command" in report["environment"] and report["tool"] == "bench.engine"
    assert report["profiles"]["x"]["max"] == [2, 32, 32]
    assert (tmp_path / "f.engine").stat().st_size == report["engine_bytes"]
    assert "versions" in report["environment"]
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644 and (tmp_path / "f.engine").stat().st_mode & 0o777 == 0o644


def test_parse_failure_prints_parser_errors_and_exits_2(trt_available, tmp_path):
    node = helper.make_node("FooOp", ["x"], ["y"], name="my_unknown_node", domain="custom.ops")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "bad.onnx"))
    proc = run_cli(tmp_path / "bad.onnx", "-o", tmp_path / "bad.engine")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "my_unknown_node" in proc.stderr and "FooOp" in proc.stderr and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and "could not parse" in lines[-1]
    assert not (tmp_path / "bad.engine").exists()


def test_user_errors(trt_available, models, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        be.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    original = models["fp32"][0]
    with pytest.raises(UserError, match="does not exist"):
        be.build_engine(original, tmp_path / "no" / "m.engine")
    with pytest.raises(UserError, match="overwrite the input"):
        be.build_engine(original, original)
    with pytest.raises(UserError, match="min <= opt <= max"):
        be.build_engine(original, tmp_path / "m.engine", min_shape=(4, 1), opt_shape=(1, 8), max_shape=(8, 8))
    with pytest.raises(SystemExit):
        be.main([str(original), "-o", str(tmp_path / "m.engine"), "--opt", "1by8"])
