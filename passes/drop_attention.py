"""python -m passes.drop_attention MODEL.onnx -o OUT.onnx --layers SPEC      (remove attention sublayers)
python -m passes.drop_attention MODEL.onnx --rank [--inputs F] [--report R.json] [--plot P.png]

The Puzzle-style step that creates FFN runs in a model that has attention in every layer. An attention sublayer
is a residual add x' = x + a(x) whose branch a reads x, contains a Softmax (or an attention op) and ends in a
linear layer. Removing it makes x' = x: readers of x' read x (an Identity keeps x' where it is a graph output),
the residual add and the branch's nodes are removed once nothing reads them, and in a decode graph the layer's present key/value outputs and its
past inputs go away. Every other node is untouched.

Layers are named by the `layers.N` index in the node names when the exporter wrote one, else by the attention
sublayer's position (0-based) among all attention sublayers. --rank measures, per attention sublayer, on
calibration inputs: cosdist = mean over tokens of 1 - cos(x, x'), ratio = mean |a| / |x|, and the end-to-end
KL divergence of next-token distributions (and top-1 agreement) when that sublayer alone is removed.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from passes.errors import fail, run_cli
from passes.graph import GraphIndex, drop_unused, live_nodes
from passes.onnx_io import LoadedModel, ModelOutput, load_model, ort_session, save_model
from passes.report import table

ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}


@dataclass(frozen=True)
class AttentionBlock:
    position: int            # 0-based among attention sublayers, in residual-stream order
    layer: int               # from `layers.N` in the node names, else = position
    residual_in: str         # x
    residual_out: str        # x' = x + a
    contribution: str        # a
    residual_node: int
    residual_node_name: str
    branch: tuple[int, ...]  # nodes computing a from x (and from shared inputs such as masks or caches)


def _branch(index: GraphIndex, out: str, stop: str) -> set[int]:
    """Nodes on which tensor `out` depends, not looking past tensor `stop`."""
    seen, todo = set(), [out]
    while todo:
        tensor = todo.pop()
        if tensor == stop or tensor not in index.producer:
            continue
        k = index.producer[tensor]
        if k in seen:
            continue
        seen.add(k)
        todo.extend(i for i in index.node(k).input if i)
    return seen


def _cache_outputs(index: GraphIndex, branch: set[int], x: str) -> set[int]:
    """Nodes that only pass branch values to graph outputs (a decode graph's present key/value, e.g. Identity)."""
    branch_outputs = {o for k in branch for o in index.node(k).output}
    free = set(index.initializers) | {i.name for i in index.graph.input}
    extra = set()
    for output in index.graph_outputs:
        nodes = _branch(index, output, stop=x) - branch
        made = {o for k in nodes for o in index.node(k).output}
        if nodes and len(nodes) <= 3 and all(i in branch_outputs | made | free for k in nodes for i in index.node(k).input if i) \
                and any(i in branch_outputs for k in nodes for i in index.node(k).input):
            extra |= nodes
    return extra


def _layer_number(names: list[str]) -> int | None:
    for name in names:
        found = re.search(r"layers[./_](\d+)", name)
        if found:
            return int(found.group(1))
    return None


def find_attention_blocks(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[AttentionBlock]:
    """Every residual add whose branch reads x, holds an attention op and ends in a MatMul/Gemm, in graph order."""
    index = index or GraphIndex.build(model.graph)
    found = []
    for r, node in enumerate(model.graph.node):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for x, a in (node.input, reversed(node.input)):
            producer = index.producer_node(a)
            if producer is None or producer[1].op_type not in ("MatMul", "Gemm"):
                continue
            branch = _branch(index, a, stop=x)
            ops = {index.node(k).op_type for k in branch}
            reads_x = any(x in index.node(k).input for k in branch)
            if reads_x and ops & ATTENTION_OPS and r not in branch:
                branch |= _cache_outputs(index, branch, x)
                found.append((r, x, a, branch, _layer_number([index.node_label(producer[0]), index.node_label(r)])))
                break
    blocks = []
    numbered = all(layer is not None for *_, layer in found) and len({f[4] for f in found}) == len(found)
    for position, (r, x, a, branch, layer) in enumerate(found):
        blocks.append(AttentionBlock(position, layer if numbered else position, x, model.graph.node[r].output[0], a,
                                     r, index.node_label(r), tuple(sorted(branch))))
    return blocks


def parse_layers(spec: str, blocks: list[AttentionBlock]) -> list[AttentionBlock]:
    """'20-23,27' -> the attention blocks of those layers; layers without attention are an error."""
    by_layer = {b.layer: b for b in blocks}
    chosen = []
    for part in spec.split(","):
        pieces = part.strip().split("-")
        if not 1 <= len(pieces) <= 2 or not all(p.strip().isdecimal() for p in pieces):
            fail(f"malformed --layers '{spec}': expected layer numbers and ranges, e.g. 20-23,27")
        first, last = int(pieces[0]), int(pieces[-1])
        if last < first:
            fail(f"layer range '{part}' is reversed")
        for layer in range(first, last + 1):
            if layer not in by_layer:
                known = f"{min(by_layer)}-{max(by_layer)}" if by_layer else "none"
                fail(f"layer {layer} has no attention to drop (attention sublayers found in layers: {_spans(sorted(by_layer)) or known})")
            if by_layer[layer] not in chosen:
                chosen.append(by_layer[layer])
    return chosen


def _spans(values: list[int]) -> str:
    spans, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(spans)


def drop_attention(model: LoadedModel, chosen: list[AttentionBlock]) -> tuple[ModelOutput, dict]:
    """The model with each chosen attention sublayer removed (x' = x); returns the removed graph inputs/outputs too."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    candidates = set()
    bypass = {b.residual_out: b.residual_in for b in chosen}          # x' -> x
    graph_outputs = {o.name for o in graph.output}

    def resolve(name: str) -> str:
        while name in bypass and name not in graph_outputs:
            name = bypass[name]
        return name

    for block in chosen:
        old = graph.node[block.residual_node]
        if block.residual_out in graph_outputs:   # keep the output's name: x' = Identity(x)
            old.CopyFrom(helper.make_node("Identity", [resolve(block.residual_in)], [block.residual_out],
                                          name=old.name or f"attention_bypass_{block.layer}"))
        else:
            candidates.add(block.residual_node)
        candidates.update(block.branch)
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = resolve(name) if name in bypass else name
    produced_by_branch = {o for k in candidates for o in graph.node[k].output}
    dropped_outputs = [o.name for o in graph.output if o.name in produced_by_branch]
    keep_outputs = [o for o in graph.output if o.name not in produced_by_branch]
    del graph.output[:]
    graph.output.extend(keep_outputs)

    old_nodes = list(graph.node)
    keep = live_nodes(old_nodes, candidates, {o.name for o in graph.output})
    inputs_before = [i.name for i in graph.input]
    del graph.node[:]
    graph.node.extend(n for k, n in enumerate(old_nodes) if k in keep)
    drop_unused(graph, removed=[n for k, n in enumerate(old_nodes) if k not in keep])
    remaining = {i.name for i in graph.input}
    dropped_inputs = [name for name in inputs_before if name not in remaining]
    return ModelOutput(proto, model.base_dir), {"dropped_inputs": dropped_inputs, "dropped_outputs": dropped_outputs}


# ---------------------------------------------------------------- ranking

def rank_attention(model: LoadedModel, blocks: list[AttentionBlock], feeds: dict[str, np.ndarray],
                   progress: bool = True) -> list[dict]:
    """Per attention sublayer: cosdist(x, x'), |a|/|x|, and KL / top-1 of the logits when it alone is removed."""
    from tqdm import tqdm

    from passes.analysis import cosine_distance, norm_ratio
    from passes.plan_auto import next_token_agreement
    logits_name = next((o.name for o in model.proto.graph.output if o.name == "logits"), model.proto.graph.output[0].name)
    probe = onnx.ModelProto()
    probe.CopyFrom(model.proto)
    known = {o.name for o in probe.graph.output}
    for block in blocks:
        for name in (block.residual_in, block.contribution):
            if name not in known:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
                known.add(name)
    session = ort_session(probe, base_dir=model.base_dir)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    del session
    base = values[logits_name]
    ranking = []
    for block in tqdm(blocks, desc="removing attention one layer at a time", disable=not progress, leave=False):
        x, a = values[block.residual_in], values[block.contribution]
        variant, _ = drop_attention(model, [block])
        session = ort_session(variant.proto, base_dir=model.base_dir)
        out = dict(zip([o.name for o in session.get_outputs()], session.run([logits_name], feeds)))
        del session
        kl, top1 = next_token_agreement(base, out[logits_name])
        ranking.append({"layer": block.layer, "position": block.position, "residual_node": block.residual_node_name,
                        "cosdist": float(np.nanmean(cosine_distance(x, x + a))),
                        "ratio": float(np.nanmean(norm_ratio(a, x))), "kl_removed_alone": kl, "top1_removed_alone": top1})
    return ranking


def plot_ranking(ranking: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [r["layer"] for r in ranking]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 4))
    ax.bar(layers, [r["kl_removed_alone"] for r in ranking], color="tab:red", label="KL when removed alone")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("next-token KL (nats)")
    twin = ax.twinx()
    twin.plot(layers, [r["cosdist"] for r in ranking], "ko-", markersize=3, label="cosdist(x, x + attn)")
    twin.set_ylabel("cosine distance")
    ax.set_title(title, fontsize=9)
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m passes.drop_attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("model")
    parser.add_argument("-o", "--output", help="write the model without the chosen attention sublayers here")
    parser.add_argument("--layers", help="layers whose attention to remove, e.g. 20-23,27")
    parser.add_argument("--rank", action="store_true", help="rank attention sublayers by how little removing them changes the output")
    parser.add_argument("--inputs", help="calibration inputs for --rank (npz or polygraphy JSON)")
    parser.add_argument("--report", help="JSON report")
    parser.add_argument("--plot", help="PNG of the ranking (with --rank)")
    args = parser.parse_args(argv)
    if not args.rank and not (args.output and args.layers):
        fail("give -o OUT.onnx --layers SPEC to drop attention, or --rank to rank the layers")
    start = time.perf_counter()
    model = load_model(args.model)
    blocks = find_attention_blocks(model.proto)
    if not blocks:
        fail(f"{args.model}: no attention sublayers found (nothing to drop or rank)")
    report: dict = {"tool": "passes.drop_attention", "input": args.model,
                    "attention": [{k: v for k, v in asdict(b).items() if k != "branch"} | {"branch_nodes": len(b.branch)} for b in blocks]}
    print(f"attention sublayers in {args.model}: {len(blocks)} (layers {_spans([b.layer for b in blocks])})")
    if args.rank:
        from passes.calibration import calibration_for
        calib = calibration_for(model.proto, args.inputs)
        ranking = rank_attention(model, blocks, calib.feeds)
        ranking.sort(key=lambda r: r["kl_removed_alone"])
        report["ranking"] = ranking
        report["inputs"] = calib.record()
        print(table([(r["layer"], r["cosdist"], r["ratio"], r["kl_removed_alone"], f"{r['top1_removed_alone']:.1%}") for r in ranking],
                    header=("layer", "cosdist", "|a|/|x|", "KL removed alone", "top-1")))
        print(f"  least harmful first; e.g. --layers {_spans(sorted(r['layer'] for r in ranking[:4]))}")
        if args.plot:
            plot_ranking(sorted(ranking, key=lambda r: r["layer"]), Path(args.plot), f"attention removal, one layer at a time: {Path(args.model).name}")
            print(f"  plot: {args.plot}")
    if args.output and args.layers:
        out = Path(args.output)
        if out.resolve() == model.path.resolve():
            fail(f"output {out} is the input model; the input is never modified, choose another -o")
        chosen = parse_layers(args.layers, blocks)
        output, removed = drop_attention(model, chosen)
        save_model(output, out, protected={model.path} | model.external_files, reference=model.path)
        report.update(output=str(out), dropped_layers=[b.layer for b in chosen], **removed,
                      nodes_before=len(model.proto.graph.node), nodes_after=len(output.proto.graph.node))
        print(f"  removed attention in layers {_spans(sorted(b.layer for b in chosen))}: nodes {len(model.proto.graph.node)} -> "
              f"{len(output.proto.graph.node)}" + (f", graph outputs dropped: {len(removed['dropped_outputs'])}, inputs dropped: "
                                                    f"{len(removed['dropped_inputs'])}" if removed["dropped_outputs"] or removed["dropped_inputs"] else ""))
        print(f"  model: {out}")
    report["seconds"] = round(time.perf_counter() - start, 2)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"  report: {args.report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
