"""The graph forms an FFN block takes in real ONNX files, each matched and fused correctly.

Hand-built graphs (onnx.helper) cover one variation at a time: Gemm with transB, weights behind
Transpose(perm=[1,0]) and Cast, Sigmoid*Mul with its operands swapped, the gain Mul on either side,
Reciprocal+Mul vs Div, ReduceMean axes as attribute (opset 17) vs input (opset 18), Mul(x, x) vs Pow,
biases, fp16 with Cast to float32 and back, the fused norm ops SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization and ONNX's RMSNormalization (opset 23), QuickGelu, and graphs
onnxruntime optimized itself. The reference is numpy float64 evaluated from the same weights.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from passes.ffn.chains import find_chains
from passes.ffn.match import match_ffn_blocks
from passes.ffn.plan import Group
from passes.pipeline import fuse_file
from passes.support.graph import GraphIndex
from tests.helpers import rel_err
from tests.residual_models import cached_export, ort_run, parallel_reference

D = 16


# ---------------------------------------------------------------- numpy reference

@dataclass
class BlockWeights:
    g: np.ndarray
    wg: np.ndarray          # [d, m], MatMul layout
    wu: np.ndarray
    wd: np.ndarray          # [m, d]
    bg: np.ndarray | None = None
    bu: np.ndarray | None = None
    bd: np.ndarray | None = None
    eps: float = 1e-5

    def contribution(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.g
        a = h @ self.wg + (0 if self.bg is None else self.bg)
        u = h @ self.wu + (0 if self.bu is None else self.bu)
        return (a / (1 + np.exp(-a)) * u) @ self.wd + (0 if self.bd is None else self.bd)


def make_weights(widths, seed=0, bias=False, eps=1e-5) -> list[BlockWeights]:
    """Weights on the fp16 grid, so fp16 and fp32 graphs (and fp16 weights behind a Cast) store them exactly."""
    rng = np.random.default_rng(seed)
    r = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float16).astype(np.float64)
    out = []
    for m in widths:
        out.append(BlockWeights(
            g=(1 + 0.2 * rng.standard_normal(D)).astype(np.float16).astype(np.float64),
            wg=r(D, m, scale=0.9 / D ** 0.5), wu=r(D, m, scale=0.9 / D ** 0.5), wd=r(m, D, scale=0.9 / m ** 0.5),
            bg=r(m, scale=0.1) if bias else None, bu=r(m, scale=0.1) if bias else None,
            bd=r(D, scale=0.1) if bias else None, eps=eps))
    return out


def reference(x: np.ndarray, weights: list[BlockWeights], groups=()) -> np.ndarray:
    """Sequential blocks, except each group [a, z] in parallel form x + sum_t FFN_t(x)."""
    x = x.astype(np.float64)
    start = dict(groups)
    t = 0
    while t < len(weights):
        z = start.get(t, t)
        x = x + sum(weights[k].contribution(x) for k in range(t, z + 1))
        t = z + 1
    return x


# ---------------------------------------------------------------- graph builder

@dataclass
class Form:
    """How each block is written. Lists are indexed by block number modulo their length, so one chain mixes forms."""
    norm: list[str] = field(default_factory=lambda: ["pow_div"])     # pow_div | mul_recip | pow_div1 | simplified | rms23 | skip
    gain_left: list[bool] = field(default_factory=lambda: [False])
    reduce_axes_input: bool = False                                   # ReduceMean axes as input (opset >= 18)
    linear: list[str] = field(default_factory=lambda: ["matmul"])    # matmul | gemm_transb | gemm | transpose | cast | transpose_cast
    silu: list[str] = field(default_factory=lambda: ["mul_g_sig"])   # mul_g_sig | mul_sig_g | quickgelu
    packed: list[str] = field(default_factory=lambda: [""])           # "" | gate_up | up_gate: one MatMul + Split
    up_first: list[bool] = field(default_factory=lambda: [False])     # Mul(up, silu) instead of Mul(silu, up)
    residual_y_first: list[bool] = field(default_factory=lambda: [False])
    bias_first: list[bool] = field(default_factory=lambda: [False])   # Add(b, mm) instead of Add(mm, b)
    eps_as_constant_node: bool = False
    fp16: bool = False            # fp16 model: norm computed in float32 between Cast nodes, fp16 weights
    opset: int = 17
    rank: int = 3

    def pick(self, name, t):
        values = getattr(self, name)
        return values[t % len(values)]


class Builder:
    """Hand-built FFN chains in every recognized form, made with onnx-graphsurgeon: nodes and constants are
    gs objects, named by `_name`, exported with gs.export_onnx."""

    def __init__(self, form: Form):
        self.form, self.nodes, self.tensors, self.k = form, [], {}, 0
        self.T = TensorProto.FLOAT16 if form.fp16 else TensorProto.FLOAT
        self.np_t = np.float16 if form.fp16 else np.float32

    def _name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def _tensor(self, name: str):
        if not name:
            return gs.Variable.empty()
        if name not in self.tensors:
            self.tensors[name] = gs.Variable(name)
        return self.tensors[name]

    def node(self, op, inputs, n_out=1, domain="", **attrs):
        name = self._name(f"/b/{op}")
        outs = [self._tensor(f"{name}_out{i}") for i in range(n_out)]
        if op == "Constant":
            attrs = {"value": gs.Constant(f"{name}_value", numpy_helper.to_array(attrs["value"]))}
        self.nodes.append(gs.Node(op, name, attrs, inputs=[self._tensor(i) for i in inputs], outputs=outs,
                                  domain=domain or None))
        return outs[0].name if n_out == 1 else [o.name for o in outs]

    def init(self, array, base="w"):
        name = self._name(base)
        self.tensors[name] = gs.Constant(name, np.asarray(array))
        return name

    def scalar(self, value):
        if self.form.eps_as_constant_node:
            return self.node("Constant", [], value=numpy_helper.from_array(np.array(value, np.float32)))
        return self.init(np.array(value, np.float32), "c")

    def weight(self, w, kind):
        """MatMul-layout weight w [in, out] as an initializer, read through Transpose and/or Cast per `kind`."""
        transposed = "transpose" in kind or kind == "gemm_transb"
        cast = "cast" in kind
        stored = w.T if transposed else w
        stored = stored.astype(np.float16 if cast else self.np_t)
        name = self.init(np.ascontiguousarray(stored))
        if cast:
            name = self.node("Cast", [name], to=self.T)
        if "transpose" in kind:
            name = self.node("Transpose", [name], perm=[1, 0])
        return name

    def linear(self, h, w, b, t):
        kind = self.form.pick("linear", t)
        if kind.startswith("gemm"):
            inputs = [h, self.weight(w, kind)] + ([self.init(b.astype(self.np_t))] if b is not None else [])
            return self.node("Gemm", inputs, transB=int(kind == "gemm_transb"))
        y = self.node("MatMul", [h, self.weight(w, kind)])
        if b is not None:
            bias = self.init(b.astype(self.np_t))
            y = self.node("Add", [bias, y] if self.form.pick("bias_first", t) else [y, bias])
        return y

    def norm(self, x, p: BlockWeights, t, skip=None):
        """h = n(x) * g; returns h and the residual x (which a skip norm computes itself)."""
        kind = "skip" if skip is not None else self.form.pick("norm", t)
        if kind == "skip":
            kind = "simplified"
        gain = self.init(p.g.astype(self.np_t), "g")
        if skip is not None:
            h, _, _, x = self.node("SkipSimplifiedLayerNormalization", [skip[0], skip[1], gain], n_out=4,
                                   domain="com.microsoft", epsilon=p.eps)
            return h, x
        if kind == "simplified":
            return self.node("SimplifiedLayerNormalization", [x, gain], axis=-1, epsilon=p.eps), x
        if kind == "rms23":
            return self.node("RMSNormalization", [x, gain], axis=-1, epsilon=p.eps), x
        xf = self.node("Cast", [x], to=TensorProto.FLOAT) if self.form.fp16 else x
        sq = self.node("Mul", [xf, xf]) if kind == "mul_recip" else self.node("Pow", [xf, self.scalar(2.0)])
        if self.form.reduce_axes_input:
            ms = self.node("ReduceMean", [sq, self.init(np.array([-1], np.int64), "axes")], keepdims=1)
        else:
            ms = self.node("ReduceMean", [sq], axes=[-1], keepdims=1)
        var = self.node("Add", [self.scalar(p.eps), ms] if t % 2 else [ms, self.scalar(p.eps)])
        sd = self.node("Sqrt", [var])
        if kind == "pow_div":
            n = self.node("Div", [xf, sd])
        elif kind == "mul_recip":
            n = self.node("Mul", [self.node("Reciprocal", [sd]), xf])
        else:   # pow_div1: x * (1 / sqrt)
            n = self.node("Mul", [xf, self.node("Div", [self.scalar(1.0), sd])])
        if self.form.fp16:
            n = self.node("Cast", [n], to=TensorProto.FLOAT16)
        h = self.node("Mul", [gain, n] if self.form.pick("gain_left", t) else [n, gain])
        return h, x

    def ffn(self, h, p: BlockWeights, t):
        packed = self.form.pick("packed", t)
        if packed:
            order = [(p.wg, p.bg), (p.wu, p.bu)][::1 if packed == "gate_up" else -1]
            w = np.concatenate([order[0][0], order[1][0]], axis=1)
            b = None if p.bg is None else np.concatenate([order[0][1], order[1][1]])
            both = self.linear(h, w, b, t)
            m = p.wg.shape[1]
            if self.form.opset >= 13:
                halves = self.node("Split", [both, self.init(np.array([m, m], np.int64), "split")], n_out=2, axis=-1)
            else:
                halves = self.node("Split", [both], n_out=2, axis=-1, split=[m, m])
            g, u = halves if packed == "gate_up" else halves[::-1]
        else:
            g = self.linear(h, p.wg, p.bg, t)
        silu = self.form.pick("silu", t)
        if silu == "quickgelu":
            s = self.node("QuickGelu", [g], domain="com.microsoft", alpha=1.0)
        else:
            sig = self.node("Sigmoid", [g])
            s = self.node("Mul", [g, sig] if silu == "mul_g_sig" else [sig, g])
        u = u if packed else self.linear(h, p.wu, p.bu, t)
        a = self.node("Mul", [u, s] if self.form.pick("up_first", t) else [s, u])
        return self.linear(a, p.wd, p.bd, t)

    def model(self, weights: list[BlockWeights]) -> onnx.ModelProto:
        f = self.form
        x = "x"
        uses_skip = "skip" in f.norm
        pending = None
        for t, p in enumerate(weights):
            h, x = self.norm(x, p, t, skip=pending if uses_skip and t > 0 else None)
            y = self.ffn(h, p, t)
            if uses_skip and t < len(weights) - 1:
                pending = (x, y)
                continue
            x = self.node("Add", [y, x] if f.pick("residual_y_first", t) else [x, y])
        self.nodes[-1].outputs[0].name = "y"
        shape = ["batch", "seq", D] if f.rank == 3 else ["tokens", D]
        dtype = np.float16 if f.fp16 else np.float32
        x_in, y_out = self.tensors["x"], self.nodes[-1].outputs[0]
        x_in.dtype, x_in.shape, y_out.dtype, y_out.shape = dtype, shape, dtype, shape
        graph = gs.Graph(nodes=self.nodes, inputs=[x_in], outputs=[y_out], name="ffn_chain", opset=f.opset)
        model = gs.export_onnx(graph, do_type_check=False)
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", f.opset))
        if any(n.domain == "com.microsoft" for n in model.graph.node):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        model.ir_version = 11 if f.opset >= 23 else 10
        return model


FORMS = {
    "pow-div-gain-right": Form(),
    "mulxx-reciprocal-gain-left": Form(norm=["mul_recip"], gain_left=[True]),
    "div1-mixed-gain-sides": Form(norm=["pow_div1", "pow_div", "mul_recip"], gain_left=[True, False]),
    "reduce-axes-input-opset18": Form(norm=["pow_div", "mul_recip"], reduce_axes_input=True, opset=18),
    "eps-constant-node": Form(eps_as_constant_node=True, norm=["pow_div1", "mul_recip"]),
    "gemm-transB-2d": Form(linear=["gemm_transb"], rank=2),
    "gemm-mixed-2d": Form(linear=["gemm", "gemm_transb", "matmul"], rank=2),
    "weights-transposed": Form(linear=["transpose"]),
    "weights-cast": Form(linear=["cast"]),
    "weights-transposed-and-cast": Form(linear=["transpose_cast", "matmul", "cast", "transpose"]),
    "silu-swapped": Form(silu=["mul_sig_g", "mul_g_sig"], up_first=[True, False], residual_y_first=[False, True]),
    "quickgelu": Form(silu=["quickgelu", "mul_g_sig"]),
    "simplified-layer-norm": Form(norm=["simplified", "pow_div"]),
    "skip-simplified-layer-norm": Form(norm=["skip"]),
    "rms-normalization-opset23": Form(norm=["rms23", "mul_recip"], opset=23, reduce_axes_input=True),
    "fp16-cast-around-norm": Form(fp16=True, norm=["pow_div", "mul_recip"], gain_left=[True, False]),
    "fp16-skip-simplified": Form(fp16=True, norm=["skip"]),
    "packed-gate-up": Form(packed=["gate_up", "", "up_gate"]),
    "packed-gate-up-opset11": Form(packed=["gate_up", "up_gate"], opset=11),
}
BIAS_FORMS = {
    "bias-add": Form(bias_first=[False, True]),
    "bias-gemm-2d": Form(linear=["gemm_transb", "gemm"], rank=2),
    "bias-transposed-cast-swapped": Form(linear=["transpose_cast", "matmul"], silu=["mul_sig_g"], bias_first=[True]),
    "bias-packed-gate-up": Form(packed=["up_gate", "gate_up"], linear=["transpose"]),
}
WIDTHS = [24, 40, 8, 56]
# ops each form must really contain (so a builder slip cannot turn a form into the default one)
FORM_OPS = {
    "mulxx-reciprocal-gain-left": {"Reciprocal"}, "div1-mixed-gain-sides": {"Div", "Reciprocal"},
    "eps-constant-node": {"Constant"}, "gemm-transB-2d": {"Gemm"}, "gemm-mixed-2d": {"Gemm", "MatMul"},
    "weights-transposed": {"Transpose"}, "weights-cast": {"Cast"}, "weights-transposed-and-cast": {"Transpose", "Cast"},
    "quickgelu": {"QuickGelu", "Sigmoid"}, "simplified-layer-norm": {"SimplifiedLayerNormalization", "Pow"},
    "skip-simplified-layer-norm": {"SkipSimplifiedLayerNormalization"}, "rms-normalization-opset23": {"RMSNormalization"},
    "fp16-cast-around-norm": {"Cast"}, "fp16-skip-simplified": {"SkipSimplifiedLayerNormalization"},
    "bias-gemm-2d": {"Gemm"}, "bias-transposed-cast-swapped": {"Transpose", "Cast"},
    "packed-gate-up": {"Split"}, "packed-gate-up-opset11": {"Split"}, "bias-packed-gate-up": {"Split", "Transpose"},
}


def x_for(form: Form, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    shape = (2, 3, D) if form.rank == 3 else (5, D)
    return rng.standard_normal(shape).astype(np.float16 if form.fp16 else np.float32)


@pytest.mark.parametrize("name, form, bias", [pytest.param(k, v, False, id=k) for k, v in FORMS.items()]
                         + [pytest.param(k, v, True, id=k) for k, v in BIAS_FORMS.items()]
                         + [pytest.param("bias-some-blocks", Form(linear=["gemm", "matmul"], rank=2), "some",
                                         id="bias-some-blocks")])
def test_hand_built_forms(name, form, bias, tmp_path):
    weights = make_weights(WIDTHS, seed=len(name), bias=bool(bias))
    if bias == "some":   # blocks 1 and 3 have no biases at all, block 2 only a down bias
        for t in (1, 3):
            weights[t].bg = weights[t].bu = weights[t].bd = None
        weights[2].bg = weights[2].bu = None
    model = Builder(form).model(weights)
    assert FORM_OPS.get(name, set()) <= {n.op_type for n in model.graph.node}
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    x = x_for(form)
    tol = 1e-2 if form.fp16 else 1e-5
    # the builder is right: onnxruntime runs the sequential chain as numpy does
    assert rel_err(ort_run(path, {"x": x})[0], reference(x, weights)) < tol

    found = match_ffn_blocks(model)
    assert len(found.blocks) == len(WIDTHS), found.rejections
    assert [b.width for b in found.blocks] == WIDTHS
    assert [c.ordinals for c in find_chains(found.blocks, GraphIndex.build(model.graph))] == [(0, 1, 2, 3)]
    assert all(abs(b.norm.eps - 1e-5) < 1e-11 for b in found.blocks)

    for groups, merge in [([(0, 2)], False), ([(0, 3)], True), ([(0, 1), (2, 3)], False)]:
        out = tmp_path / "fused.onnx"
        result = fuse_file(path, out, groups=[Group(a, z) for a, z in groups], merge_gate_up=merge)
        per_block = [2 if form.pick("packed", t) else 3 for t in range(len(WIDTHS))]
        assert result.report["before"]["matmuls"] == sum(per_block)
        assert result.report["after"]["matmuls"] == sum(per_block) - sum(sum(per_block[a:z + 1]) for a, z in groups) \
            + (2 if merge else 3) * len(groups)
        assert result.report["after"]["ffn_blocks"] == len(WIDTHS) - sum(z - a for a, z in groups)
        y = ort_run(out, {"x": x})[0]
        assert y.dtype == x.dtype
        assert rel_err(y, reference(x, weights, groups)) < tol, (groups, merge)
    # the paper rule on a chain of four: fuse 0-2
    result = fuse_file(path, out)
    assert result.report["groups"] == [[0, 2]]
    assert rel_err(ort_run(out, {"x": x})[0], reference(x, weights, [(0, 2)])) < tol


def test_rms_normalization_runs_in_onnxruntime():
    """ONNX's own RMSNormalization (opset 23): onnxruntime runs it, so the test above fuses and runs it too."""
    model = Builder(Form(norm=["rms23"], opset=23)).model(make_weights([8]))
    assert any(n.op_type == "RMSNormalization" for n in model.graph.node)
    x = x_for(Form())
    assert rel_err(ort_run(model, {"x": x})[0], reference(x, make_weights([8]))) < 1e-5


