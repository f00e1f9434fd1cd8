"""passes.pipeline: planning from the dependency matrix, auto_plan end to end, and measure_change."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from passes.ffn.chains import Chain
from passes.ffn.plan import Group, paper_rule, plan_from_metrics
from passes.ffn.structure import model_structure
from passes.measure.change import measure_change, next_token_agreement
from passes.measure.metrics import Metrics
from passes.measure.runs import Cost
from passes.pipeline import auto_plan, fuse_file
from passes.support.calibration import calibration_for
from passes.support.errors import UserError
from passes.support.input_files import save_inputs_npz
from passes.support.onnx_io import load_model
from tests.residual_models import ResidualStack, TinyLM, export, export_lm, parallel_reference

VOCAB, D = 50, 32


def metrics_from(matrix: np.ndarray, ordinals=None) -> Metrics:
    n = matrix.shape[0]
    ordinals = list(range(n)) if ordinals is None else list(ordinals)
    dep = [[0.0 if b <= a else float(matrix[a, b]) for b in range(n)] for a in range(n)]
    return Metrics(ordinals, [0.0] * n, [0.0] * n, dep, Cost(0.0, 0.0, 0.0, 0.0, 0))


def admissible(run, matrix, threshold, max_group):
    return len(run) <= (max_group or len(run)) and all(matrix[i, j] <= threshold for i, j in itertools.combinations(run, 2))


def check_plan(groups, chains, matrix, threshold, max_group, keep_last):
    chain_of = {o: k for k, c in enumerate(chains) for o in c.ordinals}
    taken = set()
    for g in groups:
        members = list(g.ordinals)
        assert len(members) >= 2
        assert chain_of[g.first] == chain_of[g.last]                       # inside one chain
        assert admissible(members, matrix, threshold, max_group)          # every pair <= threshold, size <= max_group
        assert not taken & set(members)
        taken |= set(members)
        if keep_last:
            assert chains[chain_of[g.first]].last not in members


def min_groups_brute_force(ordinals, matrix, threshold, max_group):
    """Fewest segments (singletons allowed) covering `ordinals`, each admissible: the sequential depth."""
    n = len(ordinals)
    best = [0] + [10 ** 9] * n
    for end in range(1, n + 1):
        for start in range(end):
            if admissible(ordinals[start:end], matrix, threshold, max_group):
                best[end] = min(best[end], best[start] + 1)
    return best[n]


def test_planner_respects_threshold_chains_max_group_keep_last():
    rng = np.random.default_rng(0)
    chains = [Chain((0,)), Chain((1, 2, 3, 4, 5, 6)), Chain((7, 8, 9, 10, 11))]
    for trial in range(200):
        matrix = np.triu(rng.uniform(0, 0.2, size=(12, 12)), 1)
        threshold = float(rng.uniform(0.02, 0.2))
        max_group = [None, 2, 3, 4][trial % 4]
        keep_last = trial % 3 != 0
        groups, candidates = plan_from_metrics(chains, metrics_from(matrix), threshold, max_group, keep_last)
        check_plan(groups, chains, matrix, threshold, max_group, keep_last)
        # greedy is optimal: the fewest sequential FFN stages any admissible partition reaches
        for chain in chains:
            ordinals = list(chain.ordinals[:-1] if keep_last and len(chain) > 1 else chain.ordinals)
            inside = [g for g in groups if g.first in ordinals]
            depth = len(ordinals) - sum(len(g) - 1 for g in inside)
            assert depth == min_groups_brute_force(ordinals, matrix, threshold, max_group)
        assert {tuple(c.span) for c in candidates if c.taken} == {(g.first, g.last) for g in groups}


def test_planner_candidates_say_why():
    matrix = np.full((6, 6), 0.01)
    matrix[1, 3] = 0.5                       # block 3 depends on block 1
    groups, candidates = plan_from_metrics([Chain(tuple(range(6)))], metrics_from(np.triu(matrix, 1)), 0.1, None, True)
    assert groups == [Group(0, 2), Group(3, 4)]
    reasons = {c.span: c for c in candidates}
    assert reasons[(5, 5)].reason.startswith("last block") and not reasons[(5, 5)].taken
    assert not reasons[(0, 3)].taken and "M[1][3] = 0.5 > threshold 0.1" in reasons[(0, 3)].reason
    assert reasons[(0, 3)].max_dependency == pytest.approx(0.5)
    assert reasons[(0, 2)].taken and reasons[(0, 2)].max_dependency == pytest.approx(0.01)
    groups, candidates = plan_from_metrics([Chain(tuple(range(6)))], metrics_from(np.triu(matrix, 1)), 0.1, 2, False)
    assert groups == [Group(0, 1), Group(2, 3), Group(4, 5)]
    assert any("max-group 2" in c.reason for c in candidates if not c.taken)
    no_keep, _ = plan_from_metrics([Chain(tuple(range(6)))], metrics_from(np.full((6, 6), 0.0)), 0.0, None, False)
    assert no_keep == [Group(0, 5)]
    with pytest.raises(UserError):
        plan_from_metrics([Chain((0, 1))], metrics_from(np.zeros((2, 2))), -1.0)


def test_planner_skips_unmeasured_pairs():
    metrics = metrics_from(np.zeros((3, 3)), ordinals=[0, 1, 2])
    metrics.dependency[0][2] = None
    groups, candidates = plan_from_metrics([Chain((0, 1, 2))], metrics, 0.1, None, False)
    assert groups == [Group(0, 1)]
    assert any("not measured" in c.reason for c in candidates)


@pytest.fixture(scope="module")
def stack_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    stack = ResidualStack("FFFFAFFFF", d=32, seed=11)
    path = export(stack, folder / "stack.onnx", dtype=torch.float64)
    x = np.random.default_rng(3).standard_normal((2, 10, 32))
    return {"path": path, "stack": stack, "x": x, "npz": save_inputs_npz(folder / "x.npz", {"x": x}), "folder": folder}


def test_auto_plan_thresholds(stack_model):
    model = load_model(stack_model["path"])
    structure, calib = model_structure(model.proto), calibration_for(model, stack_model["npz"])

    def plan(threshold, max_group=None):
        return auto_plan(model, structure, calib, threshold=threshold, max_group=max_group, progress=False)

    groups, record = plan(float("inf"))
    chains = [Chain((0, 1, 2, 3)), Chain((4, 5, 6, 7))]
    assert groups == paper_rule(chains)                       # with no threshold: the paper's rule
    assert record["dependency"]["ordinals"] == [0, 1, 2, 4, 5, 6]   # only blocks that could be fused were measured
    assert record["dependency"]["scope"] == "chains"
    assert record["cost"]["runs"] == 5 and record["inputs"]["shapes"] == {"x": [2, 10, 32]}
    none, record0 = plan(0.0)
    assert none == [] and all(not c["taken"] for c in record0["candidates"])
    matrix = record["dependency"]["matrix"]
    mid = sorted(v for row in matrix for v in row if v)[len([v for row in matrix for v in row if v]) // 2]
    groups_mid, record_mid = plan(mid, max_group=2)
    ordinals = record_mid["dependency"]["ordinals"]
    dense = np.zeros((8, 8))
    for a, i in enumerate(ordinals):
        for b, j in enumerate(ordinals):
            dense[i, j] = matrix[a][b] or 0.0
    check_plan(groups_mid, chains, dense, mid, 2, True)


def test_measure_change_matches_parallel_reference(stack_model):
    path, x = stack_model["path"], stack_model["x"]
    fused = stack_model["folder"] / "fused.onnx"
    fuse_file(path, fused, groups=[Group(0, 2), Group(4, 6)])
    change = measure_change(path, fused, {"x": x})
    stack = stack_model["stack"]
    with torch.no_grad():
        want = parallel_reference(stack, torch.from_numpy(x), [(0, 2), (4, 6)]).numpy()
        orig = stack.double()(torch.from_numpy(x)).numpy()
    expected = np.linalg.norm(orig - want) / np.linalg.norm(orig)
    assert change["outputs"]["y"]["relative_error"] == pytest.approx(expected, rel=1e-6)
    assert change["relative_error"] > 1e-3 and "kl" not in change
    same = measure_change(path, path, {"x": x})
    assert same["relative_error"] == 0.0


def test_measure_change_language_model(tmp_path):
    """The KL and top-1 agreement measure_change reports, against the torch model and its parallel form (FFNs
    0-2 reading the same input), computed here in float64."""
    model = TinyLM("FFFFAF", seed=2, vocab=VOCAB, d=D)
    path = export_lm(model, tmp_path / "lm.onnx")
    fused = tmp_path / "lm.fused.onnx"
    fuse_file(path, fused, groups=[Group(0, 2)])
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 16))
    change = measure_change(path, fused, {"input_ids": ids})
    with torch.no_grad():
        model = model.double()
        x = model.embed(torch.from_numpy(ids))
        original = torch.log_softmax(model.head(model.stack(x)), -1)
        parallel = torch.log_softmax(model.head(parallel_reference(model.stack, x, [(0, 2)])), -1)
    kl = float((original.exp() * (original - parallel)).sum(-1).mean())
    top1 = float((original.argmax(-1) == parallel.argmax(-1)).double().mean())
    assert change["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-6
    assert change["top1_agreement"] == pytest.approx(top1, abs=1e-9)
    assert change["outputs"]["logits"]["kl"] == change["kl"]
    same = measure_change(path, path, save_inputs_npz(tmp_path / "ids.npz", {"input_ids": ids}))
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0


def test_next_token_agreement_against_torch():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 5, 11)), rng.standard_normal((3, 5, 11))
    kl, top1 = next_token_agreement(a, b)
    ta, tb = torch.from_numpy(a).reshape(-1, 11), torch.from_numpy(b).reshape(-1, 11)
    want = torch.nn.functional.kl_div(tb.log_softmax(-1), ta.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl == pytest.approx(float(want), rel=1e-10)
    assert top1 == pytest.approx(float((ta.argmax(-1) == tb.argmax(-1)).double().mean()))
