"""python -m passes.analyze MODEL.onnx [--inputs FILE] [--blocks SPEC] -o REPORT.json [--plot HEATMAP.png]

Measures, on calibration inputs through onnxruntime, how much each FFN block changes the residual stream and how
much each block depends on each earlier one (the dependency matrix M of arXiv 2503.18908; definitions in
passes/measure/metrics.py). Small M[i][j]: block j barely notices block i, so they can run in parallel.

It also predicts what fusing each candidate group would cost (every run of 2 to --max-group selected blocks
inside a chain): the first-order change of the model's output, next-token KL for language models
(passes/measure/predict.py). M stays as the paper's reference; the prediction is what `passes.fuse --plan auto`
plans with.

The runs are segment-major by default (--stream segments, passes/measure/streams.py): the graph is cut at
residual nodes into segments of about one sublayer, each segment's weights are loaded once (about 1x the
model's bytes in all) and every run the analysis needs goes through it before the next, values kept on the GPU
when they fit; so a model larger than GPU or host memory is analyzed. --stream suffix runs one session over the
rest of the graph per removal (the weights read about n/2 times); both give the same numbers.

Report (JSON): tool, model, blocks (ordinal, node names, width, ...), chains, selected (ordinals analyzed),
inputs (source, shapes; a warning for random tokens), tokens, metrics {ordinal: {cosdist_io, ratio}},
dependency {ordinals, scope, matrix (row i, column j; null = not measured)}, candidates {unit, definition,
groups: [{span, predicted_cost, relative_error, sensitivity, max_m}]}, cost {forward_pass_equivalents,
node_fraction, seconds, session_seconds, session_wait_seconds, runs, per_run, parts {name: {forward_pass_equivalents, seconds, count}},
definition, provider, weights_read_bytes, weights_read_multiple, execution, segments, activations,
activation_bytes_peak, per_segment [{segment, starts_at, weight_bytes, session_seconds, runs, run_seconds,
forward_pass_fraction}]}, seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from passes.ffn.plan import DEFAULT_MAX_GROUP
from passes.ffn.structure import model_structure
from passes.measure.metrics import EXECUTIONS, SCOPES, compute_metrics, parse_block_spec
from passes.measure.plots import blocks_plot_path
from passes.support.calibration import DEFAULT_BATCH, DEFAULT_SEED, DEFAULT_SEQ, calibration_for
from passes.support.errors import fail, run_cli
from passes.support.onnx_io import PROVIDERS, load_model, resolve_provider
from passes.support.outputs import Staging, check_output
from passes.support.ranges import spans
from passes.support.report import table

CANDIDATES_SHOWN = 15


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.analyze", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("model", help="ONNX model (external data is read in place, never modified)")
    parser.add_argument("-o", "--output", required=True, help="write the JSON report here")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="where onnxruntime runs the measurement: auto (cuda where onnxruntime-gpu finds a GPU, "
                             "else cpu), cpu or cuda")
    parser.add_argument("--stream", choices=EXECUTIONS, default="segments",
                        help="segments: each segment of the graph loaded once, every run pushed through it (weights "
                             "read once); suffix: one session per removal over the rest of the graph")
    parser.add_argument("--inputs", help="calibration inputs: FILE.npz (one array per graph input) or a polygraphy "
                                         "--save-inputs JSON (default: random token ids, with a warning)")
    parser.add_argument("--blocks", help="FFN ordinals to analyze, e.g. 3-10 or 1,4,6-9 (default: all)")
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="all: M between every pair of selected blocks; chains: only inside each chain (cheaper)")
    parser.add_argument("--max-group", type=_positive_int, default=DEFAULT_MAX_GROUP,
                        help=f"longest candidate group whose cost is predicted (default {DEFAULT_MAX_GROUP}; 1: none)")
    parser.add_argument("--plot", help="write the heatmap of M here (PNG) and the per-block plot beside it as *_blocks.png")
    parser.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH, help="rows of random inputs (without --inputs)")
    parser.add_argument("--seq", type=_positive_int, default=DEFAULT_SEQ, help="sequence length of random inputs")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of random inputs")
    return parser


def summary(report: dict) -> str:
    metrics, dep = report["metrics"], report["dependency"]
    ordinals = dep["ordinals"]
    pos = {o: a for a, o in enumerate(ordinals)}
    chain_of = {o: spans(c) for c in report["chains"] for o in c}
    width = {b["ordinal"]: b["width"] for b in report["blocks"]}
    rows = []
    for a, o in enumerate(ordinals):
        nxt = dep["matrix"][a][pos[o + 1]] if o + 1 in pos else None
        rows.append((o, width[o], chain_of.get(o, "-"), metrics[str(o)]["cosdist_io"], metrics[str(o)]["ratio"],
                     "-" if nxt is None else nxt))
    cost = report["cost"]
    lines = [f"FFN analysis: {report['model']}  ({len(report['blocks'])} FFN blocks, {len(ordinals)} analyzed, "
             f"{report['tokens']} tokens)",
             f"  inputs: {report['inputs']['source']}",
             table(rows, header=("block", "width", "chain", "cosdist_io", "|h|/|x|", "M[t][t+1]"))]
    candidates = report.get("candidates")
    if candidates:
        ranked = sorted(candidates["groups"], key=lambda c: (c["predicted_cost"] is None, c["predicted_cost"] or 0.0))
        shown = ranked[:CANDIDATES_SHOWN]
        lines.append(f"  candidate groups, cheapest first ({len(shown)} of {len(ranked)}; predicted {candidates['unit']} of "
                     f"fusing each alone, max M over its pairs):")
        lines.append(table([(f"{c['span'][0]}-{c['span'][1]}", "-" if c["predicted_cost"] is None else c["predicted_cost"],
                             "-" if c["max_m"] is None else c["max_m"]) for c in shown],
                           header=("group", f"predicted {candidates['unit']}", "max M")))
    parts = "; ".join(f"{name} {p['forward_pass_equivalents']:.3g} in {p['seconds']:.2f} s" for name, p in cost["parts"].items())
    waited = cost.get("session_wait_seconds")
    sessions = f"{cost['session_seconds']:.2f} s creating sessions" + (f", {waited:.2f} s of it waited for" if waited is not None else "")
    lines.append(f"  cost: {cost['forward_pass_equivalents']:.3g} forward-pass equivalents ({parts}), "
                 f"{cost['seconds']:.2f} s in all ({sessions}); weights read "
                 f"{cost['weights_read_bytes'] / 1e9:.3g} GB = {cost['weights_read_multiple']:.3g}x the model "
                 f"({cost['execution']}, {cost['provider']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.provider = resolve_provider(args.provider)    # before any work: --provider cuda needs a GPU
    start = time.perf_counter()
    out, plot = Path(args.output), Path(args.plot) if args.plot else None
    inputs = [Path(args.model)] + ([Path(args.inputs)] if args.inputs else [])
    check_output(out, "report", *inputs)
    if plot is not None:
        check_output(plot, "plot", *inputs, suffix=".png")
        check_output(blocks_plot_path(plot), "per-block plot", *inputs, suffix=".png")
    model = load_model(args.model, weights_in_place=True)     # it only reads the model
    for path, what in ((out, "report"), (plot, "plot"), (plot and blocks_plot_path(plot), "per-block plot")):
        if path is not None and path.resolve() in model.external_files:
            fail(f"{what} {path} would overwrite the model's external data; choose another file name")
    structure = model_structure(model.proto)
    if not structure.blocks:
        hint = f"; first rejected candidate: {structure.rejections[0].node}: {structure.rejections[0].check}" if structure.rejections else ""
        fail(f"{args.model}: no FFN blocks found (pre-norm SwiGLU on the residual stream){hint}")
    ordinals = parse_block_spec(args.blocks, len(structure.blocks)) if args.blocks else list(range(len(structure.blocks)))
    calib = calibration_for(model, args.inputs, batch=args.batch, seq=args.seq, seed=args.seed)
    print(f"analyze: {args.model}: {len(structure.blocks)} FFN blocks, measuring {len(ordinals)} on "
          f"{calib.record()['tokens']} tokens ...", flush=True)
    metrics = compute_metrics(model, calib.feeds, ordinals, scope=args.scope, structure=structure, provider=args.provider,
                              predict=args.max_group if args.max_group > 1 else None, execution=args.stream)
    record = structure.record()
    report = {
        "tool": "passes.analyze",
        "model": str(args.model),
        "blocks": record["ffn_blocks"], "chains": record["chains"], "rejections": record["rejections"],
        "selected": ordinals,
        "inputs": calib.record(),
        **metrics.record(),
        "seconds": round(time.perf_counter() - start, 3),
        "command": ["python", "-m", "passes.analyze", *(argv if argv is not None else sys.argv[1:])],
    }
    with Staging() as staging:
        staging.json(out, report)
        if plot is not None:
            from passes.measure.plots import plot_blocks, plot_dependency
            plot_dependency(metrics, structure.chains, staging.path(plot), title=f"FFN dependency matrix M: {Path(args.model).name}")
            plot_blocks(metrics, structure.chains, staging.path(blocks_plot_path(plot)),
                        title=f"Per-block metrics: {Path(args.model).name}")
        staging.publish()
    print(summary(report))
    print(f"  report: {out}" + (f"; plots: {plot}, {blocks_plot_path(plot)}" if plot is not None else ""))
    print(f"  {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
