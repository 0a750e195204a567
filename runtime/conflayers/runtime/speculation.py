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

    It compares the request's own steps: those that drafted (tokens per second of draft +
    verify) against those that did not (plain steps: the drafter proposed nothing, e.g. no n-gram
    match, or the guard asked for them), both near the same context length. At each check it
    needs `probe_steps` plain steps since the last one; when the drafter gave fewer, it asks for
    the rest (drafting() is False until they ran), and they produce the request's tokens like any
    step, so a probe wastes nothing. A plain step estimated from the verify passes through a cost
    model measured at one length (verify_cost(n) plain steps) comes out too slow at long
    contexts, where a verify grows faster than a step: that estimate only turns a draft off early,
    at the first check, when even it says the draft loses; keeping a draft rests on measured plain
    steps. Checks come after min_steps drafting steps, then after twice as many each time (at most
    `max_period`). One noisy probe must not end a draft that pays: drafting stops after `strikes`
    checks in a row that measured it losing (the next check then comes as soon as the first)."""

    def __init__(self, verify_cost: Callable[[int], float], min_steps: int = 8, tolerance: float = 0.03,
                 probe_steps: int = 4, max_period: int = 64, strikes: int = 2):
        self.verify_cost = verify_cost
        self.min_steps = min_steps
        self.tolerance = tolerance
        self.probe_steps = probe_steps
        self.max_period = max_period
        self.strikes = strikes
        self.active = True
        self._period = min_steps       # drafting steps until the next check
        self._probe_left = 0           # plain steps the current check still waits for
        self._checks = 0
        self._lost = 0                 # checks in a row that measured drafting losing
        self._reset()

    def _reset(self):
        self._steps = self._tokens = 0
        self._spec_s = self._est_plain_s = 0.0
        self._plain_n, self._plain_s = 0, 0.0

    def drafting(self) -> bool:
        """Whether the next step may draft: not once turned off, nor while a check waits for plain steps."""
        return self.active and self._probe_left == 0

    def record(self, produced: int, drafted: int, draft_s: float, verify_s: float):
        """A step that verified `drafted` draft tokens (0: a plain step) and gave `produced` tokens
        in draft_s + verify_s seconds."""
        if not self.active:
            return
        if drafted == 0:
            self.record_plain(draft_s + verify_s)
            return
        self._steps += 1
        self._tokens += produced
        self._spec_s += draft_s + verify_s
        self._est_plain_s += verify_s / self.verify_cost(drafted + 1)
        if self._steps < self._period or self._probe_left:
            return
        if self._checks == 0 and self._loses(self._steps / self._est_plain_s):
            self.active = False
            return
        self._probe_left = max(self.probe_steps - self._plain_n, 0)
        if not self._probe_left:
            self._check()

    def record_plain(self, seconds: float | None):
        """A step without drafts that took `seconds` (None: not timed alone, e.g. in a batch)."""
        if not self.active:
            return
        if seconds is not None:
            self._plain_n += 1
            self._plain_s += seconds
        if self._probe_left:
            self._probe_left -= 1
            if not self._probe_left:
                self._check()

    def _check(self):
        self._checks += 1
        if self._plain_n and self._plain_s > 0 and self._loses(self._plain_n / self._plain_s):
            self._lost += 1
            if self._lost >= self.strikes:
                self.active = False
                return
        else:
            self._lost = 0
            self._period = min(2 * self._period, self.max_period)
        self._reset()

    def _loses(self, plain_rate: float) -> bool:
        return self._spec_s > 0 and self._tokens / self._spec_s < plain_rate * (1.0 - self.tolerance)
