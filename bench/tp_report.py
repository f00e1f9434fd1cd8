"""bench.tp's reports: the table and goal lines it prints, its plot, and the TP-N prediction from an --emulate-tp
run and a multi-GPU run (no torch needed: they read result rows)."""
from __future__ import annotations

from pathlib import Path


def format_table(rows) -> str:
    header = ("shape", "k", "T", "W", "seq gemm", "seq ar", "seq us", "fused gemm", "fused ar", "fused us",
              "speedup", "gemm x", "ar share seq", "ar share fused", "err seq", "err fused")
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append((r["shape"], r["k"], r["tokens"], r["world"], f"skipped: {r['skipped']}"))
            continue
        s, f = r["seq"], r["fused"]
        lines.append((r["shape"], r["k"], r["tokens"], r["world"],
                      f"{s['gemm_us']:.1f}", f"{s['allreduce_us']:.1f}", f"{s['total_us']:.1f}",
                      f"{f['gemm_us']:.1f}", f"{f['allreduce_us']:.1f}", f"{f['total_us']:.1f}",
                      f"{r['speedup']:.3f}", f"{r['gemm_speedup']:.3f}",
                      f"{r['allreduce_share_seq']:.1%}", f"{r['allreduce_share_fused']:.1%}",
                      f"{r['rel_err']['seq_vs_seq_ref']:.1e}",
                      f"{max(r['rel_err']['fused_vs_fused_ref'], r['rel_err']['fused_vs_parallel_ref']):.1e}"
                      + ("" if r["check_passed"] else " FAIL")))
    full = [line for line in lines if len(line) == len(header)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *full)]
    out = []
    for line in [header, *lines]:
        if len(line) != len(header):
            out.append("  ".join(str(c).rjust(w) for c, w in zip(line[:4], widths)) + "  " + line[4])
        else:
            out.append("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    return "\n".join(out)


def goal_lines(rows) -> list[str]:
    """The issue's goal (405B layer, k=4, 1 token, 8 GPUs: fused >= 1.2x) and, for one GPU, GEMM-only speedup."""
    out = []
    for r in rows:
        if r.get("skipped") or not r["shape"].startswith("405b") or r["k"] != 4 or r["tokens"] != 1:
            continue
        tp = r["world"] * r["emulated_tp"]
        where = f"world {r['world']}" + (f", each GPU one rank's share of TP{tp}" if r["emulated_tp"] > 1 else "")
        verdict = ("PASS" if r["speedup"] >= 1.2 else "FAIL") if r["world"] == 8 else "needs 8 GPUs"
        out.append(f"goal 405b k=4 T=1 ({where}): speedup {r['speedup']:.3f}x (goal >= 1.2x at 8 GPUs: {verdict}); "
                   f"GEMM-only speedup {r['gemm_speedup']:.3f}x (the single-GPU number)")
    return out


def plot(rows, path: Path) -> Path | None:
    """speedup (top) and GEMM-only speedup (bottom) vs tokens, one column per shape, one line per (k, world)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    rows = [r for r in rows if not r.get("skipped")]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.5 * len(shapes), 7), squeeze=False, sharex=True)
    for col, name in enumerate(shapes):
        mine = [r for r in rows if r["shape"] == name]
        for key, ax, title in (("speedup", axes[0][col], "seq / fused (total)"),
                               ("gemm_speedup", axes[1][col], "seq / fused (GEMM only)")):
            for k, world in sorted({(r["k"], r["world"]) for r in mine}):
                pts = sorted((r["tokens"], r[key]) for r in mine if r["k"] == k and r["world"] == world)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"k={k}, W={world}")
            ax.axhline(1.0, color="gray", lw=0.8)
            if key == "speedup":
                ax.axhline(1.2, color="red", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ticks = sorted({r["tokens"] for r in mine})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("speedup")
    axes[1][0].set_ylabel("speedup")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predict(emulated: list[dict], measured: list[dict]) -> list[dict]:
    """Fused over sequential at the emulated TP size, from one GPU doing one rank's share (--emulate-tp N: the
    GEMM-only times G_seq, G_fused of a rank) and a real multi-GPU run (the all-reduce cost a inside a step):
        speedup_N = (G_seq + k a_N) / (G_fused + a_N),   a_N in [a, 2 a]
    a = ((seq total - seq gemm) + (fused total - fused gemm)) / (k + 1), the measured cost of one all-reduce in
    the step at the measured world size (k in seq, 1 in fused), clamped at 0. With more ranks an all-reduce of
    the same [T, d] tensor is not cheaper (a ring moves 2(N-1)/N of the bytes per GPU instead of 1, in more
    steps), so a is the low end; 2 a is the high end, an assumption, not a measurement."""
    by_key = {(r["shape"], r["k"], r["tokens"]): r for r in measured if not r.get("skipped")}
    rows = []
    for e in emulated:
        key = (e["shape"].split("/")[0], e["k"], e["tokens"])
        if e.get("skipped") or key not in by_key:
            continue
        m, k = by_key[key], e["k"]
        a = max(0.0, ((m["seq"]["total_us"] - m["seq"]["gemm_us"]) + (m["fused"]["total_us"] - m["fused"]["gemm_us"])) / (k + 1))
        g_seq, g_fused = e["seq"]["gemm_us"], e["fused"]["gemm_us"]
        low, high = ((g_seq + k * s * a) / (g_fused + s * a) for s in (1, 2))
        rows.append({"shape": key[0], "k": k, "tokens": key[2], "tp": e["emulated_tp"], "from_world": m["world"],
                     "gemm_seq_us": g_seq, "gemm_fused_us": g_fused, "allreduce_us": a,
                     "measured_speedup": m["speedup"], "predicted_speedup": [low, high]})
    return rows


def format_prediction(rows) -> str:
    header = ("shape", "k", "T", "rank gemm seq", "rank gemm fused", "all-reduce", "measured W", "predicted TP")
    lines = [header] + [(r["shape"], r["k"], r["tokens"], f"{r['gemm_seq_us']:.1f}", f"{r['gemm_fused_us']:.1f}",
                         f"{r['allreduce_us']:.1f}", f"{r['measured_speedup']:.3f} (W={r['from_world']})",
                         f"{r['predicted_speedup'][0]:.2f}-{r['predicted_speedup'][1]:.2f} (TP{r['tp']})") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(*lines)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)
