"""Positive tests of the FFN-fusion pass (`python -m passes.fuse`, issue 3).

Every check compares onnxruntime's output of the fused model with an independent reference: the torch
model of tests/residual_models.py evaluated in float64 in the parallel form x + sum_t FFN_t(n(x) g_t)
(`parallel_reference`), never with the pass's own idea of what it did. Expected groups, widths, chains and
op counts are written down here from the layouts, not taken from the pass.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from passes.ffn.match import match_ffn_blocks
from passes.ffn.plan import Group
from passes.fuse import main as fuse_main
from passes.pipeline import fuse_file
from tests.helpers import rel_err
from tests.residual_models import REPO, cached_export, ort_run, parallel_reference, run_fuse_cli

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]

# chains 0-2 (three blocks, then attention) and 3-8 (six blocks; block 8 is the last layer, its sum is the
# graph output); every block has its own width
LAYOUT = "FFFAFFFFFF"
WIDTHS = [40, 72, 56, 24, 88, 64, 32, 48, 96]
CHAINS = [[0, 1, 2], [3, 4, 5, 6, 7, 8]]
D = 32

# (command-line options, the groups they must produce on LAYOUT)
PLANS = [
    pytest.param([], [(0, 1), (3, 7)], id="paper-rule"),
    pytest.param(["--max-group", "2"], [(0, 1), (3, 4), (5, 6)], id="max-group-2"),
    pytest.param(["--max-group", "3"], [(0, 1), (3, 5), (6, 7)], id="max-group-3"),
    pytest.param(["--groups", "0-2,3-8"], [(0, 2), (3, 8)], id="whole-chains"),
    pytest.param(["--groups", "3-4,5-6,7-8"], [(3, 4), (5, 6), (7, 8)], id="adjacent-groups"),
    pytest.param(["--groups", "4-5", "--max-group", "2"], [(4, 5)], id="one-pair"),
    pytest.param(["--merge-gate-up"], [(0, 1), (3, 7)], id="merge-paper-rule"),
    pytest.param(["--merge-gate-up", "--groups", "0-2,3-8"], [(0, 2), (3, 8)], id="merge-whole-chains"),
]


def inputs(dtype=torch.float32, shape=(3, 7, D), seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def matmul_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)


def fuse_cli_in_process(model, out, options, tmp_path) -> dict:
    """passes.fuse.main (the CLI, in this process) with --report; returns the report."""
    report = tmp_path / "report.json"
    assert fuse_main([str(model), "-o", str(out), *options, "--report", str(report)]) == 0
    return json.loads(report.read_text())


def expected_weights(stack, group: tuple[int, int]) -> dict[str, np.ndarray]:
    """Fused weights from the torch modules: gains folded into gate/up, blocks side by side, gate before up."""
    ffns = [stack.ffns[t] for t in range(group[0], group[1] + 1)]
    as64 = lambda p: p.detach().double().numpy()
    gate = np.concatenate([as64(f.norm.weight)[:, None] * as64(f.gate.weight).T for f in ffns], axis=1)
    up = np.concatenate([as64(f.norm.weight)[:, None] * as64(f.up.weight).T for f in ffns], axis=1)
    down = np.concatenate([as64(f.down.weight).T for f in ffns], axis=0)
    out = {"gate": gate, "up": up, "down": down, "gate_up": np.concatenate([gate, up], axis=1)}
    if ffns[0].gate.bias is not None:
        out["gate_bias"] = np.concatenate([as64(f.gate.bias) for f in ffns])
        out["up_bias"] = np.concatenate([as64(f.up.bias) for f in ffns])
        out["down_bias"] = sum(as64(f.down.bias) for f in ffns)
    return out


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    found = [n for n in model.graph.node if n.name == name]
    assert len(found) == 1, f"{len(found)} nodes named {name}"
    return found[0]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = [t for t in model.graph.initializer if t.name == name]
    assert len(found) == 1, f"{len(found)} initializers named {name}"
    return numpy_helper.to_array(found[0]).astype(np.float64)


def consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def dangling(model: onnx.ModelProto) -> set[str]:
    """Node outputs and initializers that nothing reads."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    outs = {o for n in model.graph.node for o in n.output if o}
    return {t for t in outs | {t.name for t in model.graph.initializer} if t not in read}


