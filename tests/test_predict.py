"""passes.measure.predict and the budget planner: predicted costs against fusions actually made and measured,
the error energy against torch, the planner against brute force, and the fuse CLI's budget options."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporters.export import export_onnx
from models.fused import drop_and_fuse
from models.presets import build_preset
from passes.drop_attention import main as drop_main
from passes.ffn.chains import Chain
from passes.ffn.plan import CandidateCost, Group, plan_by_budget
from passes.ffn.structure import model_structure
from passes.measure.change import measure_change
from passes.measure.metrics import compute_metrics
from passes.pipeline import fuse_model
from passes.support.calibration import calibration_for
from passes.support.onnx_io import load_model, save_model
from tests.test_foreign_forms import quiet

DROPPED = [1, 8]       # puzzle-small: attention removed here joins FFN runs into longer chains


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    """puzzle-small with attention dropped in DROPPED, its structure, calibration on random tokens, and metrics with
    predicted costs of every run of 2-3 blocks."""
    folder = tmp_path_factory.mktemp("predict")
    torch_model = build_preset("puzzle-small")[0]
    export_onnx(torch_model, folder / "m.onnx")
    assert quiet(drop_main, [folder / "m.onnx", "-o", folder / "d.onnx", "--layers", ",".join(map(str, DROPPED))]) == 0
    model = load_model(folder / "d.onnx")
    structure = model_structure(model.proto)
    ids = np.random.default_rng(3).integers(0, torch_model.config.vocab_size, (2, 32))
    np.savez(folder / "calib.npz", input_ids=ids)
    calib = calibration_for(model, str(folder / "calib.npz"), warn=False)
    chain_blocks = [o for c in structure.chains if len(c) > 1 for o in c.ordinals]
    metrics = compute_metrics(model, calib.feeds, chain_blocks, scope="chains", structure=structure, predict=3, progress=False)
    return {"folder": folder, "torch": torch_model, "model": model, "structure": structure, "calib": calib,
            "metrics": metrics, "ids": ids}


def measured_kl(d, group: tuple[int, int]) -> float:
    path = d["folder"] / f"fused_{group[0]}_{group[1]}.onnx"
    save_model(fuse_model(d["model"], d["structure"], [Group(*group)]).output, path, external=False)
    return measure_change(d["model"], path, d["calib"])["kl"]


def test_candidates_cover_every_run_of_two_and_three(dropped):
    spans = [(c.first, c.last) for c in dropped["metrics"].candidates]
    chains = [list(c.ordinals) for c in dropped["structure"].chains if len(c) > 1]
    assert chains, "the drop must create chains"
    want = sorted((c[i], c[i + k - 1]) for c in chains for k in (2, 3) for i in range(len(c) - k + 1))
    assert spans == want


def test_pair_prediction_is_the_fused_pair_measured(dropped):
    """For a pair the prediction injects exactly the fused stream: it must equal the measured KL of the fused
    model (numpy float32 vs onnxruntime rounding only)."""
    pairs = [c for c in dropped["metrics"].candidates if c.last == c.first + 1]
    for c in pairs[:3]:
        kl = measured_kl(dropped, (c.first, c.last))
        assert kl > 1e-6
        assert abs(c.predicted_cost - kl) <= 1e-3 * kl, (c, kl)


def test_triples_predicted_within_a_factor_and_in_order(dropped):
    triples = [c for c in dropped["metrics"].candidates if c.last == c.first + 2]
    measured = [measured_kl(dropped, (c.first, c.last)) for c in triples]
    for c, kl in zip(triples, measured):
        assert kl / 2 < c.predicted_cost < 2 * kl, (c, kl)


def test_relative_error_is_the_fused_stream_error_in_torch(dropped):
    """E|delta|^2 / E|x'_z|^2 against the torch model: the residual stream after the group's last layer, fused
    (models.fused) and not."""
    model, metrics = dropped["torch"], dropped["metrics"]
    c = max(metrics.candidates, key=lambda c: c.last - c.first)
    where = [i for i, spec in enumerate(model.config.layers) if spec.ffn_width is not None]
    plain = drop_and_fuse(model, DROPPED, [])
    fused = drop_and_fuse(model, DROPPED, [(c.first, c.last)])
    streams = {}
    for name, m in (("plain", plain), ("fused", fused)):
        m.layers[where[c.last]].register_forward_hook(lambda _m, _a, out, name=name: streams.__setitem__(name, out))
        with torch.no_grad():
            m(torch.from_numpy(dropped["ids"]))
    delta = (streams["fused"] - streams["plain"]).double()
    want = (delta.pow(2).sum(-1).mean() / streams["plain"].double().pow(2).sum(-1).mean()).item()
    assert abs(c.relative_error - want) <= 1e-3 * want


def test_report_definition_is_the_formula_the_code_computes(dropped):
    """The report's definition text and the numbers: predicted_cost = s_z * E|delta(a..z)|^2 with
    s_z = change(fuse z-1..z) / E|delta(z-1..z)|^2, checked with delta from the torch model (fused vs plain
    residual stream after block z, models.fused) and the pair's change measured on the fused ONNX model."""
    from passes.measure.predict import PREDICTION_DEFINITION
    record = dropped["metrics"].record()["candidates"]
    assert record["definition"] == PREDICTION_DEFINITION
    for text in ("s_z * E|delta(a..z)|^2", "sum_{t=a+1..z} F_t(x_a) - h_t", "s_z = change(fuse z-1..z) / E|delta(z-1..z)|^2"):
        assert text in PREDICTION_DEFINITION
    model, metrics = dropped["torch"], dropped["metrics"]
    where = [i for i, spec in enumerate(model.config.layers) if spec.ffn_width is not None]
    c = max(metrics.candidates, key=lambda c: c.last - c.first)

    def energy(group):
        streams = {}
        for name, m in (("plain", drop_and_fuse(model, DROPPED, [])), ("fused", drop_and_fuse(model, DROPPED, [group]))):
            m.layers[where[group[1]]].register_forward_hook(lambda _m, _a, out, name=name: streams.__setitem__(name, out))
            with torch.no_grad():
                m(torch.from_numpy(dropped["ids"]))
        return (streams["fused"] - streams["plain"]).double().pow(2).sum(-1).mean().item()

    sensitivity = measured_kl(dropped, (c.last - 1, c.last)) / energy((c.last - 1, c.last))
    want = sensitivity * energy((c.first, c.last))
    assert abs(c.predicted_cost - want) <= 2e-3 * want, (c, want)


