"""Any PuzzleDecoder (original, attention dropped, fused, healed) as an HF checkpoint folder that serving engines
load for tensor parallelism (vLLM, SGLang and TensorRT-LLM read the nemotron-nas layout), and that
models.loaders (beside this writer) reads back to identical logits:

    python -m exporters.export SOURCE -o DIR --runtime nemotron-nas

Layout: config.json (model_type "nemotron-nas", architectures ["DeciLMForCausalLM"], block_configs: per layer
attention {no_op, n_heads_in_group, replace_with_linear}, ffn {no_op, ffn_mult, replace_with_linear}), safetensors
with the standard Llama tensor names (shards of at most 5 GB with model.safetensors.index.json when larger), and
the tokenizer files. A homogeneous model (attention and one FFN width in every layer, one KV-head count) may be
written as plain "llama" instead (layout="auto").

Widths: the engines derive a layer's FFN width as int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256.
A width that is not a multiple of 256 (a fused FFN is the sum of its blocks' widths) is padded up to one with
zero gate and up rows and zero down columns, which is exact: silu(0) * 0 = 0; ffn_mult = 1.5 * width / hidden.

Tensor parallelism over T GPUs (Megatron sharding, as these engines do it) needs every FFN width divisible by T
(a multiple of 256 always is, for T up to 256) and each attention layer's KV heads divisible by T, or T divisible
by them (the engines then replicate KV heads); `tp_constraints` says which T a model allows.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from models.config import DecoderConfig
from models.decoder import PuzzleDecoder
from models.loaders import hf_tensor_names
from passes.support.errors import UserError
from passes.support.outputs import staged_folder

SHARD_BYTES = 5 * 10**9


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


def save_checkpoint(model: PuzzleDecoder, folder: str | os.PathLike, tokenizer=None, *, layout: str = "auto",
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json, the safetensors (sharded above shard_bytes) and the tokenizer files into the new or
    empty `folder`, made in a temporary folder beside it and renamed into place. The folder's parent must exist
    (UserError otherwise: passes.support.outputs.staged_folder)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    with staged_folder(folder) as stage:
        raw = hf_config(model.config, layout)
        nas = raw["model_type"] == "nemotron-nas"
        config = _padded_config(model.config) if nas else model.config
        names = hf_tensor_names(config)
        state = {names[k]: v.contiguous().cpu() for k, v in _padded_state(model, nas).items()}
        (stage / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
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
        else:
            weight_map = {}
            for k, shard in enumerate(shards):
                file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(stage / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (stage / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return folder


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
