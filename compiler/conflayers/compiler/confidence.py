"""Per-layer confidence (ConfLayers): how decided each block's output is.

For a module output h (the attention or MLP output that the layer adds to the residual stream),
confidence = 1 - H(softmax(h)) / log(d), the entropy taken over the hidden dimension d and
averaged over the last W tokens of a real context (prompt + the model's own greedy continuation).
A layer's confidence is its attention confidence plus its MLP confidence. Low confidence marks a
layer whose contribution is diffuse: a candidate to skip.
"""
from __future__ import annotations

import math

import numpy as np

from .arch import architecture_for


def module_confidence(h) -> float:
    """h: [tokens, d] torch tensor -> mean normalised-entropy confidence."""
    import torch
    h = h.float()
    logp = torch.log_softmax(h, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return float((1.0 - entropy / math.log(h.shape[-1])).mean())


def decoder_layers(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(dec, "layers", None)
    if layers is None:
        from .arch import UnsupportedArchitecture
        raise UnsupportedArchitecture(f"cannot locate the decoder layers of {type(model).__name__}")
    return layers


def layer_confidences(model, model_type: str, contexts: list[list[int]], window: int):
    """Confidences per context: returns (attention [n_ctx, L], mlp [n_ctx, L]) numpy arrays."""
    import torch
    arch = architecture_for(model_type)
    layers = decoder_layers(model)
    captured = {}

    def hook(key):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[key] = out[0, -window:].detach()
        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(arch.attn_output_module).register_forward_hook(hook(("attn", i))))
        handles.append(layer.get_submodule(arch.mlp_output_module).register_forward_hook(hook(("mlp", i))))
    attn = np.zeros((len(contexts), len(layers)))
    mlp = np.zeros((len(contexts), len(layers)))
    try:
        with torch.no_grad():
            for c, ids in enumerate(contexts):
                if len(ids) < window:
                    raise ValueError(f"calibration context {c} has {len(ids)} tokens, fewer than the "
                                     f"confidence window W={window}; lower --context-window or raise "
                                     "--max-new-tokens")
                captured.clear()
                model(torch.tensor([ids]), use_cache=False)
                for i in range(len(layers)):
                    attn[c, i] = module_confidence(captured[("attn", i)])
                    mlp[c, i] = module_confidence(captured[("mlp", i)])
    finally:
        for h in handles:
            h.remove()
    return attn, mlp
