"""The independent reference for what the passes do to a transformers Llama model: the model itself, with chosen
attention modules returning zeros (attention dropped) and chosen FFN groups reading their group's input (the
parallel form x_a + sum_t FFN_t(n_t(x_a)) of FFN fusion), computed by transformers in torch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def dropped_and_parallel(model, dropped=(), groups=()):
    """Within the block, `model` runs with the attention of layers `dropped` returning zeros and, for each FFN
    group (a, z) (FFN ordinal = layer here), the FFNs of layers a..z reading x_a, the input of FFN a: the residual
    stream then carries x_a + sum_t FFN_t(n_t(x_a)) out of layer z, the parallel form."""
    layers = model.model.layers
    saved = []

    def patch(module, forward):
        saved.append((module, module.forward))
        module.forward = forward

    for i in dropped:
        attn = layers[i].self_attn
        patch(attn, lambda *a, _f=attn.forward, **k: (lambda out: (torch.zeros_like(out[0]), *out[1:]))(_f(*a, **k)))
    for a, z in groups:
        group_input = {}
        first = layers[a].post_attention_layernorm
        patch(first, lambda x, _f=first.forward, _s=group_input: (_s.__setitem__("x", x), _f(x))[1])
        for t in range(a + 1, z + 1):
            norm = layers[t].post_attention_layernorm
            patch(norm, lambda x, _f=norm.forward, _s=group_input: _f(_s["x"]))
    try:
        yield
    finally:
        for module, forward in reversed(saved):
            module.forward = forward


def reference_logits(model, ids: np.ndarray, dropped=(), groups=()) -> np.ndarray:
    with torch.no_grad(), dropped_and_parallel(model, dropped, groups):
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.double().numpy()
