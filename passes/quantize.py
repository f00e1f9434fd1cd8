"""python -m passes.quantize MODEL.onnx -o OUT.onnx [--block-size 32] [--asymmetric] [--accuracy-level 4] [--exclude NODES]

Weight-only int4 (or int8) quantization of a float model into onnxruntime's MatMulNBits: every MatMul with a
constant 2-D weight, quantized block by block with onnxruntime's own kernel, bit for bit what its
MatMulNBitsQuantizer and onnxruntime-genai's model builder (`-p int4`) write, with the builder's defaults: block
32, symmetric, accuracy_level 4, lm_head included, the embedding Gather left in float. The weights stream column
chunk by column chunk from memory-mapped storage; a MatMul whose K holds more than passes.ffn.int4.MAX_K_BLOCKS
blocks (a fused down projection) is written as summed pieces (the fast form in int4; passes/ffn/int4.py). For a model in an
onnxruntime-genai folder, the config and tokenizer files go beside the output (write it to another folder).
Use it on what passes.fuse or passes.drop_attention wrote; graphs that are already int4 are fused directly.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from passes.ffn.int4 import MAX_K_BLOCKS, QuantConfig, quantize_matmuls
from passes.support.errors import fail, run_cli
from passes.support.genai import beside_output
from passes.support.onnx_io import check_not_input, load_model, stage_model
from passes.support.outputs import Staging, check_output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m passes.quantize", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("model", help="input ONNX model (float; external data is read in place, never modified)")
    parser.add_argument("-o", "--output", required=True, help="output ONNX model")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=32)
    parser.add_argument("--asymmetric", action="store_true", help="zero points per block (default: symmetric)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                        help="MatMulNBits accuracy_level (4: int8 activations on CPU; the builder's default)")
    parser.add_argument("--exclude", default="", help="comma-separated MatMul node names to keep in float")
    return parser


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    model_path, out = Path(args.model), Path(args.output)
    check_output(out, "output", model_path)
    config = QuantConfig(args.bits, args.block_size, not args.asymmetric, args.accuracy_level,
                         tuple(n for n in args.exclude.split(",") if n))
    model = load_model(model_path)
    check_not_input(out, {model.path} | model.external_files)
    names = {n.name for n in model.proto.graph.node}
    unknown = [n for n in config.exclude if n not in names]
    if unknown:
        fail(f"--exclude names no node of the model: {', '.join(unknown)}")
    output, quantized = quantize_matmuls(model, config)
    if not quantized:
        fail(f"{model_path} has no MatMul with a constant float weight to quantize")
    split = [n for n in output.proto.graph.node if n.op_type == "Slice" and "/Q" in n.name]
    extra, note = beside_output(model, output.proto, out, renumber=False)
    with Staging() as staging:
        stage_model(output, out, staging, protected={model.path} | model.external_files, reference=model.path,
                    extra_files=extra)
        staging.publish()
    size = lambda path: path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size  # noqa: E731
                                               if path.with_name(path.name + ".data").exists() else 0)
    print(f"quantize: {model_path} -> {out}  ({time.perf_counter() - start:.1f} s)")
    print(f"  {len(quantized)} MatMuls -> MatMulNBits ({config.bits} bits, block {config.block_size}, "
          f"{'symmetric' if config.symmetric else 'asymmetric'}, accuracy_level {config.accuracy_level})"
          + (f"; {len(split)} K-pieces of at most {MAX_K_BLOCKS} blocks for the longest" if split else ""))
    print(f"  size: {size(model.path) / 1e6:.1f} MB -> {size(out) / 1e6:.1f} MB")
    if extra:
        print(f"  onnxruntime-genai folder: {out.parent} (genai_config.json, {len(extra) - 1} other files)")
    if note:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    run_cli(main)
