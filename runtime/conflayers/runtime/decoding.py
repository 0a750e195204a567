"""One request decoded on its own KV cache, in the caller's thread: the scheduler's loop
(scheduler.py, the one decoding loop) over a single slot. The compiler validates profiles with it
and tools time with it; the engine serves through the same loop.

    for new in generate(full.bind(cache), prompt_ids, 128, Sampler(), drafter=drafter.bind(prompt_ids)):
        ...
"""
from __future__ import annotations

from typing import Iterator

from .ort_backend import BoundGraph
from .sampling import Sampler
from .scheduler import Scheduler, Sequence
from .speculation import DecodeStats, SpeculationGuard  # noqa: F401 (imported from here by callers)


def generate(target: BoundGraph, prompt: list[int], max_new_tokens: int, sampler: Sampler,
             drafter=None, stop_ids: frozenset = frozenset(), guard: SpeculationGuard | None = None,
             stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of each step (1 or more at a time) until max_new_tokens, a stop token
    (included) or the end of the KV cache. `drafter`: a bound drafter (drafter.bind(prompt)) or
    None for plain decoding; `target`: the full graph bound to the request's KV cache."""
    cache = target.cache
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens - 1 > cache.capacity:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {cache.capacity} tokens")
    loop = Scheduler(target.graph, None, cache.capacity, stop_ids, cache=cache)
    loop.full.solo[0] = target        # its passes through the caller's binding (tools wrap it)
    seq = Sequence(list(prompt), sampler, max_new_tokens, drafter=drafter, guard=guard)
    if stats is not None:
        seq.stats = stats
    for new in loop.drive(seq):
        cache.length = seq.length
        yield new
    cache.length = seq.length