def check_structure(before: onnx.ModelProto, after: onnx.ModelProto, report: dict, groups, merge: bool,
                    widths: list[int]) -> None:
    """Op counts, names of new and untouched nodes, the report's schema, against expectations from the layout."""
    n_ffn = len(widths)
    fused_blocks = sum(z - a + 1 for a, z in groups)
    per_group = 2 if merge else 3
    assert matmul_count(after) == matmul_count(before) - 3 * fused_blocks + per_group * len(groups)
    assert report["before"]["matmuls"] == matmul_count(before)
    assert report["after"]["matmuls"] == matmul_count(after)
    assert report["before"]["nodes"] == len(before.graph.node) and report["after"]["nodes"] == len(after.graph.node)
    assert report["before"]["ffn_blocks"] == n_ffn
    rematched = match_ffn_blocks(after).blocks
    assert report["after"]["ffn_blocks"] == report["after"]["sequential_ffn_depth"] == len(rematched)
    # every fused group is again one FFN block (merged too: one packed gate|up MatMul and a Split), of the summed width
    assert len(rematched) == n_ffn - fused_blocks + len(groups)
    assert {sum(widths[a:z + 1]) for a, z in groups} <= {b.width for b in rematched}

    # the report's schema
    assert {"ffn_blocks", "chains", "groups", "before", "after", "fused", "rejections"} <= report.keys()
    for key in ("nodes", "matmuls", "ffn_blocks", "sequential_ffn_depth"):
        assert key in report["before"] and key in report["after"]
    assert [b["ordinal"] for b in report["ffn_blocks"]] == list(range(n_ffn))
    assert [b["width"] for b in report["ffn_blocks"]] == widths
    assert all(b["nodes"] and all(isinstance(n, str) for n in b["nodes"]) for b in report["ffn_blocks"])
    assert report["groups"] == [list(g) for g in groups]
    assert [f["prefix"] for f in report["fused"]] == [f"/fused_ffn_{a}_{z}" for a, z in groups]
    assert [f["width"] for f in report["fused"]] == [sum(widths[a:z + 1]) for a, z in groups]

    # names: new nodes live under their group's prefix; untouched nodes keep name, op and outputs
    names_before = {n.name: n for n in before.graph.node}
    names_after = {n.name: n for n in after.graph.node}
    assert len(names_after) == len(after.graph.node), "node names in the output are not unique"
    prefixes = [f"/fused_ffn_{a}_{z}/" for a, z in groups]
    new = [n for n in names_after if n not in names_before]
    assert new and all(any(n.startswith(p) for p in prefixes) for n in new), new
    for p in prefixes:
        ops = [names_after[n].op_type for n in new if n.startswith(p)]
        if merge:
            assert ops.count("Split") == 1 and (p + "gate_up/MatMul") in names_after and (p + "gate_up/Split") in names_after
        else:
            for name in ("gate/MatMul", "up/MatMul", "act/Sigmoid"):
                assert p + name in names_after
        assert p + "down/MatMul" in names_after
        assert ops.count("MatMul") == per_group
    blocks = report["ffn_blocks"]
    replaced = {n for a, z in groups for t in range(a, z + 1) for n in blocks[t]["nodes"]}
    inner_residuals = {blocks[t]["residual_node"] for a, z in groups for t in range(a, z)}
    last_residuals = {blocks[z]["residual_node"] for a, z in groups}
    group_inputs = {blocks[a]["residual_in"] for a, _ in groups}
    for name, node in names_before.items():
        if name in replaced or name in inner_residuals:
            # gone, unless it computes a group's input (TorchScript: the Cast of x of the first block)
            assert name not in names_after or set(node.output) & group_inputs, name
            continue
        assert name in names_after, f"untouched node {name} was removed or renamed"
        kept = names_after[name]
        assert kept.op_type == node.op_type and list(kept.output) == list(node.output)
        if name not in last_residuals:
            assert list(kept.input) == list(node.input), name
    # nothing left dangling that was not dangling before (e.g. Constant nodes of removed blocks)
    assert dangling(after) <= dangling(before)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("options, groups", PLANS)
