"""Stage 3, analysis: how much each FFN block changes the residual stream, and how much block j depends on block i.

On calibration inputs X (tokens = all batch x sequence positions; norms and cosines over the last axis), with
x_t the residual input of block t, h_t = FFN_t(n(x_t) g_t) its contribution and x'_t = x_t + h_t:
    cosdist_io[t] = mean_tokens 1 - cos(x_t, x'_t)
    ratio[t]      = mean_tokens |h_t| / |x_t|
    M[i][j]       = mean_tokens 1 - cos(h_j(X), h_j^(-i)(X))   for i < j (0 for j <= i)
where h_j^(-i) is block j's contribution when block i's contribution is removed (x'_i = x_i) and everything else
runs as usual. 1 - cos(a, b) is computed in float64 as |a/|a| - b/|b||^2 / 2 (no cancellation for small
distances); two zero vectors have distance 0, one zero vector distance 1.

How it is computed, frugally, through onnxruntime, never touching the user's file (variants live in memory;
external weights are read in place through the session's external-data folder):
  1. base run: the graph cut down to what the selected blocks need (nothing after the last selected block), with
     every x_t, h_t exposed as outputs, plus every tensor the removal runs below need from it;
  2. one removal run per selected block i that has a later block j to measure: only the suffix of the graph
     that depends on block i's residual node, up to the last contribution needed. The residual node reads zeros
     (ConstantOfShape(Shape(x_i))) instead of h_i, so x'_i = x_i + 0 = x_i exactly, whatever the node is (Add,
     or the next block's SkipSimplifiedLayerNormalization). Tensors the suffix reads from before the cut
     (x_i itself, rotary tables, masks, shapes) are fed from the base run as they were (onnxruntime values,
     any element type); constant subgraphs (weight casts and transposes) are kept in the suffix.
Cost is reported in forward-pass equivalents: the sum over runs of the weight-MatMul FLOPs executed (per token:
2 x the constant operand's size, for every MatMul / Gemm / MatMulNBits in the run) divided by those of one full
forward pass of the original graph. Attention score products and elementwise work are not counted; the node-count
fraction is reported beside it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.calibration import ort_type_to_onnx
from passes.chains import Chain, find_chains
from passes.errors import fail
from passes.graph import GraphIndex
from passes.match import FFNBlock, match_ffn_blocks
from passes.onnx_io import LoadedModel, load_model, ort_session, run_session
from passes.ranges import expand, parse_ranges

COST_DEFINITION = ("forward_pass_equivalents = sum over runs of the weight-MatMul FLOPs executed (MatMul/Gemm/MatMulNBits "
                   "with a constant operand, 2 x its size per token) / the same for one full forward pass of the original "
                   "model; attention score products and elementwise ops are not counted")
SCOPES = ("all", "chains")
_NONDETERMINISTIC = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
_WEIGHT_PASSTHROUGH = ("Cast", "Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze", "DequantizeLinear")


@dataclass
class Cost:
    forward_pass_equivalents: float   # see COST_DEFINITION
    node_fraction: float              # sum over runs of (nodes in the run) / (nodes of the original graph)
    seconds: float                    # wall time of the whole analysis (sessions, runs, metrics)
    session_seconds: float            # of which creating onnxruntime sessions
    runs: int
    per_run: list[dict] = field(default_factory=list)   # {"run", "forward_pass_fraction", "nodes", "seconds"}
    definition: str = COST_DEFINITION

    def record(self) -> dict:
        rec = asdict(self)
        rec["forward_pass_equivalents"] = round(self.forward_pass_equivalents, 4)
        rec["node_fraction"] = round(self.node_fraction, 4)
        rec["seconds"] = round(self.seconds, 3)
        rec["session_seconds"] = round(self.session_seconds, 3)
        return rec


@dataclass
class Metrics:
    """Per-block metrics and the dependency matrix for `ordinals` (ascending).

    dependency[a][b] is M[ordinals[a]][ordinals[b]]: 0.0 for b <= a, None where it was not measured
    (scope "chains": pairs in different chains)."""
    ordinals: list[int]
    cosdist_io: list[float]
    ratio: list[float]
    dependency: list[list[float | None]]
    cost: Cost
    tokens: int = 0
    scope: str = "all"

    def position(self, ordinal: int) -> int:
        return self.ordinals.index(ordinal)

    def m(self, i: int, j: int) -> float | None:
        """M[i][j] by ordinals (None when not measured)."""
        return self.dependency[self.position(i)][self.position(j)]

    def record(self) -> dict:
        """`metrics`, `dependency` and `cost` entries of the analyze report."""
        return {
            "metrics": {str(o): {"cosdist_io": _num(c), "ratio": _num(r)}
                        for o, c, r in zip(self.ordinals, self.cosdist_io, self.ratio)},
            "dependency": {"ordinals": list(self.ordinals), "scope": self.scope,
                           "matrix": [[_num(v) for v in row] for row in self.dependency]},
            "tokens": self.tokens,
            "cost": self.cost.record(),
        }


def _num(value):
    if value is None or not np.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------- distances

def _unit_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1])
    norms = np.sqrt(np.einsum("td,td->t", a, a))
    return a / np.where(norms > 0, norms, 1.0)[:, None], norms


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token 1 - cos(a_t, b_t) over the last axis, in float64, as |a/|a| - b/|b||^2 / 2."""
    ua, na = _unit_rows(a)
    ub, nb = _unit_rows(b)
    diff = ua - ub
    dist = 0.5 * np.einsum("td,td->t", diff, diff)
    return np.where((na == 0) != (nb == 0), 1.0, dist)


