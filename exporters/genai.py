"""The deployment form onnxruntime-genai runs, written straight from a PuzzleDecoder (no torch tracing):

    python -m exporters.export SOURCE -o DIR --runtime genai [--dtype fp16|bf16|fp32] [--context-length 4096]

DIR gets model.onnx + model.onnx.data, genai_config.json and the source's tokenizer files. The graph is the one
onnxruntime-genai's own model builder writes for Llama (same ops, same names, same layouts, so the same kernels):
per layer SkipSimplifiedLayerNormalization (the residual add fused into the next norm, output 3 = the stream),
one packed q|k|v MatMul, GroupQueryAttention (KV cache in place, rotary inside from cos/sin caches), o_proj
MatMul, SwiGLU (gate and up MatMul, Sigmoid, Mul, Mul, down MatMul), final norm and lm_head. What the builder
cannot express, this writes: layers without attention (no GroupQueryAttention, no KV cache: the caches are
numbered 0..n-1 over the layers that keep attention and num_hidden_layers = n), layers without an FFN, a width
per layer (nemotron-nas block_configs) and KV heads per layer (each layer's K/V heads repeated up to the largest
count, which is exact: query head j reads the same key/value head as before; genai allocates one cache shape).
The very first norm, which has no residual add to fuse, is a decomposed RMSNorm (standard ONNX, fused into
SimplifiedLayerNormalization by onnxruntime when the session loads). Tied embeddings are stored once (lm_head
reads Transpose(E)). Logits are float32 for bf16 models (genai's convention), else the model's type.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from models.config import DecoderConfig
from models.decoder import PuzzleDecoder
from models.tokenizers import save_tokenizer
from passes.ffn.int4 import QuantConfig, quantize_matmuls
from passes.support.builder import NodeBuilder
from passes.support.errors import UserError
from passes.support.onnx_io import ModelOutput, NewTensor, load_model, save_model
from passes.support.outputs import staged_folder

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
OPSET = 21
MODEL = "model.onnx"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy in the same element type (bfloat16 through its bits)."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
    return tensor.numpy()


def kv_heads_for_cache(config: DecoderConfig) -> int:
    """The one KV-head count every cache gets: the least common multiple of the attention layers' counts."""
    counts = {config.kv_heads(i) for i, spec in enumerate(config.layers) if spec.attention}
    kv = math.lcm(*counts) if counts else config.num_kv_heads
    if config.num_heads % kv:
        raise UserError(f"KV heads per layer {sorted(counts)} have no common multiple dividing {config.num_heads} heads; "
                        f"onnxruntime-genai needs one cache shape")
    return kv


def repeat_kv_rows(weight: torch.Tensor, kv: int, target: int, head_dim: int) -> torch.Tensor:
    """K or V projection [kv * head_dim, d] with every head repeated target/kv times in place (head h -> heads
    h*r .. h*r+r-1): with target KV heads, query head j reads head j // (H/target), the copy of j // (H/kv)."""
    r = target // kv
    return weight.view(kv, 1, head_dim, -1).expand(kv, r, head_dim, weight.shape[-1]).reshape(target * head_dim, -1)


class _Graph:
    """Nodes, graph inputs/outputs and weights (streamed at save time) of the genai decoder graph."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.T = dtype, ONNX_TYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.small: list[TensorProto] = []
        self.weights: dict[str, NewTensor] = {}

    def node(self, op, inputs, name, outputs=None, domain="", **attrs) -> list[str]:
        outputs = outputs or [f"{name}/output_0"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """A weight in the model's type, in MatMul layout as given; written chunk by chunk at save time."""
        tensor = tensor.detach().to(self.dtype)
        self.weights[name] = NewTensor(name, tuple(tensor.shape), self.T, lambda t=tensor: iter([_numpy(t)]))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        self.small.append(numpy_helper.from_array(array, name))
        return name


