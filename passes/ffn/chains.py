"""Chains: maximal runs of FFN blocks with nothing else between them.

Blocks t and t+1 are consecutive when x'_t is x_{t+1} and that tensor is read by nothing but block t+1
(its normalization and its residual add; possibly through an identity Cast) and is not a graph output.
"""
from __future__ import annotations

from dataclasses import dataclass

from passes.ffn.match import FFNBlock
from passes.support.graph import GraphIndex


@dataclass(frozen=True)
class Chain:
    ordinals: tuple[int, ...]

    @property
    def first(self) -> int:
        return self.ordinals[0]

    @property
    def last(self) -> int:
        return self.ordinals[-1]

    def __len__(self) -> int:
        return len(self.ordinals)


def feeds_only(index: GraphIndex, before: FFNBlock, after: FFNBlock) -> bool:
    """True when block `after` directly follows `before` and nothing else reads the residual between them."""
    if not after.stream_in or before.residual_out != after.stream_in:
        return False
    allowed = set(after.nodes) | {after.residual_node}
    return all(not index.is_graph_output(x) and all(c in allowed for c in index.consumer_ids(x))
               for x in {after.stream_in, after.residual_in})


def find_chains(blocks: list[FFNBlock], index: GraphIndex) -> list[Chain]:
    """Every maximal run (length >= 1) of consecutive blocks, in order; each block is in exactly one chain."""
    chains, run = [], []
    for block in blocks:
        if run and not feeds_only(index, blocks[run[-1]], block):
            chains.append(Chain(tuple(run)))
            run = []
        run.append(block.ordinal)
    if run:
        chains.append(Chain(tuple(run)))
    return chains
