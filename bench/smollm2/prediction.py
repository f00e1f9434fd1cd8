"""How well does a cheap signal predict what fusing a group costs? On the real SmolLM2 (our fp32 export) in two
attention-dropped configurations, every pair and triple of consecutive FFN blocks inside a chain is fused alone
and its next-token KL against the dropped model is measured on held-out text; the signals come from one analysis
on disjoint calibration text:

    python -m bench.smollm2.prediction [--out out/smollm2_prediction] [--results-dir bench/results]

Signals: the paper's M (max M[i][j] over the group's pairs), ratio (sum of |h_t| / |x_t| over the group's blocks
after the first), and predicted_cost (passes/measure/predict.py). Reported: Spearman rank correlation of each
with the measured KL (pairs and triples together, and apart), the analysis cost in forward-pass equivalents
against n/2 + 1, and what `passes.fuse --plan auto` with default settings fuses on the ranked-8 model and the KL
that costs on the held-out text. JSON + scatter plot in --results-dir.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np

from bench.smollm2.common import RESULTS, agreement, corpus_ids, ort_logits, spearman, token_sets
from passes.measure.predict import PREDICTION_DEFINITION
from passes.support.errors import run_cli

NAME = "smollm2_prediction"
CONFIGS = {"ranked8": [5, 6, 7, 17, 18, 25, 26, 29],      # the 8 layers passes.drop_attention --rank picks
           "last8": list(range(22, 30))}
SIGNALS = ("m", "ratio", "predicted")


def prepare(out: Path, tokens: int, seq: int) -> tuple[Path, np.ndarray, Path]:
    """Our fp32 export of SmolLM2, the held-out evaluation ids and the calibration inputs file."""
    from exporters.export import export_onnx
    from models.loaders import load_model
    original = out / "smollm2.onnx"
    if not original.is_file():
        export_onnx(load_model("smollm2"), original)
    evaluation, calibration, _ = token_sets(corpus_ids(), tokens, seq)
    calib = out / "calibration.npz"
    np.savez(calib, input_ids=calibration)
    return original, evaluation, calib


def fused_kl(model, structure, group: tuple[int, int], reference: np.ndarray, evaluation: np.ndarray, path: Path) -> dict:
    """Fuse `group` alone, run the held-out text, compare with the unfused model's logits."""
    from passes.ffn.plan import Group
    from passes.pipeline import fuse_model
    from passes.support.onnx_io import save_model
    fusion = fuse_model(model, structure, [Group(*group)])
    save_model(fusion.output, path, external=False)
    return agreement(reference, ort_logits(path, evaluation, rows_per_run=2), evaluation)


