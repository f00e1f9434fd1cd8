"""python -m passes.fuse MODEL.onnx -o OUT.onnx [--groups SPEC | --plan paper|auto] [--inputs F] [--report R.json]

match -> chains -> (analysis) -> plan -> rewrite -> verify. Plans: --groups (explicit ordinals); the paper's
rule (default): every chain of at least 3 FFN blocks is fused except its last block, in groups of at most
--max-group blocks; --plan auto: measured on --inputs, the groups that remove the most sequential FFN stages
while the predicted next-token KL of the plan stays under --max-kl (or the cheapest plan reaching
--target-depth; or, with --threshold, groups whose pairwise dependency M stays under it). With --inputs, the change of the model's outputs is measured on the written model before
it is put in place, and reported. Nothing to fuse: no model is written (unless --write-unchanged).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from passes.ffn.plan import DEFAULT_MAX_COST, DEFAULT_THRESHOLD, parse_groups
from passes.ffn.structure import ModelStructure, model_structure
from passes.measure.change import change_summary, measure_change
from passes.pipeline import Plan, choose_groups, fuse_model, stage_fused
from passes.support.calibration import calibration_for
from passes.support.errors import fail, run_cli
from passes.support.onnx_io import PROVIDERS, check_not_input, load_model, resolve_provider
from passes.support.outputs import Staging, check_output
from passes.support.ranges import spans
from passes.support.report import table


def summary(report: dict, seconds: float) -> str:
    blocks, chains = report["ffn_blocks"], report["chains"]
    before, after = report["before"], report["after"]
    widths = sorted({b["width"] for b in blocks})
    lines = [f"FFN fusion: {report['input']} -> {report['output']}  ({seconds:.1f} s, plan: {report['plan']})"]
    if blocks:
        lines.append(f"  FFN blocks found: {len(blocks)} (hidden {blocks[0]['hidden_size']}, widths {', '.join(map(str, widths))}, "
                     f"{blocks[0]['dtype'].lower()})")
        lines.append(f"  chains: {' '.join('[' + spans(c) + ']' for c in chains)}")
    else:
        lines.append("  FFN blocks found: 0")
    if report["rejections"]:
        lines.append(f"  {len(report['rejections'])} activation(s) did not match an FFN block; first: "
                     f"{report['rejections'][0]['node']}: {report['rejections'][0]['check']}")
    lines.append("  fused: " + ", ".join(f"{f['group'][0]}-{f['group'][1]} -> width {f['width']}" for f in report["fused"]))
    rows = [(key.replace("_", " "), before[key], after[key], after[key] - before[key]) for key in before]
    lines.append(table(rows, header=("", "before", "after", "change")))
    if report.get("requantized"):
        worst = max(r["relative_error"] for r in report["requantized"])
        lines.append(f"  (int4: {len(report['requantized'])} gate/up weights requantized with their RMSNorm gains folded in, "
                     f"relative error up to {worst:.3g}; see the report's requantized)")
    elif after["parameters"] != before["parameters"]:
        lines.append(f"  (parameters: {before['parameters'] - after['parameters']} RMSNorm gain values folded into the fused weights; "
                     f"FFN weights unchanged)")
    return "\n".join(lines)


def why_nothing(structure: ModelStructure, plan: str, auto: dict | None) -> list[str]:
    """Lines that say why a plan is empty and what to do."""
    if not structure.blocks:
        first = structure.rejections[0] if structure.rejections else None
        return ["  nothing to fuse: no FFN blocks found" + (f" (first rejected: {first.node}: {first.check})" if first else "")]
    if structure.separated_by_attention:
        return [f"  nothing to fuse: every FFN block ({len(structure.blocks)}) is separated from the next by attention "
                f"or another sublayer; run passes.drop_attention first (its --rank says which layers cost least)"]
    longest = max(len(c) for c in structure.chains)
    if auto is None:
        return [f"  nothing to fuse: the paper's rule fuses chains of 3 or more FFN blocks; the longest chain has "
                f"{longest} ({' '.join('[' + spans(c.ordinals) + ']' for c in structure.chains if len(c) > 1)}); "
                f"give --groups, or drop more attention"]
    if auto.get("reason"):
        return [f"  nothing to fuse: {auto['reason']}"]
    if "threshold" not in auto:
        return ["  nothing to fuse within the budget; raise --max-kl deliberately (the change is measured and reported)"]
    closest = ", ".join(f"{c['span'][0]}-{c['span'][1]} (M {c['m']:.3g})" for c in auto.get("closest", [])[:3])
    return [f"  nothing to fuse: no group has every pair with M <= threshold {auto['threshold']:g}; closest: {closest}",
            "  raise --threshold deliberately (the change is measured and reported), or give --groups"]


def _at_least_two(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got '{text}'")
    return int(text)


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return int(text)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.fuse", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("model", help="input ONNX model (external data is read in place, never modified)")
    parser.add_argument("-o", "--output", help="output ONNX model (default: MODEL.fused.onnx)")
    parser.add_argument("--groups", help="groups to fuse by FFN ordinal, e.g. 2-5,7-9 (default: the paper's rule)")
    parser.add_argument("--plan", choices=("paper", "auto"),
                        help="paper: every chain of >= 3 blocks but its last block (the default without --groups); "
                             "auto: predict what fusing each group costs on --inputs and fuse the most stages "
                             "within --max-kl")
    parser.add_argument("--max-kl", type=_threshold,
                        help=f"--plan auto: budget of predicted next-token KL (nats) for the whole plan (default "
                             f"{DEFAULT_MAX_COST}; for models without logits: relative squared output error)")
    parser.add_argument("--target-depth", type=_at_least_one,
                        help="--plan auto: the cheapest plan with at most this many sequential FFN stages")
    parser.add_argument("--threshold", type=_threshold,
                        help=f"--plan auto by the paper's metric instead: largest M[i][j] inside a group (e.g. "
                             f"{DEFAULT_THRESHOLD}), the last block of each chain kept")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="where onnxruntime runs the measurement: auto (cuda where onnxruntime-gpu finds a GPU, "
                             "else cpu), cpu or cuda")
    parser.add_argument("--inputs", help="calibration inputs (npz, polygraphy JSON or JSON token lists; see bench.inputs) "
                                         "for --plan auto and to measure the change the fusion makes (default for "
                                         "--plan auto: random token ids, with a warning)")
    parser.add_argument("--max-group", type=_at_least_two, help="at most this many blocks per group")
    parser.add_argument("--merge-gate-up", action="store_true", help="one packed gate|up MatMul followed by Split")
    parser.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="auto: external when the input had it or above 1.8 GB")
    parser.add_argument("--write-unchanged", action="store_true", help="write the output even when nothing is fused")
    parser.add_argument("--report", help="write the JSON report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.provider = resolve_provider(args.provider)    # before any work: --provider cuda needs a GPU
    model_path = Path(args.model)
    out = Path(args.output) if args.output else model_path.with_name(model_path.name.removesuffix(".onnx") + ".fused.onnx")
    if args.plan is not None and args.groups is not None:
        fail("--plan and --groups are exclusive: give the groups, or let --plan choose them")
    chosen = [f"--{name.replace('_', '-')}" for name in ("max_kl", "target_depth", "threshold") if getattr(args, name) is not None]
    if chosen and args.plan != "auto":
        fail(f"{chosen[0]} only applies to --plan auto")
    if len(chosen) > 1:
        fail(f"{' and '.join(chosen)} are exclusive: give one budget for --plan auto")
    groups = parse_groups(args.groups) if args.groups is not None else None
    check_output(out, "output", model_path)
    if args.report:
        check_output(Path(args.report), "report", model_path, out, suffix=None)
        if Path(args.report).resolve() in (out.resolve(), out.with_name(out.name + ".data").resolve()):
            fail(f"report {args.report} would overwrite the output model; choose another --report")

    model = load_model(model_path)
    check_not_input(out, {model.path} | model.external_files)
    structure = model_structure(model.proto)
    print(f"fuse: {model_path}: {len(structure.blocks)} FFN blocks, chains "
          f"{' '.join('[' + spans(c.ordinals) + ']' for c in structure.chains if len(c) > 1) or 'none longer than 1'}",
          flush=True)
    plan = Plan("groups", tuple(groups)) if groups is not None else \
        Plan(args.plan or "paper", max_group=args.max_group, max_kl=args.max_kl, target_depth=args.target_depth,
             threshold=args.threshold)
    calib = calibration_for(model, args.inputs) if plan.rule == "auto" or args.inputs is not None else None
    chosen = choose_groups(model, structure, plan, calib, provider=args.provider)
    groups, plan, auto = chosen.groups, chosen.plan, chosen.auto
    report = {"tool": "passes.fuse", "input": str(model_path), "output": str(out), "plan": plan,
              "command": ["python", "-m", "passes.fuse", *(argv if argv is not None else sys.argv[1:])],
              **({"auto_plan": auto} if auto is not None else {})}

    with Staging() as staging:
        if not groups and not args.write_unchanged:
            report.update(structure.record(), groups=[], output=None, seconds=round(time.perf_counter() - start, 3))
            for line in why_nothing(structure, plan, auto):
                print(line)
            print("  no model written (nothing changed; --write-unchanged writes the copy anyway)")
            if args.report:
                staging.json(Path(args.report), report)
                staging.publish()
                print(f"  report: {args.report}")
            return 0
        fusion = fuse_model(model, structure, groups, max_group=args.max_group, merge_gate_up=args.merge_gate_up)
        report.update(fusion.report)
        staged = stage_fused(model, fusion, out, staging,
                             external={"auto": None, "always": True, "never": False}[args.external_data])
        if calib is not None:
            print(f"  measuring the change on {calib.record()['tokens']} tokens ...", flush=True)
            report["change"] = measure_change(model, load_model(staged), calib, args.provider)
        report["seconds"] = round(time.perf_counter() - start, 3)
        if args.report:
            staging.json(Path(args.report), report)
        staging.publish()
    print(summary(report, time.perf_counter() - start))
    if not groups:
        for line in why_nothing(structure, plan, auto):
            print(line)
    if "change" in report:
        print(change_summary(report["change"]))
    if auto is not None and groups and "predicted_cost" in auto:
        measured = report.get("change", {}).get("kl" if auto["unit"] == "kl" else "relative_error")
        print(f"  predicted {auto['unit']} of the plan: {auto['predicted_cost']:.4g}"
              + (f" (measured {measured:.4g})" if measured is not None and auto["unit"] == "kl" else ""))
    if args.report:
        print(f"  report: {args.report}")
    print(f"  model: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
