"""Running part of a graph: one base run exposing every tensor needed later, then, for each removal of a
contribution from the residual stream, a run of only the part of the graph downstream of it.

A removal replaces the contribution a at its residual node by zeros (ConstantOfShape(Shape(x))), so x' = x + 0 = x
exactly, whatever the node is (Add, or the next block's SkipSimplifiedLayerNormalization). Tensors the suffix
reads from before the cut (x itself, rotary tables, masks, shapes) are fed from the base run as they were
(onnxruntime values, any element type); constant subgraphs (weight casts and transposes) are kept in the suffix.
The variants live in memory; external weights are read in place through the session's external-data folder;
the user's file is never touched. Each run loads the weights of its part of the graph: about n/2 times the model
for n removals (passes.measure.streams reads them once).

Cost is reported in forward-pass equivalents (COST_DEFINITION): the sum over runs of the weight-MatMul FLOPs
executed (per token: 2 x the constant operand's size, for every MatMul / Gemm / MatMulNBits in the run), plus work
charged from outside onnxruntime (the numpy FFN probes) in the same unit, divided by those of one full forward pass
of the original graph; `parts` splits it and the seconds by kind of work. Attention score products and elementwise
work are not counted; the node-count fraction is reported beside it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.support.errors import fail
from passes.support.graph import GraphIndex
from passes.support.graph_inputs import ort_type_to_onnx
from passes.support.onnx_io import (
    LoadedModel,
    execution_providers,
    ort_session,
    placeholder,
    resolve_provider,
    run_session,
    tensor_nbytes,
)

COST_DEFINITION = ("forward_pass_equivalents = sum over every part of the analysis of the weight-MatMul FLOPs executed per "
                   "calibration token (onnxruntime runs: MatMul/Gemm/MatMulNBits with a constant operand, 2 x its size per "
                   "token; FFN probes: 6 d m per probed token of each block in numpy (suffix execution), their runs in "
                   "onnxruntime (segments execution)) / the same for one full forward pass "
                   "of the original model; attention score products and elementwise ops are not counted. `parts` splits "
                   "it, and the seconds, by kind of work. weights_read_bytes = the initializer bytes every onnxruntime "
                   "session loaded plus the weights the numpy probes read; weights_read_multiple = that / the model's "
                   "initializer bytes")
RUNS = "onnxruntime runs"
_WEIGHT_PASSTHROUGH = ("Cast", "Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze", "DequantizeLinear")


@dataclass
class Cost:
    forward_pass_equivalents: float   # see COST_DEFINITION
    node_fraction: float              # sum over runs of (nodes in the run) / (nodes of the original graph)
    seconds: float                    # wall time of the whole analysis (sessions, runs, metrics)
    session_seconds: float            # creating onnxruntime sessions (execution "segments": partly while runs went on)
    runs: int
    per_run: list[dict] = field(default_factory=list)   # {"run", "part", "forward_pass_fraction", "nodes", "seconds"}
    definition: str = COST_DEFINITION
    provider: str = "cpu"                 # where onnxruntime ran
    weights_read_bytes: int = 0           # see COST_DEFINITION
    weights_read_multiple: float | None = None
    execution: str = "suffix"             # "segments" (passes.measure.streams) or "suffix" (SuffixRuns)
    segments: int | None = None           # segments the graph was cut into (execution "segments")
    activations: str = "host"             # where values between runs were kept: "host" or "device"
    activation_bytes_peak: int | None = None   # most bytes of stream values held at once (execution "segments")
    per_segment: list[dict] = field(default_factory=list)   # execution "segments": {"segment", "starts_at",
    #   "weight_bytes", "session_seconds", "runs", "run_seconds", "forward_pass_fraction"} (one run of it)
    session_wait_seconds: float | None = None   # execution "segments": of `seconds`, waiting for sessions to open

    @property
    def parts(self) -> dict[str, dict]:
        """Forward-pass equivalents, seconds and count of each kind of work ("onnxruntime runs", "FFN probes", ...)."""
        parts: dict[str, dict] = {}
        for run in self.per_run:
            part = parts.setdefault(run.get("part", RUNS), {"forward_pass_equivalents": 0.0, "seconds": 0.0, "count": 0})
            part["forward_pass_equivalents"] += run["forward_pass_fraction"] or 0.0
            part["seconds"] += run["seconds"]
            part["count"] += 1
        return {name: {**p, "forward_pass_equivalents": round(p["forward_pass_equivalents"], 4),
                       "seconds": round(p["seconds"], 3)} for name, p in parts.items()}

    def record(self) -> dict:
        rec = asdict(self)
        rec["parts"] = self.parts
        rec["forward_pass_equivalents"] = round(self.forward_pass_equivalents, 4)
        rec["node_fraction"] = round(self.node_fraction, 4)
        rec["seconds"] = round(self.seconds, 3)
        rec["session_seconds"] = round(self.session_seconds, 3)
        rec["session_wait_seconds"] = None if self.session_wait_seconds is None else round(self.session_wait_seconds, 3)
        rec["weights_read_multiple"] = None if self.weights_read_multiple is None else round(self.weights_read_multiple, 4)
        return rec


def weight_bytes(net: GraphIndex, names=None) -> int:
    """Bytes of the initializers `names` (default: all of them) as stored."""
    names = (*net.initializers, *net.sparse_initializers) if names is None else names
    return sum(tensor_nbytes(net.initializers[n]) if n in net.initializers else tensor_nbytes(net.sparse_initializers[n].values)
               for n in names)


def weight_flops(index: GraphIndex) -> list[float]:
    """Per node: weight-MatMul FLOPs per token (2 x the size of a constant operand of MatMul / Gemm /
    MatMulNBits, reached through Cast / Transpose / Reshape and the like), else 0."""
    def weight_size(name: str) -> int | None:
        for _ in range(16):
            if name in index.initializers:
                return int(np.prod(index.initializers[name].dims, dtype=np.int64))
            k = index.producer.get(name)
            if k is None or k not in index.constant_nodes:
                return None
            node = index.node(k)
            if node.op_type not in _WEIGHT_PASSTHROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    flops = []
    for node in index.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            flops.append(2.0 * attrs.get("K", 0) * attrs.get("N", 0))
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger") and len(node.input) >= 2:
            sizes = [s for s in (weight_size(name) for name in node.input[:2]) if s]
            flops.append(2.0 * sizes[0] if sizes else 0.0)
        else:
            flops.append(0.0)
    return flops


@dataclass
class _Cut:
    """A run: nodes to execute (original indices), tensors fed from the base run, graph inputs fed from the
    calibration data, initializers used, and the residual node to rewire (None for the base run)."""
    label: str
    nodes: list[int]
    boundary: list[str]
    graph_inputs: list[str]
    inits: list[str]
    outputs: list[str]
    removed: "Removable | None" = None
    constant_targets: list[str] = field(default_factory=list)   # targets not downstream of the cut (h unchanged)
    replacement: str | None = None    # graph input (float32) that replaces the removed contribution, else zeros


def _cut(net: GraphIndex, targets: Sequence[str], removed: "Removable | None", label: str) -> _Cut:
    """Walk back from `targets`. With `removed`, only nodes downstream of its residual node (and constant
    subgraphs) are run; everything else they read becomes a boundary tensor fed from the base run."""
    cone = net.forward_cone(removed.residual_node) if removed is not None else None
    skip_port = removed.residual_ports[1] if removed is not None else None
    nodes, boundary, gin, inits, constant_targets = set(), set(), set(), set(), []
    outputs = []
    seen: set[str] = set()
    stack = []
    for t in targets:
        k = net.producer.get(t)
        if cone is not None and k not in cone:
            constant_targets.append(t)
        else:
            outputs.append(t)
            stack.append(t)
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in net.initializers or t in net.sparse_initializers:
            inits.add(t)
            continue
        k = net.producer.get(t)
        if k is None:
            if t in net.inputs:
                gin.add(t)
                continue
            raise ValueError(f"tensor '{t}' has no producer and is not a graph input or initializer")
        if cone is None or k in cone or k in net.constant_nodes:
            if k in nodes:
                continue
            nodes.add(k)
            reads = net.reads[k]
            if removed is not None and k == removed.residual_node:
                y = net.node(k).input[skip_port]
                reads = [n for n in reads if n != y]
            stack.extend(reads)
        else:
            boundary.add(t)
    return _Cut(label, sorted(nodes), sorted(boundary), sorted(gin), sorted(inits), outputs, removed, constant_targets)


def _float_name(name: str) -> str:
    return f"__analysis/float/{name}"


def _variant(proto: onnx.ModelProto, net: GraphIndex, cut: _Cut, input_types: Mapping[str, int],
             float_outputs: set[str]) -> onnx.ModelProto:
    """A model running only cut.nodes; boundary tensors become typed graph inputs; outputs in float_outputs are
    also exposed cast to float32 (bfloat16 cannot reach numpy)."""
    nodes = []
    for k in cut.nodes:
        node = net.node(k)
        if cut.removed is not None and k == cut.removed.residual_node:
            b = cut.removed
            x_port, y_port = b.residual_ports
            scope = f"__analysis/{cut.label.replace(' ', '_')}"
            zero, shape = f"{scope}/zeros", f"{scope}/shape"
            if cut.replacement is not None:
                nodes.append(helper.make_node("Cast", [cut.replacement], [zero], name=f"{scope}/Cast", to=b.data_type))
            else:
                x = node.input[x_port]
                nodes.append(helper.make_node("Shape", [x], [shape], name=f"{scope}/Shape"))
                nodes.append(helper.make_node("ConstantOfShape", [shape], [zero], name=f"{scope}/ConstantOfShape",
                                              value=helper.make_tensor("value", b.data_type, [1], [0])))
            rewired = onnx.NodeProto()
            rewired.CopyFrom(node)
            rewired.input[y_port] = zero
            nodes.append(rewired)
        else:
            nodes.append(node)
    outputs = []
    for name in cut.outputs:
        outputs.append(helper.ValueInfoProto(name=name))
        if name in float_outputs:
            nodes.append(helper.make_node("Cast", [name], [_float_name(name)], name=f"__analysis/Cast/{name}", to=TensorProto.FLOAT))
            outputs.append(helper.ValueInfoProto(name=_float_name(name)))
    inputs = [net.inputs[n] for n in cut.graph_inputs]
    inputs += [helper.make_tensor_value_info(n, input_types[n], None) for n in cut.boundary]
    if cut.replacement is not None:
        inputs.append(helper.make_tensor_value_info(cut.replacement, TensorProto.FLOAT, None))
    return submodel(proto, net, cut.label, nodes, inputs, outputs, cut.inits)


def submodel(proto: onnx.ModelProto, net: GraphIndex, label: str, nodes: list[onnx.NodeProto],
             inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], inits: Sequence[str]) -> onnx.ModelProto:
    """A model of `nodes` from `proto` (its opsets, functions and IR version), with the initializers `inits`
    (external ones stay references to the model's data files; big inline ones become placeholders, which
    open_session fills from `net.initializers`)."""
    dense = [placeholder(net.initializers[n]) for n in inits if n in net.initializers]
    sparse = [net.sparse_initializers[n] for n in inits if n in net.sparse_initializers]
    graph = helper.make_graph(nodes, f"{proto.graph.name or 'graph'}_{label.replace(' ', '_')}", inputs, outputs,
                              initializer=dense, sparse_initializer=sparse)
    model = onnx.ModelProto()
    model.ir_version = proto.ir_version
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    model.producer_name = "passes.measure"
    model.graph.CopyFrom(graph)
    return model


# ---------------------------------------------------------------- running

def open_session(model: onnx.ModelProto, net: GraphIndex, base_dir, providers: list, config: dict[str, str] | None = None):
    """An onnxruntime session over a submodel of `net`'s graph (external data in base_dir); kernels onnxruntime
    lacks (bf16 on the CPU) are a UserError."""
    try:
        return ort_session(model, base_dir=base_dir, providers=providers, config=config, weights=net.initializers)
    except Exception as exc:
        _explain_ort_failure(exc)
        raise


def _explain_ort_failure(exc: Exception) -> None:
    text = str(exc)
    if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
        line = text.strip().splitlines()[0]
        fail(f"onnxruntime cannot run this model: {line}")


def _numpy(values: Mapping, name: str) -> np.ndarray:
    return (values[_float_name(name)] if _float_name(name) in values else values[name]).numpy()


class Removable(Protocol):
    """Where a contribution joins the residual stream: node `residual_node` reads x and the contribution at
    `residual_ports` (x slot, contribution slot); `data_type` is the contribution's element type."""
    residual_node: int
    residual_ports: tuple[int, int]
    data_type: int


