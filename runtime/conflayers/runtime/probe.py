"""Timing on this machine the three costs a drafting policy depends on: a 1-token full step, a
verify pass of the widest step the policy table allows, and one draft step (body + head).

Each is the median of a few interleaved runs (so noise hits all three alike) on a scratch KV cache
at the context length the profile was measured at: a few full steps in all, well under a second
for models that decode at interactive speed. The verify widths in between follow the shape of
the profile's compiled verify curve, rescaled to the two widths measured here.
"""
from __future__ import annotations

from typing import Callable

from .drafter import LayerSkipDrafter
from .modelspec import ModelSpec
from .ort_backend import GraphRunner, KVCache
from .policy import MachineCosts
from .timing import time_jobs


def measure(full: GraphRunner, drafter: LayerSkipDrafter, spec: ModelSpec, width: int, context: int,
            compiled_verify_cost: Callable[[int], float], device: str = "cpu", reps: int = 3) -> MachineCosts:
    """MachineCosts for verify widths 1..width (width >= 2) and the drafter's step, measured at
    `context` tokens of (zero) past."""
    cache = KVCache(spec, context + width + 1, device)
    verify, draft = full.bind(cache), drafter.stepper(cache)
    token = min(10, spec.vocab_size - 1)
    ms = time_jobs({"step": lambda: verify.run([token], context),
                    "wide": lambda: verify.run([token] * width, context),
                    "draft": lambda: draft(token, context)}, reps)
    step, wide, draft_ms = ms["step"], ms["wide"], ms["draft"]
    # the compiled curve's shape, scaled so that it passes through both measured widths
    ratio = max(wide / step, 1.0)
    compiled = [compiled_verify_cost(n) for n in range(1, width + 1)]
    span = compiled[-1] - compiled[0]
    shape = [(c - compiled[0]) / span if span > 1e-9 else (n / (width - 1)) for n, c in enumerate(compiled)]
    return MachineCosts(tuple(step * (1.0 + (ratio - 1.0) * s) for s in shape), draft_ms)
