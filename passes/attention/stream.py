"""The residual stream: every sublayer x' = x + f(n(x)) of an exported decoder, in stream order.

A sublayer is a residual node R that adds a branch output a to a stream tensor x, where a is computed from x
only through a normalization n of x (the forms of passes.support.norms: decomposed RMSNorm / LayerNorm on x or its
float32 Cast, the fused norm ops, and the skip norms, whose output 3 is x and output 0 is n(x)).
R is an Add(x, a), or a skip normalization reading x and a as input and skip (then x' is its output 3). Adds
whose operands are not both a stream tensor and something computed from its normalization are never residual
adds: attention masks, biases and rotary terms are not normalized.

The branch of a sublayer is every node reached forward from n(x) before R, minus what R itself feeds (the rest
of the model): the projections, the attention or FFN, and layer-local graph outputs such as a decode graph's
present key/value. Its kind is "attention" when it holds an attention op (GroupQueryAttention,
MultiHeadAttention, Attention (com.microsoft or ONNX opset 23), the other onnxruntime attention ops, or a Softmax
over a product of two activations, q k^T), else "mlp" (an FFN, a linear replacement, ...).

Layer numbers follow stream order: an attention sublayer opens a layer; any other sublayer opens one unless it
directly follows an attention sublayer (attention + FFN is one layer, FFN-only and attention-only layers count).
`layers.N` (also `layer.N`, `h.N`, `blocks.N`) in the branch's node and weight names is cross-checked; where
the two disagree the stream number is used and the disagreement is reported.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from passes.support.graph import GraphIndex, attribute
from passes.support.norms import SKIP_NORMS, float_casts, normalized_tensors

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "SparseAttention", "PagedAttention", "DecoderMaskedMultiHeadAttention",
                 "DecoderMaskedSelfAttention", "LongformerAttention", "QAttention")
_SCORE_PATH = ("Add", "Mul", "Div", "Where", "Cast", "Reshape", "Transpose", "Sub", "Tanh", "Softcap", "Expand")
_LAYER_NAME = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?)[./_](\d+)(?=[./_:]|$)")


@dataclass(frozen=True)
class Sublayer:
    """x' = x + a with a = branch(n(x)); residual_ports are the input slots of x and a on the residual node."""
    kind: str                        # "attention" or "mlp"
    position: int                    # 0-based among all sublayers, in stream order
    layer: int                       # stream-order layer number (see the module docstring)
    named_layer: int | None          # from `layers.N` in the branch's names, None if absent
    residual_in: str                 # x (the residual node may read an identity float32 Cast of it)
    residual_out: str                # x' (Add output, or the skip normalization's output 3; "" if not exposed)
    contribution: str                # a
    residual_node: int
    residual_node_name: str
    residual_ports: tuple[int, int]
    branch: tuple[int, ...]          # nodes computing a (and layer-local outputs) from x's normalization
    local_outputs: tuple[str, ...]   # graph outputs only this branch produces (a decode graph's present K/V)
    data_type: int                   # element type of a


@dataclass
class Stream:
    sublayers: list[Sublayer]
    mismatches: list[tuple[int, int]] = field(default_factory=list)   # (stream layer, named layer) that differ

    @property
    def attention(self) -> list[Sublayer]:
        return [s for s in self.sublayers if s.kind == "attention"]

    def mismatch_note(self) -> str | None:
        """One line on layer numbers that disagree with the names, or None."""
        if not self.mismatches:
            return None
        shown = ", ".join(f"{s} (named {n})" for s, n in self.mismatches[:6])
        more = f" and {len(self.mismatches) - 6} more" if len(self.mismatches) > 6 else ""
        return (f"layer numbers follow the residual stream and differ from `layers.N` in the names at "
                f"{shown}{more}; the stream numbers are used")


def find_stream(model: onnx.ModelProto, index: GraphIndex | None = None) -> Stream:
    """Every sublayer of the residual stream, in stream (graph) order, numbered by layer."""
    index = index or GraphIndex.build(model.graph)
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    found = []
    for x, seeds, norm_nodes in normalized_tensors(index):
        sub = _sublayer_from(index, types, x, seeds, norm_nodes)
        if sub is not None:
            found.append(sub)
    found.sort(key=lambda s: s["residual_node"])
    sublayers, layer, previous = [], -1, None
    for position, s in enumerate(found):
        if s["kind"] == "attention" or previous != "attention":
            layer += 1
        previous = s["kind"]
        sublayers.append(Sublayer(position=position, layer=layer, **s))
    mismatches = [(s.layer, s.named_layer) for s in sublayers if s.named_layer is not None and s.named_layer != s.layer]
    return Stream(sublayers, mismatches)


# ---------------------------------------------------------------- the sublayer of one normalization

def _residual_slot(index: GraphIndex, node: onnx.NodeProto, aliases: set[str], arriving: str) -> tuple[int, int] | None:
    """(slot of x, slot of a) when `node` adds the branch tensor `arriving` to x (one of `aliases`)."""
    if node.op_type == "Add" and len(node.input) == 2 or node.op_type in SKIP_NORMS and len(node.input) >= 3:
        pair = list(node.input[:2])
        if arriving in pair:
            a_slot = pair.index(arriving)
            if pair[1 - a_slot] in aliases:
                return 1 - a_slot, a_slot
    return None


