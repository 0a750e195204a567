"""The torch reference a draft graph must match: the Hugging Face model with the draft plan's
attention and MLP blocks removed, reading the full model's KV cache for the prefix.

Used by the parity tests and tools/check_parity.py, so both check against one definition.
"""
from __future__ import annotations

import contextlib

import numpy as np


def _stubs():
    import torch

    class NoAttention(torch.nn.Module):
        """A skipped attention block: contributes exactly nothing to the residual stream."""
        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states), None

    class NoMLP(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states)

    return NoAttention, NoMLP


@contextlib.contextmanager
def skipping(model, plan, sandwich: bool):
    """Temporarily remove the plan's attention/MLP blocks from the HF model. A removed block adds
    exact zeros (x + 0 == x); for Gemma the post-attention / post-feedforward norms belong to the
    removed block and are replaced too (Identity on those zeros)."""
    import torch
    no_attention, no_mlp = _stubs()
    saved = []

    def swap(module, attr, new):
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, new)

    for i, layer in enumerate(model.model.layers):
        if not plan.keeps_attention(i):
            swap(layer, "self_attn", no_attention())
            if sandwich:
                swap(layer, "post_attention_layernorm", torch.nn.Identity())
        if not plan.keeps_mlp(i):
            swap(layer, "mlp", no_mlp())
            if sandwich:
                swap(layer, "post_feedforward_layernorm", torch.nn.Identity())
    try:
        yield model
    finally:
        for module, attr, old in reversed(saved):
            setattr(module, attr, old)


def draft_reference(model, plan, sandwich: bool, ids, prefix: int, steps: int) -> np.ndarray:
    """Logits the draft should give for ids[prefix + j] (j < steps), fed one token at a time: the
    prefix's KV comes from the FULL model, the new positions' KV (kept layers) from the draft."""
    import torch
    from transformers import DynamicCache
    ids = np.asarray(ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor(ids[None, :prefix]), cache=cache, use_cache=True)
        out = []
        with skipping(model, plan, sandwich):
            for j in range(steps):
                p = prefix + j
                r = model(torch.tensor(ids[None, p:p + 1]), cache=cache, use_cache=True,
                          position_ids=torch.tensor([[p]]))
                out.append(r.logits[0, -1].float().numpy())
    return np.stack(out)
