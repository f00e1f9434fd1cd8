"""The layout's rules: imports only point down (floors), and the normalization is recognized in one place that
the FFN matcher (backward) and the stream finder (forward) agree on for every hand-built form."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from passes.attention.stream import find_stream
from passes.ffn.match import match_ffn_blocks
from tests.test_match_forms import FORMS, WIDTHS, Builder, make_weights

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> the top-level packages / passes floors it may import (besides itself and third parties)
ALLOWED = {
    "passes.support": {"passes.support"},
    "passes.ffn": {"passes.support", "passes.ffn"},
    "passes.attention": {"passes.support", "passes.attention"},
    "passes.measure": {"passes.support", "passes.ffn", "passes.attention", "passes.measure"},
    "passes.pipeline": {"passes.support", "passes.ffn", "passes.attention", "passes.measure"},
    "passes": {"passes"},
    "models": {"passes", "models"},
    "exporters": {"passes", "models", "exporters"},
    "bench": {"passes", "models", "exporters", "bench"},
}
OURS = ("passes", "models", "exporters", "bench", "tests")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in OURS}


def floor_of(module: str) -> str:
    return max((prefix for prefix in ALLOWED if module == prefix or module.startswith(prefix + ".")), key=len)


def test_imports_only_point_down():
    wrong = []
    for package in ("passes", "models", "exporters", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = module_name(path)
            allowed = ALLOWED[floor_of(module)]
            for target in imports(path):
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_floor_table_catches_an_upward_import(tmp_path):
    """The check itself: a support module importing the FFN fusion, and models importing exporters, are caught."""
    assert not any("passes.ffn".startswith(a) for a in ALLOWED[floor_of("passes.support.graph")])
    assert "exporters" not in ALLOWED[floor_of("models.heal")]
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from passes.ffn.match import FFNBlock\n")
    assert imports(probe) == {"passes.ffn.match"}


@pytest.mark.parametrize("name", list(FORMS))
def test_matcher_and_stream_finder_agree_on_every_norm_form(name):
    """Every FFN block the matcher finds is a sublayer the stream finder finds, with the same residual node and
    residual input: the two directions of passes.support.norms recognize the same normalizations."""
    model = Builder(FORMS[name]).model(make_weights(WIDTHS, seed=len(name)))
    blocks = match_ffn_blocks(model).blocks
    sublayers = find_stream(model).sublayers
    assert len(blocks) == len(WIDTHS)
    assert [(b.residual_node_name, b.residual_in) for b in blocks] == \
        [(s.residual_node_name, s.residual_in) for s in sublayers if s.kind == "mlp"]