class SuffixRuns:
    """One base run of the graph, then for each removal a run of only the part of the graph downstream of it.

    `removals` are (site, targets, label) or (site, targets, label, True): the site's contribution is replaced by
    zeros (x' = x exactly, whatever the residual node is), or with True by values given to `removal` (float32,
    cast to the contribution's type), and the targets are computed from there; everything the suffix reads from before the
    cut is fed from the base run. All cuts are planned up front, so the base run exposes every boundary tensor
    once. `float_names`: bfloat16 tensors among the targets, returned cast to float32 (numpy has no bfloat16).
    `provider`: "cpu", "cuda" or "auto" (passes.support.onnx_io.resolve_provider); values move between runs in
    host memory. Use as a context manager (it owns a progress bar); `cost()` charges the runs in forward-pass
    equivalents."""

    def __init__(self, model: LoadedModel, feeds: Mapping[str, np.ndarray], base_targets: Sequence[str],
                 removals: Sequence[tuple["Removable", Sequence[str], str]], *, float_names: set[str] = frozenset(),
                 progress: bool = True, desc: str = "analysis", provider: str | None = "cpu"):
        from tqdm import tqdm
        self.start = time.perf_counter()
        self.provider = resolve_provider(provider)
        self.providers = execution_providers(self.provider)
        self.model, self.feeds, self.float_names = model, feeds, set(float_names)
        self.net = GraphIndex.build(model.proto.graph)
        self.flops = weight_flops(self.net)
        self.total_flops = sum(self.flops) or 0.0
        self.cuts = [_cut(self.net, list(targets), site, label) for site, targets, label, *_ in removals]
        for cut, removal in zip(self.cuts, removals):
            if len(removal) > 3 and removal[3]:
                cut.replacement = f"__analysis/{cut.label.replace(' ', '_')}/contribution"
        needed = list(dict.fromkeys([*base_targets, *(t for c in self.cuts for t in c.boundary)]))
        self.base_targets = list(base_targets)
        self.base_cut = _cut(self.net, [t for t in needed if t not in self.net.inputs], None, "base")
        self.boundary: dict = {}
        self.base_values: dict[str, np.ndarray] = {}
        self.run_log: list[dict] = []
        self.session_seconds = 0.0
        self.weights_read = 0
        self.bar = tqdm(total=1 + len(self.cuts), desc=desc, unit="run", disable=None if progress else True, leave=False)

    def __enter__(self) -> "SuffixRuns":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def _execute(self, cut: _Cut, feeds: Mapping, input_types: Mapping[str, int]) -> dict:
        import onnxruntime as ort
        self.bar.set_postfix_str(cut.label)
        t0 = time.perf_counter()
        session = open_session(_variant(self.model.proto, self.net, cut, input_types, self.float_names), self.net,
                               self.model.base_dir, self.providers)
        self.session_seconds += time.perf_counter() - t0
        self.weights_read += weight_bytes(self.net, cut.inits)
        names = [o.name for o in session.get_outputs()]
        values = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                  for name, value in feeds.items()}
        try:
            results = run_session(session, names, values, ort_values=True)
        except Exception as exc:
            _explain_ort_failure(exc)
            raise
        del session
        self.run_log.append({"run": cut.label, "part": RUNS, "nodes": len(cut.nodes), "seconds": round(time.perf_counter() - t0, 4),
                             "forward_pass_fraction": round(sum(self.flops[k] for k in cut.nodes) / self.total_flops, 6)
                             if self.total_flops else None})
        self.bar.update(1)
        return dict(zip(names, results))

    def base(self) -> dict[str, np.ndarray]:
        """The base targets as numpy arrays (graph inputs among them come from the feeds)."""
        result = self._execute(self.base_cut, {n: self.feeds[n] for n in self.base_cut.graph_inputs}, {})
        boundary = {t for c in self.cuts for t in c.boundary}
        self.boundary = {name: value for name, value in result.items() if name in boundary}
        self.base_values = {name: np.asarray(self.feeds[name]) if name in self.net.inputs else _numpy(result, name)
                            for name in self.base_targets}
        return self.base_values

    def removal(self, k: int, replacement: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Targets of removal k (with its replacing contribution, when it has one); a target the removed
        contribution cannot reach is its base value (then it must be a base target)."""
        cut = self.cuts[k]
        feeds = {name: self.boundary[name] for name in cut.boundary}
        feeds.update({name: self.feeds[name] for name in cut.graph_inputs})
        if cut.replacement is not None:
            if replacement is None:
                raise ValueError(f"{cut.label}: this run replaces the contribution; give the replacement")
            feeds[cut.replacement] = np.ascontiguousarray(replacement, dtype=np.float32)
        types = {name: ort_type_to_onnx(self.boundary[name].data_type()) for name in cut.boundary}
        result = self._execute(cut, feeds, types)
        values = {name: _numpy(result, name) for name in cut.outputs}
        values.update({name: self.base_values[name] for name in cut.constant_targets})
        return values

    def charge(self, label: str, flops_per_token: float, seconds: float, bytes_read: int = 0) -> None:
        """Record work done outside onnxruntime (weight-MatMul FLOPs per calibration token, weight bytes read) in
        the cost, as part `label`."""
        self.weights_read += bytes_read
        self.run_log.append({"run": label, "part": label, "nodes": 0, "seconds": round(seconds, 4),
                             "forward_pass_fraction": round(flops_per_token / self.total_flops, 6) if self.total_flops else None})

    def cost(self) -> Cost:
        fractions = [r["forward_pass_fraction"] or 0.0 for r in self.run_log]
        return Cost(forward_pass_equivalents=float(sum(fractions)),
                    node_fraction=float(sum(r["nodes"] for r in self.run_log) / max(len(self.net.graph.node), 1)),
                    seconds=time.perf_counter() - self.start, session_seconds=self.session_seconds,
                    runs=len(self.run_log), per_run=self.run_log, provider=self.provider,
                    weights_read_bytes=self.weights_read,
                    weights_read_multiple=self.weights_read / max(weight_bytes(self.net), 1))
