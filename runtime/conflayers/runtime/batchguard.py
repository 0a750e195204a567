"""The guard of speculation under batching: drafting in a batch never stays slower than plain
batched decoding, whatever the start-up timings predicted.

The batch planner (batchplan.py) decides from passes timed once at start-up, on a machine whose
speed moves 20-25%, and from acceptance that changes with the requests being served. The guard
measures what its decision gives as served. Per class of batch sizes (2, 3-4, 5-8, 9-16, ...) it
compares the tokens per second of whole steps with drafting allowed against steps it runs without
drafts (probes), taken in turn, so both see the same load, contexts and machine speed:
- drafting on: after every `period` steps of a class, `probe_steps` plain ones. When drafting
  measured slower than they were at `strikes` checks in a row, drafting is off at that class.
- drafting off: after every `period` plain steps, `probe_steps` drafting ones; `strikes` checks
  in a row that measure drafting faster turn it on again. (One lucky check used to: in the load
  bench at 4-16 streams, where drafting was within a few % of plain, the guard switched 18-22
  times, drafting in about half the steps of each class.)
A check that keeps the state doubles `period` (up to `max_period`), so a settled class probes
rarely; a switch starts it again from `min_steps`. Only steps in which every sequence decoded
count (a prompt chunk in the pass would weigh on whichever side it fell). Output never changes:
a plain step's token is the target's own, as a verified draft's is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

_log = logging.getLogger(__name__)


def size_class(n: int) -> int:
    """The class of batch size n: the power of two at or above it (2, 4, 8, 16, ...)."""
    c = 2
    while c < n:
        c *= 2
    return c


@dataclass
class _Class:
    period: int
    on: bool = True
    run: int = 0                    # steps of the current state since the last check
    probe_left: int = 0             # probe steps the current check still waits for
    lost: int = 0                   # checks in a row that measured drafting losing (while on)
    won: int = 0                    # checks in a row that measured drafting winning (while off)
    sums: dict = field(default_factory=lambda: {True: [0, 0.0], False: [0, 0.0]})   # drafting? -> [tokens, s]
    switches: int = 0
    steps: dict = field(default_factory=lambda: {True: 0, False: 0})   # drafting? -> steps, all time


class BatchGuard:
    def __init__(self, min_steps: int = 8, probe_steps: int = 4, max_period: int = 128, strikes: int = 2):
        self.min_steps, self.probe_steps = min_steps, probe_steps
        self.max_period, self.strikes = max_period, strikes
        self._classes: dict[int, _Class] = {}

    def _get(self, n: int) -> _Class:
        c = size_class(n)
        if c not in self._classes:
            self._classes[c] = _Class(self.min_steps)
        return self._classes[c]

    def allows(self, n: int) -> bool:
        """Whether a step over n (>= 2) sequences may draft: the class's state, unless a probe of
        the other one is due."""
        k = self._get(n)
        return k.on != (k.probe_left > 0)

    def record(self, n: int, drafting: bool, tokens: int, seconds: float):
        """A step over n decoding sequences (none prefilling) that ran with drafting allowed or
        not (what allows() said) and gave `tokens` in `seconds`."""
        if n < 2 or seconds <= 0:
            return
        k = self._get(n)
        k.steps[drafting] += 1
        k.sums[drafting][0] += tokens
        k.sums[drafting][1] += seconds
        if k.probe_left and drafting != k.on:
            k.probe_left -= 1
            if not k.probe_left:
                self._check(n, k)
        elif not k.probe_left:
            k.run += 1
            if k.run >= k.period:
                k.probe_left = self.probe_steps

    def _check(self, n: int, k: _Class):
        (dt, ds), (pt, ps) = k.sums[True], k.sums[False]
        ratio = (dt / ds) / (pt / ps) if ds > 0 and ps > 0 and pt > 0 else 1.0
        switch = False
        if k.on and ratio < 1.0:
            k.lost += 1
            switch = k.lost >= self.strikes
        elif not k.on and ratio > 1.0:
            k.won += 1
            switch = k.won >= self.strikes
        else:
            k.lost = k.won = 0
        if switch:
            k.on, k.lost, k.won, k.period, k.switches = not k.on, 0, 0, self.min_steps, k.switches + 1
            c = size_class(n)
            _log.info("batch guard: drafting %s at batch %d-%d (measured %.2fx plain batched decoding)",
                      "on" if k.on else "off", c // 2 + 1, c, ratio)
        elif not (k.lost or k.won):         # a strike pending: check again as soon
            k.period = min(2 * k.period, self.max_period)
        k.run, k.sums = 0, {True: [0, 0.0], False: [0, 0.0]}

    def paused(self) -> list[int]:
        """The classes (their largest batch size) where drafting is off now."""
        return sorted(c for c, k in self._classes.items() if not k.on)

    def steps(self, n: int) -> tuple[int, int]:
        """(steps with drafting allowed, plain steps) recorded at n's class."""
        k = self._classes.get(size_class(n))
        return (k.steps[True], k.steps[False]) if k is not None else (0, 0)

    def switches(self) -> int:
        """How many times drafting went off or on again, all classes together."""
        return sum(k.switches for k in self._classes.values())
