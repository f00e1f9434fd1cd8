"""python -m bench.inputs --text FILE --tokenizer SOURCE -o calib.npz [--rows 8] [--seq 256] [--offset 0] [--model M.onnx]

Turn text into an inputs file for --inputs (passes.analyze, passes.fuse, passes.drop_attention, bench.compare):
the text is tokenized once and `rows` consecutive windows of `seq` tokens, starting `offset` tokens in, become
`input_ids` [rows, seq] (int64). SOURCE is anything that carries a tokenizer: an HF folder, a .gguf file, an
onnxruntime-genai folder (its tokenizer.json), or `smollm2`. --text @pydoc uses CPython's language reference
(pydoc_data.topics, in every Python: models.text.pydoc_text), when you have no text at hand. Use another --offset for held-out text
(evaluation inputs must not overlap the calibration inputs).

OUT.npz holds input_ids only; the tools make an attention mask, position ids and empty KV caches for models that
take them. With --model, OUT.npz holds every graph input of that model (so polygraphy and other tools can use it
as it is). OUT.json writes the token rows as a plain JSON list of lists instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.text import PYDOC, pydoc_text
from passes.support.errors import fail, run_cli
from passes.support.outputs import Staging, check_output


def read_text(source: str) -> str:
    """The text of a file (UTF-8), of standard input ("-"), or CPython's language reference (@pydoc:
    models.text.pydoc_text)."""
    if source == PYDOC:
        return pydoc_text()
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        fail(f"--text {source}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        fail(f"--text {source} is not UTF-8 text ({exc.reason} at byte {exc.start})")


def token_rows(ids: list[int], rows: int, seq: int, offset: int) -> np.ndarray:
    """[rows, seq] int64 from ids[offset : offset + rows * seq]; too few tokens is a UserError."""
    need = offset + rows * seq
    if len(ids) < need:
        fail(f"the text has {len(ids)} tokens; --offset {offset} + --rows {rows} x --seq {seq} needs {need}")
    return np.asarray(ids[offset:need], dtype=np.int64).reshape(rows, seq)


def describe(feeds: dict[str, np.ndarray]) -> str:
    """'input_ids [8, 256] int64, attention_mask [8, 256] int64, 60 more like past_key_values.0.key [8, 3, 0, 64]
    float32' (inputs of one shape and type after the first two are counted, not listed)."""
    groups: dict[tuple, list[str]] = {}
    for name, value in feeds.items():
        groups.setdefault((tuple(value.shape), str(value.dtype)), []).append(name)
    parts = []
    for (shape, dtype), names in groups.items():
        parts += [f"{n} {list(shape)} {dtype}" for n in names[:2]]
        if len(names) > 2:
            parts.append(f"{len(names) - 2} more like {names[0]}")
    return ", ".join(parts)


def load_tokenizer_of(source: str):
    import transformers

    from models.loaders import load_tokenizer
    transformers.logging.set_verbosity_error()      # "sequence longer than the model's maximum": we cut windows
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        fail(f"--tokenizer {source} carries no tokenizer (give an HF or onnxruntime-genai folder with tokenizer.json, "
             f"or a .gguf file)")
    return tokenizer


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got '{text}'")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inputs", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help=f"UTF-8 text file, - for standard input, or {PYDOC}")
    parser.add_argument("--tokenizer", required=True, help="HF folder, .gguf file, onnxruntime-genai folder, or smollm2")
    parser.add_argument("-o", "--output", required=True, help="OUT.npz (or OUT.json for plain token lists)")
    parser.add_argument("--rows", type=_positive, default=8, help="sequences (default 8)")
    parser.add_argument("--seq", type=_positive, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--offset", type=_non_negative, default=0, help="tokens of the text to skip first (default 0)")
    parser.add_argument("--model", help="write every graph input of this ONNX model, not only input_ids")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.suffix not in (".npz", ".json"):
        fail(f"output {out}: give a .npz or .json file name")
    check_output(out, "output", *([Path(args.model)] if args.model else []))
    if args.model and out.suffix == ".json":
        fail("--model writes every graph input, which needs .npz; a .json output holds token ids only")
    tokenizer = load_tokenizer_of(args.tokenizer)
    text = read_text(args.text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = token_rows(ids, args.rows, args.seq, args.offset)
    feeds = {"input_ids": rows}
    if args.model:
        from passes.support.calibration import feeds_for_tokens
        from passes.support.onnx_io import load_model
        feeds = feeds_for_tokens(load_model(args.model), rows)
    with Staging() as staging:
        if out.suffix == ".json":
            staging.json(out, rows.tolist())
        else:
            with open(staging.path(out), "wb") as f:
                np.savez(f, **feeds)
        staging.publish()
    print(f"inputs: {out}: {describe(feeds)}")
    print(f"  {args.rows} x {args.seq} tokens from token {args.offset} of {len(ids)} ({len(text):,} characters of text); "
          f"next unused offset: {args.offset + args.rows * args.seq}")
    return 0


if __name__ == "__main__":
    run_cli(main)
