"""The configuration class of the nemotron-nas checkpoint folders this project writes (models.checkpoint ships this
file into each of them as configuration_decilm.py, named by config.json's auto_map), so that

    transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)

loads them as vLLM, SGLang and TensorRT-LLM do before they build their own DeciLM / nemotron-nas model (transformers
has no class for model_type "nemotron-nas"). It reads what NVIDIA's own configuration_decilm.py reads: the Llama
keys, and `block_configs`, one BlockConfig per layer whose `.attention` and `.ffn` answer every key of config.json
as attributes (block_configs[i].attention.no_op, .n_heads_in_group, block_configs[i].ffn.no_op, .ffn_mult, ...);
keys it does not know are kept as attributes too, and to_dict() gives the plain dicts back. The classes are
dataclasses, as NVIDIA's are (TensorRT-LLM calls dataclasses.asdict on them).

It runs inside the engines' processes: it imports only the standard library and transformers (4.x or 5.x), never
this project, and defines no model (the engines have their own).
"""
from __future__ import annotations

import copy
import dataclasses

from transformers import PretrainedConfig


def _fill(section, values: dict) -> None:
    """Every field's default, then every given key (known or not) as an attribute."""
    for f in dataclasses.fields(section):
        setattr(section, f.name, copy.deepcopy(f.default))
    for key, value in values.items():
        setattr(section, key, value)


class _Section:
    """A block's "attention" or "ffn" part: every key as an attribute (fields' defaults first), back as a dict."""

    def __init__(self, **values):
        _fill(self, values)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


@dataclasses.dataclass(init=False)
class AttentionConfig(_Section):
    """block_configs[i]["attention"]; keys beyond these fields are kept as attributes."""
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    n_heads_in_group: int | None = None
    window_length: int | None = None
    num_sink_tokens: int | None = None
    use_prefill_window_in_sink_attention: bool = False
    unshifted_sink: bool = False


@dataclasses.dataclass(init=False)
class FFNConfig(_Section):
    """block_configs[i]["ffn"]; the width is int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of 256.
    Keys beyond these fields are kept as attributes."""
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    ffn_mult: float | None = None


@dataclasses.dataclass(init=False)
class BlockConfig:
    """One layer: .attention and .ffn; other keys of the block are kept as attributes."""
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    ffn: FFNConfig = dataclasses.field(default_factory=FFNConfig)

    def __init__(self, attention=None, ffn=None, **extra):
        self.attention = attention if isinstance(attention, AttentionConfig) else AttentionConfig(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, FFNConfig) else FFNConfig(**(ffn or {}))
        for key, value in extra.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        out = {key: copy.deepcopy(value) for key, value in self.__dict__.items()}
        out["attention"], out["ffn"] = self.attention.to_dict(), self.ffn.to_dict()
        return out


def _rope_parameters_api() -> bool:
    """transformers 5 keeps RoPE settings in `rope_parameters` (`rope_scaling` is a property over it)."""
    return isinstance(getattr(PretrainedConfig, "rope_scaling", None), property)


class DeciLMConfig(PretrainedConfig):
    """A heterogeneous Llama (nemotron-nas): per-layer attention (or none) and FFN width (or none) in block_configs."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, block_configs=None, vocab_size=32000, hidden_size=4096, intermediate_size=None,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                 hidden_act="silu", max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-6,
                 use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
                 tie_word_embeddings=False, rope_theta=None, rope_scaling=None, attention_bias=False,
                 attention_dropout=0.0, mlp_bias=False, **kwargs):
        rope_parameters = kwargs.pop("rope_parameters", None)     # a config saved by transformers 5
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size                # per layer: block_configs[i].ffn.ffn_mult
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads            # per layer: block_configs[i].attention
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pretraining_tp = pretraining_tp
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self._set_rope(rope_theta, rope_scaling if rope_scaling is not None else rope_parameters)
        self.block_configs = None if block_configs is None else [
            block if isinstance(block, BlockConfig) else BlockConfig(**block) for block in block_configs]

    def _set_rope(self, theta, scaling) -> None:
        """rope_theta and rope_scaling as attributes (transformers 4, SGLang, TensorRT-LLM read them); with
        transformers 5 also rope_parameters (rope_type and rope_theta included), which rope_scaling then returns."""
        scaling = dict(scaling) if scaling else None
        if theta is None:
            theta = (scaling or {}).get("rope_theta", 10000.0)
        self.rope_theta = theta
        if _rope_parameters_api():
            params = dict(scaling or {})
            params.setdefault("rope_type", params.get("type", "default"))
            params.setdefault("rope_theta", theta)
            self.rope_parameters = params
        else:
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            if scaling is not None:
                scaling.pop("rope_theta", None)
            self.rope_scaling = scaling

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.block_configs is not None:
            out["block_configs"] = [block.to_dict() for block in self.block_configs]
        return out


__all__ = ["AttentionConfig", "BlockConfig", "DeciLMConfig", "FFNConfig"]
