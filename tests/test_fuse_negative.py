"""Negative cases of `python -m passes.fuse`: models it must leave unchanged, and inputs it must refuse.

Unchanged: exit 0, says there was nothing to fuse, writes an equivalent model. Refused: exit 2, exactly one
line `error: ...` on stderr, no traceback, no output file (nor temporary files) left, the input untouched.
Most cases run the CLI in this process through passes.support.errors.run_cli (what `python -m passes.fuse` runs);
a subset runs the real command in a subprocess for the exit-code contract.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from passes.fuse import main as fuse_main
from passes.support.errors import run_cli
from tests.helpers import rel_err
from tests.residual_models import cached_export, ort_run, parallel_reference, run_fuse_cli

D = 32


def inputs(seed=1, shape=(2, 5, D)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cli(args, capsys) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr). Any exception but SystemExit is a bug and fails the test."""
    with pytest.raises(SystemExit) as exc:
        run_cli(fuse_main, [str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def tree(folder) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path):
    """tmp/in (the inputs) and tmp/out (an empty output folder)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def copy_in(path, workspace, name="model.onnx"):
    dst = workspace / "in" / name
    shutil.copy(path, dst)
    return dst


def assert_refused(args, workspace, capsys, *, message: str, usage=False):
    before = tree(workspace / "in")
    code, out, err = cli(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    if usage:   # argparse: usage, then one error line
        assert lines[-1].startswith("python -m passes.fuse: error:"), err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[-1], lines[-1]
    assert tree(workspace / "in") == before, "the input folder changed"
    assert list((workspace / "out").iterdir()) == [], "a refused run left files in the output folder"
    return lines[-1]


def assert_unchanged(original: onnx.ModelProto, out_path, feeds):
    fused = onnx.load(out_path)
    sig = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]
    assert sig(fused) == sig(original)
    assert {t.name: t.SerializeToString() for t in fused.graph.initializer} == \
        {t.name: t.SerializeToString() for t in original.graph.initializer}
    for a, b in zip(ort_run(out_path, feeds), ort_run(original, feeds)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- nothing to fuse: exit 0, says why, writes nothing

@pytest.mark.parametrize("layout, reason, blocks", [
    ("FAFAF", "is separated from the next by attention or another sublayer; run passes.drop_attention first", 3),
    ("FFAFF", "the paper's rule fuses chains of 3 or more FFN blocks; the longest chain has 2", 4),
    ("AA", "no FFN blocks found", 0),
])
def test_nothing_to_fuse(layout, reason, blocks, workspace, capsys):
    _, path = cached_export(layout, seed=2)
    model = copy_in(path, workspace)
    out = workspace / "out" / "fused.onnx"
    report = workspace / "out" / "r.json"
    code, stdout, err = cli([model, "-o", out, "--report", report], capsys)
    assert code == 0, err
    assert f"fuse: {model}: {blocks} FFN blocks" in stdout and reason in stdout
    assert "no model written" in stdout and not out.exists()
    assert json.loads(report.read_text())["groups"] == []
    code, stdout, err = cli([model, "-o", out, "--write-unchanged"], capsys)
    assert code == 0, err
    assert_unchanged(onnx.load(path), out, {"x": inputs().numpy()})


def test_intermediate_residual_is_a_graph_output(workspace, capsys):
    """x after block 1 is also a graph output (or read by another branch): the chain must split there."""
    stack, path = cached_export("FFFFF", seed=8)
    x = inputs()
    after_1 = stack.double().layers[1](stack.layers[0](x.double())).detach()
    for variant in ("graph output", "side branch"):
        model = onnx.load(path)
        tensor = "/layers.1/Add_output_0"                      # TorchScript's name of x after block 1
        assert any(tensor in n.output for n in model.graph.node)
        if variant == "side branch":
            model.graph.node.append(helper.make_node("Identity", [tensor], ["side"], name="side_branch"))
            tensor = "side"
        model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        src = workspace / "in" / "model.onnx"
        onnx.save(model, src)
        out = workspace / "out" / "fused.onnx"
        code, stdout, err = cli([src, "-o", out, "--report", workspace / "r.json"], capsys)
        assert code == 0, err
        assert "chains: [0-1] [2-4]" in stdout
        y, extra = ort_run(out, {"x": x.numpy()})
        assert rel_err(y, parallel_reference(stack, x, [(2, 3)])) < 1e-5
        assert rel_err(extra, after_1) < 1e-5
        out.unlink()
        for spec in ("0-3", "1-2", "0-2"):
            assert_refused([src, "-o", out, "--groups", spec], workspace, capsys, message="leaves its chain")
        code, _, err = cli([src, "-o", out, "--groups", "0-1,2-4"], capsys)
        assert code == 0, err
        y, extra = ort_run(out, {"x": x.numpy()})
        assert rel_err(y, parallel_reference(stack, x, [(0, 1), (2, 4)])) < 1e-5
        assert rel_err(extra, _first_two(stack, x)) < 1e-5
        out.unlink()


def _first_two(stack, x):
    """x after blocks 0 and 1 run in parallel: x + FFN_0(x) + FFN_1(x), in float64."""
    s = stack.double()
    x = x.double()
    return (x + s.ffns[0].contribution(x) + s.ffns[1].contribution(x)).detach()


# ---------------------------------------------------------------- plans that are refused

@pytest.mark.parametrize("layout, options, message", [
    ("FFFAFFF", ["--groups", "1-4"], "leaves its chain"),                     # across attention
    ("FFFAFFF", ["--groups", "2-3"], "leaves its chain"),
    ("FFFFF", ["--groups", "0-2,2-3"], "overlap at block 2"),
    ("FFFFF", ["--groups", "0-2,1-3"], "overlap"),
    ("FFFFF", ["--groups", "3-5"], "out of range: the model has 5 FFN blocks (ordinals 0-4)"),
    ("FFFFF", ["--groups", "0-99"], "out of range"),
    ("AA", ["--groups", "0-1"], "out of range: the model has no FFN blocks"),
    ("FFFFF", ["--groups", "2-"], "malformed range '2-' in --groups"),
    ("FFFFF", ["--groups", "a-b"], "malformed range 'a-b' in --groups"),
    ("FFFFF", ["--groups", "5-3"], "reversed"),
    ("FFFFF", ["--groups", "3-3"], "at least two blocks"),
    ("FFFFF", ["--groups", ""], "malformed range '' in --groups"),
    ("FFFFF", ["--groups", "1-2-3"], "malformed"),
    ("FFFFF", ["--groups=-1-2"], "malformed"),
    ("FFFFF", ["--groups", "1-2,"], "malformed range '' in --groups"),
    ("FFFFF", ["--groups", "²-3"], "malformed"),                              # int('²') raised ValueError
    ("FFFFF", ["--groups", "0-3", "--max-group", "2"], "more than --max-group 2"),
])
def test_refused_plans(layout, options, message, workspace, capsys):
    _, path = cached_export(layout, seed=2)
    model = copy_in(path, workspace)
    assert_refused([model, "-o", workspace / "out" / "fused.onnx", *options], workspace, capsys, message=message)


@pytest.mark.parametrize("options, message", [
    (["--max-group", "1"], "--max-group"),
    (["--max-group", "x"], "--max-group"),
    (["--external-data", "sometimes"], "--external-data"),
    (["--bogus"], "unrecognized arguments"),
    (["--groups", "-1-2"], "expected one argument"),
])
def test_usage_errors(options, message, workspace, capsys):
    _, path = cached_export("FFFFF", seed=2)
    model = copy_in(path, workspace)
    assert_refused([model, "-o", workspace / "out" / "fused.onnx", *options], workspace, capsys, message=message, usage=True)


def test_different_eps_in_one_group(workspace, capsys):
    stack, path = cached_export("FFFFF", seed=9, eps_per_ffn=[1e-5, 1e-5, 1e-6, 1e-5, 1e-5])
    model = copy_in(path, workspace)
    out = workspace / "out" / "fused.onnx"
    for options in (["--groups", "1-3"], ["--groups", "0-2"], []):   # [] = the paper rule's group 0-3
        assert_refused([model, "-o", out, *options], workspace, capsys, message="mixes RMSNorm eps values")
    code, _, err = cli([model, "-o", out, "--groups", "0-1,3-4"], capsys)   # each group has one eps
    assert code == 0, err
    x = inputs()
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 1), (3, 4)])) < 1e-5


# ---------------------------------------------------------------- bad files and paths

def test_bad_paths(workspace, capsys):
    _, path = cached_export("FFFFF", seed=2)
    model = copy_in(path, workspace)
    out = workspace / "out" / "fused.onnx"
    assert_refused([model, "-o", model], workspace, capsys, message="would overwrite the input")
    assert_refused([model, "-o", workspace / "in" / "." / "model.onnx"], workspace, capsys, message="would overwrite the input")
    assert_refused([workspace / "in" / "missing.onnx", "-o", out], workspace, capsys, message="no such file")
    assert_refused([workspace / "in", "-o", out], workspace, capsys, message="not a file")
    assert_refused([model, "-o", workspace / "out" / "nope" / "fused.onnx"], workspace, capsys, message="does not exist")
    (workspace / "folder.onnx").mkdir()
    assert_refused([model, "-o", workspace / "folder.onnx"], workspace, capsys, message="is a folder")
    assert list((workspace / "folder.onnx").iterdir()) == []
    # the report must not land on top of the input (it did: the JSON overwrote the model) or in a missing folder
    assert_refused([model, "-o", out, "--report", model], workspace, capsys, message="would overwrite the input")
    assert_refused([model, "-o", out, "--report", workspace / "none" / "r.json"], workspace, capsys, message="does not exist")
    assert_refused([model, "-o", out, "--report", workspace / "out"], workspace, capsys, message="is a folder")


@pytest.mark.parametrize("content, message", [
    (b"this is not an onnx model\n", "not a readable ONNX model"),
    (b"", "not an ONNX model"),
    (bytes(range(256)) * 8, "ONNX model"),
    ("half", "not a readable ONNX model"),
    ("100 bytes", "not a readable ONNX model"),
])
def test_not_onnx_or_truncated(content, message, workspace, capsys):
    _, path = cached_export("FFFFF", seed=2)
    data = path.read_bytes()
    if content == "half":
        content = data[:len(data) // 2]
    elif content == "100 bytes":
        content = data[:100]
    bad = workspace / "in" / "bad.onnx"
    bad.write_bytes(content)
    assert_refused([bad, "-o", workspace / "out" / "fused.onnx"], workspace, capsys, message=message)


def test_truncated_after_the_graph(workspace, capsys):
    _, path = cached_export("FFFFF", seed=2)
    model = onnx.load(path)
    data = model.SerializeToString()
    del model.opset_import[:]
    cut = len(model.SerializeToString())
    assert data[:cut] == model.SerializeToString()        # a true prefix of the file: only the opsets are missing
    bad = workspace / "in" / "cut.onnx"
    bad.write_bytes(data[:cut])
    assert_refused([bad, "-o", workspace / "out" / "fused.onnx"], workspace, capsys, message="")


def _external_copy(path, workspace, location="model.onnx.data", name="model.onnx"):
    model = onnx.load(path)
    dst = workspace / "in" / name
    onnx.save_model(model, dst, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return dst, workspace / "in" / location


def test_external_data_missing_or_truncated(workspace, capsys):
    _, path = cached_export("FFFFF", seed=2)
    model, data = _external_copy(path, workspace)
    out = workspace / "out" / "fused.onnx"
    full = data.read_bytes()
    data.write_bytes(full[:len(full) // 2])
    assert_refused([model, "-o", out], workspace, capsys, message="ends past the end of the file")
    data.unlink()
    assert_refused([model, "-o", out], workspace, capsys, message="is missing")


def test_output_would_overwrite_input_data(workspace, capsys):
    """The input's weights live in other.onnx.data; -o other.onnx would write its data there."""
    _, path = cached_export("FFFFF", seed=2)
    model, data = _external_copy(path, workspace, location="other.onnx.data")
    assert_refused([model, "-o", workspace / "in" / "other.onnx"], workspace, capsys, message="would overwrite")
    assert data.is_file() and not (workspace / "in" / "other.onnx").exists()


# ---------------------------------------------------------------- the real command line

def test_exit_codes_in_a_subprocess(workspace):
    _, path = cached_export("FFFAFFF", seed=2)
    model = copy_in(path, workspace)
    (workspace / "in" / "text.onnx").write_text("not onnx\n")
    ext, data = _external_copy(path, workspace, location="weights.bin", name="external.onnx")
    data.unlink()
    before = tree(workspace / "in")
    out = workspace / "out" / "fused.onnx"
    for args, message in [
        ([workspace / "in" / "text.onnx", "-o", out], "not a readable ONNX model"),
        ([model, "-o", out, "--groups", "2-"], "malformed range"),
        ([model, "-o", out, "--groups", "1-4"], "leaves its chain"),
        ([model, "-o", workspace / "nope" / "f.onnx"], "does not exist"),
        ([ext, "-o", out], "is missing"),
    ]:
        proc = run_fuse_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
        assert list((workspace / "out").iterdir()) == []
    assert tree(workspace / "in") == before
    # and a model without FFN blocks: exit 0, says so, writes nothing (the copy only when asked)
    _, none = cached_export("AA", seed=2)
    proc = run_fuse_cli(none, "-o", out)
    assert proc.returncode == 0 and "nothing to fuse: no FFN blocks found" in proc.stdout, proc.stderr
    assert not out.exists()
    proc = run_fuse_cli(none, "-o", out, "--write-unchanged")
    assert proc.returncode == 0, proc.stderr
    assert_unchanged(onnx.load(none), out, {"x": inputs().numpy()})