def test_fused_model_matches_parallel_form(dynamo, options, groups, tmp_path):
    stack, path = cached_export(LAYOUT, dynamo=dynamo, widths=WIDTHS, seed=3)
    x = inputs()
    original = onnx.load(path)
    # the reference itself: the unfused export is the sequential stack
    assert rel_err(ort_run(path, {"x": x.numpy()})[0], parallel_reference(stack, x, [])) < 1e-5
    out = tmp_path / "fused.onnx"
    report = fuse_cli_in_process(path, out, options, tmp_path)
    assert report["chains"] == CHAINS
    assert [tuple(g) for g in report["groups"]] == groups
    fused = onnx.load(out)
    y = ort_run(out, {"x": x.numpy()})[0]
    ref = parallel_reference(stack, x, groups)
    assert rel_err(y, ref) < 1e-5
    # and it is not the sequential model: fusion changed the function by far more than rounding
    assert rel_err(y, parallel_reference(stack, x, [])) > 1e-3
    check_structure(original, fused, report, groups, merge="--merge-gate-up" in options, widths=WIDTHS)
    # dynamic batch and sequence survive
    x2 = inputs(shape=(1, 2, D), seed=2)
    assert rel_err(ort_run(out, {"x": x2.numpy()})[0], parallel_reference(stack, x2, groups)) < 1e-5


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("merge", [False, True], ids=["separate", "merged"])
def test_fused_weight_values(dynamo, merge, tmp_path):
    """Gains folded, blocks concatenated in ordinal order, gate before up (merged: one MatMul and a Split)."""
    stack, path = cached_export(LAYOUT, dynamo=dynamo, widths=WIDTHS, seed=3)
    out = tmp_path / "fused.onnx"
    fuse_file(path, out, groups=[Group(0, 2), Group(4, 6)], merge_gate_up=merge)
    fused = onnx.load(out)
    for a, z in [(0, 2), (4, 6)]:
        p = f"/fused_ffn_{a}_{z}"
        want = expected_weights(stack, (a, z))
        m_total = sum(WIDTHS[a:z + 1])
        down = node_named(fused, f"{p}/down/MatMul")
        assert rel_err(initializer(fused, down.input[1]), want["down"]) < 1e-6
        if merge:
            assert [n.name for n in fused.graph.node if n.name.startswith(p) and n.op_type == "MatMul"] == \
                [f"{p}/gate_up/MatMul", f"{p}/down/MatMul"]
            matmul, split = node_named(fused, f"{p}/gate_up/MatMul"), node_named(fused, f"{p}/gate_up/Split")
            packed = initializer(fused, matmul.input[1])
            assert packed.shape == (D, 2 * m_total)
            assert rel_err(packed, want["gate_up"]) < 1e-6
            assert rel_err(packed[:, :m_total], want["gate"]) < 1e-6      # gate first ...
            assert rel_err(packed[:, m_total:], want["up"]) < 1e-6        # ... then up
            assert split.input[0] == matmul.output[0] and len(split.output) == 2
            if len(split.input) > 1:
                assert initializer(fused, split.input[1]).tolist() == [m_total, m_total]
            # Split output 0 is the gate: it goes through the Sigmoid
            assert "Sigmoid" in {n.op_type for n in consumers(fused, split.output[0])}
            assert "Sigmoid" not in {n.op_type for n in consumers(fused, split.output[1])}
        else:
            gate, up = node_named(fused, f"{p}/gate/MatMul"), node_named(fused, f"{p}/up/MatMul")
            assert rel_err(initializer(fused, gate.input[1]), want["gate"]) < 1e-6
            assert rel_err(initializer(fused, up.input[1]), want["up"]) < 1e-6
            assert "Sigmoid" in {n.op_type for n in consumers(fused, gate.output[0])}
    x = inputs()
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 2), (4, 6)])) < 1e-5


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("merge", [False, True], ids=["separate", "merged"])
def test_biases(dynamo, merge, tmp_path):
    """Linear biases: gate/up biases concatenated (gate first), down biases summed."""
    stack, path = cached_export(LAYOUT, dynamo=dynamo, widths=WIDTHS, seed=4, bias=True)
    x = inputs()
    assert rel_err(ort_run(path, {"x": x.numpy()})[0], parallel_reference(stack, x, [])) < 1e-5
    out = tmp_path / "fused.onnx"
    report = fuse_cli_in_process(path, out, ["--merge-gate-up"] if merge else [], tmp_path)
    assert report["groups"] == [[0, 1], [3, 7]]
    fused = onnx.load(out)
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 1), (3, 7)])) < 1e-5
    for a, z in [(0, 1), (3, 7)]:
        p = f"/fused_ffn_{a}_{z}"
        want = expected_weights(stack, (a, z))
        down_add = node_named(fused, f"{p}/down/Add")
        assert rel_err(initializer(fused, down_add.input[1]), want["down_bias"]) < 1e-6
        if merge:
            packed = initializer(fused, node_named(fused, f"{p}/gate_up/Add").input[1])
            assert rel_err(packed, np.concatenate([want["gate_bias"], want["up_bias"]])) < 1e-6
        else:
            assert rel_err(initializer(fused, node_named(fused, f"{p}/gate/Add").input[1]), want["gate_bias"]) < 1e-6
            assert rel_err(initializer(fused, node_named(fused, f"{p}/up/Add").input[1]), want["up_bias"]) < 1e-6


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fp16(dynamo, tmp_path):
    """fp16 exports: fused weights stay fp16; reference in float64 from the fp16 weights."""
    stack, path = cached_export(LAYOUT, dynamo=dynamo, dtype=torch.float16, widths=WIDTHS, seed=5)
    x = inputs(torch.float16)
    assert rel_err(ort_run(path, {"x": x.numpy()})[0], parallel_reference(stack, x, [])) < 1e-2
    out = tmp_path / "fused.onnx"
    for options, groups in [([], [(0, 1), (3, 7)]), (["--groups", "0-2,3-8", "--merge-gate-up"], [(0, 2), (3, 8)])]:
        report = fuse_cli_in_process(path, out, options, tmp_path)
        assert [tuple(g) for g in report["groups"]] == groups
        assert {b["dtype"] for b in report["ffn_blocks"]} == {"FLOAT16"}
        y = ort_run(out, {"x": x.numpy()})[0]
        assert y.dtype == np.float16
        assert rel_err(y, parallel_reference(stack, x, groups)) < 1e-2
        fused = onnx.load(out)
        for a, z in groups:
            down = node_named(fused, f"/fused_ffn_{a}_{z}/down/MatMul")
            weight = [t for t in fused.graph.initializer if t.name == down.input[1]][0]
            assert weight.data_type == onnx.TensorProto.FLOAT16
        check_structure(onnx.load(path), fused, report, groups, merge="--merge-gate-up" in options, widths=WIDTHS)


