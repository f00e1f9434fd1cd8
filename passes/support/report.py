"""How the CLIs print and write numbers: aligned tables, report-safe floats, lists of differences."""
from __future__ import annotations

import numpy as np


def finite_or_none(value: float | None) -> float | None:
    """A plain float for reports; None for a missing or non-finite value."""
    return float(value) if value is not None and np.isfinite(value) else None


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
