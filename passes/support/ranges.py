"""Ranges on command lines (`2-5,7,9-10`: block ordinals, layers, groups) and their compact printed form."""
from __future__ import annotations

from passes.support.errors import fail


def parse_ranges(spec: str, option: str, example: str = "2-5,7") -> list[tuple[int, int]]:
    """'2-5,7' -> [(2, 5), (7, 7)]: comma-separated FIRST-LAST or single 0-based numbers (ASCII digits only);
    anything else, or FIRST > LAST, is a UserError naming `option`."""
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        pieces = [p.strip() for p in part.split("-")]
        if not part or len(pieces) > 2 or not all(p.isascii() and p.isdigit() for p in pieces):
            fail(f"malformed range '{part}' in {option} '{spec}': expected numbers and FIRST-LAST ranges, e.g. {example}")
        first, last = int(pieces[0]), int(pieces[-1])
        if last < first:
            fail(f"range '{part}' in {option} is reversed (FIRST > LAST)")
        ranges.append((first, last))
    return ranges


def expand(ranges: list[tuple[int, int]]) -> list[int]:
    """[(2, 4), (7, 7)] -> [2, 3, 4, 7] (sorted, unique)."""
    return sorted({k for first, last in ranges for k in range(first, last + 1)})


def spans(values) -> str:
    """[2, 3, 4, 7] -> '2-4,7' (sorted, unique)."""
    values = sorted(set(values))
    out, start = [], None
    for k, v in enumerate(values):
        start = v if start is None else start
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)
