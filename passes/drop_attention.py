"""python -m passes.drop_attention MODEL.onnx -o OUT.onnx --layers SPEC      (remove attention sublayers)
python -m passes.drop_attention MODEL.onnx --rank [--inputs F] [--report R.json] [--plot P.png]

The Puzzle step that creates FFN runs in a model with attention in every layer: remove the attention sublayers of
the given layers (x' = x + attn(n(x)) becomes x' = x). Sublayers are found on the residual stream
(passes.attention.stream), removed by passes.attention.drop; --rank measures what removing each one alone costs (passes.measure.ranking).
Layers are numbered in residual-stream order (cross-checked against `layers.N` in names). For an
onnxruntime-genai folder (genai_config.json beside the model), the remaining KV caches are renumbered and, when
-o is in another folder, the config and tokenizer files are written beside the output so it runs as it is.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from passes.attention.drop import drop_sublayers, stage_dropped
from passes.attention.stream import Sublayer, find_stream
from passes.measure.ranking import rank_sublayers
from passes.support.calibration import calibration_for
from passes.support.errors import fail, run_cli
from passes.support.onnx_io import PROVIDERS, check_not_input, load_model, resolve_provider
from passes.support.outputs import Staging, check_output
from passes.support.ranges import expand, parse_ranges, spans
from passes.support.report import table


def choose_layers(spec: str, attention: list[Sublayer]) -> list[Sublayer]:
    """The attention sublayers of the layers in `spec`; a layer without attention is a UserError."""
    by_layer = {s.layer: s for s in attention}
    chosen = []
    for layer in expand(parse_ranges(spec, "--layers", "20-23,27")):
        if layer not in by_layer:
            fail(f"layer {layer} has no attention to drop (attention sublayers are in layers {spans(by_layer) or 'none'})")
        chosen.append(by_layer[layer])
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.drop_attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("model")
    parser.add_argument("-o", "--output", help="write the model without the chosen attention sublayers here")
    parser.add_argument("--layers", help="layers whose attention to remove, e.g. 20-23,27")
    parser.add_argument("--rank", action="store_true", help="rank attention sublayers by how little removing each one alone changes the output")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="where onnxruntime runs the measurement: auto (cuda where onnxruntime-gpu finds a GPU, "
                             "else cpu), cpu or cuda")
    parser.add_argument("--inputs", help="calibration inputs for --rank (npz, polygraphy JSON or JSON token lists)")
    parser.add_argument("--report", help="JSON report")
    parser.add_argument("--plot", help="PNG of the ranking (with --rank)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.provider = resolve_provider(args.provider)    # before any work: --provider cuda needs a GPU
    if not args.rank and not (args.output and args.layers):
        fail("give -o OUT.onnx --layers SPEC to drop attention, or --rank to rank the layers")
    if bool(args.output) != bool(args.layers):
        fail("-o and --layers go together: --layers says what to drop, -o where to write the result")
    start = time.perf_counter()
    model_path = Path(args.model)
    for path, what in ((args.output, "output"), (args.report, "report"), (args.plot, "plot")):
        if path:
            check_output(Path(path), what, model_path, suffix=".png" if what == "plot" else None)
    model = load_model(model_path)
    if args.output:
        check_not_input(Path(args.output), {model.path} | model.external_files)
    stream = find_stream(model.proto)
    attention = stream.attention
    if not attention:
        fail(f"{args.model}: no attention sublayers found on the residual stream (nothing to drop or rank)")
    chosen = choose_layers(args.layers, attention) if args.layers else []
    print(f"attention sublayers in {args.model}: {len(attention)} (layers {spans(s.layer for s in attention)}; "
          f"{len(stream.sublayers) - len(attention)} other sublayers on the stream)")
    if stream.mismatch_note():
        print(f"  note: {stream.mismatch_note()}")
    report: dict = {"tool": "passes.drop_attention", "input": args.model,
                    "attention": [{k: v for k, v in asdict(s).items() if k not in ("branch", "local_outputs")}
                                  | {"branch_nodes": len(s.branch)} for s in attention],
                    "layer_name_mismatches": [list(m) for m in stream.mismatches]}
    with Staging() as staging:
        if args.rank:
            calib = calibration_for(model, args.inputs)
            print(f"  ranking: removing each of {len(attention)} attention sublayers alone on "
                  f"{calib.record()['tokens']} tokens ...", flush=True)
            ranking, cost = rank_sublayers(model, attention, calib.feeds, provider=args.provider)
            ranking.sort(key=lambda r: r["kl_removed_alone"])
            report.update(ranking=ranking, inputs=calib.record(), cost=cost.record())
            print(table([(r["layer"], r["cosdist"], r["ratio"], r["kl_removed_alone"], f"{r['top1_removed_alone']:.1%}")
                         for r in ranking], header=("layer", "cosdist", "|a|/|x|", "KL removed alone", "top-1")))
            print(f"  least harmful first; e.g. --layers {spans(r['layer'] for r in ranking[:4])}")
            print(f"  cost: {cost.forward_pass_equivalents:.3g} forward-pass equivalents in {cost.runs} runs, "
                  f"{cost.seconds:.1f} s ({calib.record()['tokens']} tokens)")
            if args.plot:
                from passes.measure.plots import plot_ranking
                plot_ranking(sorted(ranking, key=lambda r: r["layer"]), staging.path(Path(args.plot)),
                             f"attention removal, one layer at a time: {model_path.name}")
        if chosen:
            out = Path(args.output)
            output, dropped = drop_sublayers(model, chosen)
            _, extra, note = stage_dropped(model, output, out, staging)
            report.update(output=str(out), dropped_layers=[s.layer for s in chosen], dropped_inputs=dropped.inputs,
                          dropped_outputs=dropped.outputs, nodes_before=dropped.nodes_before, nodes_after=dropped.nodes_after)
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["command"] = ["python", "-m", "passes.drop_attention", *(argv if argv is not None else sys.argv[1:])]
        if args.report:
            staging.json(Path(args.report), report)
        staging.publish()
    if args.rank and args.plot:
        print(f"  plot: {args.plot}")
    if chosen:
        print(f"  removed attention in layers {spans(s.layer for s in chosen)}: nodes {dropped.nodes_before} -> "
              f"{dropped.nodes_after}" + (f", KV inputs/outputs removed: {len(dropped.inputs)}/{len(dropped.outputs)}"
                                          if dropped.inputs or dropped.outputs else ""))
        if extra:
            print(f"  onnxruntime-genai folder: {out.parent} (genai_config.json, {len(extra) - 1} other files)")
        if note:
            print(f"  note: {note}")
        print(f"  model: {out}")
    if args.report:
        print(f"  report: {args.report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
