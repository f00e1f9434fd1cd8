"""Fuzz: a few hundred seeded mutants of valid exports through the whole pass (match, chains, plan, rewrite, save).

Each mutant (a node dropped or reordered, an input rewired, a Cast retyped, an initializer's dims, bytes or
existence changed, an attribute changed) either
  * is refused with a UserError (the CLI's exit 2), or
  * is fused; then, when the mutant itself runs in onnxruntime, the fused model must run too and equal the
    mutant evaluated in the parallel form. That reference is built from the mutant's own nodes, not from
    the pass's weights: every later block of a group gets a copy of its nodes that reads the group's input
    x_a instead of its own, and the residual adds then sum to x_a + sum_t FFN_t(x_a).
Any other exception (a traceback) fails. A few mutants also go through the real CLI to check exit codes.
"""
from __future__ import annotations

import json
import random
import traceback
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from passes.ffn.match import match_ffn_blocks
from passes.fuse import main as fuse_main
from passes.support.errors import UserError
from tests.helpers import rel_err
from tests.residual_models import cached_export, ort_run, run_fuse_cli

BASES = {
    # name: (layout, stack arguments, exporter, dtype, mutants, relative tolerance)
    "torchscript": ("FFFAFF", dict(d=16, widths=[16, 24, 8, 32, 16], seed=21), False, torch.float32, 90, 1e-4),
    "torchscript-bias": ("FFFF", dict(d=16, widths=[8, 24, 16, 8], seed=22, bias=True), False, torch.float32, 90, 1e-4),
    # the models of test_fuse.py (shared cached exports)
    "dynamo": ("FFFAFFFFFF", dict(widths=[40, 72, 56, 24, 88, 64, 32, 48, 96], seed=3), True, torch.float32, 90, 1e-4),
    "torchscript-fp16": ("FFFAFFFFFF", dict(widths=[40, 72, 56, 24, 88, 64, 32, 48, 96], seed=5), False,
                         torch.float16, 60, 1e-2),
    # the first model after a fusion with --merge-gate-up: packed gate|up MatMul + Split blocks to mutate
    "torchscript-merged": ("FFFFFFAFF", dict(d=16, widths=[16, 24, 8, 32, 16, 8, 8, 16], seed=23), False,
                           torch.float32, 60, 1e-4),
}
PLANS = [[], ["--merge-gate-up"], ["--max-group", "2"], ["--groups", "0-1"], ["--groups", "1-2", "--merge-gate-up"],
         ["--groups", "0-2,3-4"]]
ELEM_TYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64,
              TensorProto.BOOL, TensorProto.BFLOAT16, TensorProto.INT8]


# ---------------------------------------------------------------- mutations

def _tensor_names(model):
    g = model.graph
    return [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output if o]


def drop_node(model, rng):
    i = rng.randrange(len(model.graph.node))
    node = model.graph.node[i]
    del model.graph.node[i]
    return f"drop node {node.name} ({node.op_type})"


def rewire_input(model, rng):
    nodes = [n for n in model.graph.node if n.input]
    node = rng.choice(nodes)
    k = rng.randrange(len(node.input))
    new = rng.choice(_tensor_names(model))
    old, node.input[k] = node.input[k], new
    return f"rewire {node.name} input {k}: {old} -> {new}"


def retype_cast(model, rng):
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    if not casts:
        return rewire_input(model, rng)
    node = rng.choice(casts)
    to = rng.choice(ELEM_TYPES)
    _set_attribute(node, helper.make_attribute("to", to))
    return f"retype {node.name} to {TensorProto.DataType.Name(to)}"


def change_dims(model, rng):
    t = rng.choice(list(model.graph.initializer))
    old = list(t.dims)
    choice = rng.randrange(4)
    if choice == 0 and len(old) == 2:
        new = old[::-1]                             # same size: a transposed shape over the same bytes
    elif choice == 1 and old:
        new = old[:-1] + [old[-1] + 1]              # one element too many for the data
    elif choice == 2 and len(old) >= 1:
        new = old[:-1]                              # drop a dimension
    else:
        new = old + [1]                             # add a dimension of 1
    del t.dims[:]
    t.dims.extend(new)
    return f"dims of {t.name}: {old} -> {new}"


