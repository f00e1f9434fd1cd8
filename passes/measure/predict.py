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

What it costs: the base run is shared with passes.measure.metrics, and one run from z to the output per group
end. The energies are taken on `probe_tokens` tokens spread evenly over the calibration tokens (probe_rows),
each F_t(x_a) once. With the segment-major execution (the default) F_z(x_{z-1}) is block z's contribution in
the removal run of block z - 1, and each other F_t(x_a) a run of block t alone on x_a (block t - 1 handed x_a and
no contribution), in the model's own arithmetic; with the suffix execution both come from numpy (float32, the
blocks' weights read again: FFNProbe). The report's cost counts all of it.
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
from passes.support.onnx_io import LoadedModel, initializer_map, tensor_nbytes

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
        self.bytes_read = 0    # weight bytes read, for the cost report

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
        self.bytes_read += sum(tensor_nbytes(w.tensors[name]) for name in {block.gate.name, block.up.name, block.down.name})
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


def probe_rows(tokens: int, probe_tokens: int = PROBE_TOKENS) -> np.ndarray:
    """The token rows (of the flattened [tokens, d]) the predictions use: all, or probe_tokens spread evenly."""
    return np.linspace(0, tokens - 1, probe_tokens).round().astype(int) if tokens > probe_tokens else np.arange(tokens)


def forward_needed(spans: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """t -> the sources a of every F_t(x_a) the spans need besides the pairs (z-1, z) of their ends, each once."""
    ends = set(group_ends(spans))
    needed: dict[int, list[int]] = {}
    for a, z in spans:
        for t in range(a + 1, z + 1):
            if not (a == t - 1 and t in ends) and a not in needed.setdefault(t, []):
                needed[t].append(a)
    return {t: sources for t, sources in needed.items() if sources}


def probe_forward(needed: Mapping[int, Sequence[int]], blocks: Sequence[FFNBlock], x_rows: Mapping[int, np.ndarray],
                  probe: FFNProbe) -> dict[tuple[int, int], np.ndarray]:
    """F_t(x_a) on the probe rows for every (a, t) of `needed` (forward_needed), one numpy call per block t with
    every source stacked."""
    forward = {}
    for t, sources in needed.items():
        outputs = probe(blocks[t], np.concatenate([x_rows[a] for a in sources]))
        for k, part in enumerate(np.split(outputs, len(sources))):
            forward[sources[k], t] = part
    return forward


def predict_costs(spans: Sequence[tuple[int, int]], x_rows: Mapping[int, np.ndarray], h_rows: Mapping[int, np.ndarray],
                  forward: Mapping[tuple[int, int], np.ndarray], pair_change: Mapping[int, float]) -> list[CandidateCost]:
    """predicted_cost of every span (see the module docstring) from x_t, h_t and F_t(x_a) on the probe rows
    ([rows, d] each; forward[a, t] = F_t(x_a) for every a < t <= z of every span) and each end's measured
    change of its pair."""
    def rows(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, np.float64)

    def energy(v: np.ndarray) -> float:
        return float(np.einsum("td,td->t", v, v).mean())

    error = {(a, t): rows(forward[a, t]) - rows(h_rows[t]) for a, z in spans for t in range(a + 1, z + 1)}
    costs = []
    for a, z in spans:
        delta = sum(error[a, t] for t in range(a + 1, z + 1))
        pair = energy(error[z - 1, z])
        sensitivity = pair_change[z] / pair if pair > 0 else None
        out_z = rows(x_rows[z]) + rows(h_rows[z])
        costs.append(CandidateCost(a, z, None if sensitivity is None else sensitivity * energy(delta),
                                   energy(delta) / max(energy(out_z), 1e-30), sensitivity))
    return costs
