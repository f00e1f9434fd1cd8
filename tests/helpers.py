"""Small helpers every test module may use: a relative error, seeded token ids, an onnxruntime CPU session."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def rel_err(actual, expected) -> float:
    """max|a - b| / max|b|, in float64 (torch tensors and numpy arrays alike)."""
    a = np.asarray(actual.detach().double() if hasattr(actual, "detach") else actual, np.float64)
    b = np.asarray(expected.detach().double() if hasattr(expected, "detach") else expected, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_ids(vocab: int, shape: tuple[int, int] = (2, 24), seed: int = 0):
    """Seeded token ids in [0, vocab) as a torch int64 tensor."""
    import torch
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def session(path: Path):
    """An onnxruntime CPU session over a model file."""
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
