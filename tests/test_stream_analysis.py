"""Segment-major analysis (issue 23): the segments path against the suffix path on the same models (M, per-block
metrics, predicted costs, the attention ranking), the segment plan's invariants, the on-device reductions against
the numpy rules, what the cost report says about weights read, bf16 on the CPU provider, and the Super-49B preset
of bench.synthetic at full size (its configuration) and scaled down (written, then analyzed)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.synthetic import PRESETS, SyntheticConfig, _Builder, write
from bench.synthetic import main as synthetic_main
from passes.analyze import main as analyze_main
from passes.attention.stream import find_stream
from passes.ffn.structure import model_structure
from passes.measure import reductions
from passes.measure.change import next_token_agreement
from passes.measure.metrics import compute_metrics, cosine_distance, norm_ratio
from passes.measure.ranking import rank_sublayers
from passes.measure.reductions import Reductions
from passes.measure.runs import weight_bytes
from passes.measure.segments import plan_segments
from passes.support.errors import UserError
from passes.support.graph import GraphIndex
from passes.support.onnx_io import load_model
from tests.helpers import assert_parsed_alike
from tests.residual_models import TinyLM, export_lm
from tests.test_foreign_forms import quiet

LAYOUT = "AFFFFAFFFAF"          # FFN chains [0-3], [4-6], [7]: pairs, triples and a group of four


def matrix(metrics) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in metrics.dependency], dtype=np.float64)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    path = export_lm(TinyLM(LAYOUT, seed=4, vocab=80, d=32), folder / "lm.onnx")
    ids = np.random.default_rng(5).integers(0, 80, (3, 40))
    np.savez(folder / "ids.npz", input_ids=ids)
    model = load_model(path)
    both = {ex: compute_metrics(model, {"input_ids": ids}, predict=4, execution=ex, progress=False, probe_tokens=64)
            for ex in ("suffix", "segments")}
    return {"path": path, "folder": folder, "ids": ids, "model": model, **both}


def test_segments_give_the_suffix_numbers(lm):
    """M, cosdist_io, ratio to float64 rounding; predicted costs to the numpy probe's float32 rounding."""
    a, b = lm["suffix"], lm["segments"]
    assert np.nanmax(matrix(a)) > 1e-3
    np.testing.assert_allclose(matrix(b), matrix(a), rtol=0, atol=1e-9)
    np.testing.assert_allclose(b.cosdist_io, a.cosdist_io, rtol=1e-9)
    np.testing.assert_allclose(b.ratio, a.ratio, rtol=1e-9)
    assert [(c.first, c.last) for c in b.candidates] == [(c.first, c.last) for c in a.candidates]
    assert max(c.last - c.first for c in a.candidates) == 3
    for x, y in zip(a.candidates, b.candidates):
        assert y.predicted_cost == pytest.approx(x.predicted_cost, rel=1e-4)
        assert y.relative_error == pytest.approx(x.relative_error, rel=1e-4)
    assert a.tokens == b.tokens == 120 and b.change_unit == a.change_unit == "kl"


def test_segments_read_the_weights_once(lm):
    """Weights read: each segment's initializers once (about 1x; the suffix path reads them once per run); the
    same kinds of runs, in the same order, and about the same forward-pass equivalents."""
    a, b = lm["suffix"].cost, lm["segments"].cost
    model_bytes = weight_bytes(GraphIndex.build(lm["model"].proto.graph))
    assert b.execution == "segments" and a.execution == "suffix" and b.activations == "host"
    assert b.weights_read_bytes == pytest.approx(b.weights_read_multiple * model_bytes, rel=1e-3)
    assert 0.9 < b.weights_read_multiple < 1.3 < 2 < a.weights_read_multiple
    assert [r["run"] for r in b.per_run] == [r["run"] for r in a.per_run]
    assert set(b.parts) == {"onnxruntime runs", "FFN probes"}
    assert b.parts["onnxruntime runs"]["forward_pass_equivalents"] == pytest.approx(
        a.parts["onnxruntime runs"]["forward_pass_equivalents"], rel=0.15)
    assert b.segments == LAYOUT.count("F") + 1 and b.activation_bytes_peak > 0      # cut at the blocks only: a small model
    assert [x["segment"] for x in b.per_segment] == list(range(b.segments))
    assert sum(x["weight_bytes"] for x in b.per_segment) == b.weights_read_bytes
    assert sum(x["runs"] for x in b.per_segment) > b.segments
    record = b.record()
    assert {"weights_read_bytes", "weights_read_multiple", "execution", "segments", "activations"} <= set(record)


