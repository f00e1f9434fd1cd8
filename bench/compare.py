"""python -m bench.compare ORIGINAL.onnx FUSED.onnx [--inputs FILE] [--shape BxS] [--atol A] [--rtol R]
                         [--max-kl K] [--min-top1 T] [--json OUT.json] [-v]

How far is the fused model from the original? Both models run in onnxruntime (CPU) as two polygraphy
`OnnxrtRunner`s on the same inputs (`Comparator.run`), and polygraphy's `SimpleCompareFunc` compares every output
(`Comparator.compare_accuracy`), the original being the reference (relative errors are |fused - original| /
|original|, as `polygraphy run FUSED.onnx --load-outputs original.json` computes them).

Printed per output: polygraphy's mean / median / max absolute and relative error, the verdict, and for a failing
output where its largest error is. For a language model (an output named `logits`, or whose last dimension is the
vocabulary): KL(p_original || p_fused) of the next-token distributions (log-softmax in float64, mean over all
tokens), top-1 agreement, and with `--inputs` holding `input_ids` (real text), the perplexity of both models on them.

Tolerances (per element, polygraphy's "elemwise" check: an element fails when its absolute error exceeds atol AND
its relative error exceeds rtol). Defaults depend on the output's type: float32/float64 1e-3, float16 1e-2,
bfloat16 3e-2; --atol/--rtol set both for every output. Fusion changes the math (the parallel form is an
approximation of the sequential one), so a fused model usually does NOT meet element tolerances: the point is to
measure how far it is. Language models are better judged by KL and top-1: gate on them with --max-kl/--min-top1
(and `--atol inf` to skip the element check).

Without --inputs the inputs are random, made as every tool makes them (passes.support.calibration, seed --seed):
token ids uniform in the vocabulary with an all-ones attention mask, positions 0..seq-1 and empty KV caches, or
N(0, 1) floats for a model without a token input; the batch and sequence are --shape BATCHxSEQ (default 1x16).
Random tokens are not text: real inputs (--inputs, see bench.inputs) are better, and only they give a perplexity.
The computation is bench.comparison's.

Exit codes: 0 within tolerance, 1 not (the failing output and where are printed), 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.batch_seq import batch_seq_arg
from bench.comparison import DEFAULT_SEED, DEFAULT_SHAPE, compare
from bench.results import result_json
from passes.support.errors import fail, run_cli
from passes.support.onnx_io import PROVIDERS, resolve_provider
from passes.support.outputs import check_output


def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.4g}"


def format_report(r: dict) -> str:
    lines = [f"bench.compare: {r['original']} vs {r['fused']}  (onnxruntime CPU, polygraphy Comparator; "
             f"{r['elapsed_s']:.2f} s)"]
    inp = r["inputs"]
    if inp["source"] == "random":
        lines.append(f"  inputs: RANDOM (--shape {inp['shape'][0]}x{inp['shape'][1]}): {inp['description']}")
        lines.append(f"          {inp['warning']}")
    else:
        desc = "; ".join(f"{n} {t['dtype']} {t['shape']}" for n, t in inp["tensors"].items())
        notes = f" ({'; '.join(inp['notes'])})" if inp.get("notes") else ""
        lines.append(f"  inputs: {inp['path']}: {desc}{notes}")
    lines.append("  check: per element, fails when abs error > atol AND rel error > rtol (rel to the original; polygraphy elemwise)")
    multi = any(len(o["iterations"]) > 1 for o in r["outputs"].values())
    header = ["output"] + (["iter"] if multi else []) + ["atol", "rtol", "mean abs", "median abs", "max abs",
                                                         "mean rel", "median rel", "max rel", "result"]
    table = [header]
    for name, o in r["outputs"].items():
        for row in o["iterations"]:
            table.append([name] + ([str(row["iteration"])] if multi else []) + [
                _g(o["atol"]), _g(o["rtol"]), _g(row.get("mean_absdiff")), _g(row.get("median_absdiff")),
                _g(row.get("max_absdiff")), _g(row.get("mean_reldiff")), _g(row.get("median_reldiff")),
                _g(row.get("max_reldiff")), "ok" if row["passed"] else "FAILED"])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
    failing = [(name, o, row) for name, o in r["outputs"].items() for row in o["iterations"] if not row["passed"]]
    for name, o, row in failing:
        it = f" (iteration {row['iteration']})" if multi else ""
        if "error" in row:
            lines.append(f"  {name}{it}: {row['error']}")
        else:
            lines.append(f"  {name}{it}: {row['mismatched_elements']:,} of {row['total_elements']:,} elements outside "
                         f"tolerance; largest abs error {_g(row['max_absdiff'])} at {row['max_abs_index']} "
                         f"(original {_g(row['original_value'])}, fused {_g(row['fused_value'])})")
    lm = r["language_model"]
    if lm is not None:
        lines.append(f"  language model ('{lm['output']}', vocab {lm['vocab']}, {lm['tokens']} tokens):")
        lines.append(f"    KL(original || fused)  mean {_g(lm['kl_mean'])}  median {_g(lm['kl_median'])}  max {_g(lm['kl_max'])}"
                     "  (nats per token, next-token distributions)")
        lines.append(f"    top-1 agreement        {lm['top1_agreement']:.4f} ({lm['top1_agree_count']}/{lm['tokens']})")
        if "perplexity_original" in lm:
            lines.append(f"    perplexity             original {lm['perplexity_original']:.4g}   fused {lm['perplexity_fused']:.4g}"
                         f"   ({lm['predictions']} next-token predictions on the given input_ids)")
        else:
            lines.append(f"    ({lm.get('perplexity_note', 'no perplexity')})")
    if r["passed"]:
        lines.append("result: PASSED (within tolerance)")
    else:
        reasons, named = [], set()
        for name, o, row in failing:   # the first failing iteration of each output
            if name in named:
                continue
            named.add(name)
            it = f" iteration {row['iteration']}" if multi else ""
            if "error" in row:
                reasons.append(f"{name}{it}: {row['error']}")
            else:
                reasons.append(f"{name}{it} exceeds atol {_g(o['atol'])}/rtol {_g(o['rtol'])} "
                               f"(max abs error {_g(row['max_absdiff'])} at {row['max_abs_index']})")
        if lm is not None:
            reasons += lm["failures"]
        lines.append("result: FAILED: " + "; ".join(reasons))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, help="the original ONNX model (the reference)")
    parser.add_argument("fused", type=Path, help="the fused ONNX model")
    parser.add_argument("--provider", choices=PROVIDERS, default="auto",
                        help="where onnxruntime runs both models: auto (cuda where onnxruntime-gpu finds a GPU, else cpu), cpu, cuda")
    parser.add_argument("--inputs", type=Path, help=".npz (one array per input) or polygraphy inputs JSON "
                                                     "(polygraphy run --save-inputs); default: random")
    parser.add_argument("--shape", type=batch_seq_arg, default=DEFAULT_SHAPE, metavar="BATCHxSEQ",
                        help="dynamic batch and sequence for random inputs (default 1x16)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for random inputs (default 1)")
    parser.add_argument("--atol", type=float, help="absolute tolerance for every output "
                                                   "(default by type: fp32 1e-3, fp16 1e-2, bf16 3e-2)")
    parser.add_argument("--rtol", type=float, help="relative tolerance for every output (same defaults)")
    parser.add_argument("--max-kl", type=float, help="language models: also fail when mean KL exceeds this")
    parser.add_argument("--min-top1", type=float, help="language models: also fail when top-1 agreement is below this")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write every number to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show polygraphy's and onnxruntime's logs")
    args = parser.parse_args(argv)
    for flag in ("atol", "rtol", "max_kl"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        fail(f"--min-top1 must be in [0, 1], got {args.min_top1}")
    if args.json is not None:
        check_output(args.json, "--json", args.original, args.fused, suffix=".json")
    report = compare(args.original, args.fused, inputs=args.inputs, shape=args.shape, seed=args.seed,
                     provider=resolve_provider(args.provider),
                     atol=args.atol, rtol=args.rtol, max_kl=args.max_kl, min_top1=args.min_top1, verbose=args.verbose)
    print(format_report(report))
    if args.json is not None:
        print(f"  json: {result_json(args.json, report)}")
    return report["exit_code"]


if __name__ == "__main__":
    run_cli(main)