@pytest.mark.parametrize("layout, widths, groups, options", [
    ("AFFAFFFFA", [64, 16, 24, 40, 56, 72], [(2, 4)], []),            # starts and ends with attention
    ("FFF", None, [(0, 1)], []),                                     # the smallest chain the paper rule fuses
    ("FFF", None, [(0, 2)], ["--groups", "0-2"]),                    # the whole model is one FFN
    ("FAFFFFFFFFAF", None, [(1, 3), (4, 5), (6, 7)], ["--max-group", "3"]),
])
def test_more_layouts(layout, widths, groups, options, tmp_path):
    stack, path = cached_export(layout, widths=widths, seed=6)
    _check_layout(stack, path, layout, widths, groups, options, tmp_path)


@pytest.mark.parametrize("opset", [11, 13])
def test_old_opsets(opset, tmp_path):
    """Opset 11-12: ReduceMean axes and Split sizes are attributes; 13: Split sizes an input, axes not yet."""
    stack, path = cached_export("FFFFF", seed=6, opset=opset)
    assert onnx.load(path).opset_import[0].version == opset
    _check_layout(stack, path, "FFFFF", None, [(0, 3)], ["--merge-gate-up"], tmp_path)
    _check_layout(stack, path, "FFFFF", None, [(0, 1), (2, 4)], ["--groups", "0-1,2-4"], tmp_path)


