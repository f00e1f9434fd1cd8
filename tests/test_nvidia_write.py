"""nemotron-nas folders the serving engines load (issue 22): written from an NVIDIA-shaped folder (tests.nvidia_folder)
they keep the source's settings, block keys and dtype, ship the configuration code AutoConfig(trust_remote_code=True)
runs (block_configs answered as attributes, as vLLM, SGLang and TensorRT-LLM read them), hold no tensor for a no_op
sub-block and widths the engines' ffn_mult rule gives; folders 0777 and files 0666 less the umask; --drop / --fuse
without training as models.fused.drop_and_fuse; healing writes the source's dtype and keys."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exporters.export import main as export_main
from models.checkpoint import CONFIG_CODE, engine_width, save_checkpoint
from models.fused import drop_and_fuse
from models.heal import HealConfig, run_heal
from models.loaders import load_model
from models.presets import build_preset
from passes.support.errors import UserError
from passes.support.outputs import staged_folder
from tests.helpers import random_ids, rel_err, session
from tests.nvidia_folder import BOS, EOS, write_nvidia_folder

REPO = Path(__file__).resolve().parents[1]
# tests.test_models.NEMOTRON_BLOCKS: attention in layers 0, 4, 5; FFN ordinals 0-3 are layers 0-3, ordinal 4 is layer 5.
# Dropping attention in 4-5 makes ordinals 2-4 (layers 2-5) one chain; 0-1 is one already (layer 1 has no attention).
DROP, FUSE = "4-5", "0-1,2-4"


@pytest.fixture(scope="module")
def nvidia(tmp_path_factory) -> Path:
    return write_nvidia_folder(tmp_path_factory.mktemp("nvidia") / "nemotron-super")


def export(*args) -> None:
    assert export_main([str(a) for a in args]) == 0


def tensors(folder: Path) -> dict[str, tuple[list[int], str]]:
    """Every tensor of the folder's safetensors: name -> (shape, dtype as stored)."""
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                out[name] = (list(piece.get_shape()), piece.get_dtype())
    return out


AUTOCONFIG = """
import json, sys
import transformers
config = transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
blocks = [{"attention": {k: getattr(b.attention, k) for k in ("no_op", "n_heads_in_group", "replace_with_linear",
                                                               "sparsify", "num_sink_tokens", "window_length",
                                                               "unshifted_sink")},
           "ffn": {k: getattr(b.ffn, k) for k in ("no_op", "ffn_mult", "replace_with_linear", "sparsify")}}
          for b in config.block_configs]
print(json.dumps({"class": type(config).__name__, "model_type": config.model_type, "blocks": blocks,
                  "to_dict": config.to_dict()["block_configs"],
                  "max_position_embeddings": config.max_position_embeddings, "eos": config.eos_token_id,
                  "bos": config.bos_token_id, "hidden_size": config.hidden_size}))
"""