class _Decoder:
    """The genai decoder graph of one model, built layer by layer. The residual stream is `x`; `pending` is a
    (stream, branch output) pair whose add the next norm fuses (SkipSimplifiedLayerNormalization, output 3 = the new
    stream); `caches` lists the layers that got a KV cache, in cache order."""

    def __init__(self, model: PuzzleDecoder, g: _Graph, context_length: int):
        self.model, self.config, self.g = model, model.config, g
        self.kv = kv_heads_for_cache(self.config)
        self.eps = float(self.config.rms_norm_eps)
        self.seqlens_k, self.total = self._mask_lengths()
        positions = torch.arange(context_length, dtype=torch.float32)[:, None] * \
            torch.tensor(model.inv_freq, dtype=torch.float32)[None]
        self.cos = g.weight("cos_cache", positions.cos())
        self.sin = g.weight("sin_cache", positions.sin())
        self.embed = g.weight("model.embed_tokens.weight", model.embed_tokens.weight)
        self.x = g.node("Gather", [self.embed, "input_ids"], "/model/embed_tokens/Gather")[0]
        self.pending: tuple[str, str] | None = None
        self.caches: list[int] = []

    def _mask_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (attention_mask row sums - 1) and total_sequence_length (the mask's
        width), int32, computed as the builder's attn_mask_reformat subgraph does."""
        g, prefix = self.g, "/model/attn_mask_reformat/attn_mask_subgraph"
        one = g.constant("/model/constants/INT64/[1]", np.array([1], np.int64))
        ones = g.node("ReduceSum", ["attention_mask", one], f"{prefix}/ReduceSum", keepdims=0)[0]
        sub = g.node("Sub", [ones, one], f"{prefix}/Sub")[0]
        seqlens_k = g.node("Cast", [sub], f"{prefix}/Sub/Cast", to=TensorProto.INT32)[0]
        shape = g.node("Shape", ["attention_mask"], f"{prefix}/Shape")[0]
        width = g.node("Gather", [shape, g.constant("/model/constants/INT64/1", np.array(1, np.int64))],
                       f"{prefix}/Gather", axis=0)[0]
        total = g.node("Cast", [width], f"{prefix}/Gather/Cast", to=TensorProto.INT32)[0]
        return seqlens_k, total

    def norm(self, gain: torch.Tensor, prefix: str, weight_name: str) -> str:
        """RMSNorm of the stream (adding the pending branch first, fused); returns the normalized tensor."""
        g, gamma = self.g, self.g.weight(weight_name, gain)
        if self.pending is None:     # nothing to add yet: the decomposed RMSNorm (onnxruntime fuses it)
            build = NodeBuilder(prefix)
            h = build.node("Mul", [build.rms_normalized(self.x, self.eps, g.T, OPSET), gamma], "norm/Mul")
            g.nodes.extend(build.nodes)
            g.small.extend(build.initializers)
            return h
        h, _, _, self.x = g.node("SkipSimplifiedLayerNormalization", [*self.pending, gamma], f"{prefix}/SkipLayerNorm",
                                 outputs=[f"{prefix}/output_0", "", "", f"{prefix}/output_3"], domain="com.microsoft",
                                 epsilon=self.eps)
        self.pending = None
        return h

    def attention(self, i: int) -> None:
        """Layer i's attention: norm, packed q|k|v MatMul (K/V heads repeated up to the cache's count),
        GroupQueryAttention on the next KV cache, o_proj MatMul; its output is left pending."""
        g, config, layer, base = self.g, self.config, self.model.layers[i], f"/model/layers.{i}"
        hd, H = config.head_dim, config.num_heads
        h = self.norm(layer.attn_norm.weight, f"{base}/input_layernorm", f"model.layers.{i}.input_layernorm.weight")
        attn, layer_kv = layer.attn, config.kv_heads(i)
        qkv = torch.cat([attn.q_proj.weight, repeat_kv_rows(attn.k_proj.weight, layer_kv, self.kv, hd),
                         repeat_kv_rows(attn.v_proj.weight, layer_kv, self.kv, hd)]).t()
        packed = g.node("MatMul", [h, g.weight(f"model.layers.{i}.attn.qkv_proj.MatMul.weight", qkv)],
                        f"{base}/attn/qkv_proj/MatMul")[0]
        j = len(self.caches)
        self.caches.append(i)
        out = g.node("GroupQueryAttention",
                     [packed, "", "", f"past_key_values.{j}.key", f"past_key_values.{j}.value", self.seqlens_k, self.total,
                      self.cos, self.sin],
                     f"{base}/attn/GroupQueryAttention",
                     outputs=[f"{base}/attn/GroupQueryAttention/output_0", f"present.{j}.key", f"present.{j}.value"],
                     domain="com.microsoft", num_heads=H, kv_num_heads=self.kv, scale=1.0 / math.sqrt(hd),
                     local_window_size=-1, softcap=0.0, do_rotary=1, rotary_interleaved=0)[0]
        y = g.node("MatMul", [out, g.weight(f"model.layers.{i}.attn.o_proj.MatMul.weight", attn.o_proj.weight.t())],
                   f"{base}/attn/o_proj/MatMul")[0]
        self.pending = (self.x, y)

    def ffn(self, i: int) -> None:
        """Layer i's FFN: norm, SwiGLU (gate and up MatMul, Sigmoid, Mul, Mul, down MatMul); its output is left pending."""
        g, ffn, base = self.g, self.model.layers[i].ffn, f"/model/layers.{i}"
        h = self.norm(self.model.layers[i].ffn_norm.weight, f"{base}/post_attention_layernorm",
                      f"model.layers.{i}.post_attention_layernorm.weight")

        def matmul(x: str, proj: str, weight: torch.Tensor) -> str:
            return g.node("MatMul", [x, g.weight(f"model.layers.{i}.mlp.{proj}.MatMul.weight", weight.t())],
                          f"{base}/mlp/{proj}/MatMul")[0]
        gate = matmul(h, "gate_proj", ffn.gate_proj.weight)
        up = matmul(h, "up_proj", ffn.up_proj.weight)
        sig = g.node("Sigmoid", [gate], f"{base}/mlp/act_fn/Sigmoid")[0]
        silu = g.node("Mul", [gate, sig], f"{base}/mlp/act_fn/Mul")[0]
        act = g.node("Mul", [silu, up], f"{base}/mlp/Mul")[0]
        self.pending = (self.x, matmul(act, "down_proj", ffn.down_proj.weight))

    def final_norm(self) -> str:
        """The last norm (adding the last pending branch; its stream output is not needed)."""
        n = len(self.model.layers)
        prefix, name = f"/model/layers.{n}/final_norm_layernorm", f"model.layers.{n}.final_norm_layernorm.weight"
        if self.pending is None:
            return self.norm(self.model.norm.weight, prefix, name)
        return self.g.node("SkipSimplifiedLayerNormalization", [*self.pending, self.g.weight(name, self.model.norm.weight)],
                           f"{prefix}/SkipLayerNorm", outputs=[f"{prefix}/output_0"], domain="com.microsoft",
                           epsilon=self.eps)[0]

    def lm_head(self, h: str) -> int:
        """logits = h @ lm_head (Transpose(E) when tied), cast to float32 for bf16 models; returns the logits' type."""
        g = self.g
        logits_type = TensorProto.FLOAT if g.T == TensorProto.BFLOAT16 else g.T
        if self.config.tie_word_embeddings:
            head = g.node("Transpose", [self.embed], "/lm_head/Transpose", perm=[1, 0])[0]
        else:
            head = g.weight("lm_head.MatMul.weight", self.model.lm_head.weight.t())
        logits = g.node("MatMul", [h, head], "/lm_head/MatMul",
                        outputs=["logits" if logits_type == g.T else "/lm_head/MatMul/output_0"])[0]
        if logits != "logits":
            g.node("Cast", [logits], "/lm_head/Cast", outputs=["logits"], to=logits_type)
        return logits_type

    def proto(self, logits_type: int) -> onnx.ModelProto:
        """The model: input_ids, attention_mask and the past caches in; logits and the present caches out."""
        g, hd, kv, n = self.g, self.config.head_dim, self.kv, len(self.caches)
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", logits_type, ["batch_size", "sequence_length", self.config.vocab_size])]
        for kind in ("key", "value"):
            inputs += [helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", g.T, ["batch_size", kv, "past_sequence_length", hd])
                       for j in range(n)]
            outputs += [helper.make_tensor_value_info(f"present.{j}.{kind}", g.T, ["batch_size", kv, "total_sequence_length", hd])
                        for j in range(n)]
        initializers = g.small + [TensorProto(name=t.name, data_type=t.data_type, dims=t.dims) for t in g.weights.values()]
        graph = helper.make_graph(g.nodes, "genai_decoder", inputs, outputs, initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="exporters.genai")
        proto.ir_version = 10
        return proto

    def facts(self) -> dict:
        """What genai_config.json states about the decoder."""
        config = self.config
        return {"head_size": config.head_dim, "hidden_size": config.hidden_size, "num_attention_heads": config.num_heads,
                "num_hidden_layers": len(self.caches), "num_key_value_heads": self.kv, "vocab_size": config.vocab_size,
                "attention_layers": self.caches}


