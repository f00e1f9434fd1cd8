"""bench.tp's model and numerics: the pre-norm SwiGLU FFN chain and its fused form, Megatron shards of random
blocks that are the same for every world size, and the float32 references (see bench.tp for the math)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

EPS = 1e-5


# ----------------------------------------------------------------------------------------------- the model
def rms_hat(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps), computed in float32, returned in x's dtype (the RMSNorm without its gain)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def ffn_partial(n: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, split: bool) -> torch.Tensor:
    """This rank's partial FFN output w2 (silu(gate) * up): w1 = [gate rows; up rows] (2c x d), w2 (d x c)."""
    if split:
        c = w1.shape[0] // 2
        gate, up = F.linear(n, w1[:c]), F.linear(n, w1[c:])
    else:
        gate, up = F.linear(n, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def seq_step(x, blocks, allreduce: bool, split: bool):
    """The sequential chain on this rank: blocks = [(gain, w1, w2)], one all-reduce after each FFN."""
    for gain, w1, w2 in blocks:
        p = ffn_partial(rms_hat(x) * gain, w1, w2, split)
        if allreduce:
            dist.all_reduce(p)
        x = x + p
    return x


def fused_step(x, w1, w2, allreduce: bool, split: bool):
    """The fused FFN on this rank (gains folded into w1): one all-reduce."""
    p = ffn_partial(rms_hat(x), w1, w2, split)
    if allreduce:
        dist.all_reduce(p)
    return x + p


# ----------------------------------------------------------------------------------------------- weights
def block_weights(d: int, m: int, block: int, seed: int, dtype, device):
    """Unsharded block `block`: gain [d], gate [m, d], up [m, d], down [d, m]; the same on every rank and world size."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1000 + block)

    def randn(*size, scale):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).mul_(scale)

    gain = randn(d, scale=0.1).add_(1.0)
    gate, up = randn(m, d, scale=d ** -0.5), randn(m, d, scale=d ** -0.5)
    down = randn(d, m, scale=m ** -0.5)
    return gain, gate, up, down


def shard(block, rank: int, world: int):
    """Rank `rank`'s Megatron slice of an unsharded block: (gain, w1 = [gate rows; up rows] (2c x d), w2 (d x c))."""
    gain, gate, up, down = block
    c = gate.shape[0] // world
    rows = slice(rank * c, (rank + 1) * c)
    return gain, torch.cat([gate[rows], up[rows]]), down[:, rows].contiguous()


def fuse_shards(shards, k: int):
    """Fused shard from k blocks' shards (an iterable, consumed one block at a time): w1 = [gate_1 diag(g_1); ...;
    gate_k diag(g_k); up_1 diag(g_1); ...; up_k diag(g_k)] (2kc x d), w2 = [down_1 ... down_k] (d x kc)."""
    w1 = w2 = None
    count = 0
    for i, (gain, b1, b2) in enumerate(shards):
        c, d = b1.shape[0] // 2, b1.shape[1]
        if w1 is None:
            w1 = torch.empty(2 * k * c, d, dtype=b1.dtype, device=b1.device)
            w2 = torch.empty(d, k * c, dtype=b2.dtype, device=b2.device)
        torch.mul(b1[:c], gain, out=w1[i * c:(i + 1) * c])
        torch.mul(b1[c:], gain, out=w1[(k + i) * c:(k + i + 1) * c])
        w2[:, i * c:(i + 1) * c] = b2
        count += 1
    assert count == k, f"fuse_shards: {count} blocks, expected {k}"
    return w1, w2


class Reference:
    """Float32, unsharded references on inputs x [T, d], updated block by block as the blocks are drawn:
    seq (the chain), par (x + sum_i FFN_i(x), original norms) and fused (the fused FFN on gain-folded weights)."""

    def __init__(self, x: torch.Tensor):
        self.x = x.float()
        self.seq = self.x.clone()
        self.par_sum = torch.zeros_like(self.x)
        self.fused_sum = torch.zeros_like(self.x)

    @staticmethod
    def _hat(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    def add(self, block):
        gain, gate, up, down = block
        g, xh, t = gain.float(), self._hat(self.x), self.x.shape[0]
        inp = torch.cat([self._hat(self.seq) * g, xh * g])             # rows: seq chain, parallel form

        def both(w):   # the original and the gain-folded weight (folded in the weights' dtype, as fuse_shards does)
            plain = F.linear(inp, w.float())
            folded = F.linear(xh, torch.mul(w, gain).float())
            return plain, folded

        (hg, hgf), (hu, huf) = both(gate), both(up)
        d32 = down.float()
        out = F.linear(F.silu(hg) * hu, d32)
        self.seq += out[:t]
        self.par_sum += out[t:]
        self.fused_sum += F.linear(F.silu(hgf) * huf, d32)

    def deltas(self, t: int) -> dict:
        """ref - x for the first t rows."""
        return {"seq": (self.seq - self.x)[:t], "par": self.par_sum[:t], "fused": self.fused_sum[:t]}


def rel_err(out: torch.Tensor, x: torch.Tensor, ref_delta: torch.Tensor, ffn_only: bool = False) -> float:
    """||out - ref|| / ||ref|| with ref = x + ref_delta, in float32
    (ffn_only: ||(out - x) - ref_delta|| / ||ref_delta||, the FFNs' contribution alone)."""
    x = x.float()
    err = out.float() - x - ref_delta
    scale = ref_delta if ffn_only else x + ref_delta
    return float(err.norm() / scale.norm().clamp_min(1e-30))