@pytest.mark.parametrize("change, check", [
    (lambda m: _set_attr(m, "QuickGelu", "alpha", 1.702), "alpha"),
    (lambda m: _set_attr(m, "ReduceMean", "keepdims", 0), "ReduceMean"),
    (lambda m: _set_attr(m, "Transpose", "perm", [0, 1]), "Transpose"),
    (lambda m: _set_attr(m, "Gemm", "alpha", 0.5), "Gemm"),
])
def test_look_alikes_are_not_blocks(change, check):
    """Graphs that look like FFN blocks but compute something else are rejected, naming the failed check."""
    form = Form(silu=["quickgelu"], linear=["transpose", "gemm_transb"], rank=2)
    model = Builder(form).model(make_weights([8, 8]))
    assert len(match_ffn_blocks(model).blocks) == 2
    change(model)
    found = match_ffn_blocks(model)
    assert len(found.blocks) < 2
    assert any(check in r.check for r in found.rejections), found.rejections


def _set_attr(model, op, name, value):
    node = next(n for n in model.graph.node if n.op_type == op)
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


# ---------------------------------------------------------------- graphs onnxruntime optimized

def ort_optimized(src, dst, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


# the model of test_fuse.py (same arguments, so the cached export is shared): chains 0-2 and 3-8
LAYOUT, FFN_WIDTHS = "FFFAFFFFFF", [40, 72, 56, 24, 88, 64, 32, 48, 96]
SEEDS = {torch.float32: 3, torch.float16: 5}


@pytest.mark.parametrize("dynamo, dtype", [pytest.param(False, torch.float32, id="torchscript-fp32"),
                                           pytest.param(True, torch.float32, id="dynamo-fp32"),
                                           pytest.param(False, torch.float16, id="torchscript-fp16")])
def test_onnxruntime_optimized_graphs(dynamo, dtype, tmp_path):
    stack, path = cached_export(LAYOUT, dynamo=dynamo, dtype=dtype, widths=FFN_WIDTHS, seed=SEEDS[dtype])
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    seen, made = [], collections.Counter()
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        optimized = tmp_path / f"opt_{int(level)}.onnx"
        ops = collections.Counter(n.op_type for n in ort_optimized(path, optimized, level).graph.node)
        if set(ops) in seen:
            continue   # ORT_ENABLE_ALL made the same kinds of ops as ORT_ENABLE_EXTENDED: nothing new to test
        seen.append(set(ops))
        made.update(ops)
        if ops["QuickGelu"]:
            assert ops["QuickGelu"] == 9 and ops["Sigmoid"] == 0
        out = tmp_path / "fused.onnx"
        result = fuse_file(optimized, out)
        assert result.report["chains"] == [[0, 1, 2], [3, 4, 5, 6, 7, 8]], result.report["rejections"]
        assert result.report["groups"] == [[0, 1], [3, 7]]
        assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, [(0, 1), (3, 7)])) < tol
    # what onnxruntime made of the exports: SiLU became QuickGelu; TorchScript's Div-form RMSNorm became
    # SimplifiedLayerNormalization (fp16: at ORT_ENABLE_ALL only; dynamo's Reciprocal form stays decomposed)
    assert made["QuickGelu"]
    if not dynamo:
        assert made["SimplifiedLayerNormalization"]


