"""What the SmolLM2 studies share: the text and its token sets, running ONNX models on them, the numbers that
compare a variant with the original (passes.measure.change), and the plans of the study (equal-depth cuts,
pairs), over plain records."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from passes.measure.change import next_token_metrics
from passes.support.errors import fail

ROOT = Path(__file__).resolve().parents[2]


RESULTS = ROOT / "bench" / "results"


DOC = ROOT / "docs" / "smollm2.md"


NAME = "smollm2_study"


SOURCE = "smollm2"


LAYERS = 30


AUTO_LOOSE = 0.1


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


def groups_spec(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups)


def corpus_text() -> str:
    from models.text import pydoc_text
    return pydoc_text()


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


def chains_of(path: Path):
    from passes.ffn.structure import model_structure
    from passes.support.onnx_io import load_model
    structure = model_structure(load_model(path).proto)
    return structure.blocks, structure.chains


def metrics_from_record(record: dict):
    """passes.measure.metrics.Metrics rebuilt from a fuse report's auto_plan entry (M measured once, reused)."""
    from passes.measure.metrics import Metrics
    from passes.measure.runs import Cost
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
    from passes.ffn.plan import plan_from_metrics
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


NEARLY_FREE = 0.05   # nats of KL the fusion itself may cost: what running two late SmolLM2 blocks in parallel costs
