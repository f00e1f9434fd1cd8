"""Figures of an analysis: the dependency matrix M as a heatmap (like Figure 3 of arXiv 2503.18908) and the
per-block metrics. matplotlib is imported lazily with the Agg backend (no display needed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from passes.ffn.chains import Chain
from passes.measure.metrics import Metrics


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _boundaries(ordinals: Sequence[int], chains: Sequence[Chain]) -> list[float]:
    """Positions (between matrix cells) where a chain ends and another starts, among `ordinals`."""
    chain_of = {o: k for k, c in enumerate(chains) for o in c.ordinals}
    return [a + 0.5 for a in range(len(ordinals) - 1) if chain_of.get(ordinals[a]) != chain_of.get(ordinals[a + 1])]


def blocks_plot_path(heatmap_path: str | os.PathLike) -> Path:
    """H.png -> H_blocks.png."""
    path = Path(heatmap_path)
    return path.with_name(f"{path.stem}_blocks{path.suffix or '.png'}")


def plot_dependency(metrics: Metrics, chains: Sequence[Chain], path: str | os.PathLike, title: str | None = None) -> Path:
    """Heatmap of M[i][j] (rows i = removed block, columns j = affected block), log colour scale; cells j <= i
    and unmeasured pairs are blank; chain boundaries are drawn as lines."""
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    ordinals = metrics.ordinals
    n = len(ordinals)
    data = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(a + 1, n):
            v = metrics.dependency[a][b]
            if v is not None and v > 0 and np.isfinite(v):
                data[a, b] = v
    finite = data[np.isfinite(data)]
    size = min(max(4.0, 0.32 * n + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    if finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
        if vmax <= vmin:
            vmin, vmax = vmin / 2, vmax * 2
        image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax),
                          interpolation="nearest", origin="upper")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="M[i][j] = mean 1 - cos(h_j, h_j without block i)")
    else:
        ax.imshow(np.zeros((n, n)), cmap="Greys", vmin=0, vmax=1)
        ax.text((n - 1) / 2, (n - 1) / 2, "no dependency measured", ha="center", va="center")
    for pos in _boundaries(ordinals, chains):
        ax.axhline(pos, color="red", linewidth=0.6, alpha=0.6)
        ax.axvline(pos, color="red", linewidth=0.6, alpha=0.6)
    from matplotlib.patches import Rectangle
    where = {o: a for a, o in enumerate(ordinals)}
    for chain in chains:
        inside = [where[o] for o in chain.ordinals if o in where]
        if len(inside) >= 2:   # the square of M inside a chain: the pairs fusion may put side by side
            ax.add_patch(Rectangle((inside[0] - 0.5, inside[0] - 0.5), len(inside), len(inside), fill=False,
                                   edgecolor="red", linewidth=2.0))
    step = max(1, n // 32)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(ordinals[t]) for t in ticks], rotation=90 if n > 16 else 0)
    ax.set_yticks(ticks, [str(ordinals[t]) for t in ticks])
    ax.set_xlabel("block j (affected), FFN ordinal")
    ax.set_ylabel("block i (removed), FFN ordinal")
    ax.set_title(title or "FFN dependency matrix M")
    fig.text(0.01, 0.005, "red lines: chain boundaries; red squares: chains of 2 or more FFN blocks", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_blocks(metrics: Metrics, chains: Sequence[Chain], path: str | os.PathLike, title: str | None = None) -> Path:
    """cosdist_io and |h|/|x| per block, chain boundaries as vertical lines."""
    plt = _pyplot()
    ordinals = metrics.ordinals
    x = np.arange(len(ordinals))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.25 * len(ordinals) + 3), 6))
    top.plot(x, [np.nan if v is None else v for v in metrics.cosdist_io], marker="o")
    top.set_ylabel("cosdist_io\nmean 1 - cos(x, x')")
    bottom.plot(x, [np.nan if v is None else v for v in metrics.ratio], marker="o", color="tab:orange")
    bottom.set_ylabel("ratio\nmean |h| / |x|")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        for pos in _boundaries(ordinals, chains):
            ax.axvline(pos, color="red", linewidth=0.8)
    step = max(1, len(ordinals) // 40)
    bottom.set_xticks(x[::step], [str(o) for o in ordinals[::step]])
    bottom.set_xlabel("FFN block (ordinal); red lines: chain boundaries")
    top.set_title(title or "Per-block change of the residual stream")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_ranking(ranking: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Per layer: KL when its sublayer alone is removed (bars, log scale) and cosdist(x, x') (line); the legend
    sits below the axes, where it hides no data."""
    plt = _pyplot()
    layers = [r["layer"] for r in ranking]
    fig, ax = plt.subplots(figsize=(max(6.0, len(layers) * 0.25), 4.5))
    bars = ax.bar(layers, [r["kl_removed_alone"] for r in ranking], color="tab:red", label="KL when removed alone")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("next-token KL (nats)")
    twin = ax.twinx()
    line, = twin.plot(layers, [r["cosdist"] for r in ranking], "ko-", markersize=3, label="cosdist(x, x')")
    twin.set_ylabel("cosine distance")
    ax.set_title(title, fontsize=9)
    fig.legend(handles=[bars, line], loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
