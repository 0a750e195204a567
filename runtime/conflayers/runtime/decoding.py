"""The one decoding loop: plain decoding, or speculative decoding with a drafter.

Shape after gpt-fast's generate.py: prefill, then repeat { draft k tokens, verify them in one
full-graph pass, keep the agreed prefix plus the full model's own next token, roll back the
rest }. Plain decoding is the same loop with no drafter. The compiler validates profiles with
this loop, the runtime serves with it.

Acceptance statistics have one set of names everywhere (DecodeStats, the engine's metrics, the
compiler's search results, the bench): draft_steps, drafted_tokens, accepted_tokens,
acceptance_rate, mean_accepted_tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .drafter import Drafter
from .ort_backend import BoundGraph
from .sampling import Sampler


@dataclass
class DecodeStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: int = 0
    full_passes: int = 0            # full-graph passes after the prefill
    draft_steps: int = 0            # speculative iterations (draft + verify)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accept_lengths: list = field(default_factory=list)
    guard_stopped_at: int | None = None   # tokens generated when the guard turned drafting off

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Mean drafted tokens kept per speculative step."""
        return self.accepted_tokens / self.draft_steps if self.draft_steps else 0.0


class SpeculationGuard:
    """Turns drafting off for the rest of a request once it is measured to cost time.

    Speculative throughput is measured directly (tokens per second of draft + verify). The plain
    step it competes with is estimated from the same verify passes: a verify of n tokens costs
    verify_cost(n) plain steps on this hardware (the profile's cost model)."""

    def __init__(self, verify_cost: Callable[[int], float], min_steps: int = 8, tolerance: float = 0.03):
        self.verify_cost = verify_cost
        self.min_steps = min_steps
        self.tolerance = tolerance
        self.active = True
        self._tokens = 0
        self._spec_s = 0.0
        self._plain_s = 0.0
        self._steps = 0

    def record(self, produced: int, drafted: int, draft_s: float, verify_s: float):
        self._steps += 1
        self._tokens += produced
        self._spec_s += draft_s + verify_s
        self._plain_s += verify_s / self.verify_cost(drafted + 1)
        if self._steps >= self.min_steps:
            spec_rate = self._tokens / self._spec_s
            plain_rate = self._steps / self._plain_s
            if spec_rate < plain_rate * (1.0 - self.tolerance):
                self.active = False


def draft_and_verify(target: BoundGraph, drafter: Drafter, token: int, sampler: Sampler, limit: int,
                     stats: DecodeStats, guard: SpeculationGuard | None = None) -> list[int]:
    """One speculative step after `token` (not yet in the cache): the drafter proposes at most
    `limit` tokens, one full-graph pass scores them, the agreed prefix is kept. Returns the kept
    drafts plus the full model's own next token; the caller advances the cache over them."""
    start = target.cache.length
    t1 = time.perf_counter()
    drafted, q = drafter.propose(token, start, sampler, limit)
    t2 = time.perf_counter()
    logits = target.run([token] + drafted, start)
    n, nxt = sampler.verify(drafted, q, logits)
    t3 = time.perf_counter()
    drafter.feedback(len(drafted), n)
    stats.draft_steps += 1
    stats.drafted_tokens += len(drafted)
    stats.accepted_tokens += n
    stats.accept_lengths.append(n)
    if guard is not None:
        guard.record(n + 1, len(drafted), t2 - t1, t3 - t2)
    return drafted[:n] + [nxt]


def prefill(target: BoundGraph, prompt: list[int], start: int = 0) -> np.ndarray:
    """Feed prompt[start:] into the cache (in pieces that stop at the full graph's verify
    boundaries, so every row is computed as a one-token step would) and return the last row's
    logits; the cache's length is then len(prompt)."""
    cache = target.cache
    while True:
        n = len(prompt) - start
        room = target.graph.pass_room(start)
        if room is not None:
            n = min(n, max(room, 1))
        end = start + n
        logits = target.run(prompt[start:end], start, logits_from=n - 1)
        cache.length = start = end
        if end == len(prompt):
            return logits


def generate(target: BoundGraph, prompt: list[int], max_new_tokens: int, sampler: Sampler,
             drafter: Drafter | None = None, stop_ids: frozenset = frozenset(),
             guard: SpeculationGuard | None = None, stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of each iteration (1 or more at a time) until max_new_tokens, a stop
    token (included) or the end of the KV cache. A draft never carries a verify pass past one of
    the full graph's verify boundaries (GraphRunner.verify_room)."""
    stats = stats if stats is not None else DecodeStats()
    cache = target.cache
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens - 1 > cache.capacity:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {cache.capacity} tokens")
    t0 = time.perf_counter()
    logits = prefill(target, prompt)
    token = sampler.pick(logits[-1])
    stats.prefill_s = time.perf_counter() - t0
    stats.tokens = 1
    yield [token]
    if token in stop_ids:
        return
    t_decode = time.perf_counter()
    while stats.tokens < max_new_tokens:
        remaining = max_new_tokens - stats.tokens
        # Drafts beyond remaining - 1 could never be returned: the verify pass adds one token.
        limit = remaining - 1
        room = target.graph.verify_room(cache.length)
        if room is not None:
            limit = min(limit, room)
        if drafter is not None and limit > 0 and (guard is None or guard.active):
            new = draft_and_verify(target, drafter, token, sampler, limit, stats, guard)
            if guard is not None and not guard.active:
                stats.guard_stopped_at = stats.tokens + len(new)
        else:
            logits = target.run([token], cache.length)
            new = [sampler.pick(logits[-1])]
        stats.full_passes += 1
        # The fed token and the kept drafts are now valid cache positions; the last one is fed next time.
        cache.length += len(new)
        for j, t in enumerate(new):
            if t in stop_ids:
                new = new[: j + 1]
                break
        new = new[:remaining]
        stats.tokens += len(new)
        stats.decode_s = time.perf_counter() - t_decode
        yield new
        if new[-1] in stop_ids:
            return
        token = new[-1]
