"""A read-only index over an ONNX graph: who produces and who consumes each tensor, and which tensors are constants.

Nodes are identified by their position in `graph.node` (names may be missing or repeated in real exports);
`node_label` gives the name a report shows.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class GraphIndex:
    graph: onnx.GraphProto
    producer: dict[str, int] = field(default_factory=dict)          # tensor -> index of the node that writes it
    consumers: dict[str, list[int]] = field(default_factory=dict)   # tensor -> indices of nodes that read it
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> "GraphIndex":
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.graph_outputs = {o.name for o in graph.output}
        for i, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    index.producer[name] = i
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(i)
        return index

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
