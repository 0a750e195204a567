"""Timing on this machine the three costs a drafting policy depends on: a 1-token full step, a
verify pass of the widest step the policy table allows, and one draft step (body + head); and,
for n-gram drafting (no draft step), the verify curve alone (verify_curve).

Each is the median of a few interleaved runs (so noise hits all three alike) on a scratch KV cache
at the context length the profile was measured at: a few full steps in all, well under a second
for models that decode at interactive speed. The verify widths in between follow the shape of
the profile's compiled verify curve, rescaled to the two widths measured here.

The scratch cache's past positions are filled first (on the CPU): a calloc'd cache maps every
page to the kernel's one zero page, so attention would read its keys and values from L1 and a
long-context step would look cheaper than it is (SmolLM2 native at 4k positions: 8.8 ms measured
that way against 20.6 over a written cache).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .drafter import LayerSkipDrafter
from .modelspec import ModelSpec
from .ort_backend import GraphRunner, KVCache
from .policy import MachineCosts
from .timing import time_jobs, write_past


def measure(full: GraphRunner, drafter: LayerSkipDrafter, spec: ModelSpec, width: int, context: int,
            compiled_verify_cost: Callable[[int], float], device: str = "cpu", reps: int = 3) -> MachineCosts:
    """MachineCosts for verify widths 1..width (width >= 2) and the drafter's step, measured at
    `context` tokens of past."""
    cache = scratch_cache(spec, context, width, device, full.kv_dtype)
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


def verify_curve(full: GraphRunner, spec: ModelSpec, width: int, context: int, device: str = "cpu",
                 reps: int = 3) -> MachineCosts:
    """MachineCosts (no draft: draft_ms 0) for verify widths 1..width, timed at 1, 2, 4 and
    `width` tokens (interpolated between): what an n-gram proposal's length is chosen from. A
    4-bit target's curve bends (on an AVX2 EPYC 1.17x a step at 2 tokens, 1.62x at 4, 3.0x at
    9), so two points would misjudge the short proposals that pay there."""
    cache = scratch_cache(spec, context, width, device, full.kv_dtype)
    verify = full.bind(cache)
    token = min(10, spec.vocab_size - 1)
    widths = sorted({w for w in (1, 2, 4, width) if w <= width})
    ms = time_jobs({w: (lambda w=w: verify.run([token] * w, context)) for w in widths}, reps)
    timed = np.maximum.accumulate([ms[w] for w in widths])   # noise aside, a wider pass never costs less
    curve = np.interp(np.arange(1, width + 1), widths, timed)
    return MachineCosts(tuple(float(v) for v in curve), 0.0)


def scratch_cache(spec: ModelSpec, context: int, width: int, device: str, dtype=np.float32) -> KVCache:
    """A KV cache for timings at `context` tokens of past, those positions written."""
    cache = KVCache(spec, context + width + 1, device, dtype)
    write_past(cache, context)
    return cache
