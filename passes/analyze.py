"""python -m passes.analyze MODEL.onnx [--inputs FILE] [--blocks SPEC] -o REPORT.json [--plot HEATMAP.png]

Measures, on calibration inputs through onnxruntime, how much each FFN block changes the residual stream and how
much each block depends on each earlier one (the dependency matrix M of arXiv 2503.18908; definitions in
passes/analysis.py and DESIGN.md). Small M[i][j]: block j barely notices block i, so they can run in parallel.

Report (JSON): tool, model, blocks (ordinal, node names, width, ...), chains, selected (ordinals analyzed),
inputs (source, shapes; a warning for random tokens), tokens, metrics {ordinal: {cosdist_io, ratio}},
dependency {ordinals, scope, matrix (row i, column j; null = not measured)}, cost {forward_pass_equivalents,
node_fraction, seconds, session_seconds, runs, per_run, definition}, seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from passes.analysis import SCOPES, compute_metrics, parse_block_spec
from passes.calibration import DEFAULT_BATCH, DEFAULT_SEED, DEFAULT_SEQ, calibration_for
from passes.chains import find_chains
from passes.errors import fail, run_cli
from passes.graph import GraphIndex
from passes.match import match_ffn_blocks
from passes.onnx_io import load_model
from passes.plots import blocks_plot_path
from passes.ranges import spans
from passes.report import structure_record, table


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.analyze", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("model", help="ONNX model (external data is read in place, never modified)")
    parser.add_argument("-o", "--output", required=True, help="write the JSON report here")
    parser.add_argument("--inputs", help="calibration inputs: FILE.npz (one array per graph input) or a polygraphy "
                                         "--save-inputs JSON (default: random token ids, with a warning)")
    parser.add_argument("--blocks", help="FFN ordinals to analyze, e.g. 3-10 or 1,4,6-9 (default: all)")
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="all: M between every pair of selected blocks; chains: only inside each chain (cheaper)")
    parser.add_argument("--plot", help="write the heatmap of M here (PNG) and the per-block plot beside it as *_blocks.png")
    parser.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH, help="rows of random inputs (without --inputs)")
    parser.add_argument("--seq", type=_positive_int, default=DEFAULT_SEQ, help="sequence length of random inputs")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of random inputs")
    return parser


def _check_writable(path: Path, what: str) -> None:
    if not path.parent.is_dir():
        fail(f"{what} folder {path.parent} does not exist")
    if path.is_dir():
        fail(f"{what} {path} is a folder")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _structure(found, chains) -> dict:
    """blocks (as passes.report.block_record: ordinal, node names, width, ...), chains, rejections."""
    record = structure_record(found.blocks, chains, found.rejections)
    return {"blocks": record["ffn_blocks"], "chains": record["chains"], "rejections": record["rejections"]}


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
             table(rows, header=("block", "width", "chain", "cosdist_io", "|h|/|x|", "M[t][t+1]")),
             f"  cost: {cost['forward_pass_equivalents']:.3g} forward-pass equivalents in {cost['runs']} runs, "
             f"{cost['seconds']:.2f} s ({cost['session_seconds']:.2f} s creating sessions)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output)
    _check_writable(out, "report")
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        _check_writable(plot, "plot")
        if plot.suffix.lower() != ".png":
            fail(f"--plot {plot}: the heatmap is written as PNG, give a .png file name")
    model = load_model(args.model)
    protected = {Path(args.model).resolve()} | model.external_files
    if args.inputs:
        protected.add(Path(args.inputs).resolve())
    for path, what in ((out, "report"), (plot, "plot"), (plot and blocks_plot_path(plot), "per-block plot")):
        if path is not None and path.resolve() in protected:
            fail(f"{what} {path} would overwrite the model, its external data or the inputs; choose another file name")
    index = GraphIndex.build(model.proto.graph)
    found = match_ffn_blocks(model.proto, index)
    if not found.blocks:
        hint = f"; first rejected candidate: {found.rejections[0].node}: {found.rejections[0].check}" if found.rejections else ""
        fail(f"{args.model}: no FFN blocks found (pre-norm SwiGLU on the residual stream){hint}")
    chains = find_chains(found.blocks, index)
    ordinals = parse_block_spec(args.blocks, len(found.blocks)) if args.blocks else list(range(len(found.blocks)))
    calib = calibration_for(model.proto, args.inputs, batch=args.batch, seq=args.seq, seed=args.seed)
    metrics = compute_metrics(model, calib.feeds, ordinals, scope=args.scope, blocks=found.blocks, chains=chains)
    report = {
        "tool": "passes.analyze",
        "model": str(args.model),
        **_structure(found, chains),
        "selected": ordinals,
        "inputs": calib.record(),
        **metrics.record(),
        "seconds": round(time.perf_counter() - start, 3),
        "command": ["python", "-m", "passes.analyze", *(argv if argv is not None else sys.argv[1:])],
    }
    _write_json(out, report)
    print(summary(report))
    print(f"  report: {out}")
    if plot is not None:
        from passes.plots import plot_blocks, plot_dependency
        plot_dependency(metrics, chains, plot, title=f"FFN dependency matrix M: {Path(args.model).name}")
        blocks_png = plot_blocks(metrics, chains, blocks_plot_path(plot), title=f"Per-block metrics: {Path(args.model).name}")
        print(f"  plots: {plot}, {blocks_png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
