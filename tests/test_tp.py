"""bench.tp: Megatron-sharded sequential FFN chain vs the fused FFN, checked on CPU.

The in-process tests check the sharding and fusion math without processes (ranks simulated by summing their
partial outputs); the subprocess tests run the benchmark itself with 2 gloo ranks (and with 1) on the tiny shape,
as the GPU run does with NCCL, and check its numerical verdict and its JSON and PNG, written to a temporary folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import tp_model as tp

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _blocks(d, m, k, dtype=torch.float32):
    return [tp.block_weights(d, m, i, seed=3, dtype=dtype, device=CPU) for i in range(k)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_seq_and_fused_match_references(world):
    d, m, k, t = 32, 64, 3, 5
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(0))
    blocks = _blocks(d, m, k)
    ref = tp.Reference(x)
    for block in blocks:
        ref.add(block)
    deltas = ref.deltas(t)
    shards = [[tp.shard(block, r, world) for block in blocks] for r in range(world)]
    y = x                                                    # the chain; summing the ranks' partials = all-reduce
    for i in range(k):
        y = y + sum(tp.ffn_partial(tp.rms_hat(y) * shards[r][i][0], shards[r][i][1], shards[r][i][2], False)
                    for r in range(world))
    fused = [tp.fuse_shards(iter(shards[r]), k) for r in range(world)]
    assert fused[0][0].shape == (2 * k * m // world, d) and fused[0][1].shape == (d, k * m // world)
    for split in (False, True):
        yf = x + sum(tp.ffn_partial(tp.rms_hat(x), w1, w2, split) for w1, w2 in fused)
        assert tp.rel_err(yf, x, deltas["fused"], ffn_only=True) < 1e-5
        assert tp.rel_err(yf, x, deltas["par"], ffn_only=True) < 1e-5
    assert tp.rel_err(y, x, deltas["seq"], ffn_only=True) < 1e-5


def test_check_detects_wrong_fusion():
    """The references tell apart the chain from the fused FFN, and a fusion that forgets the norm gains."""
    d, m, k, t = 32, 64, 3, 5
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(1))
    blocks = _blocks(d, m, k)
    ref = tp.Reference(x)
    for block in blocks:
        ref.add(block)
    deltas = ref.deltas(t)
    assert tp.rel_err(ref.seq, x, deltas["par"]) > 0.1
    w1, w2 = tp.fuse_shards(((torch.ones(d), b1, b2) for _, b1, b2 in (tp.shard(b, 0, 1) for b in blocks)), k)
    assert tp.rel_err(x + tp.ffn_partial(tp.rms_hat(x), w1, w2, False), x, deltas["fused"]) > 0.02


def test_weights_do_not_depend_on_world_size():
    full = tp.block_weights(16, 32, 1, seed=0, dtype=torch.float32, device=CPU)
    halves = [tp.shard(full, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h[2] for h in halves], dim=1), full[3])
    assert torch.equal(torch.cat([h[1][:16] for h in halves]), full[1])
    assert torch.equal(tp.block_weights(16, 32, 1, seed=0, dtype=torch.float32, device=CPU)[1], full[1])


def _run(tmp_path, *extra):
    name = "tp_pytest"
    cmd = [sys.executable, "-m", "bench.tp", "--backend", "gloo", "--device", "cpu", "--shapes", "tiny",
           "--iters", "3", "--warmup", "1", "--out", str(tmp_path), "--name", name, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not (ROOT / "bench" / "results" / f"{name}.json").exists(), "wrote into the package's bench/results"
    return proc.stdout, json.loads((tmp_path / f"{name}.json").read_text())


def test_bench_two_gloo_ranks(tmp_path):
    out, data = _run(tmp_path, "--world-size", "2")
    rows = data["rows"]
    assert data["complete"] and data["checks_passed"] and data["world_size"] == 2
    assert {(r["k"], r["tokens"]) for r in rows} == {(k, t) for k in (2, 4, 8) for t in (1, 8, 32, 128)}
    for r in rows:
        assert r["check_passed"] and r["world"] == 2 and r["m_per_rank"] == 64 and r["dtype"] == "fp32"
        assert max(r["rel_err"].values()) < 1e-4 and max(r["rel_err_ffn_only"].values()) < 1e-4
        for step in ("seq", "fused"):
            assert all(r[step][key] > 0 for key in ("gemm_us", "allreduce_us", "total_us"))
        assert r["speedup"] > 0 and r["gemm_speedup"] > 0
    assert "numerical check" in out and "passed" in out and "speedup" in out
    assert (tmp_path / "tp_pytest.png").stat().st_size > 0
    assert data["environment"]["command"].startswith("python -m bench.tp")


def test_bench_one_rank_in_process(tmp_path):
    _, data = _run(tmp_path, "--world-size", "1", "--k", "2", "--tokens", "1,4", "--split-gate-up")
    assert data["checks_passed"] and [r["world"] for r in data["rows"]] == [1, 1]
    assert all(r["split_gate_up"] for r in data["rows"])