def corrupt_bytes(model, rng):
    candidates = [t for t in model.graph.initializer if t.raw_data]
    if not candidates:
        return change_dims(model, rng)
    t = rng.choice(candidates)
    data = bytearray(t.raw_data)
    if rng.random() < 0.5:
        cut = rng.randrange(len(data))
        t.raw_data = bytes(data[:cut])
        return f"truncate {t.name} bytes to {cut}"
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    t.raw_data = bytes(data)
    return f"corrupt bytes of {t.name}"


def swap_nodes(model, rng):
    n = len(model.graph.node)
    i, j = rng.randrange(n), rng.randrange(n)
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(model.graph.node[i])
    b.CopyFrom(model.graph.node[j])
    model.graph.node[i].CopyFrom(b)
    model.graph.node[j].CopyFrom(a)
    return f"swap nodes {i} and {j}"


def delete_initializer(model, rng):
    i = rng.randrange(len(model.graph.initializer))
    name = model.graph.initializer[i].name
    del model.graph.initializer[i]
    return f"delete initializer {name}"


def change_attribute(model, rng):
    nodes = [n for n in model.graph.node if n.attribute]
    node = rng.choice(nodes)
    attr = rng.choice(list(node.attribute))
    value = helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.INT:
        new = helper.make_attribute(attr.name, rng.choice([0, 1, -1, 2, value + 1]))
    elif attr.type == onnx.AttributeProto.FLOAT:
        new = helper.make_attribute(attr.name, rng.choice([0.0, 1.0, 1e-3, -1.0, value * 2]))
    elif attr.type == onnx.AttributeProto.INTS:
        new = helper.make_attribute(attr.name, rng.choice([[0], [1], [-2], [1, 0], [0, 1], list(value)[::-1] or [0]]))
    elif attr.type == onnx.AttributeProto.TENSOR:
        array = onnx.numpy_helper.to_array(value).copy()
        if array.size and array.dtype.kind in "fiu":
            array.flat[rng.randrange(array.size)] = rng.choice([0, 1, 2, 3, -1])
        else:
            array = np.array([0, 1], np.int64)
        new = helper.make_attribute(attr.name, onnx.numpy_helper.from_array(array))
    else:
        node.attribute.remove(attr)
        return f"remove attribute {attr.name} of {node.name}"
    _set_attribute(node, new)
    return f"attribute {attr.name} of {node.name} ({node.op_type}): {value if attr.type != 4 else 'tensor'} -> changed"


def _set_attribute(node, attr):
    for a in list(node.attribute):
        if a.name == attr.name:
            node.attribute.remove(a)
    node.attribute.append(attr)


MUTATIONS = [drop_node, rewire_input, retype_cast, change_dims, corrupt_bytes, swap_nodes, delete_initializer,
             change_attribute]


def mutate(model, rng) -> tuple[onnx.ModelProto, str]:
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    what = [rng.choice(MUTATIONS)(mutant, rng) for _ in range(1 if rng.random() < 0.8 else 2)]
    return mutant, "; ".join(what)


# ---------------------------------------------------------------- the independent reference

def parallel_form(model: onnx.ModelProto, groups: list[list[int]]) -> onnx.ModelProto:
    """The model itself, with each group [a, z] in parallel form: for t > a, a copy of block t's nodes reads
    x_a (instead of x_t) and feeds block t's residual add, so x_{z+1} = x_a + sum_t FFN_t(x_a)."""
    blocks = match_ffn_blocks(model).blocks
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    copies = []
    for a, z in groups:
        first = blocks[a]
        for t in range(a + 1, z + 1):
            block = blocks[t]
            produced = {o for k in block.nodes for o in graph.node[k].output if o}
            rename = {name: f"{name}__par{t}" for name in produced}
            rename.setdefault(block.stream_in, first.stream_in)
            rename.setdefault(block.residual_in, first.residual_in)
            if block.stream_in in produced:   # cannot happen for a chain member; be loud if it does
                raise AssertionError(f"block {t} produces its own input")
            for k in block.nodes:
                node = onnx.NodeProto()
                node.CopyFrom(graph.node[k])
                node.name = f"{node.name}__par{t}"
                node.input[:] = [rename.get(i, i) for i in node.input]
                node.output[:] = [rename.get(o, o) for o in node.output]
                copies.append(node)
            residual = graph.node[block.residual_node]
            residual.input[block.residual_ports[1]] = rename[block.contribution]
    graph.node.extend(copies)   # onnxruntime sorts the graph itself
    return out


