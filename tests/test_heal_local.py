"""Blockwise local distillation (models.heal_local): each fused group's error is the one of the student's layers
against the teacher's sequential layers on the teacher's own stream, and training lowers it on held-out tokens
without touching any layer outside the groups."""
from __future__ import annotations

import torch

from models.fused import drop_and_fuse
from models.heal_local import group_spans, held_out_errors, local_distill
from models.presets import build_preset
from models.sampling import sample_pool
from tests.helpers import random_ids

CPU = torch.device("cpu")
DROP, GROUPS = [1, 8], [(1, 3), (7, 9)]      # puzzle-tiny: FFN ordinals 7-9 are layers 8-10


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def streams(model, ids) -> list[torch.Tensor]:
    """The residual stream before each layer and after the last, layer by layer (independent of the hooks)."""
    x = model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])
    cos, sin = model.rope(positions, x.dtype)
    mask = positions[None, :] > positions[:, None]
    out = [x]
    for layer in model.layers:
        out.append(layer(out[-1], cos, sin, mask))
    return out, (cos, sin, mask)


def test_group_error_is_the_error_of_the_replaced_layers():
    teacher = build_preset("puzzle-tiny")[0]
    student = drop_and_fuse(teacher, DROP, GROUPS)
    spans = group_spans(teacher, GROUPS)
    assert spans == [(1, 3), (8, 10)]
    ids = random_ids(teacher.config.vocab_size, (2, 24))
    errors = held_out_errors(teacher, student, spans, ids, CPU, no_autocast)
    with torch.no_grad():
        stream, rope = streams(teacher, ids)
        for (first, last), error in zip(spans, errors):
            x, y = stream[first], stream[last + 1]
            ys = x
            for i in range(first, last + 1):
                ys = student.layers[i](ys, *rope)
            want = ((ys - y).pow(2).sum() / (y - x).pow(2).sum()).item()
            assert abs(error - want) < 1e-5 * want
            assert 0.05 < want < 1         # fusion changed the block: there is something to learn


def test_local_distillation_lowers_each_group_error():
    teacher = build_preset("puzzle-tiny")[0].requires_grad_(False)
    student = drop_and_fuse(teacher, DROP, GROUPS).train()
    untouched = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith(("layers.1.", "layers.2.",
                 "layers.3.", "layers.8.", "layers.9.", "layers.10."))}
    data = sample_pool(teacher, 64, 64, CPU, 64, 0, no_autocast)
    held_out = random_ids(teacher.config.vocab_size, (4, 64), seed=9)
    record = local_distill(teacher, student, GROUPS, data, held_out, steps=20, batch=8, micro_batch=4,
                           lr_of=lambda step: 1e-3, seed=0, device=CPU, autocast=no_autocast)
    assert [g["layers"] for g in record["groups"]] == [[1, 3], [8, 10]] and record["steps"] == 20
    for group in record["groups"]:
        assert group["error_after"] < 0.8 * group["error_before"], group
    assert record["loss"][1] < record["loss"][0]
    assert held_out_errors(teacher, student, group_spans(teacher, GROUPS), held_out, CPU, no_autocast) == \
        [g["error_after"] for g in record["groups"]]
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in untouched.items())

