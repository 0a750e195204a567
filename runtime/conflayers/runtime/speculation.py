"""What a request's decoding keeps count of, and the guard that stops speculation that costs time.

Acceptance statistics have one set of names everywhere (DecodeStats, the engine's metrics, the
compiler's search results, the bench): draft_steps, drafted_tokens, accepted_tokens,
acceptance_rate, mean_accepted_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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
    prompt_reused: int = 0          # prompt tokens whose KV a slot kept from an earlier request

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Mean drafted tokens kept per speculative step."""
        return self.accepted_tokens / self.draft_steps if self.draft_steps else 0.0


def speedup_over_plain(accepted_per_step: float, spec_step_ms: float, plain_step_ms: float) -> float:
    """The one formula of what speculation is worth, used by the compiler's searches, the runtime's
    policy and the batch planner alike: a speculative step (its draft passes and one verify pass,
    spec_step_ms) yields the drafted tokens it keeps plus the verify's own token, where plain
    decoding yields one token per plain_step_ms. For a batch of n sequences both sides carry n."""
    return (accepted_per_step + 1.0) * plain_step_ms / spec_step_ms if spec_step_ms > 0 else 0.0


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
