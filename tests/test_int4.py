"""int4 (MatMulNBits): fusing graphs that are already quantized, quantizing float graphs, and the K-split rule.

References are independent numpy code in this file: MatMulNBits weights unpacked and dequantized here, and the
parallel form x + sum_t FFN_t(n(x) g_t) computed in float64 with those dequantized weights."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from passes.drop_attention import main as drop_main
from passes.ffn import int4
from passes.ffn.plan import Group
from passes.fuse import main as fuse_main
from passes.measure.change import measure_change
from passes.pipeline import fuse_file
from passes.quantize import main as quantize_main
from tests.residual_models import ort_run
from tests.test_foreign_forms import quiet
from tests.test_match_forms import Builder, Form, make_weights, reference

REPO = Path(__file__).resolve().parents[1]
WIDTHS = [32, 64, 32, 48]          # multiples of 16: the down projections tile the block grid of block_size 16


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quantized_stack(folder: Path, widths=WIDTHS, *, block_size=16, symmetric=True, unit_gains=False, exclude=(),
                    accuracy_level=0, name="q.onnx"):
    """A chain of FFN blocks (hand-built float graph) quantized by onnxruntime's own MatMulNBitsQuantizer."""
    weights = make_weights(widths, seed=7)
    if unit_gains:
        weights = [replace(w, g=np.ones_like(w.g)) for w in weights]
    model = Builder(Form()).model(weights)
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(exclude))
    quantizer.process()
    path = folder / name
    onnx.save(quantizer.model.model, path)
    return weights, path


def dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """W [K, N] of one MatMulNBits node, unpacked here independently of passes.support.nbits."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b = inits[node.input[1]].reshape(n, -1)
    q = np.empty((n, b.shape[1] * 2), np.float64)
    q[:, 0::2], q[:, 1::2] = b & 0x0F, b >> 4
    blocks = q.shape[1] // block
    scales = inits[node.input[2]].reshape(n, blocks).astype(np.float64)
    if len(node.input) > 3 and node.input[3]:
        zp_bytes = inits[node.input[3]].reshape(n, -1)
        zp = np.empty((n, zp_bytes.shape[1] * 2))
        zp[:, 0::2], zp[:, 1::2] = zp_bytes & 0x0F, zp_bytes >> 4
        zp = zp[:, :blocks]
    else:
        zp = np.full((n, blocks), 8.0)
    w = (q.reshape(n, blocks, block) - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, -1)[:, :k].T


def dequantized_weights(path: Path, weights):
    """The BlockWeights with gate, up and down replaced by what the quantized model holds (gains, eps kept)."""
    model = onnx.load(path)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 * len(weights)
    out = []
    for t, w in enumerate(weights):
        by_width = {node.name: dequantized(model, node) for node in nbits[3 * t:3 * t + 3]}
        gate, up, down = by_width.values()
        out.append(replace(w, wg=gate, wu=up, wd=down))
    return out


def x_input(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 16)).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_unit_gains_fuse_exactly_in_the_quantized_domain(symmetric, tmp_path):
    """Gate/up concatenated along N, down along K in whole blocks: the fused int4 model equals the parallel form of
    the dequantized weights to float32 rounding, and its weights are the concatenations, value for value."""
    weights, path = quantized_stack(tmp_path, symmetric=symmetric, unit_gains=True)
    deq = dequantized_weights(path, weights)
    out = tmp_path / "fused.onnx"
    result = fuse_file(path, out, groups=[Group(0, 2)])
    assert "requantized" not in result.report
    x = x_input()
    assert rel(ort_run(out, {"x": x})[0], reference(x, deq, [(0, 2)])) < 1e-5
    fused = onnx.load(out)
    nodes = {n.name: n for n in fused.graph.node if n.op_type == "MatMulNBits"}
    prefix = "/fused_ffn_0_2"
    np.testing.assert_array_equal(dequantized(fused, nodes[f"{prefix}/gate_up/MatMulNBits"]),    # gate | up, packed
                                  np.hstack([w.wg for w in deq[:3]] + [w.wu for w in deq[:3]]))
    np.testing.assert_array_equal(dequantized(fused, nodes[f"{prefix}/down/MatMulNBits"]),
                                  np.vstack([w.wd for w in deq[:3]]))
    assert len(nodes) == 2 + 3 * (len(WIDTHS) - 3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gains_are_folded_by_requantization_and_reported(symmetric, tmp_path):
    """RMSNorm gains cannot be folded into int4 weights exactly: the fused gate/up weights are diag(g) W requantized
    (within int4 rounding of it), the down weights stay exact, and the report says what requantization cost."""
    weights, path = quantized_stack(tmp_path, symmetric=symmetric)
    deq = dequantized_weights(path, weights)
    out = tmp_path / "fused.onnx"
    report = tmp_path / "r.json"
    assert quiet(fuse_main, [path, "-o", out, "--groups", "0-2", "--report", report]) == 0
    requantized = json.loads(report.read_text())["requantized"]
    assert {(r["ordinal"], r["projection"]) for r in requantized} == {(t, p) for t in range(3) for p in ("gate", "up")}
    fused = onnx.load(out)
    nodes = {n.name: n for n in fused.graph.node if n.op_type == "MatMulNBits"}
    gate_up = dequantized(fused, nodes["/fused_ffn_0_2/gate_up/MatMulNBits"])
    folded = np.hstack([w.g[:, None] * w.wg for w in deq[:3]] + [w.g[:, None] * w.wu for w in deq[:3]])
    error = np.linalg.norm(gate_up - folded) / np.linalg.norm(folded)
    assert 0 < error < 0.15                                        # int4 rounding of diag(g) W, no more
    np.testing.assert_allclose(error, np.sqrt(np.mean([r["relative_error"] ** 2 for r in requantized])), rtol=0.35)
    np.testing.assert_array_equal(dequantized(fused, nodes["/fused_ffn_0_2/down/MatMulNBits"]),
                                  np.vstack([w.wd for w in deq[:3]]))
    # the model: against the parallel form of the dequantized weights, within what the original int4 rounding costs
    x = x_input()
    float_model = reference(x, weights)
    quantization = rel(ort_run(path, {"x": x})[0], float_model)
    assert rel(ort_run(out, {"x": x})[0], reference(x, deq, [(0, 2)])) < quantization


def test_long_fused_down_is_split_along_k(tmp_path, monkeypatch):
    """A fused down projection holding more than MAX_K_BLOCKS blocks along K is written as the fewest equal pieces of whole blocks, each a
    MatMulNBits on a slice of the activation, their products summed: the same numbers."""
    weights, path = quantized_stack(tmp_path, unit_gains=True)
    deq = dequantized_weights(path, weights)
    monkeypatch.setattr(int4, "MAX_K_BLOCKS", 4)
    out = tmp_path / "fused.onnx"
    fuse_file(path, out, groups=[Group(0, 3)])
    fused = onnx.load(out)
    pieces = [n for n in fused.graph.node if n.op_type == "MatMulNBits" and "/down/" in n.name]
    ks = [next(a.i for a in n.attribute if a.name == "K") for n in pieces]
    assert ks == [64, 64, 48]                         # 176 rows (11 blocks of 16): the fewest pieces of <= 4 blocks
    assert sum(n.op_type == "Slice" for n in fused.graph.node) == 3
    x = x_input()
    assert rel(ort_run(out, {"x": x})[0], reference(x, deq, [(0, 3)])) < 1e-5


def test_k_pieces_rule():
    """The measured rule: at most MAX_K_BLOCKS (1,792) blocks along K per piece, the fewest pieces."""
    assert int4.k_pieces(229_376, 32) == [(i * 57_344, (i + 1) * 57_344) for i in range(4)]     # 7,168 blocks
    assert int4.k_pieces(229_376, 64) == [(0, 114_688), (114_688, 229_376)]
    assert int4.k_pieces(229_376, 128) == [(0, 229_376)]
    assert int4.k_pieces(57_344, 32) == [(0, 57_344)]
    assert int4.k_pieces(100, 32, 2) == [(0, 64), (64, 100)]
    for k in (1000, 4096, 100_000):
        pieces = int4.k_pieces(k, 32, 90)
        assert pieces[0][0] == 0 and pieces[-1][1] == k and all(a % 32 == 0 for a, _ in pieces)
        assert all(b - a <= 90 * 32 for a, b in pieces) and len(pieces) == -(-(-(-k // 32)) // 90)


def test_widths_off_the_block_grid_are_refused(tmp_path):
    weights, path = quantized_stack(tmp_path, widths=[40, 64, 32], block_size=16)
    digest = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(path), "-o", str(tmp_path / "f.onnx"), "--groups", "0-1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "width 40 is not a multiple" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.onnx").exists() and path.read_bytes() == digest
    # the paper rule (group 0-1 of the chain 0-2) is refused the same way: nothing written, the input untouched
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(path), "-o", str(tmp_path / "p.onnx")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "width 40 is not a multiple" in proc.stderr
    assert not (tmp_path / "p.onnx").exists() and path.read_bytes() == digest


def test_mixed_block_sizes_are_refused(tmp_path):
    weights = make_weights(WIDTHS, seed=7)
    model = Builder(Form()).model(weights)
    downs = [n.name for n in model.graph.node if n.op_type == "MatMul"][2::3]
    first = MatMulNBitsQuantizer(model, block_size=16, is_symmetric=True, nodes_to_exclude=downs[1:])
    first.process()
    second = MatMulNBitsQuantizer(first.model.model, block_size=32, is_symmetric=True)
    second.process()
    path = tmp_path / "mixed.onnx"
    onnx.save(second.model.model, path)
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(path), "-o", str(tmp_path / "f.onnx"), "--groups", "0-2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "different kinds or quantizations" in proc.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_quantize_is_onnxruntimes_quantizer_bit_for_bit(tmp_path):
    """passes.quantize writes what onnxruntime's MatMulNBitsQuantizer writes (same values, same outputs)."""
    weights = make_weights(WIDTHS, seed=3)
    model = Builder(Form()).model(weights)
    onnx.save(model, tmp_path / "float.onnx")
    ref = MatMulNBitsQuantizer(onnx.load(tmp_path / "float.onnx"), block_size=16, is_symmetric=False, accuracy_level=4)
    ref.process()
    onnx.save(ref.model.model, tmp_path / "ref.onnx")
    assert quiet(quantize_main, [tmp_path / "float.onnx", "-o", tmp_path / "ours.onnx", "--block-size", "16", "--asymmetric"]) == 0
    ours = onnx.load(tmp_path / "ours.onnx")
    theirs = onnx.load(tmp_path / "ref.onnx")
    pairs = zip([n for n in ours.graph.node if n.op_type == "MatMulNBits"], [n for n in theirs.graph.node if n.op_type == "MatMulNBits"])
    for a, b in pairs:
        np.testing.assert_array_equal(dequantized(ours, a), dequantized(theirs, b))
    x = x_input()
    np.testing.assert_array_equal(ort_run(tmp_path / "ours.onnx", {"x": x})[0], ort_run(tmp_path / "ref.onnx", {"x": x})[0])


