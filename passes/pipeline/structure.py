"""What the passes know of a model, found once: its graph index, its FFN blocks (stage 1, match), the chains they
form (stage 2) and the candidates that were rejected, with reasons. Every tool starts here."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from passes.pipeline.chains import Chain, find_chains
from passes.pipeline.match import FFNBlock, Rejection, match_ffn_blocks
from passes.support.graph import GraphIndex
from passes.support.report import structure_record


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