def _check_layout(stack, path, layout, widths, groups, options, tmp_path):
    x = inputs()
    out = tmp_path / "fused.onnx"
    report = fuse_cli_in_process(path, out, options, tmp_path)
    assert [tuple(g) for g in report["groups"]] == groups
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, groups)) < 1e-5
    widths = widths or [48 + 16 * (k % 4) for k in range(layout.count("F"))]
    check_structure(onnx.load(path), onnx.load(out), report, groups, merge="--merge-gate-up" in options, widths=widths)


def test_bf16_weights(tmp_path):
    """bf16: onnxruntime's CPU cannot run this export, so check the fused weights and the graph instead."""
    stack, path = cached_export("FFFAFF", dtype=torch.bfloat16, seed=10)
    out = tmp_path / "fused.onnx"
    result = fuse_file(path, out, groups=[Group(0, 2), Group(3, 4)], merge_gate_up=True)
    assert {b["dtype"] for b in result.report["ffn_blocks"]} == {"BFLOAT16"}
    fused = onnx.load(out)
    onnx.checker.check_model(fused)
    for a, z in [(0, 2), (3, 4)]:
        want = expected_weights(stack, (a, z))
        matmul = node_named(fused, f"/fused_ffn_{a}_{z}/gate_up/MatMul")
        stored = [t for t in fused.graph.initializer if t.name == matmul.input[1]][0]
        assert stored.data_type == onnx.TensorProto.BFLOAT16
        assert rel_err(initializer(fused, matmul.input[1]), want["gate_up"]) < 1e-2
        down = node_named(fused, f"/fused_ffn_{a}_{z}/down/MatMul")
        assert rel_err(initializer(fused, down.input[1]), want["down"]) == 0     # copied, not recomputed


@pytest.mark.parametrize("merge_first, merge_second", [(False, False), (True, False), (False, True), (True, True)])
def test_fusing_a_fused_model_again(merge_first, merge_second, tmp_path):
    """A fused block (merged gate|up too) is an FFN block like any other; new names never collide with old ones."""
    stack, path = cached_export(LAYOUT, widths=WIDTHS, seed=3)
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    fuse_file(path, once, groups=[Group(0, 1), Group(3, 4)], merge_gate_up=merge_first)
    # blocks of `once`: 0 = {0,1}, 1 = 2, 2 = {3,4}, 3 = 5, ...; fuse {0,1}+2 and {3,4}+5 (same ordinals 0-1, 2-3)
    result = fuse_file(once, twice, groups=[Group(0, 1), Group(2, 3)], merge_gate_up=merge_second)
    assert [b["width"] for b in result.report["ffn_blocks"]] == [112, 56, 112] + WIDTHS[5:]
    assert [f["prefix"] for f in result.report["fused"]] == ["/fused_ffn_0_1_v2", "/fused_ffn_2_3"]
    x = inputs()
    assert rel_err(ort_run(twice, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 2), (3, 5)])) < 1e-5
    names = [n.name for n in onnx.load(twice).graph.node]
    assert len(names) == len(set(names))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _to_external(src, dst):
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".weights", size_threshold=0)
    return dst.with_name(dst.name + ".weights")


def test_external_data(tmp_path):
    stack, path = cached_export(LAYOUT, widths=WIDTHS, seed=3)
    model, data = tmp_path / "in" / "model.onnx", tmp_path / "in" / "model.onnx.weights"
    model.parent.mkdir()
    _to_external(path, model)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL          # the weights really are outside
               for t in onnx.load(str(model), load_external_data=False).graph.initializer)
    hashes = (_sha(model), _sha(data))
    x = inputs()
    ref = parallel_reference(stack, x, [(0, 1), (3, 7)])

    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    fuse_file(model, out)                                   # auto: external in, external out
    assert (out.parent / "fused.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]   # no temp files left
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} == {"fused.onnx.data"}
    onnx.checker.check_model(str(out))
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], ref) < 1e-5

    inline = tmp_path / "out" / "inline.onnx"
    assert fuse_main([str(model), "-o", str(inline), "--external-data", "never"]) == 0
    assert not (tmp_path / "out" / "inline.onnx.data").exists()
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in onnx.load(str(inline), load_external_data=False).graph.initializer)
    assert rel_err(ort_run(inline, {"x": x.numpy()})[0], ref) < 1e-5

    # an inline input written with external data on request
    always = tmp_path / "out" / "always.onnx"
    assert fuse_main([str(path), "-o", str(always), "--external-data", "always"]) == 0
    assert (tmp_path / "out" / "always.onnx.data").is_file()
    assert rel_err(ort_run(always, {"x": x.numpy()})[0], ref) < 1e-5

    assert (_sha(model), _sha(data)) == hashes           # the input is never modified
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "model.onnx.weights"]


