"""One home for each fact (issue 20): how BATCHxSEQ text is read, the dims of a graph value, when two models are
comparable, which output holds the logits, and what passes.support.calibration exports after its split. Each is
decided in one place, and the tools that need it use that place."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bench import compare as bc
from bench import comparison, latency
from bench import engine as be
from bench.batch_seq import batch_seq_arg, parse_batch_seq
from passes.measure import change
from passes.support import calibration, graph_inputs
from passes.support.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- BATCHxSEQ

@pytest.mark.parametrize("text, expected", [("1x16", (1, 16)), ("8X1024", (8, 1024)), (" 2 x 3 ", (2, 3)),
                                            ("01x016", (1, 16))])
def test_batch_seq_good(text, expected):
    assert parse_batch_seq(text) == expected
    assert batch_seq_arg(text) == expected


@pytest.mark.parametrize("text", ["1by8", "0x16", "1x0", "1x", "x16", "1x2x3", "", "-1x16", "1.5x16", "16",
                                  "\u00b2x16", "\u0661x16", "ax16"])
def test_batch_seq_bad(text):
    with pytest.raises(UserError, match="expected BATCHxSEQ with positive integers") as info:
        parse_batch_seq(text)
    assert "\n" not in str(info.value) and f"got '{text}'" in str(info.value)
    with pytest.raises(argparse.ArgumentTypeError, match="expected BATCHxSEQ"):
        batch_seq_arg(text)


def test_batch_seq_flags_use_the_one_reader(capsys):
    """bench.compare --shape and bench.engine --min/--opt/--max: a bad value is a usage error (exit 2) with the
    reader's message, before any model is read."""
    for main, argv in ((bc.main, ["a.onnx", "b.onnx", "--shape", "1by8"]),
                       (be.main, ["a.onnx", "-o", "a.engine", "--opt", "1by8"])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "expected BATCHxSEQ with positive integers, e.g. 1x16; got '1by8'" in capsys.readouterr().err
    assert not hasattr(bc, "parse_shape") and not hasattr(be, "parse_bxs")


# ---------------------------------------------------------------- dims of a graph value

def test_value_dims():
    fixed_named_unknown = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "batch", None])
    assert graph_inputs.value_dims(fixed_named_unknown) == (4, "batch", None)
    no_shape = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    assert graph_inputs.value_dims(no_shape) is None
    scalar = helper.make_tensor_value_info("x", TensorProto.FLOAT, [])
    assert graph_inputs.value_dims(scalar) == ()


def test_dims_agree_between_calibration_and_comparison(tmp_path):
    path = save(tmp_path / "m.onnx", inputs=[("x", TensorProto.FLOAT, ["batch", None, 4])])
    spec, = calibration.input_specs(onnx.load(str(path)))
    info, = comparison.model_interface(path).inputs
    assert spec.shape == tuple(info.dims) == ("batch", None, 4)


# ---------------------------------------------------------------- comparable models

