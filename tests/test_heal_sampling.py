"""Teacher sampling (models.sampling): the static-KV-cache decoder against PuzzleDecoder's own forward and its
concatenating KV cache, the same tokens from the same seed, chunks that do not depend on how the pool is cut."""
from __future__ import annotations

import pytest
import torch

from models.presets import build_preset
from models.sampling import CachedDecoder, StaticDecoder, sample_pool
from tests.helpers import random_ids, rel_err

CPU = torch.device("cpu")


def no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("preset", ["puzzle-tiny", "puzzle-small"])   # attention-free layers, per-layer KV heads
def test_static_decoder_gives_the_prefill_logits(preset):
    model = build_preset(preset)[0]
    ids = random_ids(model.config.vocab_size, (3, 20))
    static, cached = StaticDecoder(model, 3, 20, CPU, graph=False), CachedDecoder(model, 3, CPU)
    with torch.no_grad():
        full = model(ids)
        for t in range(20):
            want = full[:, t]
            assert rel_err(static.step(ids[:, t:t + 1], t), want) < 1e-5, t
            assert rel_err(cached.step(ids[:, t:t + 1], t), want) < 1e-5, t


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_static_and_cached_sample_the_same_tokens(temperature):
    model = build_preset("puzzle-tiny")[0]
    cached = sample_pool(model, 10, 24, CPU, 4, 3, no_autocast, temperature=temperature, static=False)
    static = sample_pool(model, 10, 24, CPU, 4, 3, no_autocast, temperature=temperature)
    assert cached.shape == (10, 24) and cached.dtype == torch.int64
    assert torch.equal(cached, static)
    assert len({tuple(row.tolist()) for row in static}) == 10 and static.max() < model.config.vocab_size


def test_pool_chunks_do_not_depend_on_the_pool_size():
    """Chunk c always draws from the same generator: a smaller pool is a prefix of a larger one (so processes
    that sample chunks r, r + N, ... make the pool one process makes)."""
    model = build_preset("puzzle-tiny")[0]
    big = sample_pool(model, 12, 16, CPU, 4, 5, no_autocast)
    assert torch.equal(sample_pool(model, 8, 16, CPU, 4, 5, no_autocast), big[:8])
    assert not torch.equal(sample_pool(model, 8, 16, CPU, 4, 6, no_autocast), big[:8])     # the seed matters
    first = torch.randint(0, model.config.vocab_size, (4, 1), generator=torch.Generator().manual_seed(5 * 1_000_003 + 1))
    assert torch.equal(big[4:8, :1], first)          # chunk 1's first tokens: its generator's first draw
