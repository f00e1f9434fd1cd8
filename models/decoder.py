"""PuzzleDecoder: a Llama decoder whose layers may drop attention, drop the FFN, or use their own FFN width.

Layer i, with residual stream x [batch, seq, d]:
    if attention:  x = x + Attn(RMSNorm_attn(x))
    if ffn:        x = x + Wd(silu(Wg h) * Wu h),  h = RMSNorm_ffn(x)
then logits = lm_head(RMSNorm_final(x)). Numerics follow HF LlamaForCausalLM (eager attention), so the same
weights give the same logits. Module names (`layers.3.ffn.gate_proj`, `layers.3.attn_norm`, ...) become ONNX
node names (`/layers.3/ffn/gate_proj/MatMul`).

RoPE angles and the causal mask are computed from a positions tensor (arange(seq) in this prefill forward), so a
decode step with a KV cache only has to prepend past keys/values and use positions past_len + arange(seq).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.config import DecoderConfig


def rope_inv_freq(config: DecoderConfig) -> list[float]:
    """RoPE inverse frequencies f_k = theta^(-2k / head_dim), k < head_dim / 2, in float32 as HF computes them,
    then Llama-3 scaled when config.rope_scaling is set (see Llama3RopeScaling)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device="cpu").float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    s = config.rope_scaling
    if s is not None:
        old_len = s.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
        smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < old_len / s.high_freq_factor) * ~(wavelen > old_len / s.low_freq_factor)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.tolist()


class RMSNorm(nn.Module):
    """y = g * cast(x32 / sqrt(mean(x32^2, -1) + eps)) with x32 = float32(x), cast back to x's dtype (HF Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # fp32 input: no Cast nodes at all in the exported graph
        h = x if dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if dtype != torch.float32:
            h = h.to(dtype)
        return h * self.weight


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] with x1 = x[..., :half] (HF's RoPE convention)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE: softmax(q k^T / sqrt(head_dim) + mask) v, softmax in float32.

    q = RoPE(x Wq), k = RoPE(x Wk), v = x Wv; query head j = kv * groups + g reads key/value head kv
    (as HF's repeat_kv), computed by broadcasting [b, kv, groups, s, hd] against [b, kv, 1, s, hd] instead of
    copying keys and values; output = concat(heads) Wo.
    """

    def __init__(self, config: DecoderConfig, kv_heads: int):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [b, s, d]; cos, sin [s, head_dim] in x's dtype; mask [s, s] bool, True = may not attend."""
        b, s, _ = x.shape
        kv, hd, half = self.kv_heads, self.head_dim, self.head_dim // 2
        q = self.q_proj(x).view(b, s, kv, self.num_heads // kv, hd).permute(0, 2, 3, 1, 4)
        k = self.k_proj(x).view(b, s, kv, 1, hd).permute(0, 2, 3, 1, 4)
        v = self.v_proj(x).view(b, s, kv, 1, hd).permute(0, 2, 3, 1, 4)
        q = q * cos + rotate_half(q, half) * sin
        k = k * cos + rotate_half(k, half) * sin
        scores = torch.matmul(q, k.transpose(-1, -2)) * (hd**-0.5)
        scores = scores.masked_fill(mask, float("-inf"))
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        out = torch.matmul(probs, v).permute(0, 3, 1, 2, 4).reshape(b, s, self.num_heads * hd)
        return self.o_proj(out)


class FFN(nn.Module):
    """SwiGLU: down(silu(gate(h)) * up(h)), silu(g) = g * sigmoid(g) written out so ONNX gets Sigmoid + Mul."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(h)
        return self.down_proj(g * torch.sigmoid(g) * self.up_proj(h))


class DecoderLayer(nn.Module):
    """x = x + attn(attn_norm(x)) if attention; x = x + ffn(ffn_norm(x)) if ffn (absent sublayers are no_ops)."""

    def __init__(self, config: DecoderConfig, index: int):
        super().__init__()
        spec = config.layers[index]
        d, eps = config.hidden_size, config.rms_norm_eps
        if spec.attention:
            self.attn_norm = RMSNorm(d, eps)
            self.attn = Attention(config, config.kv_heads(index))
        if spec.ffn_width is not None:
            self.ffn_norm = RMSNorm(d, eps)
            self.ffn = FFN(d, spec.ffn_width)
        self.has_attention, self.has_ffn = spec.attention, spec.ffn_width is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.has_attention:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        if self.has_ffn:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class TiedHead(nn.Module):
    """logits = x E^T with the input embedding matrix E (tied embeddings); a module so the node is /lm_head/MatMul."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, embedding.t())


class PuzzleDecoder(nn.Module):
    """input_ids [batch, seq] (int64) -> logits [batch, seq, vocab], causal, no KV cache."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(len(config.layers)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = TiedHead()
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(config)  # python floats: immune to .half()/.to(), constant in exports

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [s, head_dim] of angles positions x f (float32), each frequency used for both halves."""
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions, x.dtype)
        mask = positions[None, :] > positions[:, None]  # key position after query position
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            return self.lm_head(x, self.embed_tokens.weight)
        return self.lm_head(x)

    def num_parameters(self) -> int:
        """Number of stored weights (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())