def test_builder_int4_folder_drops_fuses_and_generates(foreign, tmp_path):
    """onnxruntime-genai's own `-p int4` folder: attention dropped, the paper rule fused on the int4 graph, the
    folder generates in onnxruntime-genai, and its logits stay within int4 rounding of the same change made in
    float (the float folder dropped and fused, then quantized by passes.quantize)."""
    import onnxruntime_genai as og
    _, paths = foreign
    hf = paths["genai"].parent.parent / "hf"
    builder = tmp_path / "int4"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(builder),
                    "-p", "int4", "-e", "cpu"], check=True, capture_output=True, timeout=900)
    for name, source in (("int4", builder / "model.onnx"), ("float", paths["genai"])):
        (tmp_path / f"{name}_d").mkdir()
        (tmp_path / f"{name}_f").mkdir()
        assert quiet(drop_main, [source, "-o", tmp_path / f"{name}_d" / "model.onnx", "--layers", "1-4"]) == 0
        assert quiet(fuse_main, [tmp_path / f"{name}_d" / "model.onnx", "-o", tmp_path / f"{name}_f" / "model.onnx"]) == 0
    (tmp_path / "float_q").mkdir()
    assert quiet(quantize_main, [tmp_path / "float_f" / "model.onnx", "-o", tmp_path / "float_q" / "model.onnx"]) == 0
    fused = onnx.load(tmp_path / "int4_f" / "model.onnx", load_external_data=False)
    assert any(n.op_type == "MatMulNBits" and n.name.startswith("/fused_ffn_0_3/") for n in fused.graph.node)
    change = measure_change(tmp_path / "float_q" / "model.onnx", tmp_path / "int4_f" / "model.onnx")
    assert change["relative_error"] < 0.1
    model = og.Model(str(tmp_path / "int4_f"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[1, 5, 9, 13]], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12


def test_export_int4_is_the_float_folder_quantized(tmp_path):
    """exporters.export --runtime genai --dtype int4: the float folder quantized with the builder's defaults (the
    same bits as passes.quantize on it), every MatMul but none of the embeddings, and it generates in
    onnxruntime-genai."""
    import onnxruntime_genai as og

    from exporters.export import main as export_main
    assert quiet(export_main, ["puzzle-small", "-o", tmp_path / "fp32", "--runtime", "genai", "--provider", "cpu"]) == 0
    assert quiet(export_main, ["puzzle-small", "-o", tmp_path / "int4", "--runtime", "genai", "--provider", "cpu",
                               "--dtype", "int4"]) == 0
    (tmp_path / "q").mkdir()
    assert quiet(quantize_main, [tmp_path / "fp32" / "model.onnx", "-o", tmp_path / "q" / "model.onnx"]) == 0
    assert measure_change(tmp_path / "q" / "model.onnx", tmp_path / "int4" / "model.onnx")["relative_error"] == 0.0
    model = onnx.load(tmp_path / "int4" / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") > 0 and "Gather" in ops
    assert any(n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/") for n in model.graph.node)
    assert sorted(p.name for p in (tmp_path / "int4").iterdir()) == sorted(p.name for p in (tmp_path / "fp32").iterdir())
    og_model = og.Model(str(tmp_path / "int4"))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=10, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.array([[3, 1, 4, 1, 5]], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 10


def test_corrupt_matmulnbits_weights_exit_2(tmp_path):
    """B whose size does not fit K, N, bits and block_size: one line, exit 2, nothing written (not a traceback)."""
    _, path = quantized_stack(tmp_path)
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    b = next(t for t in model.graph.initializer if t.name == node.input[1])
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b)[..., :4].copy(), b.name))
    onnx.save(model, tmp_path / "bad.onnx")
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "f.onnx"),
                           "--groups", "0-2"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize("fp16, symmetric", [(False, False), (True, False), (True, True)])
