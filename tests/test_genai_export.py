"""exporters/genai.py: the onnxruntime-genai folder written straight from a PuzzleDecoder, against the model
builder's own folder, against torch and transformers, through onnxruntime-genai's generator (CPU), and after
drop_attention + fuse."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from exporters.genai import export_genai
from models.fused import drop_and_fuse
from models.loaders import load_model, load_tokenizer
from models.presets import build_preset
from passes.drop_attention import main as drop_main
from passes.fuse import main as fuse_main
from tests.test_foreign_forms import IDS, logits, quiet, rel

og = pytest.importorskip("onnxruntime_genai")


def greedy_genai(folder, prompt: np.ndarray, new: int) -> np.ndarray:
    """Greedy continuation of `prompt` [batch, length] by onnxruntime-genai (CPU)."""
    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    batch, length = prompt.shape
    params.set_search_options(batch_size=batch, max_length=length + new, min_length=length + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(b)) for b in range(batch)])


@torch.no_grad()
def greedy_torch(model, prompt: np.ndarray, new: int) -> np.ndarray:
    ids = torch.from_numpy(prompt)
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids.numpy()


def test_same_graph_as_the_builder(foreign, tmp_path):
    """On a transformers Llama the folder equals the builder's: same ops from the first attention on, same logits."""
    _, paths = foreign
    builder = paths["genai"]
    ours = export_genai(load_model(str(builder.parent.parent / "hf")), tmp_path / "ours",
                        load_tokenizer(str(builder.parent.parent / "hf")), provider="cpu") / "model.onnx"
    ops = [[n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node
            if n.op_type not in ("Constant", "Transpose")] for p in (builder, ours)]
    start = [o.index("GroupQueryAttention") for o in ops]      # the first norm is decomposed in ours (docstring)
    assert ops[0][start[0]:] == ops[1][start[1]:]
    assert rel(logits(ours), logits(builder)) < 1e-6
    config = [json.loads((p.parent / "genai_config.json").read_text())["model"]["decoder"] for p in (builder, ours)]
    for key in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "head_size", "hidden_size"):
        assert config[0][key] == config[1][key], key
    prompt = IDS[:, :6]
    assert np.array_equal(greedy_genai(ours.parent, prompt, 8), greedy_genai(builder.parent, prompt, 8))


def test_heterogeneous_model_generates_like_torch(tmp_path):
    """puzzle-small (layers without attention, without FFN, per-layer widths and KV heads) through genai's
    generator: logits equal torch's, greedy tokens equal torch's greedy tokens."""
    model = build_preset("puzzle-small")[0]
    folder = export_genai(model, tmp_path / "g", provider="cpu")
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == len(model.attention_layers)
    prompt = IDS
    with torch.no_grad():
        assert rel(logits(folder / "model.onnx"), model(torch.from_numpy(prompt)).double().numpy()) < 1e-5
    assert np.array_equal(greedy_genai(folder, prompt, 12), greedy_torch(model, prompt, 12))


@pytest.fixture(scope="module")
def smollm2_genai(tmp_path_factory):
    """The real SmolLM2 as a genai folder (CPU provider), through the CLI."""
    folder = tmp_path_factory.mktemp("smol") / "genai"
    result = subprocess.run([sys.executable, "-m", "exporters.export", "smollm2", "-o", str(folder), "--runtime", "genai",
                             "--provider", "cpu", "--context-length", "512"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


def test_smollm2_generates_like_transformers(smollm2_genai):
    from transformers import LlamaForCausalLM

    from models.smollm2 import smollm2_gguf_path
    gguf = smollm2_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer("smollm2")
    for text in ("The capital of France is", "def fibonacci(n):", "Water boils at"):
        prompt = tokenizer(text, return_tensors="np").input_ids.astype(np.int64)
        want = reference.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False).numpy()
        assert np.array_equal(greedy_genai(smollm2_genai, prompt, 10), want), text


def test_smollm2_after_drop_and_fuse(smollm2_genai, tmp_path):
    """drop_attention + fuse on our genai folder: the result runs in genai and its logits equal the torch model
    with the same attention removed and the same groups fused (models.fused)."""
    dropped, fused = tmp_path / "dropped", tmp_path / "fused"
    dropped.mkdir()
    fused.mkdir()
    assert quiet(drop_main, [smollm2_genai / "model.onnx", "-o", dropped / "model.onnx", "--layers", "5-7,17-18,25-26,29"]) == 0
    assert quiet(fuse_main, [dropped / "model.onnx", "-o", fused / "model.onnx", "--groups", "4-6,16-17,24-25"]) == 0
    config = json.loads((fused / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == 30 - 8
    student = drop_and_fuse(load_model("smollm2"), [5, 6, 7, 17, 18, 25, 26, 29], [(4, 6), (16, 17), (24, 25)])
    with torch.no_grad():
        assert rel(logits(fused / "model.onnx"), student(torch.from_numpy(IDS)).double().numpy()) < 1e-5
    prompt = load_tokenizer("smollm2")("The capital of France is", return_tensors="np").input_ids.astype(np.int64)
    assert np.array_equal(greedy_genai(fused, prompt, 6), greedy_torch(student, prompt, 6))


@pytest.mark.parametrize("extra, message", [
    (["--graph", "decode"], "--graph, --exporter and --opset do not apply"),
    (["--context-length", "0"], "--context-length must be positive"),
])
def test_cli_refuses(tmp_path, extra, message):
    result = subprocess.run([sys.executable, "-m", "exporters.export", "puzzle-tiny", "-o", str(tmp_path / "g"),
                             "--runtime", "genai", *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "g").exists()

