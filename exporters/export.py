"""Export a PuzzleDecoder to an ONNX prefill graph (input_ids -> logits) or decode-step graph (with a KV cache).

    python -m exporters.export SOURCE -o MODEL.onnx [--dtype fp32|fp16|bf16] [--opset N] [--graph prefill|decode]
                               [--external-data auto|always|never] [--exporter torchscript|dynamo]
                               [--drop LAYERS] [--fuse GROUPS]

SOURCE is a preset (models.PRESETS), `smollm2`, an HF checkpoint folder or a .gguf file. --drop / --fuse (onnx and
nemotron-nas) export the attention-dropped / FFN-fused model without training (models.fused.drop_and_fuse, the
numbering of models.heal). --runtime nemotron-nas writes the source's dtype unless --dtype says otherwise.
--graph prefill (default): input_ids [batch, seq] (int64) -> logits [batch, seq, vocab]; batch and seq dynamic.
--graph decode: inputs input_ids [batch, seq] and, for every layer i with attention, past_key_i and past_value_i
[batch, kv_heads_i, past, head_dim] (model dtype, keys after RoPE); outputs logits [batch, seq, vocab] and
present_key_i, present_value_i [batch, kv_heads_i, past + seq, head_dim] (the cache with the new tokens appended).
The new tokens sit at positions past + arange(seq) and query t attends to keys 0..past+t (models.decoder.DecodeStep);
batch, seq and past are dynamic (past may be 0: then it is the prefill). Its FFN and RMSNorm nodes are the prefill
graph's, with the same names, so passes/ finds the same FFN blocks and chains in both.
The graph keeps every FFN in its natural form: RMSNorm as Pow, ReduceMean, Add eps, Sqrt, Div(1, .)
(TorchScript) or Reciprocal (dynamo), Mul, with Casts to float32 and back in fp16/bf16; gain Mul; MatMul gate and
up; Sigmoid; Mul; Mul; MatMul down; residual Add. Both exporters name nodes /layers.3/ffn/gate_proj/MatMul and
tensors <node>_output_<i>; MatMul weights are layers.3.ffn.gate_proj.weight_t ([in, out] layout). Output is written
to a temporary folder next to MODEL.onnx, checked with onnx.checker and an onnxruntime CPU session, then renamed
into place; the folder of MODEL.onnx (of DIR for --runtime genai / nemotron-nas) must exist (exit 2 otherwise). The
same source and options give byte-identical files.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import onnx
import torch

from models.config import DecoderConfig
from models.decoder import DecodeStep, PuzzleDecoder
from models.fused import PAPER, drop_and_fuse, parse_changes, planned_groups, without_attention
from models.loaders import load_model, resolve_source
from passes.support import onnx_io
from passes.support.errors import UserError, run_cli
from passes.support.outputs import check_output, check_output_folder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORTERS = ("torchscript", "dynamo")
GRAPHS = ("prefill", "decode")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # the dynamo exporter cannot convert below 18
IR_VERSION = 10  # onnx 1.23 writes 14, which onnxruntime refuses


@functools.cache
def ort_cpu_runs_bf16() -> bool:
    """Whether this onnxruntime's CPU provider has bf16 kernels (tried on a one-node bf16 Mul graph)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "bf16_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime reports a missing kernel as a generic Fail/NotImplemented
        return False
    return True


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' deprecation warnings and info logs; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def decode_io(model: PuzzleDecoder) -> tuple[list[str], list[str]]:
    """Input and output names of the decode graph: input_ids, past_key_i, past_value_i for each attention layer i;
    logits, present_key_i, present_value_i."""
    layers = model.attention_layers
    inputs = ["input_ids", *(f"past_{kind}_{i}" for i in layers for kind in ("key", "value"))]
    outputs = ["logits", *(f"present_{kind}_{i}" for i in layers for kind in ("key", "value"))]
    return inputs, outputs