def test_cost_counts_every_part_in_one_unit(dropped):
    """The analysis cost is the sum of its parts (onnxruntime runs and the numpy FFN probes), each in
    forward-pass equivalents and seconds; the probes' FLOPs are 6 d m per probed token of each block."""
    cost = dropped["metrics"].cost
    parts = cost.record()["parts"]
    assert set(parts) == {"onnxruntime runs", "FFN probes"}
    assert abs(sum(p["forward_pass_equivalents"] for p in parts.values()) - cost.forward_pass_equivalents) < 1e-3
    assert parts["FFN probes"]["forward_pass_equivalents"] > 0 and parts["FFN probes"]["seconds"] > 0
    assert parts["onnxruntime runs"]["count"] == cost.runs - 1
    assert "FFN probes" in cost.definition


def brute_force(chains, price, n_blocks, max_cost=None, target_depth=None):
    """Every plan of disjoint groups, its stages saved and cost; the best by the planner's rule."""
    spans = [s for s in price]
    plans = []
    for k in range(len(spans) + 1):
        for chosen in itertools.combinations(spans, k):
            covered = [o for a, z in chosen for o in range(a, z + 1)]
            if len(covered) != len(set(covered)):
                continue
            plans.append((sum(z - a for a, z in chosen), sum(price[s] for s in chosen), sorted(chosen)))
    if target_depth is not None:
        able = [p for p in plans if n_blocks - p[0] <= target_depth]
        return min(able, key=lambda p: (p[1], p[0])) if able else None
    able = [p for p in plans if p[1] <= max_cost]
    return max(able, key=lambda p: (p[0], -p[1]))


