"""PuzzleDecoder and its loaders against transformers' Llama (same weights -> same logits) and bad-input handling."""
from __future__ import annotations

import json
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from models import PRESETS, build_preset, load_model, load_tokenizer, smollm2_gguf_path
from models.checkpoint import save_checkpoint
from passes.support.errors import UserError
from tests.helpers import random_ids, rel_err

REPO = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}




def hf_llama(**overrides) -> LlamaForCausalLM:
    """A tiny random LlamaForCausalLM (eager attention) with non-trivial norm gains."""
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0, initializer_range=0.2,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, **LLAMA3_ROPE}},
        {"num_key_value_heads": 4},
    ],
    ids=["plain", "tied", "llama3-rope", "mha"],
)
def test_hf_llama_folder_matches_transformers(tmp_path, overrides):
    reference = hf_llama(**overrides)
    reference.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    ids = random_ids(128)
    with torch.no_grad():
        expected = reference(ids).logits
        assert rel_err(ours(ids), expected) < 1e-5
    assert ours.config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)


def test_sharded_hf_folder(tmp_path):
    reference = hf_llama()
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = random_ids(128)
    with torch.no_grad():
        assert rel_err(load_model(str(tmp_path))(ids), reference(ids).logits) < 1e-5


# nemotron-nas: hidden 192, 6 heads of 32; widths = ceil_256(int(2 * ffn_mult * 192 / 3)).
NEMOTRON_BLOCKS = [  # (n_heads_in_group or None = attention no_op, ffn_mult or None = ffn no_op, expected width)
    (2, 5.25, 768),
    (None, 1.0, 256),
    (None, 3.0, 512),
    (None, 2.0, 256),
    (3, None, None),
    (1, 3.0, 512),
]


