"""Stage 4, plan: which contiguous runs ("groups") of each chain to fuse.

A group [a, z] (written "a-z") is fused into one FFN: x + sum_{t=a..z} FFN_t(n(x) * g_t).
Plans come from the user (`--groups`), from the paper's rule, or from measured dependencies (passes.pipeline.analysis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from passes.pipeline.chains import Chain
from passes.pipeline.match import FFNBlock
from passes.support.errors import fail
from passes.support.ranges import parse_ranges


@dataclass(frozen=True)
class Group:
    first: int
    last: int

    @property
    def ordinals(self) -> range:
        return range(self.first, self.last + 1)

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_groups(spec: str) -> list[Group]:
    """'2-5,7-9' -> [Group(2, 5), Group(7, 9)]; malformed specs and single blocks are a UserError."""
    groups = []
    for first, last in parse_ranges(spec, "--groups", "2-5,7-9"):
        if last == first:
            fail(f"group '{first}' in --groups must span at least two blocks (FIRST-LAST with FIRST < LAST)")
        groups.append(Group(first, last))
    return groups


def check_groups(groups: list[Group], chains: list[Chain], blocks: list[FFNBlock]) -> None:
    """Groups must be in range, disjoint, inside one chain, and share eps, hidden size and element type."""
    chain_of = {o: c for c in chains for o in c.ordinals}
    taken: dict[int, Group] = {}
    for group in groups:
        if group.last >= len(blocks):
            known = f"{len(blocks)} FFN blocks (ordinals 0-{len(blocks) - 1})" if blocks else "no FFN blocks"
            fail(f"group {group} is out of range: the model has {known}")
        for o in group.ordinals:
            if o in taken:
                fail(f"groups {taken[o]} and {group} overlap at block {o}")
            taken[o] = group
        if chain_of[group.first] is not chain_of[group.last]:
            chain = chain_of[group.first]
            fail(f"group {group} leaves its chain {chain.first}-{chain.last}: something other than an FFN "
                 f"(attention, a graph output or another consumer) sits between blocks")
        members = [blocks[o] for o in group.ordinals]
        for attr, what in (("hidden_size", "hidden size"), ("data_type", "element type")):
            if len({getattr(b, attr) for b in members}) > 1:
                fail(f"group {group} mixes blocks of different {what}")
        if len({b.norm.eps for b in members}) > 1:
            fail(f"group {group} mixes RMSNorm eps values {sorted({b.norm.eps for b in members})}: fusion needs one shared norm")


def split_evenly(ordinals: tuple[int, ...], max_group: int | None) -> list[Group]:
    """Split a run into the fewest groups of at most max_group blocks, sizes differing by at most one."""
    if len(ordinals) < 2:
        return []
    count = 1 if not max_group else math.ceil(len(ordinals) / max_group)
    size, extra = divmod(len(ordinals), count)
    groups, start = [], 0
    for k in range(count):
        n = size + (1 if k < extra else 0)
        if n >= 2:
            groups.append(Group(ordinals[start], ordinals[start + n - 1]))
        start += n
    return groups


def paper_rule(chains: list[Chain], max_group: int | None = None) -> list[Group]:
    """The paper's plan: in every chain of >= 3 blocks fuse all but the last block, in groups of <= max_group."""
    groups = []
    for chain in chains:
        if len(chain) >= 3:
            groups += split_evenly(chain.ordinals[:-1], max_group)
    return groups
