"""Counts and tables the CLIs print and write: what was found, what was fused, before and after."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto

from passes.pipeline.chains import Chain
from passes.pipeline.match import FFNBlock, Rejection


@dataclass
class ModelCounts:
    nodes: int
    matmuls: int
    ffn_blocks: int
    sequential_ffn_depth: int     # FFN stages the residual stream passes through one after another
    parameters: int


def count(model: onnx.ModelProto, blocks: list[FFNBlock]) -> ModelCounts:
    graph = model.graph
    return ModelCounts(
        nodes=len(graph.node),
        matmuls=sum(n.op_type in ("MatMul", "Gemm") for n in graph.node),
        ffn_blocks=len(blocks),
        sequential_ffn_depth=len(blocks),
        parameters=int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer)),
    )


def block_record(block: FFNBlock) -> dict:
    return {
        "ordinal": block.ordinal,
        "hidden_size": block.hidden_size,
        "width": block.width,
        "dtype": TensorProto.DataType.Name(block.data_type),
        "norm": block.norm.kind,
        "eps": block.norm.eps,
        "residual_in": block.residual_in,
        "residual_out": block.residual_out,
        "contribution": block.contribution,
        "residual_node": block.residual_node_name,
        "nodes": list(block.node_names),
        "weights": {"gate": block.gate.name, "up": block.up.name, "down": block.down.name},
    }


def structure_record(blocks: list[FFNBlock], chains: list[Chain], rejections: list[Rejection]) -> dict:
    return {
        "ffn_blocks": [block_record(b) for b in blocks],
        "chains": [list(c.ordinals) for c in chains],
        "rejections": [asdict(r) for r in rejections],
    }


def differences(parts: list[tuple[str, list[str]]]) -> str:
    """'missing 'a', 'b'; unknown 'c'' from [("missing", [...]), ("unknown", [...])], leaving out empty parts."""
    return "; ".join(f"{label} {', '.join(repr(n) for n in names)}" for label, names in parts if names)


def table(rows: list[tuple], header: tuple | None = None) -> str:
    """A plain aligned text table; numbers right-aligned."""
    cells = ([tuple(map(str, header))] if header else []) + [tuple(map(_fmt, r)) for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(cells[0]))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)
