"""What a model's graph inputs are: their specs (name, element type, shape), the dimensions of a graph value, the
role of each dimension (batch, new tokens, cache length, ...), concrete shapes for a batch of tokens, which inputs
are token ids and their vocabulary, and the KV-cache sizes a graph leaves dynamic. Reading the graph only: making
and checking the arrays fed to it is passes.support.calibration's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.support.errors import fail

INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
             TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, element type (ONNX enum) and shape (int = fixed, str/None = dynamic)."""
    name: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None   # None: rank unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()


_ORT_TYPES = {f"tensor({name})": enum for name, enum in (
    ("float", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16),
    ("double", TensorProto.DOUBLE), ("int64", TensorProto.INT64), ("int32", TensorProto.INT32),
    ("int16", TensorProto.INT16), ("int8", TensorProto.INT8), ("uint8", TensorProto.UINT8),
    ("uint16", TensorProto.UINT16), ("uint32", TensorProto.UINT32), ("uint64", TensorProto.UINT64),
    ("bool", TensorProto.BOOL))}


def ort_type_to_onnx(type_string: str) -> int:
    """'tensor(float)' -> TensorProto.FLOAT."""
    if type_string not in _ORT_TYPES:
        raise ValueError(f"unsupported tensor type {type_string}")
    return _ORT_TYPES[type_string]


def value_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """The dimensions of a graph input/output/value_info: an int where the graph fixes the size, the dim_param
    name where it names it, None where it says nothing; None for the whole when the rank is unknown (no shape)."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)


def input_specs(source) -> list[InputSpec]:
    """InputSpecs from an onnx ModelProto / GraphProto (inputs that are not initializers), onnxruntime NodeArgs
    (`session.get_inputs()`), or InputSpecs."""
    if isinstance(source, onnx.ModelProto):
        source = source.graph
    if isinstance(source, onnx.GraphProto):
        inits = {t.name for t in source.initializer}
        return [InputSpec(vi.name, vi.type.tensor_type.elem_type, value_dims(vi))
                for vi in source.input if vi.name not in inits]
    specs = []
    for item in source:
        if isinstance(item, InputSpec):
            specs.append(item)
        else:   # onnxruntime NodeArg
            shape = None if item.shape is None else tuple(item.shape)
            specs.append(InputSpec(item.name, ort_type_to_onnx(item.type), shape))
    return specs


def vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that are token ids -> vocabulary size.

    An input is a token input when it reaches (through Cast/Reshape/Flatten/Squeeze/Unsqueeze) the indices of a
    Gather whose data is an initializer: vocab = that table's row count. Otherwise, an integer input named
    like 'input_ids' gets the last axis of an output named 'logits', when it is fixed.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    int_inputs = [s for s in input_specs(graph) if s.elem_type in INT_TYPES]
    logits_vocab = None
    for out in graph.output:
        dims = value_dims(out)
        if out.name == "logits" and dims and isinstance(dims[-1], int):
            logits_vocab = int(dims[-1])
    found = {}
    for spec in int_inputs:
        frontier, seen = [spec.name], set()
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node in consumers.get(tensor, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor and node.input[0] in inits:
                    table = inits[node.input[0]]
                    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
                    if table.dims and axis in (0, -len(table.dims)):
                        rows = int(table.dims[0])
                        found[spec.name] = min(rows, found.get(spec.name, rows))
                elif node.op_type in ("Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity") and node.input[0] == tensor:
                    frontier.append(node.output[0])
        if spec.name not in found and logits_vocab and "input_ids" in spec.name:
            found[spec.name] = logits_vocab
    return found


# ---------------------------------------------------------------- dimensions and shapes

def is_cache(spec: InputSpec) -> bool:
    """A KV-cache input (past_key_values.0.key, past_key_3, ...)."""
    return spec.elem_type in FLOAT_TYPES and ("past" in spec.name.lower() or "cache" in spec.name.lower())


def shape_text(shape) -> str:
    """'[batch, ?, 64]': a graph shape for messages (unknown dims as '?')."""
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def dimension_role(spec: InputSpec, axis: int) -> str:
    """The one rule for what a dimension of a graph input is: "fixed" (a number in the graph), "batch" (dynamic
    axis 0), in a KV-cache input "past" (a dim named like "past"), "num_key_value_heads" (axis 1) or "head_size"
    (the last axis), "total" (a dim named like "total": past + new tokens, as an attention mask over the cache),
    else "seq" (the new tokens)."""
    d = spec.shape[axis]
    name = str(d or "").lower()
    if isinstance(d, int) and d > 0:
        return "fixed"
    if axis == 0:
        return "batch"
    if is_cache(spec):
        if "past" in name:
            return "past"
        return "head_size" if axis == len(spec.shape) - 1 else "num_key_value_heads" if axis == 1 else "unknown"
    return "total" if "total" in name else "seq"


def concrete_shape(spec: InputSpec, batch: int, seq: int, hints: Mapping[str, int], past: int = 0) -> tuple[int, ...]:
    """The shape of one input for `batch` rows of `seq` new tokens after `past` cached ones (dimension_role);
    cache dimensions the graph leaves dynamic come from `hints` (head_size, num_key_value_heads)."""
    if spec.shape is None:
        fail(f"input '{spec.name}' has unknown rank; pass --inputs")
    sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    shape = []
    for axis, d in enumerate(spec.shape):
        role = dimension_role(spec, axis)
        if role == "fixed":
            shape.append(int(d))
        elif role in sizes:
            shape.append(sizes[role])
        elif role in hints:
            shape.append(int(hints[role]))
        else:
            fail(f"KV-cache input '{spec.name}' has a dynamic dimension '{d or '?'}' (axis {axis}) whose size is not "
                 f"known; pass --inputs with that input")
    return tuple(shape)


def cache_hints(model: onnx.ModelProto, model_path: Path | None = None) -> dict[str, int]:
    """Sizes of KV-cache dimensions the graph leaves dynamic: from an onnxruntime-genai config beside the model,
    else from a GroupQueryAttention's attributes and its packed QKV projection ([d, (heads + 2 kv_heads) x head])."""
    if model_path is not None:
        from passes.support.genai import genai_folder
        folder = genai_folder(Path(model_path))
        if folder is not None:
            return {k: int(folder.decoder[k]) for k in ("head_size", "num_key_value_heads")
                    if isinstance(folder.decoder.get(k), int)}
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or (len(node.input) > 1 and node.input[1]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        heads, kv = attrs.get("num_heads"), attrs.get("kv_num_heads")
        qkv = producer.get(node.input[0])
        weight = inits.get(qkv.input[1]) if qkv is not None and qkv.op_type == "MatMul" else None
        if heads and kv and weight is not None and len(weight.dims) == 2 and weight.dims[1] % (heads + 2 * kv) == 0:
            return {"head_size": int(weight.dims[1] // (heads + 2 * kv)), "num_key_value_heads": int(kv)}
    return {}
