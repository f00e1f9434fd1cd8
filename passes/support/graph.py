"""A read-only index over an ONNX graph: who produces and who consumes each tensor, and which tensors are constants.

Nodes are identified by their position in `graph.node` (names may be missing or repeated in real exports);
`node_label` gives the name a report shows.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_NONDETERMINISTIC = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")


@dataclass
class GraphIndex:
    """Producers and readers of every tensor of the top-level graph. A node reads its inputs and, through
    subgraph attributes (If, Loop, Scan), every outer-scope name its subgraphs use."""
    graph: onnx.GraphProto
    producer: dict[str, int] = field(default_factory=dict)          # tensor -> index of the node that writes it
    consumers: dict[str, list[int]] = field(default_factory=dict)   # tensor -> indices of nodes that read it
    reads: list[list[str]] = field(default_factory=list)            # per node: the names it reads
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    sparse_initializers: dict[str, onnx.SparseTensorProto] = field(default_factory=dict)
    inputs: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)   # graph inputs that are not initializers
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> "GraphIndex":
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.sparse_initializers = {t.values.name: t for t in graph.sparse_initializer}
        index.inputs = {v.name: v for v in graph.input
                        if v.name not in index.initializers and v.name not in index.sparse_initializers}
        index.graph_outputs = {o.name for o in graph.output}
        index.reads = [_reads(node) for node in graph.node]
        for i, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    index.producer[name] = i
            for name in index.reads[i]:
                index.consumers.setdefault(name, []).append(i)
        return index

    @functools.cached_property
    def constant_nodes(self) -> frozenset[int]:
        """Nodes that compute only from initializers and other constant nodes (Constant, weight Cast/Transpose,
        shape arithmetic on constants); random ops never are. A fixed point over the node list, so it holds for
        graphs that are not topologically sorted."""
        constant: set[int] = set()
        changed = True
        while changed:
            changed = False
            for k, node in enumerate(self.graph.node):
                if k in constant or node.op_type in _NONDETERMINISTIC:
                    continue
                if all(name in self.initializers or name in self.sparse_initializers or self.producer.get(name) in constant
                       for name in self.reads[k]):
                    constant.add(k)
                    changed = True
        return frozenset(constant)

    def forward_cone(self, start: int) -> set[int]:
        """Node `start` and every node that depends on it."""
        cone, stack = {start}, [start]
        while stack:
            for out in self.graph.node[stack.pop()].output:
                for c in self.consumers.get(out, []):
                    if c not in cone:
                        cone.add(c)
                        stack.append(c)
        return cone

    def node(self, i: int) -> onnx.NodeProto:
        return self.graph.node[i]

    def producer_node(self, tensor: str) -> tuple[int, onnx.NodeProto] | None:
        i = self.producer.get(tensor)
        return None if i is None else (i, self.graph.node[i])

    def consumer_ids(self, tensor: str) -> list[int]:
        return self.consumers.get(tensor, [])

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.graph_outputs

    def constant_tensor(self, tensor: str) -> onnx.TensorProto | None:
        """The TensorProto behind `tensor` if it is an initializer or the output of a Constant node."""
        if tensor in self.initializers:
            return self.initializers[tensor]
        found = self.producer_node(tensor)
        if found and found[1].op_type == "Constant" and found[1].domain in ("", "ai.onnx"):
            for attr in found[1].attribute:
                if attr.name == "value":
                    return attr.t
        return None

    def small_constant(self, tensor: str, max_elements: int = 64) -> np.ndarray | None:
        """Values of a small constant stored inside the model (scalars such as eps, axes, exponents)."""
        proto = self.constant_tensor(tensor)
        if proto is None or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        if int(np.prod(proto.dims, dtype=np.int64)) > max_elements:
            return None
        return numpy_helper.to_array(proto)

    def node_label(self, i: int) -> str:
        node = self.graph.node[i]
        return node.name or f"<unnamed {node.op_type} #{i}>"


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs and the outer-scope names its subgraphs read."""
    names = [n for n in node.input if n]
    for graph in _subgraphs(node):
        defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        names += [name for n in graph.node for name in _reads(n) if name not in defined]
    return names


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


def live_nodes(nodes: list[onnx.NodeProto], candidates: set[int], always_read: set[str]) -> set[int]:
    """Indices of nodes to keep: everything except candidates whose outputs nobody reads any more.

    Reader counts and a work list, linear in the graph (re-scanning the graph once per removed layer of nodes
    was quadratic: 36 s for a chain of 300 blocks)."""
    readers = Counter(name for node in nodes for name in node.input if name)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    keep = set(range(len(nodes)))

    def unread(i: int) -> bool:
        return not any(out and (readers[out] or out in always_read) for out in nodes[i].output)

    work = [i for i in sorted(candidates, reverse=True) if unread(i)]
    while work:
        i = work.pop()
        if i not in keep:
            continue
        keep.discard(i)
        for name in nodes[i].input:
            if name:
                readers[name] -= 1
                j = producer.get(name)
                if j in candidates and j in keep and unread(j):
                    work.append(j)
    return keep


def drop_unused(graph: onnx.GraphProto, removed: list[onnx.NodeProto]) -> None:
    """Remove initializers (and graph inputs) only the removed nodes read, and value_info of tensors nobody
    produces any more."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    orphaned = {name for node in removed for name in node.input} - read
    for entries in (graph.initializer, graph.input):
        kept = [t for t in entries if t.name not in orphaned]
        del entries[:]
        entries.extend(kept)
    produced = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)