def _torch_export_decode(model: PuzzleDecoder, path: Path, opset: int, exporter: str) -> None:
    """Export DecodeStep(model): example batch 2, seq 3, past 5 (all > 1 and distinct, so none is specialized)."""
    config, step = model.config, DecodeStep(model)
    dtype = next(model.parameters()).dtype
    past = [torch.zeros(2, config.kv_heads(i), 5, config.head_dim, dtype=dtype)
            for i in model.attention_layers for _ in range(2)]
    example = (torch.zeros(2, 3, dtype=torch.int64), *past)
    input_names, output_names = decode_io(model)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for name in input_names[1:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in output_names[1:]:
        axes[name] = {0: "batch", 2: "past_plus_seq"}
    with torch.no_grad(), _quiet_exporter():
        if exporter == "torchscript":
            torch.onnx.export(
                step, example, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=input_names, output_names=output_names, dynamic_axes=axes,
            )
        else:
            batch, seq, past_len = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
            dims = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))  # forward(ids, *past)
            program = torch.onnx.export(
                step, example, dynamo=True, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=dims, verbose=False,
            )
            program.save(str(path))


def _torch_export(model: PuzzleDecoder, path: Path, opset: int, exporter: str, graph: str = "prefill") -> None:
    """Run torch.onnx.export (TorchScript with constant folding, or dynamo with onnxscript's optimizer) to `path`."""
    if graph == "decode":
        _torch_export_decode(model, path, opset, exporter)
        return
    example = torch.zeros(2, 8, dtype=torch.int64)  # batch and seq > 1 so neither is specialized
    with torch.no_grad(), _quiet_exporter():
        if exporter == "torchscript":
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=["input_ids"], output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
            )
        else:
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=["input_ids"],
                output_names=["logits"], dynamic_shapes=(dims,), verbose=False,
            )
            program.save(str(path))


def _scope_name(node: onnx.NodeProto) -> str:
    """TorchScript-style name from the dynamo exporter's module scopes: ['', 'layers.3', 'layers.3.ffn',
    'layers.3.ffn.gate_proj', 'linear_4'] -> /layers.3/ffn/gate_proj/MatMul."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))[1:-1]
    parts, prev = [], ""
    for scope in scopes:
        parts.append(scope[len(prev) + 1 :] if prev and scope.startswith(prev + ".") else scope)
        prev = scope
    return "/" + "/".join([*parts, node.op_type])


def _rename_dynamo(graph: onnx.GraphProto) -> None:
    """Give dynamo nodes TorchScript-style names (/scope/Op, /scope/Op_1, ...) and outputs <node>_output_<i>;
    drop the exporter's metadata (stack traces with file paths)."""
    keep = {o.name for o in graph.output}
    used: Counter[str] = Counter()
    renamed: dict[str, str] = {}
    for node in graph.node:
        base = _scope_name(node)
        node.name = base if used[base] == 0 else f"{base}_{used[base]}"
        used[base] += 1
        del node.metadata_props[:]
        for i, out in enumerate(node.output):
            if out and out not in keep:
                renamed[out] = f"{node.name}_output_{i}"
                node.output[i] = renamed[out]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)


def _rename_matmul_weights(graph: onnx.GraphProto) -> None:
    """Initializers with generated names (onnx::MatMul_12, val_47) used only as weight B of one MatMul
    /a.b/c/MatMul are renamed a.b.c.weight_t (the transposed nn.Linear weight)."""
    users = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            users[name].append((node, i))
    taken = {init.name for init in graph.initializer}
    for init in graph.initializer:
        if not init.name.startswith(("onnx::", "val_")) or len(users[init.name]) != 1:
            continue
        node, i = users[init.name][0]
        scope = ".".join(node.name.strip("/").split("/")[:-1])
        new = f"{scope}.weight_t"
        if node.op_type != "MatMul" or i != 1 or not scope or new in taken:
            continue
        node.input[i] = init.name = new
        taken.add(new)