def test_how_sessions_open_changes_no_number(lm, monkeypatch):
    """M's cosines taken two at a time as they come (not all of a site in one run), every inline weight handed to
    onnxruntime over its own bytes (LIFT_BYTES 0), then one segment opened ahead at a time with shape-inferred
    input types that are all wrong (each such session is opened again with the types the base made): the
    numbers of the plain run, to the last bit."""
    from passes.measure import streams
    from passes.support import onnx_io
    want = lm["segments"]
    feeds = {"input_ids": lm["ids"]}

    def run():
        return compute_metrics(lm["model"], feeds, predict=4, progress=False, probe_tokens=64)

    def same(got):
        np.testing.assert_array_equal(matrix(got), matrix(want))
        assert got.cosdist_io == want.cosdist_io and got.ratio == want.ratio
        assert [c.predicted_cost for c in got.candidates] == [c.predicted_cost for c in want.candidates]

    batches = []
    monkeypatch.setattr(reductions, "COSINE_BATCH", 2)
    real_cosines = Reductions.cosines
    monkeypatch.setattr(Reductions, "cosines", lambda self, a, bs: batches.append(len(bs)) or real_cosines(self, a, bs))
    same(run())
    n = len(want.ordinals)
    assert max(batches) == 2 and sum(batches) == n * (n - 1) // 2          # every M[i][j], i < j
    monkeypatch.undo()

    monkeypatch.setattr(onnx_io, "LIFT_BYTES", 0)
    lifted = []
    real = onnx_io._over_bytes
    monkeypatch.setattr(onnx_io, "_over_bytes", lambda t, *where: lifted.append(t.name) or real(t, *where))
    same(run())
    assert len(set(lifted)) == sum(1 for t in lm["model"].proto.graph.initializer if t.HasField("raw_data"))

    opened = []
    monkeypatch.setattr(streams, "AHEAD_BYTES", 0)
    monkeypatch.setattr(streams, "inferred_types", lambda proto: {o: onnx.TensorProto.DOUBLE for n in proto.graph.node
                                                                   for o in n.output})
    real_open = streams.StreamRuns._open
    monkeypatch.setattr(streams.StreamRuns, "_open", lambda self, k, types: opened.append((k, dict(types))) or
                        real_open(self, k, types))
    same(run())
    # which segments open with the wrong types before the base makes theirs is a race (a queued open is cancelled
    # instead; 5 to 8 of the 8 after the first in the runs tried): every one that did is opened again with no wrong type
    wrong = [k for k, types in opened if onnx.TensorProto.DOUBLE in types.values()]
    assert wrong
    assert all(any(j == k and onnx.TensorProto.DOUBLE not in t.values() for j, t in opened[i + 1:])
               for i, (k, types) in enumerate(opened) if k in wrong and onnx.TensorProto.DOUBLE in types.values())


def test_inferred_types_ignore_stale_value_info(lm):
    """Shape inference types every tensor a segment may read, whatever the model's value_info claims."""
    from passes.measure.segments import inferred_types
    proto = onnx.ModelProto()
    proto.CopyFrom(lm["model"].proto)
    shapes = [n.output[0] for n in proto.graph.node if n.op_type == "Shape"]
    assert shapes
    proto.graph.value_info.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT16, None) for t in shapes)
    types = inferred_types(proto)
    assert {types[t] for t in shapes} == {onnx.TensorProto.INT64}
    assert all(o in types for n in proto.graph.node for o in n.output if o)


