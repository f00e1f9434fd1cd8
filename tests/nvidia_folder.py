"""A small checkpoint folder shaped like NVIDIA's Llama-3.3-Nemotron-Super release, written with plain json and
safetensors: model_type nemotron-nas, DeciLMForCausalLM, llama3 rope scaling, an eos list, bfloat16 weights and
torch_dtype, `auto_map` naming configuration / modeling files that are not in the folder (as on the hub before
the remote code is downloaded), block keys we do not use (sparsify, num_sink_tokens, window_length,
unshifted_sink, replace_with_linear), and the tokenizer files a release ships (tokenizer.json,
tokenizer_config.json, special_tokens_map.json). Heterogeneous layers: attention-free, FFN-free, per-layer widths
and KV-head counts (tests.test_models.NEMOTRON_BLOCKS)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.test_models import write_nemotron_folder

VOCAB = 512
BOS, EOS = 1, [2, 3]
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}


def write_nvidia_folder(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The folder (see the module docstring); weights random, in `dtype`."""
    from models.tokenizers import byte_level_tokenizer
    write_nemotron_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.randn(VOCAB, config["hidden_size"], generator=gen) * (1.0 if "embed" in name else 0.1)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.update({
        "vocab_size": VOCAB, "auto_map": AUTO_MAP, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": BOS, "eos_token_id": EOS, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "transformers_version": "4.48.3", "use_cache": True, "initializer_range": 0.02, "attention_dropout": 0.0,
    })
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    byte_level_tokenizer(VOCAB).save_pretrained(folder)
    return folder
