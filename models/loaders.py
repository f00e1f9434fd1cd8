"""Load a PuzzleDecoder from a preset name, an HF checkpoint folder (llama / nemotron-nas) or a llama GGUF file.

Every bad input (unknown source, unreadable file, unsupported config key, missing or misshapen tensor) raises
UserError with one line that names the file, key or tensor.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from models.config import DecoderConfig, LayerSpec, Llama3RopeScaling
from models.decoder import PuzzleDecoder
from models.presets import PRESETS, build_preset
from models.smollm2 import smollm2_gguf_path
from passes.support.errors import UserError

SMOLLM2 = "smollm2"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_source(source: str) -> tuple[str, str | Path]:
    """Classify a source: ("preset", name) | ("hf", folder) | ("gguf", file). `smollm2` = the packaged GGUF."""
    if source == SMOLLM2:
        return "gguf", smollm2_gguf_path()
    if source in PRESETS:
        return "preset", source
    path = Path(source)
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise UserError(f"{source}: not a checkpoint folder or .gguf file")
    raise UserError(
        f"{source!r} is not a preset ({', '.join(PRESETS)}, {SMOLLM2}), nor an existing checkpoint folder or .gguf file"
    )


def load_model(source: str, dtype: torch.dtype = torch.float32) -> PuzzleDecoder:
    """The model named by `source` (see resolve_source) with weights in `dtype`, in eval mode."""
    kind, where = resolve_source(source)
    if kind == "preset":
        return build_preset(str(where), dtype)[0]
    if kind == "hf":
        return _load_hf_folder(Path(where), dtype)
    return _load_gguf(Path(where), dtype)


def load_tokenizer(source: str):
    """A transformers tokenizer for sources that carry one (GGUF file, folder with tokenizer files), else None.

    Folders: models.tokenizers.folder_tokenizer (tokenizer.json as it is; never the model config through
    transformers, never code from the folder, never a prompt). GGUF: transformers' GGUF reader, remote code off.
    A tokenizer that cannot be loaded is a UserError of one line."""
    from models.tokenizers import folder_tokenizer
    kind, where = resolve_source(source)
    if kind == "preset":
        return None
    path = Path(where)
    if kind == "hf":
        return folder_tokenizer(path)
    import transformers
    from transformers import AutoTokenizer
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False,
                                             local_files_only=True)
    except Exception as exc:  # the GGUF reader raises ValueError/KeyError/struct errors/... on foreign files
        raise UserError(f"{path}: cannot load the GGUF's tokenizer ({_first_line(exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build(
    config: DecoderConfig, names: dict[str, str], read: Callable[[str], torch.Tensor | None], dtype: torch.dtype
) -> PuzzleDecoder:
    """Assemble a model without allocating it twice: `names` maps our parameter names to source tensor names,
    `read(source_name)` returns the tensor or None when absent."""
    with torch.device("meta"):
        model = PuzzleDecoder(config)
    state = {}
    for ours, param in model.state_dict().items():
        tensor = read(names[ours])
        if tensor is None:
            raise UserError(f"missing weight tensor {names[ours]}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(
                f"weight tensor {names[ours]} has shape {list(tensor.shape)}, config implies {list(param.shape)}"
            )
        state[ours] = tensor.to(dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


# ---------------------------------------------------------------- HF folders


def hf_tensor_names(config: DecoderConfig) -> dict[str, str]:
    """Our parameter names -> HF Llama tensor names."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i, spec in enumerate(config.layers):
        if spec.attention:
            names[f"layers.{i}.attn_norm.weight"] = f"model.layers.{i}.input_layernorm.weight"
            for p in "qkvo":
                names[f"layers.{i}.attn.{p}_proj.weight"] = f"model.layers.{i}.self_attn.{p}_proj.weight"
        if spec.ffn_width is not None:
            names[f"layers.{i}.ffn_norm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
            for p in ("gate", "up", "down"):
                names[f"layers.{i}.ffn.{p}_proj.weight"] = f"model.layers.{i}.mlp.{p}_proj.weight"
    return names


def _require(raw: dict, key: str, where: str):
    if raw.get(key) is None:
        raise UserError(f"{where}: required key {key!r} is missing")
    return raw[key]


def _rope(raw: dict, where: str) -> tuple[float, Llama3RopeScaling | None]:
    """rope_theta and scaling from either transformers-5 `rope_parameters` or `rope_theta` + `rope_scaling`."""
    if raw.get("rope_parameters") is not None:
        params, key = dict(raw["rope_parameters"]), "rope_parameters"
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:
        params, key = dict(raw.get("rope_scaling") or {}), "rope_scaling"
        theta = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UserError(f"{where}: {key}.rope_type {rope_type!r} is not supported (null, default, llama3)")
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise UserError(f"{where}: {key}.{exc.args[0]} is missing (llama3 rope scaling)") from None
    return float(theta), scaling


def _nemotron_layers(raw: dict, num_heads: int, hidden: int, where: str) -> list[LayerSpec]:
    """DeciLM block_configs -> LayerSpecs. FFN width = ceil_256(int(2 * ffn_mult * hidden / 3)),
    KV heads = num_attention_heads // n_heads_in_group. Extra keys must be null/false (unsupported otherwise)."""
    blocks = _require(raw, "block_configs", where)
    if raw.get("num_hidden_layers") not in (None, len(blocks)):
        raise UserError(f"{where}: num_hidden_layers {raw['num_hidden_layers']} != {len(blocks)} block_configs")
    known = {
        "attention": {"no_op", "n_heads_in_group", "replace_with_linear"},
        "ffn": {"no_op", "ffn_mult", "replace_with_linear"},
    }
    layers = []
    for i, block in enumerate(blocks):
        for part, keys in known.items():
            for key, value in (block.get(part) or {}).items():
                if value is True if key == "replace_with_linear" else (key not in keys and value not in (None, False)):
                    raise UserError(f"{where}: block_configs[{i}].{part}.{key} = {json.dumps(value)} is not supported")
        attn, ffn = block.get("attention") or {}, block.get("ffn") or {}
        kv_heads = None
        if not attn.get("no_op", False):
            group = attn.get("n_heads_in_group")
            if not isinstance(group, int) or group <= 0 or num_heads % group:
                raise UserError(
                    f"{where}: block_configs[{i}].attention.n_heads_in_group = {group!r} must divide {num_heads} heads"
                )
            kv_heads = num_heads // group
        width = None
        if not ffn.get("no_op", False):
            mult = ffn.get("ffn_mult")
            if not isinstance(mult, (int, float)) or mult <= 0:
                raise UserError(f"{where}: block_configs[{i}].ffn.ffn_mult = {mult!r} must be a positive number")
            width = 256 * math.ceil(int(2 * mult * hidden / 3) / 256)
        layers.append(LayerSpec(attention=kv_heads is not None, ffn_width=width, num_kv_heads=kv_heads))
    return layers


def config_from_hf(raw: dict, where: str = "config.json") -> DecoderConfig:
    """DecoderConfig of an HF config.json (model_type llama or nemotron-nas); unsupported keys -> UserError."""
    model_type = raw.get("model_type")
    if model_type not in ("llama", "nemotron-nas"):
        raise UserError(f"{where}: model_type {model_type!r} is not supported (llama, nemotron-nas)")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise UserError(f"{where}: {key} = true is not supported")
    hidden = _require(raw, "hidden_size", where)
    heads = _require(raw, "num_attention_heads", where)
    theta, scaling = _rope(raw, where)
    if model_type == "llama":
        width = _require(raw, "intermediate_size", where)
        layers = [LayerSpec(attention=True, ffn_width=width) for _ in range(_require(raw, "num_hidden_layers", where))]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UserError(f"{where}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    else:
        layers = _nemotron_layers(raw, heads, hidden, where)
        kv_heads = next((spec.num_kv_heads for spec in layers if spec.attention), heads)  # default: first layer's
        layers = [
            LayerSpec(s.attention, s.ffn_width, None if s.num_kv_heads == kv_heads else s.num_kv_heads) for s in layers
        ]
    return DecoderConfig(
        vocab_size=_require(raw, "vocab_size", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        layers=layers,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def _safetensors_files(folder: Path) -> list[Path]:
    """Shards listed by model.safetensors.index.json, else every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: not a safetensors index ({_first_line(exc)})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index}: lists missing shard {missing[0]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights")
    return files


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> PuzzleDecoder:
    from safetensors import safe_open

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not an HF checkpoint folder)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path}: invalid JSON ({_first_line(exc)})") from None
    config = config_from_hf(raw, str(config_path))
    handles = {}
    for file in _safetensors_files(folder):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{file}: cannot read safetensors ({_first_line(exc)})") from None
        for key in handle.keys():
            handles[key] = (file, handle)
    names = hf_tensor_names(config)
    unexpected = set(handles) - set(names.values()) - {"lm_head.weight"}
    unexpected = sorted(k for k in unexpected if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise UserError(f"{folder}: unexpected weight tensor {unexpected[0]} (unsupported layer structure)")

    def read(name: str) -> torch.Tensor | None:
        if name not in handles:
            return None
        file, handle = handles[name]
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise UserError(f"{file}: cannot read tensor {name} ({_first_line(exc)})") from None

    return _build(config, names, read, dtype)


# ---------------------------------------------------------------- GGUF


def _gguf_names(config: DecoderConfig) -> dict[str, str]:
    """Our parameter names -> llama.cpp GGUF tensor names."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {
        "attn_norm.weight": "attn_norm", "attn.q_proj.weight": "attn_q", "attn.k_proj.weight": "attn_k",
        "attn.v_proj.weight": "attn_v", "attn.o_proj.weight": "attn_output", "ffn_norm.weight": "ffn_norm",
        "ffn.gate_proj.weight": "ffn_gate", "ffn.up_proj.weight": "ffn_up", "ffn.down_proj.weight": "ffn_down",
    }
    for i in range(len(config.layers)):
        names.update({f"layers.{i}.{ours}": f"blk.{i}.{theirs}.weight" for ours, theirs in parts.items()})
    return names


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, GGUF stores rows as interleaved (i, i + d/2) pairs;
    rows [h, i, pair] -> [h, pair, i], the inverse of convert_hf_to_gguf.py's permute."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _load_gguf(path: Path, dtype: torch.dtype) -> PuzzleDecoder:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # GGUFReader raises ValueError/struct errors/... on foreign or truncated files
        raise UserError(f"{path}: not a readable GGUF file ({_first_line(exc)})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise UserError(f"{path}: GGUF key {key} is missing")
            return default
        value = f.contents()
        if isinstance(value, list):
            raise UserError(f"{path}: per-layer GGUF key {key} is not supported")
        return value

    arch = field("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors or field("llama.rope.scaling.type", "none") not in ("none", ""):
        raise UserError(f"{path}: GGUF rope scaling (llama.rope.scaling.type / rope_freqs.weight) is not supported")
    if field("llama.expert_count", 0):
        raise UserError(f"{path}: GGUF llama.expert_count > 0 (mixture of experts) is not supported")
    hidden = int(field("llama.embedding_length"))
    heads = int(field("llama.attention.head_count"))
    head_dim = int(field("llama.attention.key_length", hidden // heads))
    if int(field("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{path}: GGUF llama.rope.dimension_count != head dim (partial rotary) is not supported")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: missing weight tensor token_embd.weight")
    width = int(field("llama.feed_forward_length"))
    config = DecoderConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        layers=[LayerSpec(attention=True, ffn_width=width) for _ in range(int(field("llama.block_count")))],
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
    )

    def read(name: str) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            return None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists dims innermost first
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise UserError(f"{path}: tensor {name} type {t.tensor_type.name} cannot be dequantized ({exc})") from None
        w = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: GGUF data is read-only
        if name.endswith("attn_q.weight"):
            return unpermute_rope_rows(w, config.num_heads)
        if name.endswith("attn_k.weight"):
            return unpermute_rope_rows(w, config.num_kv_heads)
        return w

    return _build(config, _gguf_names(config), read, dtype)
