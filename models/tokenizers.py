"""Tokenizers: the one reader of a checkpoint folder's tokenizer files, and a small tokenizer for models with
random weights.

`folder_tokenizer(folder)` reads the tokenizer of a folder we did not write (NVIDIA's, the hub's, onnxruntime-genai's)
without ever loading the model config through transformers and without ever running code from the folder, so it
never asks "Do you wish to run the custom code?", and works for model types transformers does not know
(nemotron-nas): with tokenizer.json, a PreTrainedTokenizerFast built from that file as it is (the file the
tokenizers library and onnxruntime-genai read), special tokens, added tokens, chat template and model_max_length
from tokenizer_config.json / special_tokens_map.json / chat_template.jinja; without it (vocab files, a sentencepiece
model), the transformers class tokenizer_config.json names (the class AutoTokenizer would pick) or, unnamed, the one
transformers registers for config.json's model_type (read as plain JSON). `auto_map` entries are ignored and not
kept. The model's own token ids (generation_config.json over config.json: bos, eos, which may be a list, pad) ride
along as `tokenizer.model_token_ids` for writers of runtime configs (exporters.genai). Any failure is a UserError
of one line.

`byte_level_tokenizer()`: byte-level BPE trained offline on CPython's documentation text, for models with random
weights that must still come with tokenizer files (onnxruntime-genai folders, its model builder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from models.loaders import _first_line
from passes.support.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _json(path: Path) -> dict | None:
    """A JSON object file's contents (None when absent); unreadable or not an object -> UserError."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a JSON object")
    return raw


def _reason(folder: Path, exc: BaseException) -> str:
    """Why loading failed, in one line: the tokenizers library's own complaint about tokenizer.json when it has
    one (transformers may fail later, on a missing key), else the exception's first line."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as own:
            return _first_line(own)
    if isinstance(exc, KeyError) and exc.args:
        return f"missing key {exc.args[0]!r}"
    return _first_line(exc)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def model_token_ids(folder: Path) -> dict[str, int | list[int] | None]:
    """bos / eos / pad ids as the model's generation_config.json, else config.json, states them (plain JSON; eos may
    be a list, as in Llama 3 and Nemotron releases); None where neither says."""
    ids: dict[str, int | list[int] | None] = dict.fromkeys(TOKEN_ID_KEYS)
    for name in ("config.json", "generation_config.json"):        # the later file wins
        raw = _json(folder / name) or {}
        for key in TOKEN_ID_KEYS:
            value = raw.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (isinstance(value, list) and value and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value)):
                ids[key] = value
    return ids


def _tokenizer_class(folder: Path, tokenizer_config: dict):
    """The transformers class for a folder without tokenizer.json: tokenizer_config.json's tokenizer_class (as
    AutoTokenizer resolves it), else the class registered for config.json's model_type, else the generic fast one.
    Only classes shipped with transformers: a name it does not know is refused, never loaded from the folder."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
    name = tokenizer_config.get("tokenizer_class")
    if name is None:
        model_type = (_json(folder / "config.json") or {}).get("model_type")
        name = TOKENIZER_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
        if name is None:
            return PreTrainedTokenizerFast
    if not isinstance(name, str):
        raise UserError(f"{folder / 'tokenizer_config.json'}: tokenizer_class {name!r} is not a class name")
    cls = tokenizer_class_from_name(name) or (None if name.endswith("Fast") else tokenizer_class_from_name(name + "Fast"))
    if cls is None or not getattr(cls, "__module__", "").startswith("transformers."):
        raise UserError(f"{folder / 'tokenizer_config.json'}: tokenizer_class {name!r} is not a transformers class and "
                        f"the folder has no tokenizer.json (code from the folder is never run)")
    if cls.__name__ == "PythonBackend":
        return PreTrainedTokenizerFast
    return cls


def folder_tokenizer(folder: Path):
    """The tokenizer of an HF or onnxruntime-genai folder (see the module docstring), or None when the folder has
    no tokenizer files."""
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    tokenizer_config = _json(folder / "tokenizer_config.json") or {}
    _json(folder / "special_tokens_map.json")                   # a clear line when it is not JSON
    import transformers
    from transformers import PreTrainedTokenizerFast
    fast = (folder / "tokenizer.json").is_file()
    cls = PreTrainedTokenizerFast if fast else _tokenizer_class(folder, tokenizer_config)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except UserError:
        raise
    except Exception as exc:         # tokenizers, sentencepiece, json and transformers raise their own types
        if fast:
            raise UserError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer ({_reason(folder, exc)})") from None
        raise UserError(f"{folder}: cannot load the tokenizer with {cls.__name__} ({_reason(folder, exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer.init_kwargs.pop("auto_map", None)                  # never written into the folders we make
    tokenizer.model_token_ids = model_token_ids(folder)
    return tokenizer


def byte_level_tokenizer(vocab_size: int = 512):
    """A transformers PreTrainedTokenizerFast with `vocab_size` entries (<unk>, <s>, </s> first)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """tokenizer.save_pretrained(folder), with tokenizer_config.json naming the class every transformers version and
    serving engine knows (PreTrainedTokenizerFast; transformers 5 writes its internal TokenizersBackend)."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