def test_lifted_weight_placeholder(tmp_path):
    """placeholder(): a big inline tensor, or an external one at an offset onnxruntime cannot map (not a page
    multiple; here not even a multiple of 4), becomes a typed, shaped external reference that no file backs, and
    ort_session fills it from the tensor's own bytes: x @ W as numpy computes it; small ones and external ones at
    page offsets stay."""
    from onnx import TensorProto, helper, numpy_helper

    from passes.support.onnx_io import LIFT_BYTES, LIFTED, ort_session, placeholder
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, LIFT_BYTES // 2048 + 1)).astype(np.float32)       # just over LIFT_BYTES
    big, small = numpy_helper.from_array(w, "W"), numpy_helper.from_array(w[:2, :2].copy(), "S")
    lifted = placeholder(big)
    assert placeholder(small) is small and placeholder(lifted) is lifted
    assert lifted.name == "W" and list(lifted.dims) == list(w.shape) and lifted.data_type == TensorProto.FLOAT
    assert not lifted.HasField("raw_data") and {e.key: e.value for e in lifted.external_data}["location"] == LIFTED
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [lifted])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((3, 512)).astype(np.float32)
    got = ort_session(model, weights={"W": big}).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-4)
    data = tmp_path / "w.bin"
    aligned = -(-(4097 + w.nbytes) // 4096) * 4096
    data.write_bytes(b"\0" * 4097 + w.tobytes() + b"\0" * (aligned - 4097 - w.nbytes) + w.tobytes())
    external = {}
    for offset in (4097, aligned):
        tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=w.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(w.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        external[offset % 4096 == 0] = tensor
    assert placeholder(external[True]) is external[True]
    assert placeholder(external[False]) == lifted
    got = ort_session(model, weights={"W": external[False]}, base_dir=tmp_path).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ort_session(model, weights={"W": big}).run(None, {"x": x})[0])
    short = TensorProto()
    short.CopyFrom(big)
    short.raw_data = short.raw_data[:-4]
    with pytest.raises(UserError, match="'W' holds"):
        ort_session(model, weights={"W": short})


def test_weights_in_place(lm, monkeypatch):
    """load_model(weights_in_place=True): every raw_data initializer (LIFT_BYTES 0) becomes external data in the
    model file at the offset of its bytes, with the values of a whole parse and the rest of the graph unchanged;
    the analysis over it (each weight handed to onnxruntime through a memory map at that offset) gives the
    numbers of the whole parse to the last bit."""
    from passes.support import onnx_io
    monkeypatch.setattr(onnx_io, "LIFT_BYTES", 0)
    whole = lm["model"]
    in_place = load_model(lm["path"], weights_in_place=True)
    raw = [t.name for t in whole.proto.graph.initializer if t.HasField("raw_data")]
    moved = [t for t in in_place.proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert raw and [t.name for t in moved] == raw and in_place.external_files == {lm["path"].resolve()}
    assert_parsed_alike(whole, in_place)
    data, raw = lm["path"].read_bytes(), {t.name: t.raw_data for t in whole.proto.graph.initializer}
    for tensor in moved:
        where = {e.key: e.value for e in tensor.external_data}
        assert where["location"] == lm["path"].name
        assert data[int(where["offset"]):int(where["offset"]) + int(where["length"])] == raw[tensor.name]
    got = compute_metrics(in_place, {"input_ids": lm["ids"]}, predict=4, progress=False, probe_tokens=64)
    want = lm["segments"]
    np.testing.assert_array_equal(matrix(got), matrix(want))
    assert got.cosdist_io == want.cosdist_io and got.ratio == want.ratio
    assert [c.predicted_cost for c in got.candidates] == [c.predicted_cost for c in want.candidates]


def test_weights_in_place_leaves_odd_files_to_the_whole_parse(lm, tmp_path, monkeypatch):
    """Nothing moves, and load_model says what it always says, for a truncated file, a symbolic link, a binary
    model named as JSON, tensors whose raw_data does not fill their shape or that have a negative dimension (left
    inline for the checks inline tensors get), one that also holds float_data and a segmented one; a model
    without big tensors parses as onnx.load parses it."""
    from onnx import TensorProto, helper, numpy_helper

    from passes.support import onnx_io
    monkeypatch.setattr(onnx_io, "LIFT_BYTES", 64)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(lm["path"].read_bytes()[:-1000])
    for flag in (False, True):
        with pytest.raises(UserError, match="not a readable ONNX model"):
            load_model(truncated, weights_in_place=flag)
    link = tmp_path / "link.onnx"
    link.symlink_to(lm["path"])
    assert all(not onnx_io._is_external(t) for t in load_model(link, weights_in_place=True).proto.graph.initializer)

    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    short = numpy_helper.from_array(w, "short")
    short.raw_data = short.raw_data[:-4]
    both = numpy_helper.from_array(w, "both")
    both.float_data.extend([1.0])
    negative = numpy_helper.from_array(w, "negative")
    negative.dims[:] = [-8, -8]
    segmented = numpy_helper.from_array(w, "segmented")
    segmented.segment.begin, segmented.segment.end = 0, 64
    good = numpy_helper.from_array(w, "good")
    odd = [short, both, negative, segmented]
    names = [t.name for t in odd] + ["good"]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in names], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None) for n in names],
                              [*odd, good])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    loaded = {t.name: t for t in load_model(path, weights_in_place=True).proto.graph.initializer}
    assert all(loaded[t.name] == t for t in odd)
    assert onnx_io._is_external(loaded["good"])
    named_json = tmp_path / "odd.json"
    named_json.write_bytes(path.read_bytes())
    for flag in (False, True):
        with pytest.raises(UserError, match="not a readable ONNX model"):
            load_model(named_json, weights_in_place=flag)
    np.testing.assert_array_equal(onnx_io.tensor_array(loaded["good"], tmp_path), w)
    monkeypatch.setattr(onnx_io, "LIFT_BYTES", 1 << 20)
    assert load_model(path, weights_in_place=True).proto == load_model(path).proto