def write_nemotron_folder(folder: Path, **block_overrides) -> Path:
    """A DeciLM-style checkpoint written by hand (config keys as in released Nemotron configs), random weights."""
    hidden, heads, head_dim, vocab = 192, 6, 32, 96
    blocks, tensors = [], {}
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    def gain():
        return 1 + rand(hidden)

    tensors["model.embed_tokens.weight"] = rand(vocab, hidden, std=1.0)
    for i, (group, mult, width) in enumerate(NEMOTRON_BLOCKS):
        attention = {"no_op": group is None, "n_heads_in_group": group, "replace_with_linear": False,
                     "sparsify": None, "num_sink_tokens": None, "window_length": None, "unshifted_sink": False}
        ffn = {"no_op": mult is None, "ffn_mult": mult, "replace_with_linear": False, "sparsify": None}
        blocks.append({"attention": attention, "ffn": ffn})
        p = f"model.layers.{i}"
        if group is not None:
            kv = heads // group
            tensors[f"{p}.input_layernorm.weight"] = gain()
            for name, rows in (("q", heads), ("k", kv), ("v", kv)):
                tensors[f"{p}.self_attn.{name}_proj.weight"] = rand(rows * head_dim, hidden)
            tensors[f"{p}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        if mult is not None:
            tensors[f"{p}.post_attention_layernorm.weight"] = gain()
            tensors[f"{p}.mlp.gate_proj.weight"] = rand(width, hidden)
            tensors[f"{p}.mlp.up_proj.weight"] = rand(width, hidden)
            tensors[f"{p}.mlp.down_proj.weight"] = rand(hidden, width, std=0.05)
    for key, value in block_overrides.items():
        part, field = key.split(".")
        blocks[0][part][field] = value
    tensors["model.norm.weight"] = gain()
    tensors["lm_head.weight"] = rand(vocab, hidden)
    config = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "auto_map": {},
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": len(blocks),
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", **LLAMA3_ROPE}, "max_position_embeddings": 4096,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", "block_configs": blocks,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def nemotron_reference(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits computed with transformers' own Llama modules, skipping no_op sublayers (independent of models/)."""
    raw = json.loads((folder / "config.json").read_text())
    from safetensors.torch import load_file

    w = load_file(str(folder / "model.safetensors"))
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    common = dict(
        vocab_size=raw["vocab_size"], hidden_size=hidden, num_attention_heads=heads, rms_norm_eps=raw["rms_norm_eps"],
        rope_parameters={"rope_theta": raw["rope_theta"], **raw["rope_scaling"]}, attn_implementation="eager",
    )

    def norm(name):
        module = LlamaRMSNorm(hidden, eps=raw["rms_norm_eps"])
        module.load_state_dict({"weight": w[name]})
        return module

    s = ids.shape[1]
    x = F.embedding(ids, w["model.embed_tokens.weight"])
    cos_sin = LlamaRotaryEmbedding(LlamaConfig(**common))(x, torch.arange(s)[None])
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    for i, ((group, mult, width), block) in enumerate(zip(NEMOTRON_BLOCKS, raw["block_configs"])):
        p = f"model.layers.{i}"
        if not block["attention"]["no_op"]:
            attn = LlamaAttention(LlamaConfig(**common, num_key_value_heads=heads // group), i)
            attn.load_state_dict({f"{n}_proj.weight": w[f"{p}.self_attn.{n}_proj.weight"] for n in "qkvo"})
            x = x + attn(norm(f"{p}.input_layernorm.weight")(x), cos_sin, mask)[0]
        if not block["ffn"]["no_op"]:
            mlp = LlamaMLP(LlamaConfig(**common, intermediate_size=width))
            mlp.load_state_dict({f"{n}_proj.weight": w[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
            x = x + mlp(norm(f"{p}.post_attention_layernorm.weight")(x))
    return norm("model.norm.weight")(x) @ w["lm_head.weight"].T


def test_nemotron_nas_folder(tmp_path):
    folder = write_nemotron_folder(tmp_path / "nemo")
    model = load_model(str(folder))
    cfg = model.config
    assert cfg.ffn_widths == [width for _, _, width in NEMOTRON_BLOCKS]
    assert cfg.attention_free_layers == [1, 2, 3]
    assert [cfg.kv_heads(i) for i in (0, 4, 5)] == [3, 2, 6]
    assert not hasattr(model.layers[1], "attn") and not hasattr(model.layers[4], "ffn")
    ids = random_ids(96)
    with torch.no_grad():
        assert rel_err(model(ids), nemotron_reference(folder, ids)) < 1e-5


@pytest.mark.parametrize("preset", ["puzzle-small", "llama-tiny"])
def test_checkpoint_round_trip(tmp_path, preset):
    model, config = build_preset(preset)
    save_checkpoint(model, tmp_path)
    expected_type = "llama" if preset == "llama-tiny" else "nemotron-nas"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == expected_type
    loaded = load_model(str(tmp_path))
    assert loaded.config == config
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_presets_structure_and_determinism():
    model, config = build_preset("puzzle-tiny")
    assert config.attention_free_layers == [2, 3, 4, 5, 6, 9, 10, 11]
    assert config.ffn_widths == [256, 192, 128, 256, 64, 192, 320, None, 256, 128, 192, 256]
    again, _ = build_preset("puzzle-tiny")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    for name in PRESETS:
        if name == "smollm2-shape":   # a latency stand-in: tied N(0, 1) embeddings give logits of std ~ sqrt(576)
            continue
        model, config = build_preset(name)
        with torch.no_grad():
            logits = model(random_ids(config.vocab_size, (2, 16)))
        assert torch.isfinite(logits).all()
        assert 0.1 < logits.std().item() < 10, f"{name}: activations should stay O(1)"
    assert build_preset("puzzle-tiny", torch.float16)[0].embed_tokens.weight.dtype == torch.float16


def test_rmsnorm_gain_matters():
    """The norm gains are not all 1, so a fusion that drops or misplaces them would show."""
    model, _ = build_preset("puzzle-tiny")
    gains = model.layers[3].ffn_norm.weight
    assert 0.01 < (gains - 1).abs().mean().item() < 0.5


# ---------------------------------------------------------------- SmolLM2 (real trained model)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def test_smollm2_matches_transformers_gguf_loader(smollm2, tokenizer):
    gguf = smollm2_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tokenizer(pydoc_data.topics.topics["assert"], return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        assert rel_err(smollm2(ids), reference(ids).logits) < 1e-5


def test_smollm2_greedy_paris(smollm2, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(2):
            ids = torch.cat([ids, smollm2(ids)[:, -1:].argmax(-1)], dim=1)
    assert tokenizer.decode(ids[0]).startswith("The capital of France is Paris")


# ---------------------------------------------------------------- bad inputs


def write_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def junk_file(path: Path) -> Path:
    path.write_bytes(b"GGML junk, not a GGUF header")
    return path


def corrupt_folder(folder: Path) -> Path:
    hf_llama().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return folder


def edited_config(folder: Path, **changes) -> Path:
    hf_llama().save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


BAD_SOURCES = {  # name -> (build(tmp_path) -> source, words the one-line message must contain)
    "unknown-preset": (lambda tmp: "puzzle-huge", ["puzzle-huge", "puzzle-tiny", "llama-tiny"]),
    "missing-folder": (lambda tmp: str(tmp / "nowhere"), ["nowhere"]),
    "corrupt-safetensors": (lambda tmp: str(corrupt_folder(tmp / "c")), ["model.safetensors"]),
    "replace-with-linear": (
        lambda tmp: str(write_nemotron_folder(tmp / "n", **{"ffn.replace_with_linear": True})),
        ["block_configs[0].ffn.replace_with_linear"],
    ),
    "window-length": (
        lambda tmp: str(write_nemotron_folder(tmp / "n", **{"attention.window_length": 512})),
        ["block_configs[0].attention.window_length"],
    ),
    "rope-yarn": (
        lambda tmp: str(edited_config(tmp / "y", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})),
        ["rope_parameters.rope_type", "yarn"],
    ),
    "gelu": (lambda tmp: str(edited_config(tmp / "g", hidden_act="gelu")), ["hidden_act", "gelu"]),
    "model-type": (lambda tmp: str(edited_config(tmp / "m", model_type="mistral")), ["model_type", "mistral"]),
    "gguf-gpt2": (lambda tmp: str(write_gguf(tmp / "gpt2.gguf", "gpt2")), ["architecture", "gpt2"]),
    "gguf-incomplete": (lambda tmp: str(write_gguf(tmp / "l.gguf", "llama")), ["llama.embedding_length", "missing"]),
    "not-gguf": (lambda tmp: str(junk_file(tmp / "x.gguf")), ["x.gguf", "not a readable GGUF"]),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_raises_user_error(tmp_path, case):
    build, words = BAD_SOURCES[case]
    with pytest.raises(UserError) as info:
        load_model(build(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file

    hf_llama().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing weight tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(tmp_path))


def run_export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporters.export", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("case", ["unknown-preset", "corrupt-safetensors", "gguf-gpt2"])
def test_cli_bad_source_exits_2_with_one_line(tmp_path, case):
    build, words = BAD_SOURCES[case]
    result = run_export_cli(build(tmp_path), "-o", str(tmp_path / "out.onnx"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_cli_refuses_to_overwrite_its_input(tmp_path):
    gguf_file = write_gguf(tmp_path / "model.gguf", "llama")
    before = gguf_file.read_bytes()
    result = run_export_cli(str(gguf_file), "-o", str(gguf_file))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "overwrite" in result.stderr
    assert gguf_file.read_bytes() == before