def study_config(name: str, original: Path, dropped_layers: list[int], evaluation: np.ndarray, calib_file: Path,
                 out: Path) -> dict:
    from tqdm import tqdm

    from passes.drop_attention import main as drop_main
    from passes.ffn.structure import model_structure
    from passes.measure.metrics import compute_metrics
    from passes.pipeline import auto_plan
    from passes.support.calibration import calibration_for
    from passes.support.onnx_io import load_model
    from passes.support.ranges import spans
    dropped = out / f"{name}.onnx"
    if not dropped.is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            drop_main([str(original), "-o", str(dropped), "--layers", spans(dropped_layers)])
    model = load_model(dropped)
    structure = model_structure(model.proto)
    calib = calibration_for(model, str(calib_file))
    chain_blocks = [o for c in structure.chains if len(c) > 1 for o in c.ordinals]
    start = time.perf_counter()
    metrics = compute_metrics(model, calib.feeds, chain_blocks, scope="chains", structure=structure, predict=3)
    analysis_s = time.perf_counter() - start
    reference = ort_logits(dropped, evaluation, rows_per_run=2)
    ratio = dict(zip(metrics.ordinals, metrics.ratio))
    rows = []
    for c in tqdm(metrics.candidates, desc=f"{name}: fusing each group alone", unit="group"):
        measured = fused_kl(model, structure, (c.first, c.last), reference, evaluation, out / "candidate.onnx")
        rows.append({"group": [c.first, c.last], "size": c.last - c.first + 1, "measured_kl": measured["kl"],
                     "measured_top1": measured["top1"], "m": metrics.max_m(c.first, c.last),
                     "ratio": sum(ratio[t] for t in range(c.first + 1, c.last + 1)),
                     "predicted": c.predicted_cost, "relative_error": c.relative_error})
    (out / "candidate.onnx").unlink(missing_ok=True)
    correlations = {}
    for subset, keep in (("all", lambda r: True), ("pairs", lambda r: r["size"] == 2), ("triples", lambda r: r["size"] == 3)):
        chosen = [r for r in rows if keep(r)]
        correlations[subset] = {s: spearman([r[s] for r in chosen], [r["measured_kl"] for r in chosen]) for s in SIGNALS}
        correlations[subset]["groups"] = len(chosen)
    record = {"dropped_layers": dropped_layers, "chains": [list(c.ordinals) for c in structure.chains if len(c) > 1],
              "groups": rows, "spearman": correlations, "analysis": {
                  "forward_pass_equivalents": metrics.cost.forward_pass_equivalents, "limit": len(structure.blocks) / 2 + 1,
                  "seconds": round(analysis_s, 1), "blocks": len(structure.blocks), "tokens": metrics.tokens}}
    if name == "ranked8":       # what the default --plan auto does here, measured on the held-out text
        groups, auto = auto_plan(model, structure, calib)
        from passes.pipeline import fuse_model
        from passes.support.onnx_io import save_model
        fused = save_model(fuse_model(model, structure, groups).output, out / "auto.onnx", external=False)
        held_out = agreement(reference, ort_logits(fused, evaluation, rows_per_run=2), evaluation)
        record["default_auto_plan"] = {"groups": auto["groups"], "predicted_kl": auto["predicted_cost"],
                                       "max_kl": auto["max_cost"], "held_out_kl": held_out["kl"],
                                       "held_out_top1": held_out["top1"],
                                       "analysis_forward_pass_equivalents": auto["cost"]["forward_pass_equivalents"]}
    return record


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    labels = {"m": "paper's M (max over the group's pairs)", "ratio": "ratio: sum of |h_t|/|x_t| after the first block",
              "predicted": "predicted KL (passes/measure/predict.py)"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    for ax, signal in zip(axes, SIGNALS):
        for (name, config), color in zip(result["configs"].items(), ("tab:blue", "tab:orange")):
            for size, marker in ((2, "o"), (3, "^")):
                rows = [r for r in config["groups"] if r["size"] == size]
                ax.scatter([r[signal] for r in rows], [r["measured_kl"] for r in rows], c=color, marker=marker, s=28,
                           label=f"{name} {'pairs' if size == 2 else 'triples'}")
            rho = config["spearman"]["all"][signal]
            ax.plot([], [], " ", label=f"{name}: Spearman {rho:+.2f}")
        if signal == "predicted":
            lo = min(r["measured_kl"] for c in result["configs"].values() for r in c["groups"])
            hi = max(r["measured_kl"] for c in result["configs"].values() for r in c["groups"])
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(labels[signal], fontsize=8)
        ax.set_ylabel("measured KL of fusing the group alone (held-out)", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("SmolLM2-135M: what fusing a pair or triple costs, against three predictors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smollm2.prediction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/smollm2_prediction"), help="working folder (models)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation and calibration tokens each")
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    original, evaluation, calib = prepare(args.out, args.tokens, args.seq)
    result = {"configs": {name: study_config(name, original, layers, evaluation, calib, args.out)
                          for name, layers in CONFIGS.items()},
              "signals": {"m": "max M[i][j] over pairs of the group", "ratio": "sum over t = a+1..z of mean |h_t| / |x_t|",
                          "predicted": PREDICTION_DEFINITION},
              "tokens": {"evaluation": int(evaluation.size), "calibration": args.tokens}, "seconds": 0.0}
    result["seconds"] = round(time.perf_counter() - start, 1)
    from bench.results import write_result
    from passes.support.report import table
    rows = []
    for name, config in result["configs"].items():
        for subset in ("all", "pairs", "triples"):
            s = config["spearman"][subset]
            rows.append((name, subset, s["groups"], *(f"{s[k]:+.3f}" if s[k] is not None else "-" for k in SIGNALS)))
    print(table(rows, header=("config", "groups", "n", "M", "ratio", "predicted")))
    for name, config in result["configs"].items():
        a = config["analysis"]
        print(f"{name}: analysis {a['forward_pass_equivalents']:.2f} forward-pass equivalents (limit n/2+1 = {a['limit']:g}), "
              f"{a['seconds']:.0f} s")
    auto = result["configs"]["ranked8"]["default_auto_plan"]
    print(f"ranked8, --plan auto (defaults): groups {auto['groups']}, predicted KL {auto['predicted_kl']:.4f}, "
          f"held-out KL {auto['held_out_kl']:.4f}")
    path = write_result(NAME, result, args.results_dir)
    print(f"result: {path}; plot: {plot(result, args.results_dir / f'{NAME}.png')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