def save(path: Path, inputs=(("x", TensorProto.FLOAT, ["batch", 4]),), outputs=None) -> Path:
    """A tiny model: every output is Relu of the first input (the declared types and shapes are what the
    interface check reads)."""
    outputs = outputs or [("y", inputs[0][1], inputs[0][2])]
    nodes = [helper.make_node("Relu", [inputs[0][0]], [name]) for name, _, _ in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def check(tmp_path, a: dict, b: dict) -> None:
    comparison.check_same_interface(comparison.model_interface(save(tmp_path / "a.onnx", **a)),
                                    comparison.model_interface(save(tmp_path / "b.onnx", **b)))


X = ("x", TensorProto.FLOAT, ["batch", 4])
M = ("mask", TensorProto.INT64, ["batch", 4])
Y = ("y", TensorProto.FLOAT, ["batch", 4])


def test_comparable_models(tmp_path):
    check(tmp_path, {}, {})
    # other dim names, a fixed size against a dynamic one, unknown dims or rank, another order: all comparable
    check(tmp_path, {"inputs": [X, M]}, {"inputs": [("mask", TensorProto.INT64, [2, None]),
                                                     ("x", TensorProto.FLOAT, ["n", 4])], "outputs": [Y]})
    check(tmp_path, {"outputs": [Y, ("z", TensorProto.FLOAT, None)]},
          {"outputs": [("z", TensorProto.FLOAT, ["a", "b"]), ("y", TensorProto.FLOAT, [3, "s"])]})


@pytest.mark.parametrize("a, b, message", [
    ({}, {"inputs": [("z", TensorProto.FLOAT, ["batch", 4])]},
     r"different inputs \(only a.onnx has 'x'; only b.onnx has 'z'\)"),
    ({"inputs": [X, M]}, {}, r"different inputs \(only a.onnx has 'mask'\)"),
    ({}, {"inputs": [("x", TensorProto.FLOAT16, ["batch", 4])], "outputs": [Y]},
     "input 'x' is float32 in a.onnx but float16 in b.onnx"),
    ({}, {"inputs": [("x", TensorProto.FLOAT, ["batch", 4, 1])], "outputs": [Y]},
     "input 'x' has rank 2 in a.onnx but 3 in b.onnx"),
    ({}, {"inputs": [("x", TensorProto.FLOAT, ["batch", 8])], "outputs": [Y]},
     "input 'x' has size 4 on axis 1 in a.onnx but 8 in b.onnx"),
    ({"outputs": [Y, ("z", TensorProto.FLOAT, ["batch", 4])]}, {}, r"different outputs \(only a.onnx has 'z'\)"),
    ({}, {"outputs": [Y, ("z", TensorProto.FLOAT, ["batch", 4])]}, r"different outputs \(only b.onnx has 'z'\)"),
    ({}, {"outputs": [("y", TensorProto.DOUBLE, ["batch", 4])]}, "output 'y' is float32 in a.onnx but float64"),
])
def test_models_that_are_not_comparable(tmp_path, a, b, message):
    with pytest.raises(UserError, match=message):
        check(tmp_path, a, b)


def test_latency_uses_the_same_rule(tmp_path):
    assert latency.check_same_interface is comparison.check_same_interface
    a = save(tmp_path / "a.onnx")
    b = save(tmp_path / "b.onnx", inputs=[("x", TensorProto.FLOAT16, ["batch", 4])], outputs=[Y])
    with pytest.raises(UserError, match="input 'x' is float32 in a.onnx but float16 in b.onnx"):
        latency.main([str(a), str(b), "--provider", "cpu"])


# ---------------------------------------------------------------- the logits output

def lm_choice(outputs: list[tuple[str, int, list]], vocab: int | None = 8) -> str | None:
    infos = [comparison.TensorInfo(name, elem, dims) for name, elem, dims in outputs]
    iface = comparison.Interface(Path("m.onnx"), None, [], infos, vocab, None)
    rng = np.random.default_rng(0)
    runs = {o.name: rng.standard_normal([2 if d is None or isinstance(d, str) else d for d in o.dims]).astype(o.np_dtype)
            for o in infos}
    lm = comparison.language_model_statistics(iface, {}, runs, runs, real_text=False)
    return None if lm is None else lm["output"]


def test_logits_output_is_change_logits_output():
    assert comparison.logits_output is change.logits_output
    hidden = ("hidden", TensorProto.FLOAT, ["batch", 3, 8])
    logits = ("logits", TensorProto.FLOAT, ["batch", 3, 8])
    other = ("scores", TensorProto.FLOAT, ["batch", 3, 8])
    assert lm_choice([hidden, logits]) == "logits"                      # named 'logits' wins, wherever it stands
    assert lm_choice([hidden, other]) == "hidden"                       # else the first that looks like logits
    assert lm_choice([("logits", TensorProto.INT64, ["batch", 3, 8]), other]) == "scores"   # not logits-like
    assert lm_choice([("h", TensorProto.FLOAT, ["batch", 3, 5])]) is None   # neither named logits nor vocab-wide


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_passes_support_is_the_ground_floor():
    above = ("passes.ffn", "passes.measure", "passes.attention", "passes.pipeline", "passes.analyze", "passes.fuse",
             "passes.drop_attention", "bench", "exporters", "models")
    bad = {f"{path.relative_to(ROOT)}: {module}" for path in (ROOT / "passes" / "support").glob("*.py")
           for module in imports_of(path) if module.split(".")[0] in ("bench", "exporters", "models")
           or any(module == a or module.startswith(a + ".") for a in above)}
    assert not bad, sorted(bad)
    assert "passes.support.calibration" not in imports_of(ROOT / "passes" / "support" / "graph_inputs.py")