def test_quantize_matches_onnxruntime_byte_for_byte(fp16, symmetric, tmp_path):
    """Weights read through Transpose (and Cast): the quantized model holds exactly onnxruntime's B, scales and
    zero points (padding nibbles too) for each weight, and no float weight or dead Transpose / Cast is left."""
    weights = make_weights([32, 48, 32], seed=4)
    model = Builder(Form(linear=["transpose_cast" if fp16 else "transpose"], fp16=fp16)).model(weights)
    onnx.save(model, tmp_path / "float.onnx")
    assert quiet(quantize_main, [tmp_path / "float.onnx", "-o", tmp_path / "ours.onnx", "--block-size", "16",
                                 *([] if symmetric else ["--asymmetric"])]) == 0
    ours = onnx.load(tmp_path / "ours.onnx")
    float_weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    assert not float_weights & {t.name for t in ours.graph.initializer}
    assert not {"Transpose", "MatMul"} & {n.op_type for n in ours.graph.node}
    read = {name for n in ours.graph.node for name in n.input} | {o.name for o in ours.graph.output}
    assert all(out in read for n in ours.graph.node for out in n.output), "a dead node (weight Cast) was left"
    inits = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    nodes = [n for n in ours.graph.node if n.op_type == "MatMulNBits"]
    effective = [w.T for b in weights for w in (b.wg.T, b.wu.T, b.wd.T)]       # [K, N] as the MatMuls use them
    assert len(nodes) == len(effective) == 9
    dtype, elem = (np.float16, onnx.TensorProto.FLOAT16) if fp16 else (np.float32, onnx.TensorProto.FLOAT)
    for node, w in zip(nodes, effective):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")], "g",
            [onnx.helper.make_tensor_value_info("a", elem, [1, w.shape[0]])],
            [onnx.helper.make_tensor_value_info("y", elem, [1, w.shape[1]])], [numpy_helper.from_array(w.astype(dtype), "W")])
        quantizer = MatMulNBitsQuantizer(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                                         block_size=16, is_symmetric=symmetric, accuracy_level=4)
        quantizer.process()
        theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
        for name, their_name in zip(node.input[1:], ["W_Q4", "W_scales", "W_zero_points"]):
            np.testing.assert_array_equal(inits[name].reshape(-1), theirs[their_name].reshape(-1))
        assert (len(node.input) > 3) == (not symmetric)