def test_plan_cuts_every_node_once(lm):
    """Every node the analysis needs is in one segment (constant subgraphs in each that reads them); segment k >= 1
    begins with its residual node; a segment reads only graph inputs, initializers and what earlier segments
    output."""
    model = lm["model"]
    structure = model_structure(model.proto)
    net = structure.index
    sublayers = find_stream(model.proto, net).sublayers
    cuts, more = ({x.residual_node: x.residual_ports for x in chosen} for chosen in (structure.blocks, sublayers))
    assert len(plan_segments(net, cuts, ["logits"], more).segments) == len(cuts) + 1      # small: only what is needed
    budget = max(segment.weight_bytes for segment in plan_segments(net, cuts, ["logits"], more, max_bytes=0).segments)
    bounded = plan_segments(net, cuts, ["logits"], more, max_bytes=budget)
    assert len(cuts) + 1 < len(bounded.segments) and max(x.weight_bytes for x in bounded.segments) <= budget
    plan = plan_segments(net, cuts, ["logits"], more, max_bytes=0)
    assert len(plan.segments) == len(sublayers) + 1
    owner = {}
    for segment in plan.segments:
        own = [k for k in segment.nodes if k not in net.constant_nodes]
        assert not set(own) & set(owner)
        owner.update(dict.fromkeys(own, segment.index))
        if segment.residual is not None:
            assert own[0] == segment.residual
    assert set(owner) == {k for k in range(len(net.graph.node)) if k not in net.constant_nodes}
    for segment in plan.segments:
        for t in (*segment.inputs, *(segment.slots or ())):
            if t not in net.inputs:
                assert owner[net.producer[t]] < segment.index and t in plan.segments[owner[net.producer[t]]].outputs


@pytest.mark.parametrize("form", ["ortopt", "genai"])
def test_foreign_forms_segments_equal_suffix(foreign, form):
    """Graphs the project did not write: onnxruntime-optimized (skip norms) and onnxruntime-genai's builder
    (GroupQueryAttention, KV caches made empty): the attention ranking and M with predicted costs."""
    from passes.support.calibration import calibration_for
    model = load_model(foreign[1][form])
    feeds = calibration_for(model, None, batch=2, seq=12, seed=7, warn=False).feeds
    attention = find_stream(model.proto).attention
    a, _ = rank_sublayers(model, attention, feeds, progress=False, execution="suffix")
    b, _ = rank_sublayers(model, attention, feeds, progress=False, execution="segments")
    np.testing.assert_allclose([r["kl_removed_alone"] for r in b], [r["kl_removed_alone"] for r in a], rtol=1e-6)
    structure = model_structure(model.proto)
    ordinals = list(range(len(structure.blocks)))
    m = {ex: compute_metrics(model, feeds, ordinals, structure=structure, predict=3, progress=False, execution=ex)
         for ex in ("suffix", "segments")}
    np.testing.assert_allclose(matrix(m["segments"]), matrix(m["suffix"]), rtol=0, atol=1e-9)


