"""Blockwise local distillation of the fused groups (`python -m models.heal ... --local-steps N`), before the global
KL: each fused block learns to reproduce the teacher's sequential layers it replaces, on the teacher's own
activations (as Puzzle's blockwise local distillation and NVIDIA ModelOpt's distillation of replaced blocks do).

A fused group a-z (FFN ordinals) spans layers first..last: `first` holds FFN a, `last` holds FFN z (and, in the
student, the fused FFN). On a batch, x = the teacher's residual stream entering layer `first` and y = its stream
after layer `last` (the sequential FFNs and any attention the student dropped there); the student's layers
first..last (the first one's attention if kept, the fused FFN) run on the same x and give y_s:
    error_g = |y_s - y|^2 / |y - x|^2        (sums over the batch: the error relative to what the layers add)
Groups read the teacher's activations, not each other's output, so they train at once, independently, on
sum_g error_g: AdamW (betas 0.9, 0.95) over the groups' layers only, at the learning rate lr_of(step). Each group's
error on the held-out evaluation tokens is reported before and after.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from models.decoder import PuzzleDecoder
from models.fused import ffn_layers
from models.heal_dist import Ranks, all_sum, global_ratio, my_rows


def group_spans(teacher: PuzzleDecoder, groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, last) layers of each fused group of FFN ordinals (a, z)."""
    where = ffn_layers(teacher.config)
    return [(where[a], where[z]) for a, z in groups]


@torch.no_grad()
def teacher_spans(teacher: PuzzleDecoder, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[tuple]:
    """For each span: ((x, cos, sin, mask) entering layer first, y after layer last) of the teacher on `ids`."""
    inputs, outputs = {}, {}
    hooks = [teacher.layers[first].register_forward_pre_hook(lambda _m, args, i=first: inputs.__setitem__(i, args))
             for first, _ in spans]
    hooks += [teacher.layers[last].register_forward_hook(lambda _m, _a, out, i=last: outputs.__setitem__(i, out))
              for _, last in spans]
    try:
        teacher(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [(inputs[first], outputs[last]) for first, last in spans]


def span_output(student: PuzzleDecoder, span: tuple[int, int], inputs: tuple) -> torch.Tensor:
    """The student's layers first..last on the teacher's (x, cos, sin, mask)."""
    x, cos, sin, mask = inputs
    for i in range(span[0], span[1] + 1):
        x = student.layers[i](x, cos, sin, mask)
    return x


def span_sums(student, spans, activations) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(|y_s - y|^2, |y - x|^2) summed over the batch, in float32, for each span."""
    sums = []
    for span, (inputs, y) in zip(spans, activations):
        y, x = y.float(), inputs[0].float()
        sums.append(((span_output(student, span, inputs).float() - y).pow(2).sum(), (y - x).pow(2).sum()))
    return sums


@torch.no_grad()
def held_out_errors(teacher, student, spans, eval_ids, device, autocast) -> list[float]:
    """error_g of each span on the held-out rows (every process computes the same)."""
    with autocast():
        sums = span_sums(student, spans, teacher_spans(teacher, eval_ids.to(device), spans))
    return [(num / den).item() for num, den in sums]


def local_distill(teacher, student, groups, data, eval_ids, *, steps: int, batch: int, micro_batch: int | None,
                  lr_of, seed: int, device, autocast, ranks: Ranks = Ranks()) -> dict:
    """Train the student's fused groups for `steps` steps of `batch` rows of `data` (its own shuffled order, from
    `seed`; this process's slice, in micro-batches); returns the record: steps, seconds, per group the layers and
    the held-out error before and after, and the first and last batch loss (sum over groups)."""
    from tqdm import tqdm
    spans = group_spans(teacher, groups)
    layers = [student.layers[i].to(device).train() for first, last in spans for i in range(first, last + 1)]
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr_of(0), betas=(0.9, 0.95), weight_decay=0.0)
    before = held_out_errors(teacher, student, spans, eval_ids, device, autocast)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))
    losses, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="local distillation", unit="step", disable=None if ranks.main else True):
        rows = my_rows(data[order.roll(-step * batch)[:batch]], ranks)
        for group in optimizer.param_groups:
            group["lr"] = lr_of(step)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for part in rows.split(micro_batch or len(rows)):
            with autocast():
                sums = span_sums(student, spans, teacher_spans(teacher, part.to(device), spans))
                loss = sum(global_ratio(num, den) for num, den in sums) * (len(part) / len(rows))
            loss.backward()
            total += loss.detach()
        if ranks.world > 1:
            for p in params:                           # the mean over processes, as FSDP takes it
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= ranks.world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(all_sum(total).item() / ranks.world)
    after = held_out_errors(teacher, student, spans, eval_ids, device, autocast)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "loss": [losses[0], losses[-1]],
            "groups": [{"group": list(g), "layers": list(s), "error_before": b, "error_after": a}
                       for g, s, b, a in zip(groups, spans, before, after)]}