def build_graph(model: PuzzleDecoder, context_length: int) -> tuple[onnx.ModelProto, dict[str, NewTensor], dict]:
    """The genai decoder graph of `model`; returns (model proto with weight placeholders, weights, decoder facts)."""
    dtype = next(model.parameters()).dtype
    if dtype not in ONNX_TYPES:
        raise UserError(f"model weights of type {dtype} cannot be exported for onnxruntime-genai")
    decoder = _Decoder(model, _Graph(dtype), context_length)
    for i, layer in enumerate(model.layers):
        if layer.has_attention:
            decoder.attention(i)
        if layer.has_ffn:
            decoder.ffn(i)
    logits_type = decoder.lm_head(decoder.final_norm())
    return decoder.proto(logits_type), decoder.g.weights, decoder.facts()


def special_token_ids(tokenizer) -> tuple[int, int | list[int], int]:
    """(bos, eos, pad) for genai_config.json, resolved as onnxruntime-genai's model builder does: the model's own ids
    first (`tokenizer.model_token_ids`, from the source's generation_config.json / config.json, models.tokenizers),
    then the tokenizer's; eos keeps every id the model names (an int, or a list such as Llama 3's [end_of_text,
    eom, eot]: genai stops on any), with the tokenizer's end-of-turn token put first when the list lacks it; bos
    defaults to 1, eos to 2, pad to the first eos."""
    model_ids = (getattr(tokenizer, "model_token_ids", None) if tokenizer is not None else None) or {}

    def tokenizer_id(name: str) -> int | None:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        return int(value) if isinstance(value, int) else None
    bos = model_ids.get("bos_token_id")
    bos = int(bos) if isinstance(bos, int) else tokenizer_id("bos_token_id")
    eos = model_ids.get("eos_token_id")
    turn_end = tokenizer_id("eos_token_id")
    if eos is None:
        eos = turn_end if turn_end is not None else 2
    ids = [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    if turn_end is not None and turn_end not in ids:
        ids.insert(0, turn_end)
    pad = model_ids.get("pad_token_id")
    pad = int(pad) if isinstance(pad, int) else tokenizer_id("pad_token_id")
    return (1 if bos is None else bos), (ids[0] if len(ids) == 1 else ids), (ids[0] if pad is None else pad)


def genai_config(facts: dict, tokenizer, context_length: int, provider: str) -> dict:
    """genai_config.json in the builder's layout (decoder inputs/outputs, cache templates, search defaults)."""
    bos, eos, pad = special_token_ids(tokenizer)
    options = [{"cuda": {"enable_cuda_graph": "0"}}] if provider == "cuda" else []
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": options},
                "filename": MODEL,
                "head_size": facts["head_size"],
                "hidden_size": facts["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": facts["num_attention_heads"],
                "num_hidden_layers": facts["num_hidden_layers"],
                "num_key_value_heads": facts["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": facts["vocab_size"],
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_genai(model: PuzzleDecoder, folder: str | os.PathLike, tokenizer=None, *, context_length: int = 4096,
                 provider: str = "cuda") -> Path:
    """Write model.onnx (+ data), genai_config.json and the tokenizer files into `folder` (which must be new or
    empty): everything is made and verified in a temporary folder beside it, then renamed into place."""
    proto, weights, facts = build_graph(model, context_length)
    extra = {"genai_config.json": (json.dumps(genai_config(facts, tokenizer, context_length, provider), indent=4) + "\n").encode()}
    with staged_folder(Path(folder)) as stage, tempfile.TemporaryDirectory() as files:
        if tokenizer is not None:
            save_tokenizer(tokenizer, files)
            extra.update({path.name: path for path in sorted(Path(files).iterdir())})
        save_model(ModelOutput(proto, stage, dict(weights)), stage / MODEL, external=True, extra_files=extra)
    return Path(folder)


def quantize_genai(source: str | os.PathLike, folder: str | os.PathLike, config: QuantConfig = QuantConfig()) -> Path:
    """The onnxruntime-genai folder `source` with its MatMul weights block-quantized (passes.ffn.int4.quantize_matmuls,
    the model builder's int4 defaults), written to `folder` (new or empty) with the same config and tokenizer files."""
    model = load_model(Path(source) / MODEL)
    output, _ = quantize_matmuls(model, config)
    extra = {p.name: p for p in sorted(Path(source).iterdir()) if p.name not in (MODEL, MODEL + ".data")}
    with staged_folder(Path(folder)) as stage:
        save_model(output, stage / MODEL, external=True, extra_files=extra)
    return Path(folder)
