"""Write a PuzzleDecoder as an HF checkpoint folder (config.json + model.safetensors), the inverse of the loader.

model_type is "llama" when every layer has attention and an FFN of one width with the default KV heads, else
"nemotron-nas" (DeciLM block_configs: ffn_mult = 3 m / (2 d) for width m, n_heads_in_group = heads / kv_heads).
Used to make small checkpoints for tests and examples (e.g. puzzle-small as a nemotron-nas folder).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from models.config import DecoderConfig
from models.decoder import PuzzleDecoder
from models.loaders import hf_tensor_names
from passes.support.errors import UserError


def _block_configs(config: DecoderConfig) -> list[dict]:
    """block_configs whose widths the loader maps back exactly: ceil_256(int(2 * ffn_mult * d / 3)) == width."""
    d = config.hidden_size
    blocks = []
    for i, spec in enumerate(config.layers):
        mult = None
        if spec.ffn_width is not None:
            mult = 3 * spec.ffn_width / (2 * d)
            if 256 * math.ceil(int(2 * mult * d / 3) / 256) != spec.ffn_width:
                raise UserError(f"layer {i}: FFN width {spec.ffn_width} is not a nemotron-nas width (multiple of 256)")
        group = config.num_heads // config.kv_heads(i) if spec.attention else None
        blocks.append({
            "attention": {"no_op": not spec.attention, "n_heads_in_group": group, "replace_with_linear": False},
            "ffn": {"no_op": spec.ffn_width is None, "ffn_mult": mult, "replace_with_linear": False},
        })
    return blocks


def hf_config(config: DecoderConfig) -> dict:
    """config.json contents for `config` (llama when homogeneous, else nemotron-nas)."""
    raw = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": len(config.layers),
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else {"rope_type": "llama3", **asdict(config.rope_scaling)},
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
    }
    widths = {spec.ffn_width for spec in config.layers}
    homogeneous = all(s.attention and s.num_kv_heads in (None, config.num_kv_heads) for s in config.layers)
    if homogeneous and len(widths) == 1 and None not in widths:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": widths.pop(), **raw}
    blocks = _block_configs(config)
    return {"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"], **raw, "block_configs": blocks}


def save_hf_checkpoint(model: PuzzleDecoder, folder: str | Path) -> Path:
    """Write config.json and model.safetensors (HF Llama tensor names, model's dtype) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = hf_config(model.config)
    names = hf_tensor_names(model.config)
    tensors = {names[k]: v.detach().contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
