"""SmolLM2-135M-Instruct through the whole product, end to end on CPU, as a user would run it.

    python -m bench.smollm2.study [--out DIR] [--tokens 2048] [--seq 256] [--quick] [--keep-models]
    python -m bench.smollm2.study --render                 # rewrite docs/smollm2.md from the stored JSON

Steps (each one a CLI of the product, called in-process with its usual arguments, or the library function the
CLI calls; the CLIs' own output goes to DIR/study.log):
  1. Text: CPython's language reference (pydoc_data.topics, topics joined in key order with blank lines),
     tokenized with the GGUF's tokenizer (models.loaders.load_tokenizer). Evaluation set: the first --tokens
     tokens, as rows of --seq; calibration set: as many tokens from the middle of the text (disjoint).
  2. Export (exporters.export) fp32 and fp16, and check both against transformers' GGUF-loaded
     LlamaForCausalLM on the evaluation set: max |a - b| / max |b| of the logits, KL, top-1, perplexity.
  3. Rank attention sublayers (passes.drop_attention --rank) on the calibration set.
  4. Dropped sets: attention removed in the last 4, 8, 12 layers and in the 4, 8, 12 layers the ranking
     picks (passes.drop_attention --layers). For each, fusion plans (passes.fuse): none (attention dropped
     only); the paper's rule (--plan paper); --plan auto at the default threshold and at 0.1; all-in-one
     (every chain fused whole, its last block included, with --groups).
  5. Equal depth: for each dropped set, the auto plan at every threshold that changes its depth (the smallest
     threshold giving that depth), against a fixed rule at exactly the same depth per chain: the chain
     (without its last block, like auto) cut into the same number of contiguous stages of equal size
     (sizes differ by at most one). Both keep the last block of every chain, so they differ only in where the
     cuts are: chosen by M, or evenly. At the deepest fusion this fixed rule is the paper's rule.
  6. Every variant is run on the evaluation set (onnxruntime CPU): KL divergence of next-token distributions
     and top-1 agreement against the original model and against the attention-dropped model (the fusion's own
     cost), perplexity on the text (passes.measure.change), sequential FFN depth (the fuse report),
     attention layers left. One variant is also run through `python -m bench.compare` (polygraphy) as a
     cross-check.
  7. Dependency heatmaps (passes.analyze --plot) of the original model (all 30 FFN blocks) and of the model
     with attention dropped in the last 12 layers.
Writes bench/results/smollm2_study.json (bench.results.write_result), plots bench/results/smollm2_*.png and
docs/smollm2.md. --quick: 512 tokens, only the last-4/last-8 sets, no ranking and no original heatmap; it writes
into --out only (smollm2_study_quick.json, plots, smollm2_quick.md), never over the committed results.

"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bench.smollm2.common import (
    AUTO_LOOSE,
    DOC,
    LAYERS,
    NAME,
    RESULTS,
    ROOT,
    SOURCE,
    Study,
    adjacent_pairs,
    agreement,
    chains_of,
    corpus_ids,
    depth_of,
    equal_depth_pairs,
    export_check,
    groups_spec,
    metrics_from_record,
    ort_logits,
    pair_correlations,
    token_sets,
    variant_row,
)
from bench.smollm2.doc import render_markdown
from bench.smollm2.figures import make_plots
from passes.support.errors import fail, run_cli
from passes.support.ranges import spans


def run_study(args) -> dict:
    from exporters.export import main as export_main
    from passes.analyze import main as analyze_main
    from passes.drop_attention import main as drop_main
    from passes.ffn.plan import DEFAULT_THRESHOLD, Group, plan_from_metrics
    from passes.fuse import main as fuse_main
    from passes.pipeline import fuse_file

    out = Path(args.out).resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    prefix = "smollm2_quick" if args.quick else "smollm2"
    study = Study(out, out / "study.log")
    record: dict = {"quick": args.quick, "source": SOURCE}

    with study.timed("tokenize"):
        ids = corpus_ids()
        evaluation, calibration, record["tokens"] = token_sets(ids, args.tokens, args.seq)
        eval_npz, calib_npz = out / "eval.npz", out / "calib.npz"
        np.savez(eval_npz, input_ids=evaluation)
        np.savez(calib_npz, input_ids=calibration)
    study.say(f"text: {len(ids)} tokens; evaluation {evaluation.shape}, calibration {calibration.shape} from offset "
              f"{record['tokens']['calibration']['offset']}")

    original = models / "smollm2.onnx"
    with study.timed("export"):
        study.cli(export_main, [SOURCE, "-o", str(original)], "exporters.export")
        fp16 = models / "smollm2.fp16.onnx"
        study.cli(export_main, [SOURCE, "-o", str(fp16), "--dtype", "fp16"], "exporters.export")
    record["files"] = {"fp32_bytes": original.stat().st_size, "fp16_bytes": fp16.stat().st_size}
    with study.timed("export_check"):
        record["export_check"] = export_check(study, evaluation, original, fp16)
    fp16.unlink()

    with study.timed("evaluate"):
        base = ort_logits(original, evaluation)
        own = agreement(base, base, evaluation)
    record["original"] = {"ppl": own["ppl"], "ffn_depth": LAYERS, "attention_layers": LAYERS}
    study.say(f"original fp32 ONNX: perplexity {own['ppl']:.3f} on {evaluation.size} tokens")

    ranking = []
    if not args.quick:
        with study.timed("rank_attention"):
            rank_json = out / "rank.json"
            study.cli(drop_main, [str(original), "--rank", "--inputs", str(calib_npz), "--report", str(rank_json),
                                  "--plot", str(results_dir / f"{prefix}_attention_ranking.png")], "passes.drop_attention")
            ranking = json.loads(rank_json.read_text())["ranking"]
        record["ranking"] = ranking
        study.say("attention ranking (least harmful first): " + ", ".join(
            f"{r['layer']} ({r['kl_removed_alone']:.3f})" for r in ranking[:12]))

    sets = [(f"last{k}", list(range(LAYERS - k, LAYERS))) for k in ((4, 8) if args.quick else (4, 8, 12))]
    if ranking:
        sets += [(f"ranked{k}", sorted(r["layer"] for r in ranking[:k])) for k in (4, 8, 12)]
    heatmap_set = "last8" if args.quick else "last12"

    if not args.quick:
        with study.timed("analyze"):
            study.say("dependency matrix of the original model (all 30 FFN blocks)")
            analysis = out / "analyze_original.json"
            study.cli(analyze_main, [str(original), "--inputs", str(calib_npz), "-o", str(analysis),
                                     "--plot", str(results_dir / f"{prefix}_heatmap_original.png")], "passes.analyze")
            record["heatmap_original"] = _analysis_record(json.loads(analysis.read_text()))

    variants: list[dict] = []
    equal_depth: list[dict] = []
    pairs: list[dict] = []
    record["sets"] = []
    threshold_default = DEFAULT_THRESHOLD
    for set_name, layers in sets:
        spec = spans(layers)
        study.say(f"set {set_name}: dropping attention in layers {spec}")
        dropped = models / f"{set_name}.onnx"
        with study.timed("drop_attention"):
            study.cli(drop_main, [str(original), "-o", str(dropped), "--layers", spec], "passes.drop_attention")
        blocks, chains = chains_of(dropped)
        with study.timed("evaluate"):
            dropped_logits = ort_logits(dropped, evaluation)
            vs_orig = agreement(base, dropped_logits, evaluation)
        drop_cmd = f"python -m passes.drop_attention smollm2.onnx -o {set_name}.onnx --layers {spec}"
        variants.append(variant_row(set_name, "dropped", [], layers, vs_orig, None, LAYERS, drop_cmd))
        study.say(f"  attention dropped only: KL {vs_orig['kl']:.4f}, top-1 {vs_orig['top1']:.3f}, ppl {vs_orig['ppl']:.2f}")
        set_record = {"name": set_name, "dropped_layers": layers, "chains": [list(c.ordinals) for c in chains if len(c) > 1]}
        cache: dict[tuple, dict] = {(): variants[-1]}

        def reuse(key: tuple, plan: str, command: str, extra: dict) -> dict:
            """A plan already measured under another name: same numbers, its own name, command and flags."""
            row = {k: v for k, v in cache[key].items() if k not in ("sweep", "pair", "threshold", "same_as", "bench_compare")}
            row.update(id=f"{set_name}/{plan}", plan=plan, command=command, same_as=cache[key]["id"], **extra)
            variants.append(row)
            return row

        def evaluate(plan: str, groups, command: str, *, cli_argv: list[str] | None = None, **extra) -> dict:
            if groups is not None and tuple(tuple(g) for g in groups) in cache:
                return reuse(tuple(tuple(g) for g in groups), plan, command, extra)
            fused = models / f"{set_name}.{plan.replace('@', '_')}.onnx"
            report_path = out / f"{set_name}.{plan.replace('@', '_')}.json"
            with study.timed("fuse"):
                if cli_argv is not None:
                    study.cli(fuse_main, [str(dropped), "-o", str(fused), *cli_argv, "--report", str(report_path)], "passes.fuse")
                    report = json.loads(report_path.read_text())
                else:
                    report = fuse_file(dropped, fused, groups=[Group(a, b) for a, b in groups], plan_name=plan).report
            depth = report["after"]["sequential_ffn_depth"]
            groups = [tuple(g) for g in report["groups"]]
            key = tuple(groups)
            if key in cache:        # the CLI chose a plan already measured
                fused.unlink(missing_ok=True)
                return reuse(key, plan, command, extra)
            with study.timed("evaluate"):
                logits = ort_logits(fused, evaluation)
                row = variant_row(set_name, plan, groups, layers, agreement(base, logits, evaluation),
                                  agreement(dropped_logits, logits, evaluation), depth, command, **extra)
            assert depth == depth_of(groups), (depth, groups)
            if args.cross_check == row["id"]:
                with study.timed("compare"):
                    row["bench_compare"] = _cross_check(study, original, fused, eval_npz, out)
            if not args.keep_models:
                fused.unlink(missing_ok=True)
            cache[key] = row
            variants.append(row)
            study.say(f"  {plan:>12}: groups {groups_spec(groups) or '-':<22} depth {depth:2d}  KL {row['kl']:.4f}  "
                      f"top-1 {row['top1']:.3f}  ppl {row['ppl']:8.2f}  fusion's own KL {row['fusion_kl']:.4f}")
            return row

        evaluate("paper", None, f"python -m passes.fuse {set_name}.onnx -o F.onnx --plan paper", cli_argv=["--plan", "paper"])
        with study.timed("auto_plan"):
            evaluate("auto", None, f"python -m passes.fuse {set_name}.onnx -o F.onnx --plan auto --inputs calib.npz",
                                cli_argv=["--plan", "auto", "--inputs", str(calib_npz)], threshold=threshold_default)
        auto_report = json.loads((out / f"{set_name}.auto.json").read_text())
        auto_record = auto_report.get("auto_plan", {})
        metrics = metrics_from_record(auto_record) if auto_record.get("dependency") else None
        set_record["auto_plan"] = {k: auto_record.get(k) for k in ("threshold", "groups", "dependency", "metrics", "cost")}
        if metrics is not None:
            loose = [(g.first, g.last) for g in plan_from_metrics(chains, metrics, AUTO_LOOSE)[0]]
            evaluate(f"auto@{AUTO_LOOSE:g}", loose, f"python -m passes.fuse {set_name}.onnx -o F.onnx --plan auto "
                     f"--inputs calib.npz --threshold {AUTO_LOOSE:g}", threshold=AUTO_LOOSE)
        whole = [(c.first, c.last) for c in chains if len(c) >= 2]
        evaluate("all", whole, f"python -m passes.fuse {set_name}.onnx -o F.onnx --groups {groups_spec(whole)}")
        if metrics is not None and (not args.quick or set_name == "last8"):
            for pair in equal_depth_pairs(chains, metrics)[:3 if args.quick else None]:
                a = evaluate(f"auto@{pair['threshold']:.4g}", pair["auto"],
                             f"python -m passes.fuse {set_name}.onnx -o F.onnx --plan auto --inputs calib.npz "
                             f"--threshold {pair['threshold']:.4g}", threshold=pair["threshold"], sweep=True)
                e = evaluate(f"even@{pair['depth']}", pair["even"],
                             f"python -m passes.fuse {set_name}.onnx -o F.onnx --groups {groups_spec(pair['even'])}",
                             sweep=True)
                equal_depth.append({"set": set_name, "depth": pair["depth"], "threshold": pair["threshold"],
                                    "auto": a["id"], "even": e["id"], "auto_groups": a["groups"], "even_groups": e["groups"],
                                    "auto_kl": a["kl"], "even_kl": e["kl"], "auto_fusion_kl": a["fusion_kl"],
                                    "even_fusion_kl": e["fusion_kl"], "auto_top1": a["top1"], "even_top1": e["top1"],
                                    "auto_ppl": a["ppl"], "even_ppl": e["ppl"], "same_plan": a["groups"] == e["groups"]})
        if metrics is not None and (not args.quick or set_name == "last8"):
            for i, j in adjacent_pairs(metrics)[:2 if args.quick else None]:
                row = evaluate(f"pair@{i}-{j}", [(i, j)], f"python -m passes.fuse {set_name}.onnx -o F.onnx --groups {i}-{j}",
                               pair=True)
                m_ij, ratio_j = metrics.m(i, j), metrics.ratio[metrics.position(j)]
                pairs.append({"set": set_name, "pair": [i, j], "m": m_ij, "ratio_i": metrics.ratio[metrics.position(i)],
                              "ratio_j": ratio_j, "perturbation": ratio_j * math.sqrt(2 * m_ij),
                              "fusion_kl": row["fusion_kl"], "fusion_top1": row["fusion_top1"], "kl": row["kl"], "ppl": row["ppl"]})
        if set_name == heatmap_set:
            with study.timed("analyze"):
                study.say(f"dependency matrix with attention dropped in layers {spec} (all 30 FFN blocks)")
                analysis = out / f"analyze_{set_name}.json"
                study.cli(analyze_main, [str(dropped), "--inputs", str(calib_npz), "-o", str(analysis),
                                         "--plot", str(results_dir / f"{prefix}_heatmap_{set_name}.png")], "passes.analyze")
                record["heatmap_dropped"] = {"set": set_name, **_analysis_record(json.loads(analysis.read_text()))}
        record["sets"].append(set_record)
        if not args.keep_models:
            dropped.unlink(missing_ok=True)
        dropped_logits = None   # free the logits before the next set

    record["variants"] = variants
    record["equal_depth"] = equal_depth
    record["pairs"] = pairs
    record["pair_correlations"] = pair_correlations(pairs)
    record["auto_default_threshold"] = threshold_default
    record["timing_s"] = dict(study.timing, total=round(time.perf_counter() - study.start, 1))
    plots = make_plots(record, results_dir, prefix)
    record["plots"] = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in plots]
    if not args.keep_models:
        original.unlink(missing_ok=True)
    return record


def _analysis_record(report: dict) -> dict:
    return {"ordinals": report["dependency"]["ordinals"], "matrix": report["dependency"]["matrix"],
            "metrics": report["metrics"], "chains": [c for c in report["chains"] if len(c) > 1],
            "cost": {k: report["cost"][k] for k in ("forward_pass_equivalents", "seconds", "runs")}}


def _cross_check(study: Study, original: Path, fused: Path, eval_npz: Path, out: Path) -> dict:
    """The same comparison through python -m bench.compare (polygraphy); exit 1 (outside elementwise tolerance)
    is expected for a fused model."""
    from bench.compare import main as compare_main
    path = out / "compare.json"
    code = study.cli(compare_main, [str(original), str(fused), "--inputs", str(eval_npz), "--json", str(path)],
                     "bench.compare", ok=(0, 1))
    lm = json.loads(path.read_text()).get("language_model") or {}
    return {"exit_code": code, "kl_mean": lm.get("kl_mean"), "top1_agreement": lm.get("top1_agreement"),
            "perplexity_original": lm.get("perplexity_original"), "perplexity_fused": lm.get("perplexity_fused")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smollm2.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/smollm2_study", help="working folder: models (deleted as it goes), "
                                                                   "inputs, reports, log")
    parser.add_argument("--tokens", type=int, default=None, help="evaluation and calibration tokens each (default 2048; --quick 512)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 512 tokens, last-4/8 only, results under --out only")
    parser.add_argument("--keep-models", action="store_true", help="keep every variant's ONNX file under --out/models")
    parser.add_argument("--results-dir", help="where the JSON and plots go (default bench/results; --quick: --out)")
    parser.add_argument("--doc", help="markdown page to write (default docs/smollm2.md; --quick: --out/smollm2_quick.md)")
    parser.add_argument("--cross-check", default="last8/paper", help="variant also run through python -m bench.compare")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown page from the stored JSON")
    parser.add_argument("--study-json", default=str(RESULTS / f"{NAME}.json"), help="--render: study results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results_dir = Path(args.results_dir) if args.results_dir else (out if args.quick else RESULTS)
    doc = Path(args.doc) if args.doc else (out / "smollm2_quick.md" if args.quick else DOC)
    prefix = "smollm2_quick" if args.quick else "smollm2"
    name = f"{NAME}_quick" if args.quick else NAME
    if args.render:
        source = Path(args.study_json) if not args.quick else results_dir / f"{name}.json"
        if not source.is_file():
            fail(f"{source}: no study results to render; run python -m bench.smollm2.study first")
        data = json.loads(source.read_text())
        doc.write_text(render_markdown(data, os.path.relpath(results_dir.resolve(), doc.resolve().parent), prefix))
        print(f"wrote {doc}")
        return 0
    args.tokens = args.tokens or (512 if args.quick else 2048)
    args.results_dir = str(results_dir)
    record = run_study(args)
    from bench.results import write_result
    path = write_result(name, record, results_dir)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_markdown(record, os.path.relpath(results_dir.resolve(), doc.resolve().parent), prefix))
    print(f"results: {path}\npage: {doc}\nplots: {', '.join(record['plots'])}\ntotal {record['timing_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
