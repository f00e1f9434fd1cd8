"""Built-in models with seeded random weights, small enough to export and run in well under a second.

puzzle-tiny (the default; d=64, 4 heads, 2 KV heads, vocab 256), layers as (attention, FFN width):
    0 A 256 | 1 A 192 | 2 - 128 | 3 - 256 | 4 - 64 | 5 - 192 | 6 - 320 | 7 A no_op | 8 A 256 | 9 - 128
    10 - 192 | 11 - 256
  attention-free runs: layers 2-6 and 9-11; FFN chains (by ordinal): [0], [1..6], [7..10].
puzzle-small (d=256, 8 heads, 2 KV heads by default, vocab 1024), 16 layers:
    0 A 768 | 1 A(4 kv) 512 | 2 - 1024 | 3 - 768 | 4 - 512 | 5 - 1280 | 6 - 256 | 7 - 768 | 8 A 512 | 9 A(4 kv) no_op
    10 A 768 | 11 - 1024 | 12 - 512 | 13 - 768 | 14 A 768 | 15 A 1024
  attention-free runs: layers 2-7 and 11-13; FFN chains (by ordinal): [0], [1..7], [8], [9..12], [13], [14].
llama-tiny (d=64, 4 heads, 2 KV heads, vocab 256): 6 full layers, FFN width 192.
smollm2-shape: SmolLM2-135M's shapes (30 full layers, d=576, 9 heads, 3 KV heads, FFN 1536, vocab 49152, tied
  embeddings), random weights: for latency measurements where the real GGUF is not at hand.

Weights: embeddings ~ N(0, 1); each Linear ~ N(0, 1 / fan_in) (o_proj and down_proj halved) so activations stay
O(1) through the residual stream; norm gains 1 + N(0, 0.1^2) so folding gains into weights is visible.
"""
from __future__ import annotations

import copy

import torch

from models.config import DecoderConfig, LayerSpec
from models.decoder import PuzzleDecoder
from passes.support.errors import UserError

SEED = 1234


def _layers(spec: str) -> list[LayerSpec]:
    """'A256 -128 A:4/512 A0' -> LayerSpecs: A/- = attention or not, optional ':kv' heads, width (0 = no_op)."""
    layers = []
    for item in spec.split():
        head, width = item[0], item[1:]
        kv = None
        if width.startswith(":"):
            kv_text, width = width[1:].split("/")
            kv = int(kv_text)
        layers.append(LayerSpec(attention=head == "A", ffn_width=int(width) or None, num_kv_heads=kv))
    return layers


_CONFIGS: dict[str, DecoderConfig] = {
    "puzzle-tiny": DecoderConfig(
        vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        layers=_layers("A256 A192 -128 -256 -64 -192 -320 A0 A256 -128 -192 -256"),
    ),
    "puzzle-small": DecoderConfig(
        vocab_size=1024, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
        layers=_layers("A768 A:4/512 -1024 -768 -512 -1280 -256 -768 A512 A:4/0 A768 -1024 -512 -768 A768 A1024"),
    ),
    # SmolLM2-135M's shapes with random weights: for latency on machines without the GGUF file.
    "smollm2-shape": DecoderConfig(
        vocab_size=49152, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        tie_word_embeddings=True, layers=_layers("A1536 " * 30),
    ),
    "llama-tiny": DecoderConfig(
        vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        layers=_layers("A192 " * 6),
    ),
}
PRESETS: list[str] = list(_CONFIGS)


def random_weights(model: PuzzleDecoder, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Seeded weights for every parameter of `model`, drawn in state_dict order from one torch.Generator."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * noise
        elif name == "embed_tokens.weight":
            weights[name] = noise
        else:
            scale = 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            weights[name] = noise * (scale / param.shape[1] ** 0.5)
    return weights


def build_preset(name: str, dtype: torch.dtype = torch.float32) -> tuple[PuzzleDecoder, DecoderConfig]:
    """The preset's model (eval mode, in `dtype`) and its config; unknown name -> UserError."""
    if name not in _CONFIGS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    config = copy.deepcopy(_CONFIGS[name])
    with torch.device("meta"):
        model = PuzzleDecoder(config)
    weights = {k: v.to(dtype) for k, v in random_weights(model).items()}
    model.load_state_dict(weights, assign=True)
    return model.eval(), config
