"""A model file must not make our tools read or write outside its own folder.

Crafted from a real export of puzzle-tiny with external data: one FFN weight's external data is pointed outside
the folder (`../`, an absolute path, a symbolic link), past the end of its file, at a length that does not match
its shape, or at a folder. Every CLI that loads a model must refuse each one with exit code 2 and one line naming
the tensor, write nothing and leave the input as it was. onnx's own loader refuses the same models (ours is
stricter on one: a length that disagrees with the shape, which onnxruntime refuses at load). Outputs never
alias the input's data file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.export import export_onnx
from models.presets import build_preset
from passes.support.errors import UserError, run_cli
from passes.support.onnx_io import load_model

REPO = Path(__file__).resolve().parents[1]
WEIGHT = "layers.2.ffn.gate_proj.weight_t"
CASES = ("escape", "absolute", "symlink", "offset_past_end", "length_past_end", "length_not_shape", "directory",
         "constant_escape")
ONNX_ALSO_REFUSES = set(CASES) - {"length_not_shape"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, _ = build_preset("puzzle-tiny")
    folder = tmp_path_factory.mktemp("clean")
    return export_onnx(model, folder / "model.onnx", "fp32", external_data="always")


def craft(exported: Path, case: str, root: Path) -> Path:
    """A copy of the exported model in root/model/ with one tensor's external data crafted; the real bytes of
    that tensor lie outside, in root/secret.bin, where an escaping location would find them."""
    folder = root / "model"
    folder.mkdir(parents=True)
    shutil.copy(exported.with_name(exported.name + ".data"), folder / "model.onnx.data")
    proto = onnx.load(str(exported), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == WEIGHT)
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    data = (folder / "model.onnx.data").read_bytes()
    (root / "secret.bin").write_bytes(data[offset:offset + length])
    size = len(data)
    changes = {
        "escape": {"location": "../secret.bin", "offset": "0"},
        "absolute": {"location": str((root / "secret.bin").resolve()), "offset": "0"},
        "symlink": {"location": "weights.bin", "offset": "0"},
        "offset_past_end": {"offset": str(size)},
        "length_past_end": {"offset": str(size - length // 2)},
        "length_not_shape": {"length": str(length - 4)},
        "directory": {"location": "weights", "offset": "0"},
    }.get(case, {})
    if case == "symlink":
        os.symlink("../secret.bin", folder / "weights.bin")
    if case == "directory":
        (folder / "weights").mkdir()
    if case == "constant_escape":   # a Constant node's value, which onnxruntime loads, not only initializers
        value = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[4],
                                 data_location=onnx.TensorProto.EXTERNAL)
        for key, text in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
            entry = value.external_data.add()
            entry.key, entry.value = key, text
        proto.graph.node.append(onnx.helper.make_node("Constant", [], ["unused_constant"], name="crafted", value=value))
    for entry in tensor.external_data:
        if entry.key in changes:
            entry.value = changes[entry.key]
    with open(folder / "model.onnx", "wb") as f:
        f.write(proto.SerializeToString())
    return folder / "model.onnx"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def commands(model: Path, good: Path, out: Path) -> dict[str, tuple[str, list[str]]]:
    """Every CLI that loads a model, with arguments that would write into `out` if it ran."""
    return {
        "fuse": ("passes.fuse", [model, "-o", out / "fused.onnx", "--groups", "2-4", "--report", out / "r.json"]),
        "analyze": ("passes.analyze", [model, "-o", out / "deps.json"]),
        "drop": ("passes.drop_attention", [model, "-o", out / "dropped.onnx", "--layers", "1"]),
        "rank": ("passes.drop_attention", [model, "--rank", "--report", out / "rank.json"]),
        "compare": ("bench.compare", [good, model, "--json", out / "c.json"]),
        "compare_first": ("bench.compare", [model, good]),
        "engine": ("bench.engine", [model, "-o", out / "m.engine"]),
        "latency": ("bench.latency", [good, model, "--provider", "cpu", "--out", out]),
        "profile": ("bench.profile_ort", [model, "--provider", "cpu"]),
    }


def run_in_process(module: str, argv: list) -> tuple[int, str]:
    import importlib
    main = importlib.import_module(module).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as stop:
        run_cli(main, [str(a) for a in argv])
    return stop.value.code, err.getvalue()


@pytest.mark.parametrize("case", CASES)
def test_every_cli_refuses(exported, case, tmp_path):
    model = craft(exported, case, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    before, outside = digest(model.parent), digest(tmp_path)
    for name, (module, argv) in commands(model, exported, out).items():
        code, err = run_in_process(module, argv)
        assert code == 2, f"{name}: exit {code}: {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert "external data" in lines[0] and ("'c'" in lines[0] or WEIGHT in lines[0] or "crafted" in lines[0]), lines[0]
        assert list(out.iterdir()) == [], f"{name} wrote {list(out.iterdir())}"
    assert digest(model.parent) == before and digest(tmp_path) == outside


def test_subprocess_exit_code_and_message(exported, tmp_path):
    """The same through `python -m`, as a user runs it."""
    model = craft(exported, "escape", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "passes.fuse", str(model), "-o", str(tmp_path / "fused.onnx"),
                           "--groups", "2-4"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {model}: initializer '{WEIGHT}': external data location '../secret.bin' leaves the model's folder "
        f"({(tmp_path / 'secret.bin').resolve()} is outside {model.parent.resolve()})"]
    assert not (tmp_path / "fused.onnx").exists() and not (tmp_path / "fused.onnx.data").exists()


@pytest.mark.parametrize("case", CASES)
def test_onnx_loader_agrees(exported, case, tmp_path):
    """onnx.load refuses what we refuse (path escapes, links, folders, ranges past the end); on a length that
    disagrees with the shape, onnx loads the bytes and onnxruntime refuses the model, as we do."""
    model = craft(exported, case, tmp_path)
    with pytest.raises(UserError):
        load_model(model)
    if case in ONNX_ALSO_REFUSES:
        with pytest.raises(Exception):
            onnx.load(str(model))
    else:
        import onnxruntime as ort
        with pytest.raises(Exception, match="size mismatch|length"):
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_clean_model_and_internal_symlinked_folder_work(exported, tmp_path):
    """The untouched export loads, fuses and runs; so does a model whose folder is reached through a link."""
    folder = tmp_path / "real"
    folder.mkdir()
    for p in exported.parent.iterdir():
        shutil.copy(p, folder / p.name)
    os.symlink(folder, tmp_path / "via_link")
    model = load_model(tmp_path / "via_link" / exported.name)
    assert model.external_files == {(folder / (exported.name + ".data")).resolve()}
    code, err = run_in_process("passes.fuse", [tmp_path / "via_link" / exported.name, "-o", tmp_path / "fused.onnx",
                                               "--groups", "2-4"])
    assert code == 0, err
    ids = np.random.default_rng(0).integers(0, 256, (1, 8)).astype(np.int64)
    import onnxruntime as ort
    assert ort.InferenceSession(str(tmp_path / "fused.onnx")).run(None, {"input_ids": ids})[0].shape == (1, 8, 256)


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_output_data_never_aliases_the_input(exported, tmp_path, alias):
    """-o chosen so that OUT.onnx.data is the input's data file: by name, a link to it, or a hard link of it."""
    folder = tmp_path / "model"
    shutil.copytree(exported.parent, folder)
    model = folder / exported.name
    data = folder / (exported.name + ".data")
    out = {"same": folder / exported.name, "symlink": tmp_path / "o.onnx", "hardlink": tmp_path / "o.onnx"}[alias]
    if alias == "symlink":
        os.symlink(data, tmp_path / "o.onnx.data")
    if alias == "hardlink":
        os.link(data, tmp_path / "o.onnx.data")
    before = digest(folder)
    code, err = run_in_process("passes.fuse", [model, "-o", out, "--groups", "2-4"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert digest(folder) == before
