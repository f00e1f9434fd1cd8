"""Any PuzzleDecoder (original, attention dropped, fused, healed) as an HF checkpoint folder that serving engines
load for tensor parallelism (vLLM, SGLang and TensorRT-LLM read the nemotron-nas layout), and that
models.loaders (beside this writer) reads back to identical logits:

    python -m exporters.export SOURCE -o DIR --runtime nemotron-nas

Layout: config.json (model_type "nemotron-nas", architectures ["DeciLMForCausalLM"], block_configs: per layer
attention {no_op, n_heads_in_group, replace_with_linear}, ffn {no_op, ffn_mult, replace_with_linear}; auto_map
{"AutoConfig": "configuration_decilm.DeciLMConfig"}), configuration_decilm.py (models/decilm_configuration.py: the
engines load the config with AutoConfig.from_pretrained(folder, trust_remote_code=True), and transformers has no
class for nemotron-nas), safetensors with the standard Llama tensor names (none for a no_op sub-block; shards of at
most 5 GB with model.safetensors.index.json when larger), and the tokenizer files. A homogeneous model (attention
and one FFN width in every layer, one KV-head count) may be written as plain "llama" instead (layout="auto").

What the model does not describe comes from its source (`source`: the SOURCE it was loaded from). An HF folder's
config.json (read as plain JSON) gives max_position_embeddings, rope_theta, rope_scaling, bos/eos/pad_token_id as
written (an eos list stays a list), and every block key as it was for each layer the model did not change (keys we
do not use, such as sparsify or window_length, included); a changed layer gets exactly what changed (attention
dropped: attention.no_op true, n_heads_in_group null; FFN removed: ffn.no_op true, ffn_mult null; a fused FFN, at the
group's last layer: the ffn_mult of its width). Other sources: a GGUF's context length (else 8192) and the
tokenizer's special tokens. torch_dtype is the dtype of the written weights: the model's unless `dtype` says
otherwise (source_dtype: the dtype a source stores). Folders get 0777 and files 0666 less the umask.

Widths: the engines derive a layer's FFN width as int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256.
A width that is not a multiple of 256 (a fused FFN is the sum of its blocks' widths) is padded up to one with
zero gate and up rows and zero down columns, which is exact: silu(0) * 0 = 0; ffn_mult = 1.5 * width / hidden.

Tensor parallelism over T GPUs (Megatron sharding, as these engines do it) needs every FFN width divisible by T
(a multiple of 256 always is, for T up to 256) and each attention layer's KV heads divisible by T, or T divisible
by them (the engines then replicate KV heads); `tp_constraints` says which T a model allows.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from models.config import DecoderConfig
from models.decoder import PuzzleDecoder
from models.loaders import hf_tensor_names, resolve_source
from models.tokenizers import save_tokenizer
from passes.support.errors import UserError
from passes.support.outputs import default_mode, staged_folder

SHARD_BYTES = 5 * 10**9
CONFIG_CODE = "configuration_decilm.py"          # models/decilm_configuration.py, as shipped in every folder
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
KEPT_KEYS = ("max_position_embeddings", "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id")
DEFAULT_CONTEXT = 8192                           # max_position_embeddings when the source does not say (vLLM's default)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def engine_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width vLLM, SGLang, TensorRT-LLM and Megatron derive from ffn_mult."""
    return 256 * math.ceil(int(2 * ffn_mult * hidden / 3) / 256)


def padded(width: int) -> int:
    return 256 * math.ceil(width / 256)


def block_configs(config: DecoderConfig) -> list[dict]:
    """nemotron-nas block_configs; FFN widths as padded(width) (see the module docstring)."""
    d = config.hidden_size
    blocks = []
    for i, spec in enumerate(config.layers):
        mult = None if spec.ffn_width is None else 1.5 * padded(spec.ffn_width) / d
        if mult is not None and engine_width(mult, d) != padded(spec.ffn_width):
            raise UserError(f"layer {i}: FFN width {spec.ffn_width} has no ffn_mult the engines map back to it")
        blocks.append({
            "attention": {"no_op": not spec.attention, "replace_with_linear": False,
                          "n_heads_in_group": config.num_heads // config.kv_heads(i) if spec.attention else None},
            "ffn": {"no_op": spec.ffn_width is None, "replace_with_linear": False, "ffn_mult": mult},
        })
    return blocks


def hf_config(config: DecoderConfig, layout: str = "auto") -> dict:
    """config.json contents: llama when layout is "auto" and the model is homogeneous, else nemotron-nas."""
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
    if layout == "auto" and homogeneous and len(widths) == 1 and None not in widths:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": widths.pop(), **raw}
    return {"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"], **raw, "block_configs": block_configs(config)}


