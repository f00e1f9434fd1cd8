"""New nodes for a rewrite, named under one prefix: `/prefix/name` for nodes and constants, `/prefix/name_output_0`
for outputs, so what a pass adds says where it came from."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class NodeBuilder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        """Append one node; returns its (single) output, `output` or /prefix/name_output_0."""
        out = output or f"{self.prefix}/{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.prefix}/{name}", **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, f"{self.prefix}/{name}"))
        return self.initializers[-1].name

    def rms_normalized(self, x: str, eps: float, data_type: int, opset: int) -> str:
        """n(x) = x / sqrt(mean(x^2, -1) + eps) in float32, cast back to `data_type` (no gain), as Pow, ReduceMean,
        Add, Sqrt and Div: standard ONNX at any opset, which onnxruntime fuses into its own RMSNorm kernel."""
        xf = self.node("Cast", [x], "norm/Cast", to=TensorProto.FLOAT) if data_type != TensorProto.FLOAT else x
        sq = self.node("Pow", [xf, self.const("norm/two", np.array(2.0, np.float32))], "norm/Pow")
        if opset >= 18:
            ms = self.node("ReduceMean", [sq, self.const("norm/axes", np.array([-1], np.int64))], "norm/ReduceMean",
                           keepdims=1)
        else:
            ms = self.node("ReduceMean", [sq], "norm/ReduceMean", axes=[-1], keepdims=1)
        var = self.node("Add", [ms, self.const("norm/eps", np.array(eps, np.float32))], "norm/Add")
        n = self.node("Div", [xf, self.node("Sqrt", [var], "norm/Sqrt")], "norm/Div")
        return self.node("Cast", [n], "norm/Cast_1", to=data_type) if data_type != TensorProto.FLOAT else n
