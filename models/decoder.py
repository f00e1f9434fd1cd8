"""PuzzleDecoder: a Llama decoder whose layers may drop attention, drop the FFN, or use their own FFN width.

Layer i, with residual stream x [batch, seq, d]:
    if attention:  x = x + Attn(RMSNorm_attn(x))
    if ffn:        x = x + Wd(silu(Wg h) * Wu h),  h = RMSNorm_ffn(x)
then logits = lm_head(RMSNorm_final(x)). Numerics follow HF LlamaForCausalLM (eager attention), so the same
weights give the same logits. Module names (`layers.3.ffn.gate_proj`, `layers.3.attn_norm`, ...) become ONNX
node names (`/layers.3/ffn/gate_proj/MatMul`).

RoPE angles and the causal mask are computed from a positions tensor (arange(seq) in this prefill forward), so a
decode step with a KV cache only has to prepend past keys/values and use positions past_len + arange(seq):
`PuzzleDecoder.forward_step` does that, and `DecodeStep` wraps it for export (past_key_{i}/past_value_{i} in,
logits and present_key_{i}/present_value_{i} out, for each layer i with attention).
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


class OnnxReshape(torch.autograd.Function):
    """y = reshape(x, shape) with ONNX semantics (0 copies x's dim at that position, -1 is inferred), exported as
    one Reshape with a constant shape tensor, so batch and sequence stay dynamic without Shape -> Gather chains."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [b, s, d]; cos, sin [s, head_dim] in x's dtype; mask [s, s] bool, True = may not attend.

        With `past` (keys, values [b, kv, p, head_dim]) this is a decode step: see `step`; returns (out, present).
        """
        if past is not None:
            return self.step(x, cos, sin, mask, past)
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

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
             past: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention of s new tokens over p cached ones plus themselves.

        x [b, s, d]; cos, sin [s, head_dim] at positions p + arange(s); mask [s, p + s] bool, True = may not attend
        (query t sees keys 0..p+t); past = (K, V) [b, kv, p, head_dim], keys after RoPE.
        K' = [K ; RoPE(x Wk)], V' = [V ; x Wv] along the key axis ([b, kv, p + s, head_dim]);
        out = softmax(q K'^T / sqrt(head_dim), -inf where masked) V' Wo with q = RoPE(x Wq); returns (out, (K', V')).
        Reshapes use constant ONNX shapes (0 = keep that dim) so nothing reads a tensor's shape.
        """
        kv, hd, half = self.kv_heads, self.head_dim, self.head_dim // 2
        q = OnnxReshape.apply(self.q_proj(x), (0, 0, kv, self.num_heads // kv, -1)).permute(0, 2, 3, 1, 4)
        k = OnnxReshape.apply(self.k_proj(x), (0, 0, kv, -1)).transpose(1, 2)  # [b, kv, s, hd]
        v = OnnxReshape.apply(self.v_proj(x), (0, 0, kv, -1)).transpose(1, 2)
        q = q * cos + rotate_half(q, half) * sin
        k = k * cos + rotate_half(k, half) * sin
        keys = torch.cat((past[0], k), dim=2)
        values = torch.cat((past[1], v), dim=2)
        scores = torch.matmul(q, keys.unsqueeze(2).transpose(-1, -2)) * (hd**-0.5)  # [b, kv, groups, s, p + s]
        scores = scores.masked_fill(mask, float("-inf"))
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        out = torch.matmul(probs, values.unsqueeze(2)).permute(0, 3, 1, 2, 4)  # [b, s, kv, groups, hd]
        return self.o_proj(OnnxReshape.apply(out, (0, 0, -1))), (keys, values)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns x; with `past` (this layer's cached keys, values; attention layers only) returns (x, present)."""
        if past is not None:
            out, present = self.attn(self.attn_norm(x), cos, sin, mask, past)
            x = x + out
        elif self.has_attention:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        if self.has_ffn:
            x = x + self.ffn(self.ffn_norm(x))
        return x if past is None else (x, present)


class TiedHead(nn.Module):
    """logits = x E^T with the input embedding matrix E (tied embeddings); a module so the node is /lm_head/MatMul."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, embedding.t())


def step_positions(input_ids: torch.Tensor, past_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 positions of a decode step with s = input_ids.shape[1] new tokens after p = past_keys.shape[2]:
    queries p + arange(s) [s], keys arange(p + s) [p + s].

    Computed as running sums of ones (ones over p, then over s): in ONNX Slice, Shape -> ConstantOfShape, Concat,
    CumSum, ReduceSum, so no shape value is gathered and turned back into data. Exact up to 2^24 positions.
    """
    new = torch.ones_like(input_ids[:1], dtype=torch.float32)  # [1, s]
    old = torch.ones_like(past_keys[:1, :1, :, :1], dtype=torch.float32).reshape(1, -1)  # [1, p]
    keys = torch.cat((old, new), dim=1).cumsum(1) - 1
    queries = old.sum() + new.cumsum(1) - 1
    return queries.reshape(-1), keys.reshape(-1)


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
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """logits = lm_head(RMSNorm_final(x))."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            return self.lm_head(x, self.embed_tokens.weight)
        return self.lm_head(x)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers with attention: the layers that have a KV cache, in cache order."""
        return [i for i, spec in enumerate(self.config.layers) if spec.attention]

    def forward_step(
        self, input_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One decode step with a KV cache: logits of s new tokens that follow p cached ones.

        input_ids [b, s]; past[j] = (keys, values) [b, kv_heads, p, head_dim] of the j-th attention layer
        (attention_layers[j]; keys after RoPE; p may be 0). The new tokens sit at positions p + arange(s) and
        query t attends to keys 0..p+t. Returns logits [b, s, vocab] and presents[j] = (keys, values)
        [b, kv_heads, p + s, head_dim]. forward_step(ids[:, n:], forward_step(ids[:, :n], empty)[1])[0] equals
        forward(ids)[:, n:] up to rounding.
        """
        layers = self.attention_layers
        if len(past) != len(layers):
            raise ValueError(f"past has {len(past)} (keys, values) pairs; the model has {len(layers)} attention layers")
        x = self.embed_tokens(input_ids)
        cos = sin = mask = None
        if layers:
            query_pos, key_pos = step_positions(input_ids, past[0][0])
            cos, sin = self.rope(query_pos, x.dtype)
            mask = key_pos[None, :] > query_pos[:, None]  # key position after query position
        cache = dict(zip(layers, past))
        presents = []
        for i, layer in enumerate(self.layers):
            if i in cache:
                x, present = layer(x, cos, sin, mask, cache[i])
                presents.append(present)
            else:
                x = layer(x, cos, sin, mask)
        return self.head(x), presents

    def num_parameters(self) -> int:
        """Number of stored weights (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())


class DecodeStep(nn.Module):
    """Export wrapper of `PuzzleDecoder.forward_step` with flat tensors:
    forward(input_ids, past_key_0, past_value_0, past_key_1, ...) -> (logits, present_key_0, present_value_0, ...),
    one key/value pair per attention layer, in layer order.

    It registers the decoder's own submodules under the same names (embed_tokens, layers, norm, lm_head), so ONNX
    node names (/layers.3/ffn/gate_proj/MatMul) and weight names match the prefill export of the same decoder.
    """

    def __init__(self, decoder: PuzzleDecoder):
        super().__init__()
        self.embed_tokens, self.layers, self.norm, self.lm_head = (
            decoder.embed_tokens, decoder.layers, decoder.norm, decoder.lm_head)
        self.decoder = (decoder,)  # a tuple: not registered again as a submodule
        self.config = decoder.config

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = list(zip(past[0::2], past[1::2]))
        logits, presents = self.decoder[0].forward_step(input_ids, pairs)
        return (logits, *(t for pair in presents for t in pair))