# ---------------------------------------------------------------- the fuzz loop

def _runs(model_bytes, feeds):
    try:
        return ort_run(model_bytes, feeds)
    except Exception:
        return None


@pytest.mark.parametrize("base", list(BASES))
def test_fuzz(base, tmp_path):
    layout, stack_args, dynamo, dtype, mutants, tol = BASES[base]
    _, path = cached_export(layout, dynamo=dynamo, dtype=dtype, **stack_args)
    if base.endswith("-merged"):
        assert fuse_main([str(path), "-o", str(tmp_path / "merged.onnx"), "--groups", "0-1,2-3", "--merge-gate-up"]) == 0
        path = tmp_path / "merged.onnx"
    model = onnx.load(path)
    d = stack_args.get("d", 32)
    x_type = np.float16 if dtype == torch.float16 else np.float32
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, d)).astype(x_type)}
    rng = random.Random(f"fuzz-{base}")
    outcome, failures, samples = Counter(), [], {"refused": [], "fused": []}
    mutant_path, out, report = tmp_path / "mutant.onnx", tmp_path / "fused.onnx", tmp_path / "report.json"
    for i in range(mutants):
        mutant, what = mutate(model, rng)
        plan = rng.choice(PLANS)
        data = mutant.SerializeToString()
        mutant_path.write_bytes(data)
        out.unlink(missing_ok=True)
        args = [str(mutant_path), "-o", str(out), "--report", str(report), *plan]
        label = f"mutant {i} ({what}; plan {plan})"
        try:
            assert fuse_main(args) == 0
        except UserError as exc:
            outcome["refused"] += 1
            assert "\n" not in str(exc), f"{label}: multi-line error: {exc}"
            assert not out.exists(), f"{label}: refused but wrote {out}"
            samples["refused"].append((data, plan))
            continue
        except Exception:
            failures.append(f"{label}:\n{traceback.format_exc()}")
            continue
        groups = json.loads(report.read_text())["groups"]
        if not groups:        # nothing to fuse: the report says why, no model is written
            outcome["nothing to fuse"] += 1
            if out.exists():
                failures.append(f"{label}: nothing fused, but a model was written")
            continue
        outcome["fused"] += 1
        samples["fused"].append((data, plan))
        expected = _runs(data, feeds)
        if expected is None:
            outcome["mutant does not run"] += 1
            continue
        got = _runs(out.read_bytes(), feeds)
        if got is None:
            failures.append(f"{label}: the mutant runs in onnxruntime, the fused model does not")
            continue
        try:
            expected = ort_run(parallel_form(mutant, groups), feeds)
        except Exception:
            failures.append(f"{label}: the parallel-form reference does not run:\n{traceback.format_exc()}")
            continue
        if not all(np.all(np.isfinite(e)) for e in expected):
            outcome["non-finite reference"] += 1
            continue
        outcome["value checked"] += 1
        for g, e in zip(got, expected):
            if g.shape != e.shape or rel_err(g, e) > tol:
                failures.append(f"{label}: fused output differs from the parallel form of the mutant "
                                f"(groups {groups}, rel err {rel_err(g, e) if g.shape == e.shape else 'shape'})")
    print(base, dict(outcome))
    assert not failures, f"{len(failures)} of {mutants} mutants failed:\n" + "\n\n".join(failures)
    # the fuzz is not vacuous: both outcomes happen, and fused mutants get value-checked
    assert outcome["refused"] >= 5 and outcome["value checked"] >= 10, dict(outcome)

    # the exit-code contract of the real CLI, on a few of the same mutants
    for kind, code in (("refused", 2), ("fused", 0)):
        for data, plan in samples[kind][:2]:
            mutant_path.write_bytes(data)
            out.unlink(missing_ok=True)
            proc = run_fuse_cli(mutant_path, "-o", out, *plan)
            assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
            if code == 2:
                assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
                assert not out.exists()