def test_deterministic(tmp_path):
    """The same input and options give byte-identical output."""
    _, path = cached_export(LAYOUT, dynamo=True, widths=WIDTHS, seed=3)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    fuse_file(path, a, merge_gate_up=True)
    fuse_file(path, b, merge_gate_up=True)
    assert a.read_bytes() == b.read_bytes()


def test_cli_subprocess(tmp_path):
    """The real command line: exit 0, says what it did in numbers, writes model and report."""
    stack, path = cached_export(LAYOUT, widths=WIDTHS, seed=3)
    out, report = tmp_path / "fused.onnx", tmp_path / "r.json"
    proc = run_fuse_cli(path, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "FFN blocks found: 9" in proc.stdout and "0-1 -> width 112" in proc.stdout and "3-7 -> width 256" in proc.stdout
    assert json.loads(report.read_text())["groups"] == [[0, 1], [3, 7]]
    x = inputs()
    assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 1), (3, 7)])) < 1e-5


def test_default_output_path(tmp_path):
    """Without -o the output is MODEL.fused.onnx beside the input."""
    stack, path = cached_export(LAYOUT, widths=WIDTHS, seed=3)
    model = tmp_path / "model.onnx"
    model.write_bytes(path.read_bytes())
    assert fuse_main([str(model), "--max-group", "2"]) == 0
    x = inputs()
    ref = parallel_reference(stack, x, [(0, 1), (3, 4), (5, 6)])
    assert rel_err(ort_run(tmp_path / "model.fused.onnx", {"x": x.numpy()})[0], ref) < 1e-5


def test_passes_never_import_torch(tmp_path):
    """passes/ depends on onnx, onnx-graphsurgeon, onnxruntime and numpy only: fuse a model with torch blocked."""
    _, path = cached_export(LAYOUT, widths=WIDTHS, seed=3)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import passes.fuse, passes.ffn.match, passes.ffn.chains, passes.ffn.plan, passes.ffn.rewrite, passes.support.onnx_io\n"
        f"assert passes.fuse.main([{str(path)!r}, '-o', {str(tmp_path / 'f.onnx')!r}]) == 0\n"
        "assert 'torch' in sys.modules and sys.modules['torch'] is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "f.onnx").is_file()


@pytest.mark.parametrize("preset, dtype, options, exported, fused", [
    ("puzzle-small", "fp32", [], "e25ff69273d01f556965b22088d8c1f185f16d21fccb9b8a37de1bd5d9dc0be3",
     "b2d6e6a2e0a5162871fc05c4651f86680ea8e8cb0bf1f1f95f717c6b8d763f53"),
    ("puzzle-tiny", "fp16", ["--merge-gate-up", "--groups", "2-4"],
     "1372396b3129715c32adcd7e14d59e7decb44337f0bf5b885ccb9178d6dbc822",
     "ad207ce19f286d01ef9a7bf4a744abef7519f60698467cf2d4ef46d2d078ac0e"),
])
def test_fused_bytes_are_pinned(tmp_path, preset, dtype, options, exported, fused):
    """The same input and options give the same bytes as the fusion pass wrote on 2026-11-30 (before the code was
    reorganized): a refactoring that changes a single byte of the output fails here. The export is pinned too, so
    a failure says which of the two changed."""
    import hashlib

    from exporters.export import export_onnx
    from models.presets import build_preset
    from passes.fuse import main as fuse_main
    source = export_onnx(build_preset(preset)[0], tmp_path / "m.onnx", dtype)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == exported, "the exporter's bytes changed"
    assert fuse_main([str(source), "-o", str(tmp_path / "f.onnx"), *options]) == 0
    assert hashlib.sha256((tmp_path / "f.onnx").read_bytes()).hexdigest() == fused