def test_rank_segments_equal_suffix(lm):
    model = lm["model"]
    attention = find_stream(model.proto).attention
    feeds = {"input_ids": lm["ids"]}
    a, cost_a = rank_sublayers(model, attention, feeds, progress=False, execution="suffix")
    b, cost_b = rank_sublayers(model, attention, feeds, progress=False, execution="segments")
    for x, y in zip(a, b):
        assert (x["layer"], x["kind"], x["residual_node"]) == (y["layer"], y["kind"], y["residual_node"])
        assert y["kl_removed_alone"] == pytest.approx(x["kl_removed_alone"], rel=1e-6)
        assert y["top1_removed_alone"] == x["top1_removed_alone"]
        assert y["cosdist"] == pytest.approx(x["cosdist"], rel=1e-9) and y["ratio"] == pytest.approx(x["ratio"], rel=1e-9)
    assert cost_b.weights_read_multiple < 1.3 < cost_a.weights_read_multiple


def test_reductions_are_the_numpy_rules(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 5, 16))
    a[0, 1], b[0, 1], a[1, 2] = 0.0, 0.0, 0.0          # both zero: distance 0; one zero: distance 1
    reduce = Reductions(["CPUExecutionProvider"], "cpu")
    ov = ort.OrtValue.ortvalue_from_numpy
    bs = [b, a, -a, 2.5 * b, np.zeros_like(a)] + [rng.standard_normal(a.shape) for _ in range(6)]
    for batch in (32, 4, 1):                         # one run of 11 padded to 16; runs of 4, 4 and 3; one each
        monkeypatch.setattr(reductions, "COSINE_BATCH", batch)
        assert reduce.cosine_batch(ov(a)) == batch
        found = reduce.cosines(ov(a), [ov(v) for v in bs])
        assert len(found) == len(bs)
        for got, v in zip(found, bs):
            np.testing.assert_allclose(got, cosine_distance(a, v), rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(reductions, "COSINE_BATCH", 32)
    monkeypatch.setattr(reductions, "COSINE_BYTES", 3 * a.size * 8)      # three values' float64: two a run
    assert reduce.cosine_batch(ov(a)) == 2 and reduce.cosines(ov(a), []) == []
    cos, ratio = reduce.residual(ov(a), ov(b))
    np.testing.assert_allclose(cos, cosine_distance(a, a + b), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ratio, norm_ratio(b, a), rtol=1e-12)
    logits_a, logits_b = rng.standard_normal((3, 300, 40)).astype(np.float32), rng.standard_normal((3, 300, 40)).astype(np.float32)
    kl, top1 = reduce.next_token(ov(logits_a), ov(logits_b))
    want = next_token_agreement(logits_a, logits_b)
    assert kl == pytest.approx(want[0], rel=1e-12) and top1 == want[1]
    rows = np.array([0, 7, 3])
    np.testing.assert_array_equal(reduce.rows(ov(a.astype(np.float32)), rows), a.reshape(-1, 16)[rows].astype(np.float32))
    bits = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)          # bfloat16 by truncation
    bf16 = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)
    exact = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(reduce.host(bf16), exact)
    np.testing.assert_array_equal(reduce.rows(bf16, rows), exact.reshape(-1, 16)[rows])
    assert not reduce.host(reduce.zeros_like(bf16)).any()
    values = [ov(a), ov(np.array(7)), ov(np.array([True, False])), bf16]
    copies = reduce.own(values)                                      # own: copies in its own memory, in one run
    assert len(copies) == len(values) and reduce.own([]) == []
    for value, copy in zip(values, copies):
        assert copy.data_ptr() != value.data_ptr() and copy.shape() == value.shape()
        assert copy.data_type() == value.data_type()
    np.testing.assert_array_equal(copies[0].numpy(), a)
    assert copies[1].numpy() == 7 and copies[2].numpy().tolist() == [True, False]
    np.testing.assert_array_equal(reduce.host(copies[3]), exact)
    np.testing.assert_array_equal(reduce.own([ov(a)])[0].numpy(), a)


def test_cli_stream_switch_and_report(lm, tmp_path):
    reports = {}
    for stream in ("segments", "suffix"):
        out = tmp_path / f"{stream}.json"
        assert quiet(analyze_main, [lm["path"], "--inputs", lm["folder"] / "ids.npz", "-o", out, "--stream", stream,
                                    "--provider", "cpu", "--max-group", "3"]) == 0
        reports[stream] = json.loads(out.read_text())
    a, b = reports["suffix"], reports["segments"]
    assert b["cost"]["execution"] == "segments" and "--stream" in b["command"]
    np.testing.assert_allclose(np.array(b["dependency"]["matrix"], dtype=float), np.array(a["dependency"]["matrix"], dtype=float),
                               rtol=0, atol=1e-9)
    assert b["cost"]["weights_read_multiple"] < a["cost"]["weights_read_multiple"]