def source_config(source: str | None) -> dict | None:
    """The config.json of an HF folder source as plain JSON (never transformers, never code from the folder); None
    for other sources (presets, GGUF files) and for None."""
    if source is None:
        return None
    kind, where = resolve_source(source)
    if kind != "hf":
        return None
    path = Path(where) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None


def source_dtype(source: str) -> torch.dtype:
    """The dtype a source stores its weights in: an HF folder's torch_dtype (or transformers 5's dtype) in
    config.json, else its first safetensors tensor's; a GGUF's token embedding type when F16 or BF16 (quantized or
    F32 files: float32); float32 for presets (built in float32)."""
    names = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    kind, where = resolve_source(source)
    if kind == "hf":
        raw = source_config(source) or {}
        name = raw.get("torch_dtype") or raw.get("dtype")
        if name in names:
            return names[name]
        from safetensors import safe_open
        files = sorted(Path(where).glob("*.safetensors"))
        if files:
            with safe_open(str(files[0]), framework="pt") as f:
                keys = list(f.keys())
                stored = f.get_slice(keys[0]).get_dtype() if keys else None
            return {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)
    if kind == "gguf":
        embedding = next((t for t in _gguf_reader(Path(where)).tensors if t.name == "token_embd.weight"), None)
        kind_name = embedding.tensor_type.name if embedding is not None else ""
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind_name, torch.float32)
    return torch.float32


def _gguf_reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # GGUFReader raises ValueError/struct errors/... on foreign or truncated files
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None


def source_settings(source: str | None, raw: dict | None = None, tokenizer=None) -> dict:
    """The top-level config.json keys the engines read that a DecoderConfig does not hold (KEPT_KEYS): an HF
    folder's values as written (`raw`, its config.json), and for keys it lacks or other sources: a GGUF's
    llama.context_length or DEFAULT_CONTEXT, the tokenizer's bos / eos / pad token ids."""
    out: dict = {"max_position_embeddings": DEFAULT_CONTEXT}
    kind, where = resolve_source(source) if source is not None else (None, None)
    if kind == "gguf":
        field = _gguf_reader(Path(where)).fields.get("llama.context_length")
        if field is not None:
            out["max_position_embeddings"] = int(field.contents())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None) if tokenizer is not None else None
        if isinstance(value, int):
            out[key] = value
    out.update({key: copy.deepcopy(raw[key]) for key in KEPT_KEYS if raw and key in raw})
    return out


def _heads(attention: dict):
    return None if attention.get("no_op") else attention.get("n_heads_in_group")


def _width(ffn: dict, hidden: int):
    mult = ffn.get("ffn_mult")
    return None if ffn.get("no_op") or not isinstance(mult, (int, float)) else engine_width(mult, hidden)


def merged_blocks(ours: list[dict], theirs: list | None, hidden: int) -> list[dict]:
    """block_configs with the source's blocks `theirs` kept: per layer the source's block as it was, where the
    model changed it the keys that say what changed (attention: no_op and n_heads_in_group; ffn: no_op and
    ffn_mult) taken from `ours`, and any of our keys it lacks added. `ours` as it is when the source has no blocks
    or another number of them."""
    if not isinstance(theirs, list) or len(theirs) != len(ours):
        return ours
    merged = []
    for mine, block in zip(ours, copy.deepcopy(theirs)):
        attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
        if _heads(attention) != _heads(mine["attention"]):
            attention.update(no_op=mine["attention"]["no_op"], n_heads_in_group=mine["attention"]["n_heads_in_group"])
        if _width(ffn, hidden) != _width(mine["ffn"], hidden):
            ffn.update(no_op=mine["ffn"]["no_op"], ffn_mult=mine["ffn"]["ffn_mult"])
        for part, kept in (("attention", attention), ("ffn", ffn)):
            for key, value in mine[part].items():
                kept.setdefault(key, value)
        merged.append({**block, "attention": attention, "ffn": ffn})
    return merged


