"""Prediction: what fusing a candidate group would do to the model's output, before fusing it.

For a group a..z inside one chain, the fused model differs from the original only in the residual stream after
block z (block a reads x_a either way; nothing else reads the chain's inner stream):
    delta(a..z) = x'_z(fused) - x'_z = sum_{t=a+1..z} [F_t(x_a) - h_t],   F_t(x) = FFN_t(n(x) g_t),  h_t = F_t(x_t)
How much the rest of the model amplifies a change there is measured once per group end z, with the change the
pair (z-1, z) makes: block z's contribution replaced by F_z(x_{z-1}) and the model run from there to its output
(a suffix run). To first order the output change is quadratic in the perturbation, so
    sensitivity s_z = change(pair z-1..z) / E|delta(z-1..z)|^2
    predicted_cost(a..z) = s_z * E|delta(a..z)|^2
For pairs this is the pair's own change (fusing the pair alone gives exactly that stream); longer groups are
scaled by their error energy. `change` is the mean next-token KL(p_original || p_changed) when the output is
language-model logits, else the relative squared error |y' - y|^2 / |y|^2 of the first output; E is the mean over
tokens. Several groups in one plan are predicted to cost the sum of their costs.

Measured on the real SmolLM2 (bench.smollm2.prediction): why the perturbation is the pair's and not the removal
of h_z: blocks late in the model have contributions so large that removing one is far outside the quadratic
regime, and a sensitivity scaled from it under-predicted their pairs tenfold.

What it costs: the base run (x_t, h_t and the output exposed) is shared with passes.measure.metrics; one suffix
run per group end; F_z(x_{z-1}) on every calibration token; the other F_t(x_a) on at most `probe_tokens` tokens,
each (a, t) with t - a < max_group once, in numpy (float32) from the blocks' weights. The report's cost counts
all of it.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from passes.ffn.chains import Chain
from passes.ffn.linear import Weights
from passes.ffn.match import FFNBlock
from passes.ffn.plan import CandidateCost, why_not_fusable
from passes.measure.change import next_token_agreement
from passes.support.onnx_io import LoadedModel, initializer_map

PROBE_TOKENS = 512           # tokens the FFN probes F_t(x_a) are evaluated on
PREDICTION_DEFINITION = ("predicted_cost(a..z) = s_z * E|delta(a..z)|^2 with delta(a..z) = sum_{t=a+1..z} F_t(x_a) - h_t "
                         "(F_t(x) = FFN_t(n(x) g_t), h_t = F_t(x_t), E the mean over tokens) and the sensitivity "
                         "s_z = change(fuse z-1..z) / E|delta(z-1..z)|^2, change(fuse z-1..z) measured by a suffix run "
                         "in which block z reads x_{z-1}: the first-order output change of fusing a..z alone "
                         "(passes/measure/predict.py)")


def output_change(base: np.ndarray, changed: np.ndarray, logits: bool) -> float:
    """Mean next-token KL(base || changed) for logits, else |changed - base|^2 / |base|^2."""
    if logits:
        return next_token_agreement(base, changed)[0]
    a, b = np.asarray(base, np.float64), np.asarray(changed, np.float64)
    denom = float((a * a).sum())
    return float(((b - a) ** 2).sum() / denom) if denom else float(((b - a) ** 2).sum())


def candidate_spans(chains: Sequence[Chain], ordinals: Sequence[int], max_group: int,
                    blocks: Sequence[FFNBlock]) -> list[tuple[int, int]]:
    """Every run a..z of 2 to max_group consecutive blocks of one chain, all among `ordinals`, that one FFN can
    replace exactly (passes.ffn.plan.why_not_fusable)."""
    chosen = set(ordinals)
    spans = []
    for chain in chains:
        run = [o for o in chain.ordinals if o in chosen]
        for i in range(len(run)):
            for j in range(i + 1, min(len(run), i + max_group)):
                if run[j] - run[i] != j - i or why_not_fusable(blocks[run[i]:run[j] + 1]):
                    break
                spans.append((run[i], run[j]))
    return sorted(spans)


def group_ends(spans: Sequence[tuple[int, int]]) -> list[int]:
    """Blocks that end some candidate: the points whose sensitivity is needed."""
    return sorted({z for _, z in spans})


class FFNProbe:
    """F_t(x) = FFN_t(n(x) g_t) of a block in numpy float32, from the model's weights (read at each call: call it
    once per block with every input stacked)."""

    def __init__(self, model: LoadedModel):
        self.weights = Weights(initializer_map(model.proto), model.base_dir)
        self.flops = 0.0       # weight-MatMul FLOPs spent, for the cost report
        self.seconds = 0.0     # time spent in calls

    def __call__(self, block: FFNBlock, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self._forward(block, x)
        finally:
            self.seconds += time.perf_counter() - start

    def _forward(self, block: FFNBlock, x: np.ndarray) -> np.ndarray:
        w, d, m = self.weights, block.hidden_size, block.width
        x = x.astype(np.float32)
        n = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(block.norm.eps))
        h = n * w.gain(block.norm.gains, d, np.float32)
        gate = h @ w.rows(block.gate, 0, d).astype(np.float32) + w.vector(block.gate_bias, m, np.float32)
        up = h @ w.rows(block.up, 0, d).astype(np.float32) + w.vector(block.up_bias, m, np.float32)
        act = gate / (1 + np.exp(-gate)) * up
        self.flops += 6.0 * d * m * x.shape[0]
        return act @ w.rows(block.down, 0, m).astype(np.float32) + w.vector(block.down_bias, d, np.float32)


def pair_contributions(ends: Sequence[int], blocks: Sequence[FFNBlock], xs: Mapping[int, np.ndarray],
                       probe: FFNProbe) -> dict[int, np.ndarray]:
    """F_z(x_{z-1}) for every group end z, on every token, shaped like x_z: the contribution block z makes when
    it is fused with block z-1."""
    out = {}
    for z in ends:
        x = np.asarray(xs[z - 1])
        out[z] = probe(blocks[z], x.reshape(-1, x.shape[-1])).reshape(x.shape)
    return out


def predict_costs(spans: Sequence[tuple[int, int]], blocks: Sequence[FFNBlock], xs: Mapping[int, np.ndarray],
                  hs: Mapping[int, np.ndarray], pair_change: Mapping[int, float], pairs: Mapping[int, np.ndarray],
                  probe: FFNProbe, probe_tokens: int = PROBE_TOKENS) -> list[CandidateCost]:
    """predicted_cost of every span from the captured x_t, h_t (arrays [..., d]), each end's pair contribution
    F_z(x_{z-1}) (pair_contributions) and the measured change of that pair (see the module docstring)."""
    if not spans:
        return []
    tokens = int(np.asarray(xs[spans[0][0]]).size // blocks[spans[0][0]].hidden_size)
    rows = np.linspace(0, tokens - 1, probe_tokens).round().astype(int) if tokens > probe_tokens else None  # spread evenly

    def take(values: Mapping[int, np.ndarray], o: int) -> np.ndarray:
        flat = np.asarray(values[o]).reshape(-1, blocks[o].hidden_size)
        return (flat if rows is None else flat[rows]).astype(np.float64)

    # F_t(x_a) - h_t for every (a, t) a span needs, each evaluated once (pairs a = t - 1 are already known)
    error: dict[tuple[int, int], np.ndarray] = {(z - 1, z): take(pairs, z) - take(hs, z) for z in pairs}
    needed: dict[int, list[int]] = {}
    for a, z in spans:
        for t in range(a + 1, z + 1):
            if (a, t) not in error and a not in needed.setdefault(t, []):
                needed[t].append(a)
    for t, sources in needed.items():
        h_t = take(hs, t)
        outputs = probe(blocks[t], np.concatenate([take(xs, a) for a in sources])).astype(np.float64)
        for k, a in enumerate(sources):
            error[a, t] = outputs[k * len(h_t):(k + 1) * len(h_t)] - h_t

    def energy(v: np.ndarray) -> float:
        return float(np.einsum("td,td->t", v, v).mean())

    costs = []
    for a, z in spans:
        delta = sum(error[a, t] for t in range(a + 1, z + 1))
        pair = energy(error[z - 1, z])
        sensitivity = pair_change[z] / pair if pair > 0 else None
        out_z = take(xs, z) + take(hs, z)
        costs.append(CandidateCost(a, z, None if sensitivity is None else sensitivity * energy(delta),
                                   energy(delta) / max(energy(out_z), 1e-30), sensitivity))
    return costs
