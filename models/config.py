"""Plain data describing a Llama-family decoder with Puzzle-style heterogeneous layers."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer.

    attention: False = attention no_op (the layer is FFN only).
    ffn_width: intermediate size m of the SwiGLU FFN; None = FFN no_op.
    num_kv_heads: KV heads of this layer's attention; None = the model's default (Puzzle varies it per layer).
    """

    attention: bool
    ffn_width: int | None
    num_kv_heads: int | None = None


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 RoPE frequency scaling (transformers' rope_type "llama3").

    With wavelength w = 2*pi / f of each inverse frequency f and L = original_max_position_embeddings:
    w < L / high_freq_factor keeps f; w > L / low_freq_factor uses f / factor; in between
    f' = (1 - s) * f / factor + s * f with s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class DecoderConfig:
    """Shapes and constants of a PuzzleDecoder. `layers[i]` describes layer i."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: list[LayerSpec] = field(default_factory=list)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False

    def kv_heads(self, layer: int) -> int:
        """KV heads of layer `layer` (its own override or the model default)."""
        return self.layers[layer].num_kv_heads or self.num_kv_heads

    @property
    def attention_free_layers(self) -> list[int]:
        """Indices of layers whose attention is a no_op."""
        return [i for i, spec in enumerate(self.layers) if not spec.attention]

    @property
    def ffn_widths(self) -> list[int | None]:
        """FFN width per layer (None where the FFN is a no_op)."""
        return [spec.ffn_width for spec in self.layers]