def test_skip_simplified_layer_norm_from_onnxruntime_tools(tmp_path):
    """SkipSimplifiedLayerNormalization: onnxruntime's CPU session does not make it here, so it comes from
    onnxruntime.transformers' own fusion over the SimplifiedLayerNormalization graph the session made."""
    from onnxruntime.transformers.fusion_skiplayernorm import FusionSkipLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel
    stack, path = cached_export(LAYOUT, widths=FFN_WIDTHS, seed=3)
    model = OnnxModel(ort_optimized(path, tmp_path / "ext.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
    FusionSkipLayerNormalization(model, "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization").apply()
    model.prune_graph()
    model.topological_sort()
    skip_path = tmp_path / "skip.onnx"
    onnx.save(model.model, skip_path)
    ops = collections.Counter(n.op_type for n in model.model.graph.node)
    assert ops["SkipSimplifiedLayerNormalization"] >= 7
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    assert rel_err(ort_run(skip_path, {"x": x.numpy()})[0], parallel_reference(stack, x, [])) < 1e-5
    found = match_ffn_blocks(model.model)
    assert len(found.blocks) == 9
    assert [c.ordinals for c in find_chains(found.blocks, GraphIndex.build(model.model.graph))] == [(0, 1, 2), (3, 4, 5, 6, 7, 8)]
    assert {b.norm.kind for b in found.blocks} >= {"SkipSimplifiedLayerNormalization"}
    for groups in ([(0, 2)], [(0, 1), (3, 8)], [(1, 2), (4, 6)], [(3, 4), (5, 6), (7, 8)]):
        out = tmp_path / "fused.onnx"
        fuse_file(skip_path, out, groups=[Group(a, z) for a, z in groups])
        assert rel_err(ort_run(out, {"x": x.numpy()})[0], parallel_reference(stack, x, groups)) < 1e-5, groups


def test_deep_chain(tmp_path):
    """400 blocks in one chain: matching walked the residual stream recursively (RecursionError past a few
    hundred layers) and dead-node removal rescanned the graph once per removed node layer (36 s for 300)."""
    import time
    weights = make_weights([8] * 400, seed=5)
    path = tmp_path / "deep.onnx"
    onnx.save(Builder(Form(norm=["pow_div", "mul_recip"])).model(weights), path)
    start = time.perf_counter()
    result = fuse_file(path, tmp_path / "fused.onnx", groups=[Group(0, 199), Group(200, 398)])
    assert time.perf_counter() - start < 15
    assert result.report["chains"] == [list(range(400))]
    x = x_for(Form())
    assert rel_err(ort_run(tmp_path / "fused.onnx", {"x": x})[0], reference(x, weights, [(0, 199), (200, 398)])) < 1e-5
