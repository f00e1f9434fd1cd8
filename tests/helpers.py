"""Small helpers every test module may use: a relative error, seeded token ids, an onnxruntime CPU session, the
check that a model loaded with its weights in place is the model onnx.load gives."""
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


def assert_parsed_alike(whole, in_place) -> None:
    """Two LoadedModels of one file (load_model, load_model(weights_in_place=True)): every initializer's name and
    values alike (whether inline or in place), and everything but the initializers identical."""
    import onnx

    from passes.support.onnx_io import tensor_array
    for a, b in zip(whole.proto.graph.initializer, in_place.proto.graph.initializer, strict=True):
        assert a.name == b.name and a.dims == b.dims and a.data_type == b.data_type
        np.testing.assert_array_equal(tensor_array(b, in_place.base_dir), tensor_array(a, whole.base_dir))
    rest = [onnx.ModelProto(), onnx.ModelProto()]
    for proto, model in zip(rest, (whole, in_place)):
        proto.CopyFrom(model.proto)
        del proto.graph.initializer[:]
    assert rest[0] == rest[1]
