"""The whole product on the built-in default model, as a user would run it, one CLI after another.

    python -m bench.quickstart [--model puzzle-tiny] [--out out/quickstart]

export -> analyze (dependency heatmap) -> fuse (paper rule) -> compare (polygraphy) -> TensorRT engines.
Calibration tokens are real text: the UTF-8 bytes of CPython's language reference (pydoc_data.topics), which
the byte-level vocabulary (256) of the tiny presets reads directly.
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


def text_tokens(batch: int, seq: int, vocab: int, offset: int = 0) -> np.ndarray:
    """[batch, seq] int64 token ids: bytes of CPython's documentation text, folded into the vocabulary."""
    from pydoc_data.topics import topics
    data = np.frombuffer("\n".join(topics[k] for k in sorted(topics)).encode(), dtype=np.uint8)
    need = batch * seq
    return (data[offset:offset + need].astype(np.int64) % vocab).reshape(batch, seq)


def step(title: str, args: list[str], ok: tuple[int, ...] = (0,), note: str = "") -> None:
    """Run one CLI like a user would, echoing the command and its output; exit codes in `ok` are success."""
    command = [sys.executable, "-m", *args]
    print(f"\n== {title}\n$ python -m {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, text=True, capture_output=True)
    print(proc.stdout.rstrip())
    if proc.returncode not in ok:
        print(proc.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"quickstart: step '{title}' failed (exit {proc.returncode})")
    if proc.returncode and note:
        print(f"   note: {note}")
    print(f"   [{time.perf_counter() - start:.1f} s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="puzzle-tiny", help="a built-in preset (default puzzle-tiny)")
    parser.add_argument("--out", default="out/quickstart", help="folder for everything it writes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, fused = out / f"{args.model}.onnx", out / f"{args.model}.fused.onnx"
    calib, evals = out / "calib.npz", out / "eval.npz"
    np.savez(calib, input_ids=text_tokens(4, 64, 256))
    np.savez(evals, input_ids=text_tokens(4, 64, 256, offset=100_000))

    step("export the model to ONNX", ["exporters.export", args.model, "-o", str(model)])
    step("measure FFN dependencies on real text", ["passes.analyze", str(model), "--inputs", str(calib),
                                                  "-o", str(out / "deps.json"), "--plot", str(out / "deps.png")])
    step("fuse FFN runs (paper rule)", ["passes.fuse", str(model), "-o", str(fused), "--report", str(out / "fuse.json")])
    step("compare original and fused (polygraphy, onnxruntime)", ["bench.compare", str(model), str(fused),
                                                                 "--inputs", str(evals), "--json", str(out / "compare.json")],
         ok=(0, 1), note="exit 1 = outside the elementwise tolerance, as expected: fusion changes the model "
                         "(an approximation; its cost is the KL / top-1 / perplexity above)")
    for name in (model, fused):
        step(f"build a TensorRT engine for {name.name}", ["bench.engine", str(name), "-o", str(name.with_suffix(".engine")),
                                                         "--json", str(name.with_suffix(".engine.json"))])

    report = json.loads((out / "fuse.json").read_text())
    print(f"\nDone. Fused groups {report['groups']}: sequential FFN depth {report['before']['sequential_ffn_depth']} -> "
          f"{report['after']['sequential_ffn_depth']}, MatMuls {report['before']['matmuls']} -> {report['after']['matmuls']}.")
    print(f"Files in {out}/:")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:40s} {path.stat().st_size:>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