def norm_ratio(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-token |h_t| / |x_t| over the last axis (tokens with x_t = 0 give nan and are left out of means)."""
    _, nh = _unit_rows(h)
    _, nx = _unit_rows(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nx > 0, nh / np.where(nx > 0, nx, 1.0), np.nan)


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------- the graph as data

def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    return [name for n in graph.node for name in _reads(n) if name not in defined]


def _reads(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for g in _subgraphs(node):
        names += _outer_names(g)
    return names


class _Net:
    """Producers, consumers and constant-ness of the top-level graph (subgraph outer reads included)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.inits.update({t.values.name: t for t in graph.sparse_initializer})
        self.inputs = {vi.name: vi for vi in graph.input if vi.name not in self.inits}
        self.reads = [_reads(n) for n in self.nodes]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for k, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = k
            for name in self.reads[k]:
                self.consumers.setdefault(name, []).append(k)
        self.const: set[int] = set()
        for k, node in enumerate(self.nodes):
            if node.op_type in _NONDETERMINISTIC:
                continue
            if all(name in self.inits or self.producer.get(name) in self.const for name in self.reads[k]):
                self.const.add(k)
        self.flops = [self._weight_flops(k) for k in range(len(self.nodes))]

    def forward_cone(self, start: int) -> set[int]:
        cone, stack = {start}, [start]
        while stack:
            k = stack.pop()
            for name in self.nodes[k].output:
                for c in self.consumers.get(name, []):
                    if c not in cone:
                        cone.add(c)
                        stack.append(c)
        return cone

    def _weight_size(self, name: str) -> int | None:
        for _ in range(16):
            if name in self.inits:
                return int(np.prod(self.inits[name].dims, dtype=np.int64))
            k = self.producer.get(name)
            if k is None or k not in self.const:
                return None
            node = self.nodes[k]
            if node.op_type not in _WEIGHT_PASSTHROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    def _weight_flops(self, k: int) -> float:
        node = self.nodes[k]
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            return 2.0 * attrs.get("K", 0) * attrs.get("N", 0)
        if node.op_type not in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger") or len(node.input) < 2:
            return 0.0
        sizes = [self._weight_size(name) for name in node.input[:2]]
        sizes = [s for s in sizes if s]
        return 2.0 * sizes[0] if sizes else 0.0


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


def _cut(net: _Net, targets: Sequence[str], removed: "Removable | None", label: str) -> _Cut:
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
        if t in net.inits:
            inits.add(t)
            continue
        k = net.producer.get(t)
        if k is None:
            if t in net.inputs:
                gin.add(t)
                continue
            raise ValueError(f"tensor '{t}' has no producer and is not a graph input or initializer")
        if cone is None or k in cone or k in net.const:
            if k in nodes:
                continue
            nodes.add(k)
            reads = net.reads[k]
            if removed is not None and k == removed.residual_node:
                y = net.nodes[k].input[skip_port]
                reads = [n for n in reads if n != y]
            stack.extend(reads)
        else:
            boundary.add(t)
    return _Cut(label, sorted(nodes), sorted(boundary), sorted(gin), sorted(inits), outputs, removed, constant_targets)


def _float_name(name: str) -> str:
    return f"__analysis/float/{name}"


def _variant(proto: onnx.ModelProto, net: _Net, cut: _Cut, input_types: Mapping[str, int],
             float_outputs: set[str]) -> onnx.ModelProto:
    """A model running only cut.nodes; boundary tensors become typed graph inputs; outputs in float_outputs are
    also exposed cast to float32 (bfloat16 cannot reach numpy)."""
    nodes = []
    for k in cut.nodes:
        node = net.nodes[k]
        if cut.removed is not None and k == cut.removed.residual_node:
            b = cut.removed
            x_port, y_port = b.residual_ports
            scope = f"__analysis/{cut.label.replace(' ', '_')}"
            zero, shape = f"{scope}/zeros", f"{scope}/shape"
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
    dense = [net.inits[n] for n in cut.inits if isinstance(net.inits[n], TensorProto)]
    sparse = [net.inits[n] for n in cut.inits if not isinstance(net.inits[n], TensorProto)]
    graph = helper.make_graph(nodes, f"{proto.graph.name or 'graph'}_{cut.label.replace(' ', '_')}", inputs, outputs,
                              initializer=dense, sparse_initializer=sparse)
    model = onnx.ModelProto()
    model.ir_version = proto.ir_version
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    model.producer_name = "passes.analysis"
    model.graph.CopyFrom(graph)
    return model


# ---------------------------------------------------------------- running

def _session(model: onnx.ModelProto, base_dir):
    try:
        return ort_session(model, base_dir=base_dir)
    except Exception as exc:
        _explain_ort_failure(exc)
        raise


def _explain_ort_failure(exc: Exception) -> None:
    text = str(exc)
    if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
        line = text.strip().splitlines()[0]
        fail(f"onnxruntime (CPU) cannot run this model: {line}")


def _numpy(values: Mapping, name: str) -> np.ndarray:
    return (values[_float_name(name)] if _float_name(name) in values else values[name]).numpy()


def parse_block_spec(spec: str, n_blocks: int) -> list[int]:
    """'3-10' or '1,4,6-9' -> sorted unique ordinals; malformed or out of range -> UserError."""
    if n_blocks == 0:
        fail("the model has no FFN blocks")
    ordinals = expand(parse_ranges(spec, "--blocks", "3-10 or 1,4,6-9"))
    if ordinals[-1] >= n_blocks:
        fail(f"block {ordinals[-1]} in --blocks '{spec}' is out of range: the model has {n_blocks} FFN blocks "
             f"(ordinals 0-{n_blocks - 1})")
    return ordinals


class Removable(Protocol):
    """Where a contribution joins the residual stream: node `residual_node` reads x and the contribution at
    `residual_ports` (x slot, contribution slot); `data_type` is the contribution's element type."""
    residual_node: int
    residual_ports: tuple[int, int]
    data_type: int


class SuffixRuns:
    """One base run of the graph, then for each removal a run of only the part of the graph downstream of it.

    `removals` are (site, targets, label): the site's contribution is replaced by zeros (x' = x exactly, whatever
    the residual node is) and the targets are computed from there; everything the suffix reads from before the
    cut is fed from the base run. All cuts are planned up front, so the base run exposes every boundary tensor
    once. `float_names`: bfloat16 tensors among the targets, returned cast to float32 (numpy has no bfloat16).
    Use as a context manager (it owns a progress bar); `cost()` charges the runs in forward-pass equivalents."""

    def __init__(self, model: LoadedModel, feeds: Mapping[str, np.ndarray], base_targets: Sequence[str],
                 removals: Sequence[tuple["Removable", Sequence[str], str]], *, float_names: set[str] = frozenset(),
                 progress: bool = True, desc: str = "analysis"):
        from tqdm import tqdm
        self.start = time.perf_counter()
        self.model, self.feeds, self.float_names = model, feeds, set(float_names)
        self.net = _Net(model.proto.graph)
        self.total_flops = sum(self.net.flops) or 0.0
        self.cuts = [_cut(self.net, list(targets), site, label) for site, targets, label in removals]
        needed = list(dict.fromkeys([*base_targets, *(t for c in self.cuts for t in c.boundary)]))
        self.base_targets = list(base_targets)
        self.base_cut = _cut(self.net, [t for t in needed if t not in self.net.inputs], None, "base")
        self.boundary: dict = {}
        self.base_values: dict[str, np.ndarray] = {}
        self.run_log: list[dict] = []
        self.session_seconds = 0.0
        self.bar = tqdm(total=1 + len(self.cuts), desc=desc, unit="run", disable=None if progress else True, leave=False)

    def __enter__(self) -> "SuffixRuns":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def _execute(self, cut: _Cut, feeds: Mapping, input_types: Mapping[str, int]) -> dict:
        import onnxruntime as ort
        self.bar.set_postfix_str(cut.label)
        t0 = time.perf_counter()
        session = _session(_variant(self.model.proto, self.net, cut, input_types, self.float_names), self.model.base_dir)
        self.session_seconds += time.perf_counter() - t0
        names = [o.name for o in session.get_outputs()]
        values = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                  for name, value in feeds.items()}
        try:
            results = run_session(session, names, values, ort_values=True)
        except Exception as exc:
            _explain_ort_failure(exc)
            raise
        del session
        self.run_log.append({"run": cut.label, "nodes": len(cut.nodes), "seconds": round(time.perf_counter() - t0, 4),
                             "forward_pass_fraction": round(sum(self.net.flops[k] for k in cut.nodes) / self.total_flops, 6)
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

    def removal(self, k: int) -> dict[str, np.ndarray]:
        """Targets of removal k; a target the removed contribution cannot reach is its base value (then it must be
        a base target)."""
        cut = self.cuts[k]
        feeds = {name: self.boundary[name] for name in cut.boundary}
        feeds.update({name: self.feeds[name] for name in cut.graph_inputs})
        types = {name: ort_type_to_onnx(self.boundary[name].data_type()) for name in cut.boundary}
        result = self._execute(cut, feeds, types)
        values = {name: _numpy(result, name) for name in cut.outputs}
        values.update({name: self.base_values[name] for name in cut.constant_targets})
        return values

    def cost(self) -> Cost:
        fractions = [r["forward_pass_fraction"] or 0.0 for r in self.run_log]
        return Cost(forward_pass_equivalents=float(sum(fractions)),
                    node_fraction=float(sum(r["nodes"] for r in self.run_log) / max(len(self.net.nodes), 1)),
                    seconds=time.perf_counter() - self.start, session_seconds=self.session_seconds,
                    runs=len(self.run_log), per_run=self.run_log)


def compute_metrics(model: LoadedModel | str, feeds: Mapping[str, np.ndarray], ordinals: Sequence[int] | None = None, *,
                    scope: str = "all", progress: bool = True, blocks: list[FFNBlock] | None = None,
                    chains: list[Chain] | None = None) -> Metrics:
    """cosdist_io, ratio and the dependency matrix M for `ordinals` (default: every FFN block) on `feeds`
    (already validated, see passes.calibration). scope "chains" measures M only between blocks of one chain."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    proto = model.proto
    if blocks is None or (scope == "chains" and chains is None):
        index = GraphIndex.build(proto.graph)
        blocks = match_ffn_blocks(proto, index).blocks if blocks is None else blocks
        chains = find_chains(blocks, index) if chains is None else chains
    if not blocks:
        fail("the model has no FFN blocks to analyze")
    ordinals = sorted(set(range(len(blocks)) if ordinals is None else ordinals))
    if not ordinals:
        fail("no FFN blocks selected")
    if ordinals[-1] >= len(blocks) or ordinals[0] < 0:
        fail(f"block {ordinals[-1]} is out of range: the model has {len(blocks)} FFN blocks (ordinals 0-{len(blocks) - 1})")
    chain_of = {o: k for k, c in enumerate(chains or []) for o in c.ordinals}
    later: dict[int, list[int]] = {}
    for a, i in enumerate(ordinals):
        js = [j for j in ordinals[a + 1:] if scope == "all" or chain_of.get(j) == chain_of.get(i)]
        if js:
            later[i] = js
    x_names = {o: blocks[o].residual_in for o in ordinals}
    h_names = {o: blocks[o].contribution for o in ordinals}
    bf16 = {name for b in blocks if b.data_type == TensorProto.BFLOAT16 for name in (b.residual_in, b.contribution)}
    removals = [(blocks[i], [blocks[j].contribution for j in js], f"remove {i}") for i, js in later.items()]
    with SuffixRuns(model, feeds, list(dict.fromkeys([*x_names.values(), *h_names.values()])), removals,
                    float_names=bf16, progress=progress) as runs:
        base = runs.base()
        xs = {o: base[x_names[o]] for o in ordinals}
        hs = {o: base[h_names[o]] for o in ordinals}
        cosdist = [_mean(cosine_distance(xs[o], xs[o].astype(np.float64) + hs[o].astype(np.float64))) for o in ordinals]
        ratio = [_mean(norm_ratio(hs[o], xs[o])) for o in ordinals]
        tokens = int(hs[ordinals[0]].size // hs[ordinals[0]].shape[-1])
        pos = {o: a for a, o in enumerate(ordinals)}
        matrix: list[list[float | None]] = [[0.0 if b <= a else None for b in range(len(ordinals))] for a in range(len(ordinals))]
        for k, i in enumerate(later):
            result = runs.removal(k)
            for j in later[i]:
                matrix[pos[i]][pos[j]] = _mean(cosine_distance(hs[j], result[blocks[j].contribution]))
        cost = runs.cost()
    return Metrics(list(ordinals), cosdist, ratio, matrix, cost, tokens, scope)