def _sublayer_from(index: GraphIndex, types: dict[str, int], x: str, seeds: list[str], norm_nodes: list[int]) -> dict | None:
    aliases = {x, *float_casts(index, x)}
    visited: set[int] = set(norm_nodes)
    residual = None
    stack = list(seeds)
    limit = len(index.graph.node)
    while stack and len(visited) <= limit:
        tensor = stack.pop()
        for c in index.consumer_ids(tensor):
            if c in visited:
                continue
            node = index.node(c)
            slots = _residual_slot(index, node, aliases, tensor)
            if slots is not None:
                if residual is None or c < residual[0]:
                    residual = (c, slots)
                continue
            visited.add(c)
            stack.extend(o for o in node.output if o)
    if residual is None:
        return None
    r, (x_slot, a_slot) = residual
    r_node = index.node(r)
    branch = visited
    if any(k > r for k in branch):   # the walk went past R through a shared node: keep only what R does not feed
        branch = branch - index.forward_cone(r)
    if not branch:
        return None
    a = r_node.input[a_slot]
    x_in = r_node.input[x_slot]
    if x_in != x and (types.get(x) or _element_type(index, x)) == TensorProto.FLOAT:
        x_in = x      # R reads an identity float32 Cast of x (TorchScript traces x.float() of a float32 x so)
    x_out = r_node.output[0] if r_node.op_type == "Add" else (r_node.output[3] if len(r_node.output) > 3 else "")
    local = tuple(o for k in sorted(branch) for o in index.node(k).output if o and index.is_graph_output(o))
    kind = "attention" if any(_is_attention(index, k) for k in branch) else "mlp"
    return {"kind": kind, "named_layer": _named_layer(index, branch), "residual_in": x_in,
            "residual_out": x_out, "contribution": a, "residual_node": r, "residual_node_name": index.node_label(r),
            "residual_ports": (x_slot, a_slot), "branch": tuple(sorted(branch)), "local_outputs": local,
            "data_type": types.get(a) or types.get(x) or _element_type(index, a)}


def _is_attention(index: GraphIndex, k: int) -> bool:
    """An attention op, or a Softmax over scores that come from a MatMul of two activations (q k^T); a Softmax
    over a MatMul with a weight (an MoE router) is not attention."""
    node = index.node(k)
    if node.op_type in ATTENTION_OPS:
        return True
    if node.op_type != "Softmax":
        return False
    frontier, seen = [node.input[0]], set()
    for _ in range(8):
        nxt = []
        for tensor in frontier:
            found = index.producer_node(tensor)
            if found is None or found[0] in seen:
                continue
            seen.add(found[0])
            j, producer = found
            if producer.op_type in ("MatMul", "Einsum"):
                if all(index.constant_tensor(i) is None and not _from_constants(index, i) for i in producer.input[:2]):
                    return True
            elif producer.op_type in _SCORE_PATH:
                nxt.extend(i for i in producer.input if i)
        frontier = nxt
    return False


def _from_constants(index: GraphIndex, tensor: str) -> bool:
    """tensor is an initializer behind Cast / Transpose / Reshape nodes (a weight)."""
    for _ in range(4):
        if tensor in index.initializers or index.constant_tensor(tensor) is not None:
            return True
        found = index.producer_node(tensor)
        if found is None or found[1].op_type not in ("Cast", "Transpose", "Reshape", "Identity", "DequantizeLinear"):
            return False
        tensor = found[1].input[0]
    return False


def _named_layer(index: GraphIndex, branch: set[int]) -> int | None:
    """The most common N of `layers.N` in the names of the branch's nodes and of the weights only they read
    (a weight shared by several layers, such as deduplicated all-ones norm gains, says nothing)."""
    numbers: Counter[int] = Counter()
    for k in branch:
        node = index.node(k)
        own = [i for i in node.input if i in index.initializers and len(index.consumer_ids(i)) == 1]
        for name in [node.name, *own]:
            found = _LAYER_NAME.search(name)
            if found:
                numbers[int(found.group(1))] += 1
    return numbers.most_common(1)[0][0] if numbers else None


def _element_type(index: GraphIndex, tensor: str) -> int:
    """Element type of an untyped tensor: follow its producers back to a Cast's target or a float weight."""
    for _ in range(64):
        found = index.producer_node(tensor)
        if found is None:
            proto = index.constant_tensor(tensor)
            return proto.data_type if proto is not None else TensorProto.FLOAT
        _, node = found
        if node.op_type == "Cast":
            return attribute(node, "to")
        weights = [index.initializers[i] for i in node.input if i in index.initializers and index.initializers[i].dims]
        floats = [w.data_type for w in weights if w.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                                   TensorProto.BFLOAT16, TensorProto.DOUBLE)]
        if floats and node.op_type not in ("MatMulNBits",):
            return floats[0]
        tensor = next((i for i in node.input if i), "")
        if not tensor:
            break
    return TensorProto.FLOAT