def test_warm_cuda_never_raises():
    """The CUDA warm-up builds its graph where it is called and opens and runs it on a thread of its own, once a
    process: where this onnxruntime has no CUDA provider its future holds the one-line error, else it succeeds."""
    from passes.support import onnx_io
    future = onnx_io.warm_cuda()
    error = future.exception(timeout=120)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert error is None
    else:
        assert isinstance(error, UserError) and "--provider cuda" in str(error)
    assert onnx_io.warm_cuda() is future


def test_bf16_on_the_cpu_provider_is_one_line(tmp_path):
    """onnxruntime's CPU kernels do not run bf16: a UserError naming the op, before any number is made."""
    config = SyntheticConfig(**{**PRESETS["tiny"].__dict__, "dtype": "bf16"})
    path = write(config, tmp_path / "bf16.onnx")
    with pytest.raises(UserError, match="onnxruntime cannot run this model"):
        compute_metrics(path, {"input_ids": np.zeros((1, 4), np.int64)}, progress=False, provider="cpu")


def test_super49b_preset():
    """Llama-3.3-Nemotron-Super-49B's shapes with a Puzzle-like layout; the first 40 layers fit a 64 GiB disk in
    bf16; its weights are written 32 MiB at a time."""
    config = PRESETS["super49b"]
    assert (config.hidden, config.heads, config.kv_heads, config.vocab, config.dtype) == (8192, 64, 8, 128256, "bf16")
    assert len(config.layout) == 80 and set(config.layout) == {"A", "F"}
    runs = [len(r) for r in config.layout.replace("A", " ").split()]
    assert min(runs) >= 2 and config.layout[40:].count("F") > config.layout[:40].count("F") > 0
    assert len(set(config.ffn_widths)) >= 3 and len(config.ffn_widths) == 80
    assert config.parameters() == pytest.approx(49e9, rel=0.02)
    first = config.first(40)
    assert first.layout == config.layout[:40] and first.parameters() * 2 < 0.8 * (64 << 30)
    builder = _Builder(config)
    builder.weight("w", [8192, 28672])
    chunk = next(builder.new["w"].chunks())
    assert chunk.nbytes <= 32 << 20 and chunk.shape[1] == 28672
    with pytest.raises(UserError, match="--layers 81"):
        config.first(81)


def test_super49b_scaled_down_is_written_and_analyzed(tmp_path):
    """The preset's layout and relative widths at hidden 64: written (external data), then analyzed segment-major:
    the FFN chains of its attention-free runs are found and every M inside them is measured."""
    full = PRESETS["super49b"]
    config = SyntheticConfig(**{**full.__dict__, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 96, "dtype": "fp32",
                                "ffn_widths": tuple(w // 256 for w in full.ffn_widths)}).first(16)
    path = write(config, tmp_path / "super16.onnx")
    assert (tmp_path / "super16.onnx.data").is_file()
    model = load_model(path)
    structure = model_structure(model.proto)
    assert [b.width for b in structure.blocks] == list(config.ffn_widths)
    assert [len(c) for c in structure.chains if len(c) > 1] == [4]          # layers 11-14: attention removed in 12-14
    metrics = compute_metrics(model, {"input_ids": np.random.default_rng(0).integers(0, 96, (2, 24))}, scope="chains",
                              structure=structure, predict=4, progress=False)
    chain = [c for c in structure.chains if len(c) > 1][0].ordinals
    assert all(metrics.m(i, j) is not None and np.isfinite(metrics.m(i, j)) for i in chain for j in chain if i < j)
    assert len(metrics.candidates) == 6 and all(np.isfinite(c.predicted_cost) for c in metrics.candidates)


def test_synthetic_layers_option(tmp_path):
    """--layers N writes the first N layers of the preset, then the final norm and lm_head."""
    path = tmp_path / "first4.onnx"
    assert quiet(synthetic_main, ["--preset", "tiny", "--layers", "4", "-o", path]) == 0
    stream = find_stream(onnx.load(str(path), load_external_data=False))
    assert [s.kind for s in stream.sublayers] == ["attention", "mlp", "mlp", "mlp", "mlp"]
