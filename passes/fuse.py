"""python -m passes.fuse MODEL.onnx -o OUT.onnx [--groups SPEC | --plan paper|auto] [--inputs F] [--report R.json]

match -> chains -> (analysis) -> plan -> rewrite -> verify. Plans: --groups (explicit ordinals); the paper's
rule (default): every chain of at least 3 FFN blocks is fused except its last block, in groups of at most
--max-group blocks; --plan auto: groups inside chains whose pairwise dependency M stays under --threshold,
measured on --inputs. With --inputs, the change of the model's outputs is measured and reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from passes.chains import find_chains
from passes.errors import fail, run_cli
from passes.genai import genai_folder, side_files
from passes.graph import GraphIndex
from passes.match import match_ffn_blocks
from passes.onnx_io import load_model, save_model
from passes.plan import Group, check_groups, paper_rule, parse_groups
from passes.ranges import spans
from passes.report import count, structure_record, table
from passes.change import change_summary, measure_change
from passes.plan_auto import add_cli_arguments, plan_for_cli
from passes.rewrite import fuse_groups, group_prefixes


@dataclass
class FuseResult:
    report: dict
    groups: list[Group] = field(default_factory=list)


def fuse_file(model_path: str | Path, out_path: str | Path, *, groups: list[Group] | None = None,
              max_group: int | None = None, merge_gate_up: bool = False, external: bool | None = None,
              plan_name: str | None = None, extra: dict | None = None) -> FuseResult:
    """Fuse `groups` (default: the paper's rule) of the model at model_path and write it to out_path."""
    start = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    if out_path.resolve() == model_path.resolve():
        fail(f"output {out_path} is the input model; the input is never modified, choose another -o")
    if out_path.is_dir():
        fail(f"output {out_path} is a folder; -o takes the path of the ONNX file to write")
    model = load_model(model_path)
    index = GraphIndex.build(model.proto.graph)
    found = match_ffn_blocks(model.proto, index)
    chains = find_chains(found.blocks, index)
    if groups is None:
        groups = paper_rule(chains, max_group)
        plan_name = plan_name or "paper rule"
    else:
        plan_name = plan_name or "--groups"
    check_groups(groups, chains, found.blocks)
    if max_group is not None and any(len(g) > max_group for g in groups):
        fail(f"group {next(g for g in groups if len(g) > max_group)} has more than --max-group {max_group} blocks")

    prefixes = group_prefixes(model.proto.graph, groups)
    output = fuse_groups(model, found.blocks, groups, merge_gate_up=merge_gate_up)
    after_blocks = match_ffn_blocks(output.proto).blocks
    protected = {model_path} | model.external_files
    folder = genai_folder(model_path)
    genai_files = side_files(folder, out_path.name, None, skip=protected) \
        if folder is not None and out_path.resolve().parent != folder.folder.resolve() else None
    save_model(output, out_path, external=external, protected=protected, reference=model_path, extra_files=genai_files)

    report = {
        "tool": "passes.fuse",
        "input": str(model_path),
        "output": str(out_path),
        "plan": plan_name,
        "merge_gate_up": merge_gate_up,
        **structure_record(found.blocks, chains, found.rejections),
        "groups": [[g.first, g.last] for g in groups],
        "fused": [{"group": [g.first, g.last], "width": sum(found.blocks[o].width for o in g.ordinals),
                   "prefix": prefixes[g],
                   "replaced_nodes": [n for o in g.ordinals for n in found.blocks[o].node_names]} for g in groups],
        "before": asdict(count(model.proto, found.blocks)),
        "after": asdict(count(output.proto, after_blocks)),
        "seconds": round(time.perf_counter() - start, 3),
        **(extra or {}),
    }
    return FuseResult(report, groups)


def summary(report: dict) -> str:
    blocks, chains = report["ffn_blocks"], report["chains"]
    before, after = report["before"], report["after"]
    widths = sorted({b["width"] for b in blocks})
    lines = [f"FFN fusion: {report['input']} -> {report['output']}  ({report['seconds']:.2f} s, plan: {report['plan']})"]
    if blocks:
        lines.append(f"  FFN blocks found: {len(blocks)} (hidden {blocks[0]['hidden_size']}, widths {', '.join(map(str, widths))}, "
                     f"{blocks[0]['dtype'].lower()})")
        lines.append(f"  chains: {' '.join('[' + spans(c) + ']' for c in chains)}")
    else:
        lines.append("  FFN blocks found: 0")
    if report["rejections"]:
        lines.append(f"  {len(report['rejections'])} activation(s) did not match an FFN block; first: "
                     f"{report['rejections'][0]['node']}: {report['rejections'][0]['check']}")
    if report["groups"]:
        lines.append("  fused: " + ", ".join(f"{f['group'][0]}-{f['group'][1]} -> width {f['width']}" for f in report["fused"]))
    else:
        reason = "no FFN blocks" if not blocks else "no chain of 3 or more FFN blocks" if report["plan"] == "paper rule" else "empty plan"
        lines.append(f"  nothing to fuse ({reason}); the output is the model unchanged")
    rows = [(key.replace("_", " "), before[key], after[key], after[key] - before[key]) for key in before]
    lines.append(table(rows, header=("", "before", "after", "change")))
    if after["parameters"] != before["parameters"]:
        lines.append(f"  (parameters: {before['parameters'] - after['parameters']} RMSNorm gain values folded into the fused weights; "
                     f"FFN weights unchanged)")
    return "\n".join(lines)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.fuse", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("model", help="input ONNX model (external data is read in place, never modified)")
    parser.add_argument("-o", "--output", help="output ONNX model (default: MODEL.fused.onnx)")
    parser.add_argument("--groups", help="groups to fuse by FFN ordinal, e.g. 2-5,7-9 (default: the paper's rule)")
    parser.add_argument("--max-group", type=_positive, help="at most this many blocks per group")
    parser.add_argument("--merge-gate-up", action="store_true", help="one packed gate|up MatMul followed by Split")
    parser.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="auto: external when the input had it or above 1.8 GB")
    parser.add_argument("--report", help="write the JSON report here")
    add_cli_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = Path(args.model)
    out = Path(args.output) if args.output else model.with_name(model.name.removesuffix(".onnx") + ".fused.onnx")
    groups = parse_groups(args.groups) if args.groups is not None else None
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    if args.report:
        report = Path(args.report)
        if not report.parent.is_dir():
            fail(f"report folder {report.parent} does not exist")
        if report.is_dir():
            fail(f"report {report} is a folder; --report takes the path of the JSON file to write")
        clash = {model, out, out.with_name(out.name + ".data")} | load_model(model).external_files
        if report.resolve() in {p.resolve() for p in clash}:
            fail(f"report {report} would overwrite the input model, the output or their data; choose another --report")
    auto_groups, plan_name, plan_extra, calib = plan_for_cli(args, model)
    if auto_groups is not None:
        groups = auto_groups
    result = fuse_file(model, out, groups=groups, max_group=args.max_group, merge_gate_up=args.merge_gate_up,
                       external=external, plan_name=plan_name,
                       extra={"command": ["python", "-m", "passes.fuse", *(argv if argv is not None else sys.argv[1:])], **plan_extra})
    if calib is not None:
        result.report["change"] = measure_change(model, out, calib)
    print(summary(result.report))
    if calib is not None:
        print(change_summary(result.report["change"]))
    if args.report:
        Path(args.report).write_text(json.dumps(result.report, indent=2) + "\n")
        print(f"  report: {args.report}")
    print(f"  model: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
