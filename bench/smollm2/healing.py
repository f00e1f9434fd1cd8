"""The healing study's summary from models.heal reports (`bash bench/gpu_suite.sh heal OUT` writes heal_*.json):

    python -m bench.smollm2.healing [REPORT.json ...] [--out bench/results/h200]

writes smollm2_healing.json (one row per run) and smollm2_healing.png (held-out perplexity against training
tokens, the original's perplexity as a line); docs/smollm2.md shows them (`healing_section`, rendered by
`python -m bench.smollm2.study --render`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.smollm2.common import RESULTS
from passes.support.errors import fail, run_cli
from passes.support.ranges import spans
from passes.support.report import table

SUMMARY = "smollm2_healing"
GOALS = {"paper": 20.0, "all": 21.0}       # issue 15: (b) <= 20.0 and within 5 % of (a); (c) <= 21.0


def run_name(report: Path) -> str:
    return report.stem.removeprefix("heal_")


def summarize(reports: list[Path]) -> dict:
    """One row per run: what was changed, the budget spent, and the held-out numbers before and after."""
    rows = []
    for path in reports:
        r = json.loads(path.read_text())
        first, final = r["curve"][0], r["final"]
        rows.append({
            "run": run_name(path), "dropped": spans(r["dropped_layers"]),
            "groups": ",".join(f"{a}-{z}" for a, z in r["groups"]) or "-",
            "ffn_depth": sum(1 for _, width in r["student_layers"] if width is not None),
            "hidden_weight": r["settings"]["hidden_weight"], "steps": r["steps"], "tokens": r["tokens"],
            "train_minutes": r["train_seconds"] / 60, "device": r["device"],
            "teacher_perplexity": r["teacher_perplexity"],
            "before": {k: first[k] for k in ("perplexity", "kl", "top1")},
            "after": {k: final[k] for k in ("perplexity", "kl", "top1")},
            "curve": [{k: c[k] for k in ("tokens", "perplexity", "kl", "top1")} for c in r["curve"]],
            "settings": r["settings"], "data": r["data"], "eval": r["eval"],
        })
    return {"runs": rows}


def plot(summary: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in summary["runs"]:
        curve = row["curve"]
        ax.plot([c["tokens"] / 1e6 for c in curve], [c["perplexity"] for c in curve], marker=".",
                label=f"{row['run']}: depth {row['ffn_depth']}, groups {row['groups']}")
    teacher = summary["runs"][0]["teacher_perplexity"]
    ax.axhline(teacher, color="k", ls="--", lw=1, label=f"original {teacher:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M, attention dropped in 8 ranked layers: healing by distillation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def healing_section(results: Path = RESULTS / "h200", results_rel: str = "../bench/results/h200") -> list[str]:
    """The markdown of docs/smollm2.md's healing section from smollm2_healing.json (nothing when it is absent)."""
    path = results / f"{SUMMARY}.json"
    if not path.is_file():
        return []
    runs = {row["run"]: row for row in json.loads(path.read_text())["runs"]}
    lines = ["| run | attention dropped | FFN groups fused | FFN depth | hidden match | steps | tokens | minutes | "
             "perplexity before -> after | KL before -> after | top-1 before -> after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in runs.values():
        b, a = row["before"], row["after"]
        lines.append(f"| {row['run']} | {row['dropped']} | {row['groups']} | {row['ffn_depth']} | {row['hidden_weight']:g} | "
                     f"{row['steps']} | {row['tokens'] / 1e6:.1f} M | {row['train_minutes']:.1f} | "
                     f"{b['perplexity']:.2f} -> **{a['perplexity']:.2f}** | {b['kl']:.3f} -> {a['kl']:.3f} | "
                     f"{b['top1']:.1%} -> {a['top1']:.1%} |")
    any_row = next(iter(runs.values()))
    text = [f"`python -m models.heal` on {any_row['device']}: student = the model after drop (and fusion), teacher = "
            "the original; loss = KL of the next-token distributions over all positions; AdamW, lr "
            f"{any_row['settings']['lr']:g} with warm-up and cosine decay over the time budget, bf16, batch "
            f"{any_row['settings']['batch']} x {any_row['settings']['seq']} tokens. Training data: "
            f"{any_row['data']['sampled']:,} sequences the original samples itself (temperature 1, from random first "
            "tokens); no text of the evaluation is trained on. Evaluation: the first "
            f"{any_row['eval']['tokens']} tokens of CPython's language reference (the study's held-out text; the original "
            f"scores {any_row['teacher_perplexity']:.2f} on them). Every run got the same time budget; two runs shared "
            "each of the machine's two GPUs (so each had about half an H200).", "", *lines, "",
            f"![healing curves]({results_rel}/{SUMMARY}.png)", ""]
    verdicts = []
    dropped, paper, full = runs.get("dropped"), runs.get("paper"), runs.get("all")
    if dropped and paper:
        p, d = paper["after"]["perplexity"], dropped["after"]["perplexity"]
        verdicts.append(f"- Paper's rule, healed: {p:.2f} ({'meets' if p <= GOALS['paper'] else 'misses'} the goal "
                        f"<= {GOALS['paper']}); {p / d - 1:+.1%} against the healed dropped-only model ({d:.2f}; goal "
                        f"within 5 %: {'met' if p <= 1.05 * d else 'missed'}).")
    if full:
        f = full["after"]["perplexity"]
        verdicts.append(f"- Every run fused whole (FFN depth {full['ffn_depth']}), healed: {f:.2f} "
                        f"({'meets' if f <= GOALS['all'] else 'misses'} the goal <= {GOALS['all']}); unhealed it was "
                        f"{full['before']['perplexity']:.0f}.")
    return text + verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smollm2.healing", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="*", type=Path, help="models.heal --report files (default: OUT/heal_*.json)")
    parser.add_argument("--out", type=Path, default=RESULTS / "h200", help="folder of the reports and of the summary")
    args = parser.parse_args(argv)
    order = ["dropped", "paper", "all", "all_hidden"]
    reports = args.reports or sorted(args.out.glob("heal_*.json"),
                                     key=lambda p: (order.index(run_name(p)) if run_name(p) in order else len(order), p.name))
    if not reports:
        fail(f"no heal_*.json reports in {args.out}; run bash bench/gpu_suite.sh heal {args.out} on a GPU machine")
    for path in reports:
        if not path.is_file():
            fail(f"{path}: no such report")
    summary = summarize(reports)
    args.out.mkdir(parents=True, exist_ok=True)
    from passes.support.outputs import write_json
    write_json(args.out / f"{SUMMARY}.json", summary)
    png = plot(summary, args.out / f"{SUMMARY}.png")
    print(table([(r["run"], r["groups"], r["ffn_depth"], r["steps"], f"{r['tokens'] / 1e6:.1f} M",
                  f"{r['before']['perplexity']:.2f} -> {r['after']['perplexity']:.2f}",
                  f"{r['before']['kl']:.3f} -> {r['after']['kl']:.3f}") for r in summary["runs"]],
                header=("run", "groups", "FFN depth", "steps", "tokens", "perplexity", "KL")))
    print(f"summary: {args.out / f'{SUMMARY}.json'}; plot: {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