@pytest.mark.parametrize("seed", range(6))
def test_budget_planner_is_optimal(seed):
    rng = np.random.default_rng(seed)
    chains = [Chain((0, 1, 2, 3, 4)), Chain((5,)), Chain((6, 7, 8, 9))]
    price = {(c.ordinals[i], c.ordinals[j]): float(rng.lognormal(-3, 1.2)) for c in chains
             for i in range(len(c)) for j in range(i + 1, min(len(c), i + 4))}
    candidates = [CandidateCost(a, z, cost, 0.0, None) for (a, z), cost in price.items()]
    for budget in (0.0, 0.02, 0.05, 0.2, 1.0):
        groups, cost, _ = plan_by_budget(chains, candidates, 10, max_cost=budget)
        best = brute_force(chains, price, 10, max_cost=budget)
        assert sum(len(g) - 1 for g in groups) == best[0] and cost == pytest.approx(best[1])
        assert cost <= budget
    for depth in (10, 8, 6, 4):
        groups, cost, reason = plan_by_budget(chains, candidates, 10, target_depth=depth)
        best = brute_force(chains, price, 10, target_depth=depth)
        if best is None:
            assert groups == [] and "no plan reaches" in reason
        else:
            assert 10 - sum(len(g) - 1 for g in groups) <= depth and cost == pytest.approx(best[1])


def fuse_cli(*args):
    return subprocess.run([sys.executable, "-m", "passes.fuse", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_fuse_plan_auto_with_budget_and_depth(dropped, tmp_path):
    d = dropped
    cheapest = min(c.predicted_cost for c in d["metrics"].candidates)
    report = tmp_path / "r.json"
    done = fuse_cli(d["folder"] / "d.onnx", "--plan", "auto", "--inputs", d["folder"] / "calib.npz", "--max-kl",
                    f"{cheapest * 1.01:.6g}", "-o", tmp_path / "f.onnx", "--report", report)
    assert done.returncode == 0, done.stderr
    auto = json.loads(report.read_text())
    plan = auto["auto_plan"]
    assert len(plan["groups"]) == 1 and plan["predicted_cost"] <= cheapest * 1.01
    assert abs(auto["change"]["kl"] - plan["predicted_cost"]) < 0.05 * plan["predicted_cost"] + 1e-6
    assert "predicted kl of the plan" in done.stdout
    n = len(d["structure"].blocks)
    done = fuse_cli(d["folder"] / "d.onnx", "--plan", "auto", "--inputs", d["folder"] / "calib.npz", "--target-depth",
                    n - 3, "-o", tmp_path / "g.onnx", "--report", report)
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["after"]["sequential_ffn_depth"] <= n - 3
    done = fuse_cli(d["folder"] / "d.onnx", "--plan", "auto", "--max-kl", "0", "-o", tmp_path / "h.onnx")
    assert done.returncode == 0 and "no candidate group is predicted under the budget" in done.stdout
    assert not (tmp_path / "h.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-kl", "0.1"], "--max-kl only applies to --plan auto"),
    (["--plan", "auto", "--max-kl", "0.1", "--threshold", "0.05"], "are exclusive"),
    (["--plan", "auto", "--target-depth", "0"], "--target-depth"),
    (["--plan", "auto", "--max-kl", "-1"], "--max-kl"),
])
def test_fuse_budget_options_refused(dropped, tmp_path, args, message):
    done = fuse_cli(dropped["folder"] / "d.onnx", *args, "-o", tmp_path / "x.onnx")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.onnx").exists()
