"""Sharded healing (models.heal under torchrun: FSDP2 over gloo on the CPU) against the plain process, its sharded
resumable state, and the CPU defaults (a pool sized by --steps, the state removed after a clean finish)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from models.fused import PAPER, drop_and_fuse
from models.heal import HealConfig, check_config, pool_size, run_heal
from models.loaders import load_model
from models.presets import build_preset
from passes.support.errors import UserError
from tests.helpers import random_ids, rel_err
from tests.test_heal import DROP, GROUPS, heal_args, heal_config

# every run: 2 local steps, a pool of 2 chunks (1 per process), loss and held-out evaluation at every step
SETTINGS = dict(eval_every=1, local_steps=2, pool=32, sample_batch=16, device="cpu")
FLAGS = ["--eval-every", "1", "--local-steps", "2", "--pool", "32", "--sample-batch", "16", "--device", "cpu"]


def torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           "--standalone", "-m", "models.heal", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def close(a: float, b: float, tolerance: float = 1e-3) -> bool:
    return abs(a - b) <= tolerance * abs(b)


def test_two_processes_heal_as_one(tmp_path):
    """2 processes (student and teacher sharded, activation checkpointing) with the same global batch and seed:
    the same losses, local distillation and held-out curve as one process (steps 1-4 are all warm-up, so a 4-step
    run follows a 5-step one); the folder holds the sharded state's weights; one process resumes that state to
    step 5 and ends where a straight 5-step run does, to the same model."""
    one = run_heal(heal_config(tmp_path / "one", steps=5, **SETTINGS))
    out, report = tmp_path / "two", tmp_path / "two.json"
    done = torchrun(2, *heal_args(out, "--steps", "4", "--report", report, "--keep-state", "--shard-teacher",
                                  "--checkpoint-layers", *FLAGS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("healed puzzle-tiny") == 1 and "x 2 processes" in done.stdout   # the main process prints
    record = json.loads(report.read_text())
    assert record["processes"] == 2 and record["data"]["sampled"] == 32
    assert [c["step"] for c in record["curve"]] == list(range(5))
    for mine, theirs in zip(record["curve"][1:], one.record["curve"][1:5]):
        assert close(mine["loss"], theirs["loss"]) and close(mine["perplexity"], theirs["perplexity"]), (mine, theirs)
    for mine, theirs in zip(record["local"]["groups"], one.record["local"]["groups"], strict=True):
        assert close(mine["error_after"], theirs["error_after"])

    state = Path(f"{out}.state") / "checkpoint"
    assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    student = drop_and_fuse(build_preset("puzzle-tiny")[0], DROP, GROUPS)
    weights = {"model": student.state_dict()}
    dcp.load(weights, checkpoint_id=state)                  # the 2 shards read back in one process
    student.load_state_dict(weights["model"])
    ids = random_ids(student.config.vocab_size)
    with torch.no_grad():
        assert rel_err(load_model(str(out))(ids), student(ids)) < 1e-6

    shutil.rmtree(out)
    resumed = run_heal(heal_config(out, steps=5, resume=True, **SETTINGS))
    assert [c["step"] for c in resumed.record["curve"]] == list(range(6))
    assert close(resumed.record["curve"][-1]["loss"], one.record["curve"][-1]["loss"])
    assert resumed.record["local"] == record["local"] and not Path(f"{out}.state").exists()
    with torch.no_grad():
        assert rel_err(load_model(str(out))(ids), one.student(ids)) < 1e-4


def test_cpu_defaults(tmp_path):
    """The pool is what --steps read (at most 256 sequences on a CPU, 16384 on a GPU); the state goes away after a
    clean finish unless kept; --fuse paper names its groups in the record."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pool_size(HealConfig("t", "o", steps=3, batch=8), cpu) == 24
    assert pool_size(HealConfig("t", "o", steps=100, batch=64), cpu) == 256
    assert pool_size(HealConfig("t", "o", steps=100, batch=64), cuda) == 6400
    assert pool_size(HealConfig("t", "o", minutes=5), cuda) == 16384
    assert pool_size(HealConfig("t", "o", minutes=5, pool=10), cpu) == 10
    result = run_heal(heal_config(tmp_path / "h", steps=2, pool=None, keep_state=True, fuse="paper"))
    assert result.record["data"]["sampled"] == 16 and (result.state / "checkpoint" / "progress.json").is_file()
    assert result.record["groups"] == [[0, 5], [7, 9]]        # --fuse paper: the groups drop_and_fuse fused
    assert result.student.config == drop_and_fuse(build_preset("puzzle-tiny")[0], DROP, PAPER).config


@pytest.mark.parametrize("settings, message", [
    (dict(local_steps=3, fuse=None), "--local-steps trains the fused groups"),
    (dict(micro_batch=0), "--micro-batch must be at least 1"),
    (dict(temperature=0.0), "--temperature must be positive"),
    (dict(student_dtype="fp16"), "--student-dtype fp16"),
    (dict(shard_teacher=True), "--shard-teacher shards over the processes of torchrun"),
])
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        check_config(heal_config(tmp_path / "h", steps=1, **settings))


def test_a_batch_the_processes_cannot_split_is_refused(tmp_path, monkeypatch):
    """Under torchrun (its variables set) before any process group starts."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="--batch 7 must be a multiple of the 2 processes"):
        check_config(heal_config(tmp_path / "h", steps=1, batch=7))
    check_config(heal_config(tmp_path / "h", steps=1, batch=8, shard_teacher=True))
