"""The torch form of drop + fuse (models.fused) against the ONNX passes, nemotron-nas checkpoints of fused models
(padded widths, engines' ffn_mult rule), and a few healing steps on CPU (models.heal)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from exporters.export import export_onnx
from models.checkpoint import engine_width, save_checkpoint, tp_constraints
from models.fused import drop_and_fuse
from models.heal import HealConfig, parse_config, run_heal
from models.heal import main as heal_main
from models.loaders import load_model
from models.presets import build_preset
from passes.drop_attention import main as drop_main
from passes.ffn.match import match_ffn_blocks
from passes.fuse import main as fuse_main
from passes.support.errors import UserError
from tests.helpers import random_ids, rel_err, session

# puzzle-tiny: attention in layers 0, 1, 7, 8; no FFN in layer 7, so FFN ordinals 7, 8, 9 are layers 8, 9, 10.
DROP, GROUPS = [1, 8], [(1, 3), (7, 9)]


@pytest.fixture(scope="module")
def teacher():
    return build_preset("puzzle-tiny")[0]


def test_drop_and_fuse_matches_the_onnx_passes(tmp_path, teacher):
    export_onnx(teacher, tmp_path / "m.onnx")
    assert drop_main([str(tmp_path / "m.onnx"), "--layers", "1,8", "-o", str(tmp_path / "d.onnx")]) == 0
    assert fuse_main([str(tmp_path / "d.onnx"), "--groups", "1-3,7-9", "-o", str(tmp_path / "f.onnx")]) == 0
    student = drop_and_fuse(teacher, DROP, GROUPS)
    ids = random_ids(teacher.config.vocab_size)
    onnx_logits = session(tmp_path / "f.onnx").run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        assert rel_err(student(ids), onnx_logits) < 1e-5
        assert rel_err(student(ids), teacher(ids)) > 1e-3      # the fusion is an approximation: it changes logits
    widths = [s.ffn_width for s in student.config.layers]
    assert widths == [256, None, None, 576, 64, 192, 320, None, None, None, 576, 256]
    assert [s.attention for s in student.config.layers] == [True] + [False] * 6 + [True] + [False] * 4


@pytest.mark.parametrize("drop, groups, message", [
    ([2], [], "layer 2 has no attention"),
    ([], [(6, 8)], "not one chain"),                  # layer 8's attention sits inside the group
    ([1, 8], [(1, 3), (3, 4)], "overlaps"),
    ([], [(9, 11)], "out of range"),
])
def test_drop_and_fuse_refuses(teacher, drop, groups, message):
    with pytest.raises(UserError, match=message):
        drop_and_fuse(teacher, drop, groups)


def test_fused_checkpoint_is_padded_for_the_engines_and_reads_back(tmp_path, teacher):
    student = drop_and_fuse(teacher, DROP, GROUPS)
    folder = save_checkpoint(student, tmp_path / "ckpt", layout="nemotron-nas")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False] + [True] * 6 + [False] + [True] * 4
    assert [b["ffn"]["no_op"] for b in blocks] == [w is None for w in (s.ffn_width for s in student.config.layers)]
    hidden = config["hidden_size"]
    derived = [engine_width(b["ffn"]["ffn_mult"], hidden) for b in blocks if not b["ffn"]["no_op"]]
    assert derived == [256, 768, 256, 256, 512, 768, 256]        # widths rounded up to multiples of 256
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        gate = f.get_tensor("model.layers.10.mlp.gate_proj.weight")
        down = f.get_tensor("model.layers.10.mlp.down_proj.weight")
        assert "model.layers.9.mlp.gate_proj.weight" not in f.keys()
        assert "model.layers.8.self_attn.q_proj.weight" not in f.keys()
    assert gate.shape == (768, hidden) and down.shape == (hidden, 768)
    assert not gate[576:].any() and not down[:, 576:].any()
    torch.testing.assert_close(gate[:576], student.layers[10].ffn.gate_proj.weight, rtol=0, atol=0)

    loaded = load_model(str(folder))
    assert [s.ffn_width for s in loaded.config.layers] == [256, None, None, 768, 256, 256, 512, None, None, None, 768, 256]
    ids = random_ids(teacher.config.vocab_size)
    with torch.no_grad():
        assert rel_err(loaded(ids), student(ids)) < 1e-6
    # the exported ONNX of the fused model holds each fused FFN as one block: nothing left to fuse inside it
    export_onnx(loaded, tmp_path / "fused.onnx")
    blocks_found = match_ffn_blocks(onnx.load(str(tmp_path / "fused.onnx"))).blocks
    assert [b.width for b in blocks_found] == [256, 768, 256, 256, 512, 768, 256]
    assert tp_constraints(loaded.config)[2] == []


def heal_args(out, *extra):
    return ["puzzle-tiny", "-o", str(out), "--drop", "1,8", "--fuse", "1-3,7-9", "--batch", "8", "--seq", "64",
            "--pool", "64", "--eval-tokens", "512", "--eval-every", "10", "--warmup", "5", "--lr", "1e-3",
            "--save-every", "0", *extra]


def heal_config(out, **extra) -> HealConfig:
    """heal_args as a HealConfig (the library's call)."""
    settings = dict(drop="1,8", fuse="1-3,7-9", batch=8, seq=64, pool=64, eval_tokens=512, eval_every=10, warmup=5,
                    lr=1e-3, save_every=0)
    return HealConfig("puzzle-tiny", out, **{**settings, **extra})


def test_heal_config_has_the_cli_defaults(tmp_path):
    assert parse_config(["puzzle-tiny", "-o", "X"]) == HealConfig("puzzle-tiny", "X")
    assert parse_config(heal_args(tmp_path / "h", "--steps", "3", "--text", "a", "b", "--no-bf16")) == \
        heal_config(str(tmp_path / "h"), steps=3, text=("a", "b"), bf16=False)


def test_heal_few_steps_on_cpu(tmp_path):
    out, report = tmp_path / "healed", tmp_path / "heal.json"
    assert heal_main(heal_args(out, "--steps", "30", "--hidden-weight", "0.1", "--report", str(report),
                               "--keep-state")) == 0
    export_onnx(load_model(str(out)), tmp_path / "healed.onnx", "fp32")    # the healed folder's ONNX (exporters)
    record = json.loads(report.read_text())
    curve = record["curve"]
    assert [c["step"] for c in curve] == [0, 10, 20, 30]
    assert curve[-1]["kl"] < 0.8 * curve[0]["kl"]                 # healing moves the student toward the teacher
    assert curve[-1]["top1"] >= curve[0]["top1"]
    assert record["tokens"] == 30 * 8 * 64

    healed = load_model(str(out))
    ids = random_ids(healed.config.vocab_size)
    onnx_logits = session(tmp_path / "healed.onnx").run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        logits = healed(ids)
    assert rel_err(logits, onnx_logits) < 1e-5
    student = drop_and_fuse(build_preset("puzzle-tiny")[0], DROP, GROUPS)   # the kept state's trained weights,
    saved = {"model": student.state_dict()}                                    # before padding
    dcp.load(saved, checkpoint_id=f"{out}.state/checkpoint")
    student.load_state_dict(saved["model"])
    with torch.no_grad():
        assert rel_err(logits, student(ids)) < 1e-6

    # an interrupted run (no output yet) resumes from its state: the curve goes on; a clean finish removes the state
    shutil.rmtree(out)
    assert heal_main(heal_args(out, "--steps", "40", "--resume", "--report", str(report))) == 0
    curve = json.loads(report.read_text())["curve"]
    assert [c["step"] for c in curve] == [0, 10, 20, 30, 40]
    assert not Path(f"{out}.state").exists()


def test_run_heal_as_a_library(tmp_path):
    result = run_heal(heal_config(tmp_path / "healed", steps=2, eval_every=1))
    assert result.output == tmp_path / "healed" and (result.output / "config.json").is_file()
    assert result.state == tmp_path / "healed.state" and not result.state.exists()     # removed after a clean finish
    assert [c["step"] for c in result.record["curve"]] == [0, 1, 2] and result.after == result.record["curve"][-1]
    assert result.before["step"] == 0 and result.teacher_perplexity > 1
    ids = random_ids(result.student.config.vocab_size)
    with torch.no_grad():      # the returned student is the healed model (unpadded), the folder its padded form
        assert rel_err(load_model(str(result.output))(ids), result.student(ids)) < 1e-6
    assert [s.ffn_width for s in result.student.config.layers] == [256, None, None, 576, 64, 192, 320, None, None, None,
                                                                   576, 256]


@pytest.mark.parametrize("args, message", [
    (["puzzle-tiny", "-o", "X", "--steps", "1"], "give --drop and/or --fuse"),
    (["puzzle-tiny", "-o", "X", "--drop", "1"], "give --minutes or --steps"),
    (["puzzle-tiny", "-o", "X", "--drop", "2", "--steps", "1"], "layer 2 has no attention"),
    (["puzzle-tiny", "-o", "X", "--fuse", "6-8", "--steps", "1"], "not one chain"),
    (["puzzle-tiny", "-o", "X", "--drop", "x", "--steps", "1"], "--drop"),
])
def test_heal_bad_input_exits_2_with_one_line(tmp_path, args, message):
    import subprocess
    import sys
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "models.heal", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not np.any([p.name.endswith(".state") for p in tmp_path.iterdir()])


def test_fuse_reads_gains_that_torch_onnx_deduplicated(tmp_path, teacher):
    """torch.onnx stores equal initializers once and feeds the others through Identity: blocks whose norm gains
    are equal are still found and fused exactly."""
    model = build_preset("puzzle-tiny")[0]
    with torch.no_grad():
        for i in (2, 3, 4):
            model.layers[i].ffn_norm.weight.copy_(model.layers[1].ffn_norm.weight)
    export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.op_type == "Identity" for n in graph.graph.node) >= 3
    assert len(match_ffn_blocks(graph).blocks) == 11
    assert fuse_main([str(tmp_path / "m.onnx"), "--groups", "2-5", "-o", str(tmp_path / "f.onnx")]) == 0
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        want = drop_and_fuse(model, [], [(2, 5)])(ids)
    assert rel_err(session(tmp_path / "f.onnx").run(None, {"input_ids": ids.numpy()})[0], want) < 1e-5