def checkpoint_config(config: DecoderConfig, layout: str = "auto", source: str | None = None, tokenizer=None,
                      dtype: torch.dtype = torch.float32) -> dict:
    """config.json of save_checkpoint: hf_config with the source's settings (source_settings), torch_dtype (the
    written weights' dtype) and, for nemotron-nas, the auto_map of the shipped configuration code and the source's
    block keys (merged_blocks)."""
    raw = hf_config(config, layout)
    theirs = source_config(source)
    blocks = raw.pop("block_configs", None)
    raw.update(source_settings(source, theirs, tokenizer))
    raw["torch_dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if blocks is not None:
        raw["auto_map"] = dict(AUTO_MAP)
        raw["block_configs"] = merged_blocks(blocks, (theirs or {}).get("block_configs"), config.hidden_size)
    return raw


def configuration_code() -> str:
    """The source of configuration_decilm.py: models/decilm_configuration.py as it is (it imports nothing of this
    project)."""
    return Path(__file__).with_name("decilm_configuration.py").read_text()


def _padded_state(model: PuzzleDecoder, pad: bool) -> dict[str, torch.Tensor]:
    """State dict with every FFN padded to a multiple of 256 (zero gate/up rows, zero down columns) when `pad`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not pad:
        return state
    for i, spec in enumerate(model.config.layers):
        extra = 0 if spec.ffn_width is None else padded(spec.ffn_width) - spec.ffn_width
        if extra:
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                w = state[f"layers.{i}.ffn.{proj}.weight"]
                zeros = torch.zeros((extra, w.shape[1]) if dim == 0 else (w.shape[0], extra), dtype=w.dtype)
                state[f"layers.{i}.ffn.{proj}.weight"] = torch.cat([w, zeros], dim=dim)
    return state


def _padded_config(config: DecoderConfig) -> DecoderConfig:
    layers = [replace(s, ffn_width=None if s.ffn_width is None else padded(s.ffn_width)) for s in config.layers]
    return replace(config, layers=layers)


def save_checkpoint(model: PuzzleDecoder, folder: str | os.PathLike, tokenizer=None, source: str | None = None, *,
                    layout: str = "auto", shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write config.json (checkpoint_config), configuration_decilm.py (nemotron-nas), the safetensors (in `dtype`,
    default the model's; sharded above shard_bytes) and the tokenizer files into the new or empty `folder`, made in
    a temporary folder beside it and renamed into place; folders 0777 and files 0666 less the umask. `source`: the
    SOURCE the model comes from (preset, HF folder, .gguf), whose settings and block keys the config keeps (see the
    module docstring). The folder's parent must exist (UserError otherwise: passes.support.outputs.staged_folder)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    dtype = dtype or next(model.parameters()).dtype
    with staged_folder(folder) as stage:
        raw = checkpoint_config(model.config, layout, source, tokenizer, dtype)
        nas = raw["model_type"] == "nemotron-nas"
        config = _padded_config(model.config) if nas else model.config
        names = hf_tensor_names(config)
        state = {names[k]: v.to(dtype).contiguous().cpu() for k, v in _padded_state(model, nas).items()}
        (stage / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        if nas:
            (stage / CONFIG_CODE).write_text(configuration_code())
        _write_safetensors(state, stage, shard_bytes, save_file)
        if tokenizer is not None:
            save_tokenizer(tokenizer, stage)
        for path in stage.rglob("*"):     # some writers (safetensors) make 0600 files
            os.chmod(path, default_mode(folder=path.is_dir()))
    return folder


def _write_safetensors(state: dict[str, torch.Tensor], stage: Path, shard_bytes: int, save_file) -> None:
    """model.safetensors, or shards of at most shard_bytes and model.safetensors.index.json."""
    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(stage / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(stage / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (stage / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def tp_constraints(config: DecoderConfig, sizes=(2, 4, 8)) -> dict[int, list[str]]:
    """Per tensor-parallel size: what blocks Megatron-style sharding (empty list: allowed). Widths as written
    (padded to 256); KV heads must divide by T or T by them (replication)."""
    out = {}
    for tp in sizes:
        problems = []
        for i, spec in enumerate(config.layers):
            if spec.ffn_width is not None and padded(spec.ffn_width) % tp:
                problems.append(f"layer {i}: FFN width {padded(spec.ffn_width)} not divisible by {tp}")
            kv = config.kv_heads(i)
            if spec.attention and kv % tp and tp % kv:
                problems.append(f"layer {i}: {kv} KV heads and TP {tp} do not divide one another")
        if config.num_heads % tp:
            problems.append(f"{config.num_heads} attention heads not divisible by {tp}")
        out[tp] = problems
    return out
