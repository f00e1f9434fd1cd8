"""python -m bench.int4_shapes [--hidden 4096] [--width 14336] [--blocks 16] [--tokens 1,8] [--block-sizes 32,64,128]

Why a fused FFN can be slower in int4: every MatMulNBits shape of the fused and unfused forms of one group of
`--blocks` FFNs (hidden d, width m), timed alone on one GPU through onnxruntime's CUDA execution provider with
io-binding and CUDA graphs, side by side in one process:
  gate/up   unfused: k nodes N = m, K = d (each reading the same input); fused: one node N = k m, K = d
  down      one node K = k m, N = d, or P pieces of K = k m / P on slices of the input, their products summed
            (P = k: the unfused down projections, as far as this one node is concerned)
for each block size and token count (batch rows M). Weights are random 4-bit values with fp16 scales (speed does
not depend on the values). Prints a table, writes int4_shapes.json (+ .png) to --out, with the HBM floor of each
form (weight bytes / measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.results import write_result
from passes.support.errors import run_cli
from passes.support.report import table


def nbits_model(m_tokens: int, k: int, pieces: list[tuple[int, int]], block: int, accuracy_level: int,
                same_input: bool, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """A graph of MatMulNBits nodes with random int4 weights: `pieces` (K_i, N_i) either all reading the input
    [M, k] (same_input) or reading consecutive slices of it, outputs summed. Returns it and its weight bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits, outs, k0, nbytes = [], [], [], 0, 0
    for i, (ki, ni) in enumerate(pieces):
        blocks = -(-ki // block)
        b = rng.integers(0, 256, (ni, blocks, block // 2), dtype=np.uint8)
        s = (rng.random((ni, blocks)) * 0.01 + 0.001).astype(np.float16)
        inits += [numpy_helper.from_array(b, f"B{i}"), numpy_helper.from_array(s, f"S{i}")]
        nbytes += b.nbytes + s.nbytes
        a = "A"
        if not same_input:
            inits += [numpy_helper.from_array(np.array([v], np.int64), f"{name}{i}") for v, name in ((k0, "s"), (k0 + ki, "e"))]
            inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"ax{i}"))
            nodes.append(helper.make_node("Slice", ["A", f"s{i}", f"e{i}", f"ax{i}"], [f"a{i}"]))
            a = f"a{i}"
        attrs = {"K": ki, "N": ni, "bits": 4, "block_size": block, **({"accuracy_level": accuracy_level} if accuracy_level else {})}
        nodes.append(helper.make_node("MatMulNBits", [a, f"B{i}", f"S{i}"], [f"y{i}"], domain="com.microsoft", **attrs))
        outs.append(f"y{i}")
        k0 += ki
    outputs = []
    if same_input:
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT16, [m_tokens, n]) for o, (_, n) in zip(outs, pieces)]
    else:
        total = outs[0]
        for i, o in enumerate(outs[1:], 1):
            nodes.append(helper.make_node("Add", [total, o], [f"sum{i}"]))
            total = f"sum{i}"
        outputs = [helper.make_tensor_value_info(total, TensorProto.FLOAT16, [m_tokens, pieces[0][1]])]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m_tokens, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, nbytes


def forms(d: int, m: int, k: int) -> list[tuple[str, str, int, list[tuple[int, int]], bool]]:
    """(projection, form, input width, pieces, same_input)."""
    out = [("gate/up", f"unfused {k} x N={m}", d, [(d, m)] * k, True),
           ("gate/up", f"fused N={k * m}", d, [(d, k * m)], True)]
    for p in sorted({1, 2, 4, 8, k}):
        if k % p == 0:
            out.append(("down", f"{p} piece{'s' if p > 1 else ''} K={k * m // p}", k * m, [(k * m // p, d)] * p, False))
    return out


def time_model(model: onnx.ModelProto, m_tokens: int, k: int, runs: int) -> float:
    """Median seconds per run (CUDA graph replay, io-binding, synchronous)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[
        ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})])
    a = ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((m_tokens, k)).astype(np.float16), "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("A", a)
    outs = session.run(None, {"A": a.numpy()})
    keep = []
    for meta, value in zip(session.get_outputs(), outs):
        keep.append(ort.OrtValue.ortvalue_from_shape_and_type(value.shape, value.dtype, "cuda", 0))
        binding.bind_ortvalue_output(meta.name, keep[-1])
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_shapes", description=__doc__.split("\n\n")[1])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--blocks", type=int, default=16, help="FFN blocks in the fused group (k)")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--block-sizes", default="32,64,128")
    parser.add_argument("--accuracy-levels", default="0,4")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    import torch  # noqa: F401  (loads the CUDA 13 libraries onnxruntime-gpu needs)

    from bench.latency import measure_device
    device = measure_device("cuda")
    rows, records = [], []
    for block in map(int, args.block_sizes.split(",")):
        for level in map(int, args.accuracy_levels.split(",")):
            for m_tokens in map(int, args.tokens.split(",")):
                for proj, form, k, pieces, same in forms(args.hidden, args.width, args.blocks):
                    model, nbytes = nbits_model(m_tokens, k, pieces, block, level, same)
                    seconds = time_model(model, m_tokens, k, args.runs)
                    floor = nbytes / device.copy_bandwidth
                    records.append({"projection": proj, "form": form, "block_size": block, "accuracy_level": level,
                                    "tokens": m_tokens, "pieces": [list(p) for p in pieces], "weight_bytes": nbytes,
                                    "us": seconds * 1e6, "floor_us": floor * 1e6})
                    rows.append((proj, form, block, level, m_tokens, seconds * 1e6, floor * 1e6, floor / seconds))
                    print(table([rows[-1]]), flush=True)
    print(table(rows, header=("projection", "form", "block", "acc", "M", "us", "floor us", "of floor")))
    path = write_result("int4_shapes", {"hidden": args.hidden, "width": args.width, "blocks": args.blocks,
                                        "device": device.name, "copy_bandwidth": device.copy_bandwidth,
                                        "records": records}, args.out)
    print(f"  results: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
