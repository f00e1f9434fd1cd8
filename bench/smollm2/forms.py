"""The real SmolLM2-135M in the forms users bring, through drop_attention and fuse, against transformers.

    python -m bench.smollm2.forms [--out DIR] [--work DIR]

Forms (exporters.foreign): transformers + torch.onnx dynamo, that export after onnxruntime's transformer
optimizer, and onnxruntime-genai's model builder. For each: the attention and FFN sublayers found on the residual
stream; attention dropped in the 8 layers the SmolLM2 study ranks cheapest (5-7, 17-18, 25-26, 29) and the FFN
runs fused by the paper's rule (4-6, 16-17, 24-25), both with the CLIs; the logits on 256 tokens of real text
against transformers' LlamaForCausalLM with the same attention modules returning zeros and the same FFNs in the
parallel form (models.reference). Prints a table, writes smollm2_forms.json (bench/results/ by default).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results import write_result
from exporters.foreign import export_forms
from models.reference import reference_logits
from models.smollm2 import smollm2_transformers
from passes.attention.stream import find_stream
from passes.drop_attention import main as drop_main
from passes.fuse import main as fuse_main
from passes.support.calibration import calibration_for
from passes.support.onnx_io import load_model, ort_session
from passes.support.report import table

DROPPED = [5, 6, 7, 17, 18, 25, 26, 29]
GROUPS = [(4, 6), (16, 17), (24, 25)]
FORMS = ("dynamo", "ortopt", "genai")


def text_ids(tokenizer, tokens: int = 256) -> np.ndarray:
    """The first `tokens` token ids of the @pydoc text (models.text)."""
    from models.text import pydoc_text
    ids = tokenizer(pydoc_text())["input_ids"]
    return np.asarray(ids[:tokens], np.int64)[None]


def logits(path: Path, ids_file: Path) -> np.ndarray:
    feeds = calibration_for(load_model(path), ids_file, warn=False).feeds
    return ort_session(path).run(["logits"], feeds)[0].astype(np.float64)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smollm2.forms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the JSON (default bench/results/)")
    parser.add_argument("--work", help="folder for the models (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = smollm2_transformers()
    ids = text_ids(tokenizer)
    want = reference_logits(model, ids, DROPPED, GROUPS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ids_file = work / "ids.npz"
        np.savez(ids_file, input_ids=ids)
        paths = export_forms(model, tokenizer, work, FORMS)
        rows, records = [], {}
        for form, path in paths.items():
            stream = find_stream(load_model(path).proto)
            dropped, fused = work / f"{form}_dropped" / "model.onnx", work / f"{form}_fused" / "model.onnx"
            dropped.parent.mkdir(exist_ok=True)
            fused.parent.mkdir(exist_ok=True)
            with contextlib.redirect_stdout(io.StringIO()):
                drop_main([str(path), "-o", str(dropped), "--layers", ",".join(map(str, DROPPED))])
                fuse_main([str(dropped), "-o", str(fused), "--groups", ",".join(f"{a}-{z}" for a, z in GROUPS)])
            error = rel(logits(fused, ids_file), want)
            records[form] = {"attention": len(stream.attention), "ffn": len(stream.sublayers) - len(stream.attention),
                             "layer_name_mismatches": stream.mismatches, "relative_error": error}
            rows.append((form, len(stream.attention), len(stream.sublayers) - len(stream.attention), f"{error:.1e}"))
    print(table(rows, header=("form", "attention sublayers", "other sublayers", "dropped + fused vs transformers")))
    print("(relative error = max |onnx - transformers| / max |transformers| over the logits of 256 text tokens)")
    path = write_result("smollm2_forms", {"dropped": DROPPED, "groups": GROUPS, "tokens": int(ids.size),
                                          "forms": records, "seconds": round(time.perf_counter() - start, 1)},
                        Path(args.out) if args.out else None)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
