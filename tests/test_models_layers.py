"""Layers point down (bench -> exporters -> models -> passes; never up) and one home for each shared fact: the
@pydoc text (models.text), the checkpoint writer (models.checkpoint, beside its reader models.loaders)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["passes", "models", "exporters", "bench"]      # each may import only the ones before it


def imported_packages(package: str) -> dict[str, set[str]]:
    """Per file of `package`: the top-level packages of this repo it imports (anywhere in the file)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names & set(FLOORS)
    return out


@pytest.mark.parametrize("package", ["models", "exporters"])
def test_layers_only_point_down(package):
    above = set(FLOORS[FLOORS.index(package) + 1:])
    upward = {file: sorted(names & above) for file, names in imported_packages(package).items() if names & above}
    assert upward == {}


def test_export_nemotron_nas_uses_the_models_writer(tmp_path, monkeypatch, capsys):
    import importlib.util

    import models.checkpoint
    from exporters.export import main as export_main
    assert importlib.util.find_spec("exporters.checkpoint") is None
    calls = []
    writer = models.checkpoint.save_checkpoint
    monkeypatch.setattr(models.checkpoint, "save_checkpoint", lambda *a, **k: calls.append(k) or writer(*a, **k))
    assert export_main(["puzzle-tiny", "-o", str(tmp_path / "nas"), "--runtime", "nemotron-nas"]) == 0
    assert calls == [{"layout": "nemotron-nas"}] and (tmp_path / "nas" / "config.json").is_file()


def test_pydoc_text_is_the_topics_joined_with_blank_lines():
    from pydoc_data.topics import topics

    from models.text import PYDOC, pydoc_text
    expected = ""
    for i, key in enumerate(sorted(topics)):
        expected += ("\n\n" if i else "") + topics[key]
    assert PYDOC == "@pydoc"
    assert pydoc_text() == expected


def test_bench_inputs_and_heal_tokenize_the_same_pydoc_text(tmp_path):
    """bench.inputs --text @pydoc and models.heal --eval-text @pydoc read one text, so one tokenizer gives one
    sequence of ids: bench.inputs' rows are a window of the ids healing evaluates on."""
    from bench.inputs import main as inputs_main
    from bench.inputs import read_text as inputs_text
    from models.heal import read_text as heal_text
    from models.heal import tokens_of
    from models.loaders import load_tokenizer
    from models.text import PYDOC, pydoc_text
    from models.tokenizers import byte_level_tokenizer
    assert inputs_text(PYDOC) == heal_text(PYDOC) == pydoc_text()

    byte_level_tokenizer(512).save_pretrained(tmp_path / "tok")
    assert inputs_main(["--text", PYDOC, "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "c.npz"),
                        "--rows", "2", "--seq", "64", "--offset", "100"]) == 0
    rows = np.load(tmp_path / "c.npz")["input_ids"]
    ids = tokens_of(heal_text(PYDOC), load_tokenizer(str(tmp_path / "tok")), 512)
    assert np.array_equal(rows, ids[100:228].reshape(2, 64))