def auto_config(folder: Path, tmp_path: Path) -> dict:
    """What transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True) makes of the folder, in a fresh
    isolated interpreter (python -I: no PYTHONPATH, not this repository) with its own module cache."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", AUTOCONFIG, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_export_keeps_the_source_and_loads_with_its_configuration_code(nvidia, tmp_path):
    out = tmp_path / "nas"
    export(nvidia, "-o", out, "--runtime", "nemotron-nas")
    source = json.loads((nvidia / "config.json").read_text())
    raw = json.loads((out / "config.json").read_text())
    assert raw["max_position_embeddings"] == 131072 and raw["rope_scaling"] == source["rope_scaling"]
    assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == source["rope_theta"]
    assert raw["torch_dtype"] == "bfloat16" and raw["bos_token_id"] == BOS and raw["eos_token_id"] == EOS == [2, 3]
    assert raw["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}   # no modeling file is shipped
    assert raw["block_configs"] == source["block_configs"]        # nothing changed: every block key as it was
    assert (out / CONFIG_CODE).read_text() == (REPO / "models" / "decilm_configuration.py").read_text()
    assert not (out / "modeling_decilm.py").exists()

    stored = tensors(out)
    assert {dtype for _, dtype in stored.values()} == {"BF16"}
    hidden = raw["hidden_size"]
    for i, block in enumerate(raw["block_configs"]):
        layer = {name: shape for name, (shape, _) in stored.items() if name.startswith(f"model.layers.{i}.")}
        attention = {n for n in layer if ".self_attn." in n or n.endswith("input_layernorm.weight")}
        ffn = {n for n in layer if ".mlp." in n or n.endswith("post_attention_layernorm.weight")}
        assert (not attention) == block["attention"]["no_op"] and (not ffn) == block["ffn"]["no_op"], i
        if not block["ffn"]["no_op"]:
            width = engine_width(block["ffn"]["ffn_mult"], hidden)     # the engines' rule: ceil_256(int(2 m d / 3))
            assert layer[f"model.layers.{i}.mlp.gate_proj.weight"] == [width, hidden]
            assert layer[f"model.layers.{i}.mlp.down_proj.weight"] == [hidden, width]
        if not block["attention"]["no_op"]:
            kv = raw["num_attention_heads"] // block["attention"]["n_heads_in_group"]
            assert layer[f"model.layers.{i}.self_attn.k_proj.weight"] == [kv * raw["head_dim"], hidden]

    loaded = auto_config(out, tmp_path)          # our code, from the folder: what vLLM calls first
    assert loaded["class"] == "DeciLMConfig" and loaded["model_type"] == "nemotron-nas"
    assert loaded["blocks"] == raw["block_configs"]               # attributes with the values of config.json
    for written, back in zip(raw["block_configs"], loaded["to_dict"]):  # to_dict(): plain dicts, every key kept
        for part in ("attention", "ffn"):
            assert written[part].items() <= back[part].items()
    assert loaded["max_position_embeddings"] == 131072 and loaded["eos"] == EOS and loaded["bos"] == BOS
    assert torch.equal(load_model(str(out)).embed_tokens.weight, load_model(str(nvidia)).embed_tokens.weight)


def test_the_configuration_code_imports_nothing_of_this_project():
    tree = ast.parse((REPO / "models" / "decilm_configuration.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= {"__future__", "copy", "dataclasses", "transformers"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_folders_and_files_get_the_umask_default(tmp_path, umask):
    previous = os.umask(umask)
    try:
        export("puzzle-tiny", "-o", tmp_path / "nas", "--runtime", "nemotron-nas")
        with staged_folder(tmp_path / "staged") as stage:
            (stage / "f.txt").write_text("x")
    finally:
        os.umask(previous)
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert (folder_mode, file_mode) == ((0o755, 0o644) if umask == 0o022 else (0o750, 0o640))
    for folder in (tmp_path / "nas", tmp_path / "staged"):
        assert (folder.stat().st_mode & 0o777) == folder_mode, folder
    files = list((tmp_path / "nas").iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", CONFIG_CODE}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: file_mode for p in files}
    raw = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert raw["torch_dtype"] == "float32" and raw["max_position_embeddings"] == 8192    # a preset: fp32, 8192


def test_drop_and_fuse_without_training_is_models_fused(nvidia, tmp_path):
    out = tmp_path / "fused"
    export(nvidia, "-o", out, "--runtime", "nemotron-nas", "--drop", DROP, "--fuse", FUSE)
    assert {dtype for _, dtype in tensors(out).values()} == {"BF16"}              # bf16 in, bf16 out
    expected = drop_and_fuse(load_model(str(nvidia), torch.bfloat16), [4, 5], [(0, 1), (2, 4)]).float()
    written = load_model(str(out))
    ids = random_ids(written.config.vocab_size)
    with torch.no_grad():
        assert rel_err(written(ids), expected(ids)) < 1e-5

    source = json.loads((nvidia / "config.json").read_text())["block_configs"]
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, True, True, True, True]
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [None, 8.0, None, None, None, 10.0]   # widths 1024 and 1280
    assert [engine_width(b["ffn"]["ffn_mult"], 192) for b in blocks if not b["ffn"]["no_op"]] == [1024, 1280]
    assert blocks[0]["attention"] == source[0]["attention"]                      # kept as it was
    assert blocks[5]["attention"] == {**source[5]["attention"], "no_op": True, "n_heads_in_group": None}
    assert blocks[0]["ffn"] == {**source[0]["ffn"], "no_op": True, "ffn_mult": None}
    assert blocks[3]["ffn"] == {**source[3]["ffn"], "no_op": True, "ffn_mult": None}
    assert blocks[1]["attention"] == source[1]["attention"] and blocks[1]["ffn"] == {**source[1]["ffn"], "ffn_mult": 8.0}

    onnx_out = tmp_path / "fused.onnx"      # --runtime onnx takes --drop / --fuse too (the same model, exported)
    export(nvidia, "-o", onnx_out, "--drop", DROP, "--fuse", FUSE)
    logits = session(onnx_out).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        assert rel_err(logits, drop_and_fuse(load_model(str(nvidia)), [4, 5], [(0, 1), (2, 4)])(ids)) < 1e-5


def test_fuse_paper_is_the_paper_rule_of_passes_fuse_on_the_exported_graph(nvidia, tmp_path):
    """--fuse paper picks the groups passes.fuse --plan paper picks on the dropped model's ONNX graph (found there by
    the graph matcher, an independent reading of the chains), and writes what --fuse with those groups writes."""
    from passes.fuse import main as fuse_main
    export(nvidia, "-o", tmp_path / "dropped.onnx", "--drop", DROP)
    report = tmp_path / "report.json"
    assert fuse_main([str(tmp_path / "dropped.onnx"), "-o", str(tmp_path / "fused.onnx"), "--plan", "paper",
                      "--report", str(report)]) == 0
    groups = json.loads(report.read_text())["groups"]
    assert groups == [[0, 3]]            # after the drop, ordinals 0-4 are one chain: all but its last block
    export(nvidia, "-o", tmp_path / "paper", "--runtime", "nemotron-nas", "--drop", DROP, "--fuse", "paper")
    export(nvidia, "-o", tmp_path / "explicit", "--runtime", "nemotron-nas", "--drop", DROP,
           "--fuse", ",".join(f"{a}-{z}" for a, z in groups))
    config = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("paper", "explicit")]
    assert config[0] == config[1]
    paper, explicit = load_model(str(tmp_path / "paper")), load_model(str(tmp_path / "explicit"))
    for (name, a), (_, b) in zip(paper.state_dict().items(), explicit.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("extra, message", [
    (["--runtime", "genai", "--drop", "4"], "--drop and --fuse are for --runtime onnx and nemotron-nas"),
    (["--runtime", "nemotron-nas", "--drop", "4-x"], "--drop"),
    (["--runtime", "nemotron-nas", "--drop", "3"], "layer 3 has no attention"),
])
def test_drop_and_fuse_refusals(nvidia, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        export_main([str(nvidia), "-o", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_explicit_dtype_overrides_the_source_dtype(nvidia, tmp_path):
    export(nvidia, "-o", tmp_path / "fp32", "--runtime", "nemotron-nas", "--dtype", "fp32")
    assert {dtype for _, dtype in tensors(tmp_path / "fp32").values()} == {"F32"}
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_heal_writes_the_source_dtype_and_keys(nvidia, tmp_path):
    result = run_heal(HealConfig(str(nvidia), tmp_path / "healed", drop=DROP, fuse="2-4", steps=2, batch=4, seq=32,
                                 pool=8, eval_tokens=64, eval_every=1, warmup=1, save_every=0, device="cpu"))
    source = json.loads((nvidia / "config.json").read_text())
    raw = json.loads((result.output / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and {d for _, d in tensors(result.output).values()} == {"BF16"}
    for key in ("max_position_embeddings", "rope_scaling", "rope_theta", "bos_token_id", "eos_token_id"):
        assert raw[key] == source[key], key
    assert raw["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"} and (result.output / CONFIG_CODE).is_file()
    blocks = raw["block_configs"]
    assert blocks[:2] == source["block_configs"][:2]                                # untouched layers as they were
    assert blocks[5]["attention"] == {**source["block_configs"][5]["attention"], "no_op": True, "n_heads_in_group": None}
    assert blocks[5]["ffn"]["ffn_mult"] == 10.0 and blocks[5]["ffn"]["sparsify"] is None
    student = result.student.to(torch.bfloat16).float()          # the trained weights, stored in bf16
    ids = random_ids(student.config.vocab_size)
    with torch.no_grad():
        assert rel_err(load_model(str(result.output))(ids), student(ids)) < 1e-5


def test_preset_checkpoint_without_a_source_is_unchanged_in_form(tmp_path):
    """save_checkpoint without a source: the model's dtype, DEFAULT_CONTEXT, a llama layout when homogeneous."""
    model, _ = build_preset("llama-tiny")
    raw = json.loads((save_checkpoint(model.to(torch.float16), tmp_path / "llama") / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["torch_dtype"] == "float16" and "auto_map" not in raw
    assert not (tmp_path / "llama" / CONFIG_CODE).exists()