def _share_tied_embedding(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Tied embeddings are stored once: the lm_head MatMul reads Transpose(E) of the embedding table E (which
    onnxruntime and TensorRT fold at load time) instead of a second, transposed copy. The copy is dropped only
    when it equals E^T (checked on its first and last rows)."""
    import numpy as np
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    table = next((n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and len(inits[n.input[0]].dims) == 2), None)
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.name.startswith("/lm_head/")
                 and n.input[1] in inits), None)
    if table is None or head is None:
        return
    e, w = inits[table], inits[head.input[1]]
    if list(w.dims) != list(reversed(e.dims)) or w.data_type != e.data_type:
        return
    e_rows = onnx_io.tensor_array(e, base_dir)
    w_cols = onnx_io.tensor_array(w, base_dir)
    for r in (0, e.dims[0] - 1):
        if not np.array_equal(np.asarray(e_rows[r]), np.asarray(w_cols[:, r])):
            return
    transposed = f"{head.name.rsplit('/', 1)[0]}/Transpose_output_0"
    graph.node.insert(list(graph.node).index(head), onnx.helper.make_node(
        "Transpose", [table], [transposed], name=f"{head.name.rsplit('/', 1)[0]}/Transpose", perm=[1, 0]))
    old = head.input[1]
    head.input[1] = transposed
    kept = [t for t in graph.initializer if t.name != old]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def export_onnx(
    model: PuzzleDecoder,
    path: str | os.PathLike,
    dtype: str = "fp32",
    *,
    opset: int | None = None,
    exporter: str = "torchscript",
    external_data: str = "auto",
    graph: str = "prefill",
) -> Path:
    """Export `model` (a copy is cast when its dtype differs from `dtype`) to `path`; returns the resolved path.

    graph: "prefill" (input_ids -> logits) or "decode" (one step with a KV cache; see the module docstring).

    external_data: "always" -> weights in one file PATH.data; "auto" -> only above 1.8 GB of weights; "never".
    Written with passes.support.onnx_io (weights streamed, external tensors page-aligned, deterministic serialization),
    then verified with onnx.checker and an onnxruntime CPU session (skipped for bf16 when this onnxruntime has
    no bf16 CPU kernels: see ort_cpu_runs_bf16) before it replaces `path`.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    if external_data not in ("auto", "always", "never"):
        raise UserError(f"unknown --external-data {external_data!r} (auto, always, never)")
    if graph not in GRAPHS:
        raise UserError(f"unknown graph {graph!r} (choose from {', '.join(GRAPHS)})")
    opset = opset or DEFAULT_OPSET[exporter]
    if exporter == "dynamo" and opset < 18:
        raise UserError(f"the dynamo exporter needs --opset >= 18 (got {opset})")
    out = Path(path).resolve()
    check_output(out, "output")       # a file in an existing folder
    if next(model.parameters()).dtype != DTYPES[dtype]:
        model = copy.deepcopy(model).to(DTYPES[dtype])

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        raw = tmp / "raw" / "raw.onnx"  # torch writes one file per tensor beside it above 2 GB
        raw.parent.mkdir()
        _torch_export(model, raw, opset, exporter, graph)
        proto = onnx_io.load_model(raw).proto  # weights stay on disk where torch wrote them externally
        proto.ir_version = IR_VERSION
        if exporter == "dynamo":
            _rename_dynamo(proto.graph)
        _rename_matmul_weights(proto.graph)
        if model.config.tie_word_embeddings:
            _share_tied_embedding(proto, raw.parent)
        size = sum(onnx_io.tensor_nbytes(t) for t in proto.graph.initializer)
        if external_data == "never" and size > onnx_io.PROTOBUF_LIMIT:
            raise UserError(f"{size / 1e9:.2f} GB of weights do not fit one ONNX file; use --external-data auto")
        external = {"always": True, "never": False, "auto": None}[external_data]  # None: above 1.8 GB
        staged = onnx_io.save_model(onnx_io.ModelOutput(proto, raw.parent), tmp / out.name, external=external,
                                    verify=False)
        onnx.checker.check_model(str(staged))
        if dtype != "bf16" or ort_cpu_runs_bf16():
            onnx_io.ort_session(staged, light=True)
        data_name = out.name + ".data"
        if (tmp / data_name).is_file():
            os.replace(tmp / data_name, out.parent / data_name)
        elif (out.parent / data_name).is_file():
            os.remove(out.parent / data_name)  # stale weights of an earlier export to the same name
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ranges(indices: list[int]) -> str:
    """[2, 3, 4, 6] -> '2-4, 6'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def describe(config: DecoderConfig) -> list[str]:
    """Summary lines: layer count, attention-free layers, FFN no_op layers, FFN widths per layer."""
    free = config.attention_free_layers
    no_ffn = [i for i, w in enumerate(config.ffn_widths) if w is None]
    runs: list[list] = []  # [width, count] for consecutive equal widths
    for w in config.ffn_widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    widths = " ".join(("-" if w is None else str(w)) + (f"*{n}" if n > 1 else "") for w, n in runs)
    return [
        f"layers: {len(config.layers)} (d={config.hidden_size}, {config.num_heads} heads, vocab {config.vocab_size})",
        f"attention-free layers: {len(free)} ({_ranges(free)}); FFN no_op layers: {len(no_ffn)} ({_ranges(no_ffn)})",
        f"FFN widths by layer (- = no_op, *n = n layers): {widths}",
    ]


def _input_files(kind: str, where: str | Path) -> set[Path]:
    """Files a resolved source (models.loaders.resolve_source) reads, to refuse overwriting them."""
    if kind == "gguf":
        return {Path(where).resolve()}
    if kind == "hf":
        return {p.resolve() for p in Path(where).iterdir() if p.suffix in (".json", ".safetensors")}
    return set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="preset name, smollm2, HF checkpoint folder or .gguf file")
    parser.add_argument("-o", "--output", required=True, help="output MODEL.onnx")
    parser.add_argument("--dtype", choices=[*DTYPES, "int4"], default=None,
                        help="default fp32 (onnx, genai), the source's dtype for nemotron-nas (its torch_dtype); "
                             "int4 (--runtime genai only): MatMul weights block-quantized as the model builder's "
                             "-p int4 does (passes.quantize: block 32, symmetric, accuracy_level 4, lm_head included, "
                             "embeddings float); activations fp16 for --provider cuda, fp32 for cpu")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 18 for dynamo)")
    parser.add_argument("--external-data", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--exporter", choices=list(EXPORTERS), default="torchscript")
    parser.add_argument("--graph", choices=list(GRAPHS), default="prefill",
                        help="prefill: input_ids -> logits (default); decode: one step with past/present KV cache")
    parser.add_argument("--runtime", choices=("onnx", "genai", "nemotron-nas"), default="onnx",
                        help="onnx: one ONNX file (default); genai: a folder onnxruntime-genai runs (-o DIR; see "
                             "exporters/genai.py); nemotron-nas: an HF checkpoint folder serving engines load with "
                             "tensor parallelism (-o DIR; see models/checkpoint.py)")
    parser.add_argument("--context-length", type=int, default=4096, help="--runtime genai: longest sequence (rotary tables)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda",
                        help="--runtime genai: execution provider named in genai_config.json")
    parser.add_argument("--drop", help="onnx, nemotron-nas: layers whose attention is removed, e.g. 5-7,17-18 "
                                       "(as models.heal --drop; no training: models.fused.drop_and_fuse)")
    parser.add_argument("--fuse", help="onnx, nemotron-nas: FFN groups fused (ordinals), e.g. 4-6,16-17 (as "
                                       "models.heal --fuse), or paper: the paper's rule on the chains left after "
                                       "--drop (passes.fuse --plan paper)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = Path(args.output).resolve()
    inputs = _input_files(*resolve_source(args.source))
    if out in inputs or out.with_name(out.name + ".data") in inputs:
        raise UserError(f"output {args.output} would overwrite an input file")
    if args.runtime == "onnx":
        check_output(out, "output")           # before any work: a file in an existing folder
    else:
        check_output_folder(out, "output")    # a new or empty folder in an existing folder
    if args.dtype == "int4" and args.runtime != "genai":
        raise UserError("--dtype int4 is for --runtime genai (or quantize any ONNX model with python -m passes.quantize)")
    if (args.drop or args.fuse) and args.runtime == "genai":
        raise UserError("--drop and --fuse are for --runtime onnx and nemotron-nas; for genai, export the changed model "
                        "as a nemotron-nas folder and export that folder")
    args.changes = parse_changes(args.drop, args.fuse)     # before any work: a malformed range exits 2
    if args.runtime == "genai":
        args.dtype = args.dtype or "fp32"
        return _export_genai(args, out, start)
    if args.runtime == "nemotron-nas":
        return _export_checkpoint(args, out, start)
    args.dtype = args.dtype or "fp32"
    model = _changed(load_model(args.source, DTYPES[args.dtype]), args)
    path = export_onnx(
        model, out, args.dtype, opset=args.opset, exporter=args.exporter, external_data=args.external_data,
        graph=args.graph,
    )
    data = path.with_name(path.name + ".data")
    sizes = f"{path.name} {path.stat().st_size / 1e6:.1f} MB"
    if data.is_file():
        sizes += f" + {data.name} {data.stat().st_size / 1e6:.1f} MB"
    verified = "onnx.checker ok, onnxruntime CPU loads it"
    if args.dtype == "bf16" and not ort_cpu_runs_bf16():
        verified = "onnx.checker ok; this onnxruntime has no bf16 CPU kernels, so ORT CPU cannot run this file"
    opset = args.opset or DEFAULT_OPSET[args.exporter]
    kind = ", decode graph" if args.graph == "decode" else ""
    print(f"exported {args.source} -> {path} ({args.dtype}, opset {opset}, {args.exporter} exporter{kind}"
          f"{_changes_text(args)})")
    for line in describe(model.config):
        print(f"  {line}")
    print(f"  parameters: {model.num_parameters() / 1e6:.2f} M; files: {sizes}")
    print(f"  verified: {verified}")
    print(f"  elapsed: {time.perf_counter() - start:.1f} s")
    return 0


def _changed(model: PuzzleDecoder, args) -> PuzzleDecoder:
    """The model with --drop / --fuse applied (models.fused.drop_and_fuse, as models.heal builds its student)."""
    dropped, groups = args.changes
    if groups == PAPER:
        groups = planned_groups(without_attention(model.config, dropped), PAPER)
        args.fuse = ",".join(f"{a}-{z}" for a, z in groups) + " (paper rule)"
    return drop_and_fuse(model, dropped, groups) if dropped or groups else model


def _changes_text(args) -> str:
    return "".join(f", {what} {value}" for what, value in (("attention dropped in", args.drop),
                                                           ("FFN groups fused", args.fuse)) if value)


def _export_checkpoint(args, out: Path, start: float) -> int:
    """--runtime nemotron-nas: the (dropped / fused) model in the source's dtype unless --dtype, the source's
    settings and block keys kept (models.checkpoint)."""
    from models.checkpoint import save_checkpoint, source_dtype, tp_constraints
    from models.loaders import load_tokenizer
    if args.graph != "prefill" or args.exporter != "torchscript" or args.opset is not None:
        raise UserError("--runtime nemotron-nas writes a checkpoint folder: --graph, --exporter and --opset do not apply")
    dtype = DTYPES[args.dtype] if args.dtype else source_dtype(args.source)
    model = _changed(load_model(args.source, dtype), args)
    folder = save_checkpoint(model, out, load_tokenizer(args.source), args.source, layout="nemotron-nas")
    name = next(k for k, v in DTYPES.items() if v == dtype)
    print(f"exported {args.source} -> {folder}/ as a nemotron-nas checkpoint ({name}"
          f"{'' if args.dtype else ', the source dtype'}{_changes_text(args)})")
    for line in describe(model.config):
        print(f"  {line}")
    for tp, problems in tp_constraints(model.config).items():
        print(f"  tensor parallelism {tp}: " + ("possible" if not problems else f"blocked ({problems[0]}"
                                                  + (f"; {len(problems) - 1} more" if len(problems) > 1 else "") + ")"))
    print(f"  elapsed: {time.perf_counter() - start:.1f} s")
    return 0


def _export_genai(args, out: Path, start: float) -> int:
    from exporters.genai import export_genai, quantize_genai
    from models.loaders import load_tokenizer
    if args.graph != "prefill" or args.exporter != "torchscript" or args.opset is not None:
        raise UserError("--runtime genai writes its own decoder graph (KV cache included): --graph, --exporter and "
                        "--opset do not apply")
    if args.context_length < 1:
        raise UserError(f"--context-length must be positive, got {args.context_length}")
    int4 = args.dtype == "int4"
    dtype = ("fp16" if args.provider == "cuda" else "fp32") if int4 else args.dtype
    model = load_model(args.source, DTYPES[dtype])
    tokenizer = load_tokenizer(args.source)
    if int4:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.float.") as scratch:
            export_genai(model, Path(scratch) / "float", tokenizer, context_length=args.context_length, provider=args.provider)
            folder = quantize_genai(Path(scratch) / "float", out)
    else:
        folder = export_genai(model, out, tokenizer, context_length=args.context_length, provider=args.provider)
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    sizes = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"exported {args.source} -> {folder}/ for onnxruntime-genai ({args.dtype}, {args.provider})")
    for line in describe(model.config):
        print(f"  {line}")
    print(f"  KV caches: {config['num_hidden_layers']} (layers with attention), {config['num_key_value_heads']} KV heads "
          f"each; context {args.context_length}; {sizes:.1f} MB in {len(list(folder.iterdir()))} files"
          + ("" if tokenizer is not None else "; no tokenizer in the source: generation from token ids only"))
    print(f"  elapsed: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
