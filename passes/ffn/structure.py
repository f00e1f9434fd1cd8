"""What the passes know of a model, found once: its graph index, its FFN blocks (match), the chains they form
and the candidates that were rejected, with reasons; and how that is counted and recorded in reports. Every
tool starts here."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto

from passes.ffn.chains import Chain, find_chains
from passes.ffn.linear import LINEAR_READERS
from passes.ffn.match import FFNBlock, Rejection, match_ffn_blocks
from passes.support.graph import GraphIndex


@dataclass
class ModelStructure:
    index: GraphIndex
    blocks: list[FFNBlock]
    chains: list[Chain]
    rejections: list[Rejection]

    def record(self) -> dict:
        """`ffn_blocks`, `chains` and `rejections` of the reports."""
        return structure_record(self.blocks, self.chains, self.rejections)

    @property
    def separated_by_attention(self) -> bool:
        """Every FFN block is a chain of its own (attention or something else between any two)."""
        return bool(self.blocks) and all(len(c) == 1 for c in self.chains)


def model_structure(proto: onnx.ModelProto) -> ModelStructure:
    index = GraphIndex.build(proto.graph)
    found = match_ffn_blocks(proto, index)
    return ModelStructure(index, found.blocks, find_chains(found.blocks, index), found.rejections)


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
        matmuls=sum(n.op_type in LINEAR_READERS for n in graph.node),
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
