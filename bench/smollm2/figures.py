"""The study's figures: the depth / quality trade-off, equal-depth cuts, and what predicts a pair's cost."""
from __future__ import annotations

import math
from pathlib import Path

from bench.smollm2.common import AUTO_LOOSE, LAYERS, NEARLY_FREE
from passes.support.ranges import spans

PLAN_STYLE = {"dropped": ("o", "attention dropped only"), "paper": ("s", "paper rule"), "auto": ("^", "auto (default threshold)"),
              f"auto@{AUTO_LOOSE:g}": ("v", f"auto, threshold {AUTO_LOOSE:g}"), "all": ("X", "all-in-one (chains fused whole)")}


def make_plots(record: dict, directory: Path, prefix: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = []
    sets = [s["name"] for s in record["sets"]]
    colors = {name: plt.cm.tab10(k) for k, name in enumerate(sets)}
    main = [v for v in record["variants"] if not v.get("sweep") and not v.get("pair")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "kl", "KL(original || variant), nats"), (axes[1], "ppl", "perplexity on the text")):
        for v in main:
            marker, _ = PLAN_STYLE.get(v["plan"], ("o", v["plan"]))
            ax.scatter(v["ffn_depth"], max(v[key], 1e-6), marker=marker, color=colors[v["set"]], s=55, alpha=0.85,
                       edgecolors="k", linewidths=0.4)
        if key == "ppl":
            ax.axhline(record["original"]["ppl"], color="k", linestyle=":", linewidth=1)
            ax.annotate(f"original {record['original']['ppl']:.1f}", (LAYERS, record["original"]["ppl"]), fontsize=8,
                        xytext=(-60, 4), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("sequential FFN depth (FFN stages one after another)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="k", label=text)
               for m, text in PLAN_STYLE.values()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=f"{name}: attention dropped in "
                           f"{spans(next(s['dropped_layers'] for s in record['sets'] if s['name'] == name))}")
                for name, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"SmolLM2-135M: attention dropped, FFN runs fused ({record['tokens']['evaluation']['shape'][0] * record['tokens']['evaluation']['shape'][1]} "
                 "evaluation tokens of pydoc_data.topics)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    path = directory / f"{prefix}_tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    eq_sets = [s for s in sets if any(p["set"] == s for p in record["equal_depth"])]
    if eq_sets:
        cols = min(3, len(eq_sets))
        rows = math.ceil(len(eq_sets) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, eq_sets):
            pairs = sorted((p for p in record["equal_depth"] if p["set"] == name), key=lambda p: p["depth"])
            d = [p["depth"] for p in pairs]
            ax.plot(d, [max(p["auto_fusion_kl"], 1e-6) for p in pairs], "^-", color="tab:blue", label="auto (cuts by M)")
            ax.plot(d, [max(p["even_fusion_kl"], 1e-6) for p in pairs], "s--", color="tab:orange", label="even split (fixed)")
            for v in main:
                if v["set"] == name and v["plan"] in ("paper", "all") and v["groups"]:
                    marker, text = PLAN_STYLE[v["plan"]]
                    ax.scatter(v["ffn_depth"], max(v["fusion_kl"], 1e-6), marker=marker, color="k", s=40, zorder=3, label=text)
            ax.set_yscale("log")
            ax.set_title(f"{name}: attention dropped in {spans(next(s['dropped_layers'] for s in record['sets'] if s['name'] == name))}",
                         fontsize=9)
            ax.set_xlabel("sequential FFN depth")
            ax.set_ylabel("KL(dropped || fused), nats")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(eq_sets):]:
            ax.axis("off")
        fig.suptitle("Equal depth: fusion's own cost, metric-driven cuts vs equal-size cuts", fontsize=10)
        fig.tight_layout()
        path = directory / f"{prefix}_equal_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if record.get("pairs"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "m", "M[i][i+1] (calibration set)"),
                               (axes[1], "perturbation", "|h_j| sqrt(2 M[i][j]) / |x|")):
            for p in record["pairs"]:
                ax.scatter(p[key], max(p["fusion_kl"], 1e-4), color=colors[p["set"]], s=40, edgecolors="k", linewidths=0.4)
                ax.annotate(f"{p['pair'][0]}-{p['pair'][1]}", (p[key], max(p["fusion_kl"], 1e-4)), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
            ax.axhline(NEARLY_FREE, color="k", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("fusion's own KL (pair fused alone), nats")
            ax.grid(True, alpha=0.3)
        corr = record.get("pair_correlations") or {}
        axes[0].set_title(f"Spearman {corr.get('m') or float('nan'):+.2f}", fontsize=9)
        axes[1].set_title(f"Spearman {corr.get('perturbation') or float('nan'):+.2f}", fontsize=9)
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=name) for name, c in colors.items()
                   if any(p["set"] == name for p in record["pairs"])]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle("Does M predict what fusing a pair costs? Every neighbouring pair fused alone", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        path = directory / f"{prefix}_pairs.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
