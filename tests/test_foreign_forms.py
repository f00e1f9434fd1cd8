"""drop_attention and fuse on graphs the project did not write (transformers + torch.onnx TorchScript and dynamo,
the dynamo export after onnxruntime's transformer optimizer, onnxruntime-genai's model builder), each against the
transformers model itself with those attention modules returning zeros and those FFNs in the parallel form.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.foreign import FORMS
from models.reference import reference_logits
from passes.attention.stream import find_stream
from passes.drop_attention import main as drop_main
from passes.fuse import main as fuse_main
from passes.support.calibration import calibration_for
from passes.support.onnx_io import load_model, ort_session
from tests.foreign_models import LAYERS, VOCAB
from tests.helpers import assert_parsed_alike

REPO = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(7).integers(0, VOCAB, (2, 12)).astype(np.int64)


def quiet(main, argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in argv])


def logits(path: Path) -> np.ndarray:
    """The model's logits on IDS, given as a JSON of token ids (the tools make the mask and empty caches)."""
    feeds = calibration_for(load_model(path), _ids_file(path.parent), warn=False).feeds
    return ort_session(path).run(["logits"], feeds)[0].astype(np.float64)


def _ids_file(folder: Path) -> Path:
    path = folder / "ids.json"
    path.write_text(json.dumps(IDS.tolist()))
    return path


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("form", FORMS)
def test_one_attention_and_one_ffn_sublayer_per_layer(foreign, form):
    _, paths = foreign
    stream = find_stream(onnx.load(str(paths[form]), load_external_data=False))
    assert [s.layer for s in stream.attention] == list(range(LAYERS))
    assert [s.layer for s in stream.sublayers if s.kind == "mlp"] == list(range(LAYERS))
    assert stream.mismatches == []


@pytest.mark.parametrize("form", FORMS)
def test_unchanged_graph_matches_transformers(foreign, form):
    model, paths = foreign
    assert rel(logits(paths[form]), reference_logits(model, IDS)) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_drop_then_fuse_matches_reference(foreign, form, tmp_path):
    """Attention dropped in layers 2-4 makes FFNs 1-4 one chain; fusing 1-3 gives x_1 + sum_t FFN_t(n_t(x_1))."""
    model, paths = foreign
    dropped, fused = tmp_path / "dropped" / "model.onnx", tmp_path / "fused" / "model.onnx"
    dropped.parent.mkdir()
    fused.parent.mkdir()
    assert quiet(drop_main, [paths[form], "-o", dropped, "--layers", "2-4"]) == 0
    assert rel(logits(dropped), reference_logits(model, IDS, dropped=[2, 3, 4])) < 1e-5
    assert [s.layer for s in find_stream(onnx.load(str(dropped), load_external_data=False)).attention] == [0, 1, 5]
    report = tmp_path / "fuse.json"
    assert quiet(fuse_main, [dropped, "-o", fused, "--groups", "1-3", "--report", report]) == 0
    assert [1, 2, 3, 4] in json.loads(report.read_text())["chains"]
    want = reference_logits(model, IDS, dropped=[2, 3, 4], groups=[(1, 3)])
    assert rel(logits(fused), want) < 1e-5
    assert rel(logits(fused), reference_logits(model, IDS, dropped=[2, 3, 4])) > 1e-4     # the fusion is visible


def test_genai_folder_after_drop_and_fuse_generates(foreign, tmp_path):
    """The dropped + fused onnxruntime-genai folder: caches renumbered 0..n-1, genai_config.json consistent, and
    the runtime's own first-step logits equal the reference."""
    import onnxruntime_genai as og
    model, paths = foreign
    dropped, fused = tmp_path / "dropped" / "model.onnx", tmp_path / "fused" / "model.onnx"
    dropped.parent.mkdir()
    fused.parent.mkdir()
    assert quiet(drop_main, [paths["genai"], "-o", dropped, "--layers", "2-4"]) == 0
    assert quiet(fuse_main, [dropped, "-o", fused, "--groups", "1-3"]) == 0
    config = json.loads((fused.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == 3 and config["filename"] == "model.onnx"
    graph = onnx.load(str(fused), load_external_data=False).graph
    assert sorted(i.name for i in graph.input if i.name.startswith("past_key_values")) == \
        sorted(f"past_key_values.{k}.{kind}" for k in range(3) for kind in ("key", "value"))
    assert (fused.parent / "tokenizer.json").is_file()
    og_model = og.Model(str(fused.parent))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=IDS.shape[1] + 4, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(IDS[:1].astype(np.int32))
    first = np.asarray(generator.get_output("logits"), np.float64).reshape(-1, VOCAB)[-1]
    want = reference_logits(model, IDS[:1], dropped=[2, 3, 4], groups=[(1, 3)])[0, -1]
    assert rel(first, want) < 1e-4
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == IDS.shape[1] + 4


def test_rank_on_genai_graph(foreign, tmp_path):
    """--rank runs on a decode graph with KV caches (made empty for the prompt) and prices itself."""
    _, paths = foreign
    report = tmp_path / "rank.json"
    assert quiet(drop_main, [paths["genai"], "--rank", "--inputs", _ids_file(tmp_path), "--report", report]) == 0
    data = json.loads(report.read_text())
    assert sorted(r["layer"] for r in data["ranking"]) == list(range(LAYERS))
    assert all(r["kl_removed_alone"] > 0 for r in data["ranking"])
    assert data["cost"]["forward_pass_equivalents"] < 1 + LAYERS


@pytest.mark.parametrize("form", FORMS)
def test_weights_in_place_on_foreign_graphs(foreign, form, tmp_path, monkeypatch):
    """passes.analyze's loader (weights_in_place, LIFT_BYTES 4 KiB so the tiny model's weight matrices move) on
    every form: each initializer's values, and the rest of the graph, as onnx.load gives them; the analysis's
    metrics and M bit-identical to those over the whole parse."""
    from passes.measure.metrics import compute_metrics
    from passes.support import onnx_io
    monkeypatch.setattr(onnx_io, "LIFT_BYTES", 4096)
    _, paths = foreign
    whole, in_place = load_model(paths[form]), load_model(paths[form], weights_in_place=True)
    big = [t.name for t in whole.proto.graph.initializer if len(t.raw_data) >= 4096]
    assert [t.name for t in in_place.proto.graph.initializer if t.name in big and onnx_io._is_external(t)] == big
    assert_parsed_alike(whole, in_place)
    feeds = calibration_for(whole, str(_ids_file(tmp_path))).feeds
    want, got = (compute_metrics(m, feeds, progress=False) for m in (whole, in_place))
    assert got.dependency == want.dependency and got.cosdist_io == want.cosdist_io and got.ratio == want.ratio


@pytest.mark.parametrize("form", ["dynamo", "genai"])
def test_layer_without_attention_is_refused(foreign, form, tmp_path):
    _, paths = foreign
    dropped = tmp_path / "dropped" / "model.onnx"
    dropped.parent.mkdir()
    assert quiet(drop_main, [paths[form], "-o", dropped, "--layers", "2"]) == 0
    again = tmp_path / "again.onnx"
    proc = subprocess.run([sys.executable, "-m", "passes.drop_attention", str(dropped), "-o", str(again), "--layers", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "layer 2 has no attention to drop" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not again.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dropped"]
