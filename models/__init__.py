"""Llama-family decoders with Puzzle-style heterogeneous layers (attention / FFN no_ops, per-layer FFN widths)."""
from models.config import DecoderConfig, LayerSpec, Llama3RopeScaling
from models.decoder import PuzzleDecoder
from models.loaders import load_model, load_tokenizer, resolve_source
from models.presets import PRESETS, build_preset
from models.smollm2 import smollm2_gguf_path

__all__ = [
    "DecoderConfig", "LayerSpec", "Llama3RopeScaling", "PuzzleDecoder", "PRESETS", "build_preset",
    "load_model", "load_tokenizer", "resolve_source", "smollm2_gguf_path",
]
