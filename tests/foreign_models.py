"""Graphs the project did not write: a small random transformers LlamaForCausalLM exported by torch.onnx
(TorchScript and dynamo), the dynamo export after onnxruntime's transformer optimizer, and onnxruntime-genai's
model builder folder (written by exporters.foreign); the reference for what the passes do to them is
models.reference (transformers itself).
"""
from __future__ import annotations

import torch

from models.tokenizers import byte_level_tokenizer

LAYERS, VOCAB, HIDDEN, WIDTH, HEADS, KV_HEADS = 6, 512, 64, 160, 4, 2


def llama(seed: int = 0):
    """A random LlamaForCausalLM (GQA, causal mask, distinct norm gains), eager attention, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.config._attn_implementation = "eager"
    return model


def tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries (models.tokenizers)."""
    return byte_level_tokenizer(VOCAB)