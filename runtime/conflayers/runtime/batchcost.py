"""Speculation vs batch size: what the batched passes cost on this machine, and at each batch size
the draft length (if any) whose predicted tokens/s beats batched plain decoding.

The single-request cost model (policy.py) prices a verify of w tokens for one sequence; under
batching the question is what a pass over n sequences costs, which a CPU answers very differently
(the matrix products stop being memory-bound as rows grow, and each sequence has its own
attention node). So the batched engine measures it, once when it starts, through its packed graphs
themselves: a full pass over n sequences of 1 row and of `width` rows each, and one draft position
over n sequences (draft body + head), for a few sizes n up to max_batch (the fastest of 5 runs:
whatever else runs on the machine only adds time). Costs in between are
interpolated (linearly in n, and in rows per sequence; past `width` extrapolated linearly).

A step in which n sequences draft at most k tokens, d on average, and keep a of them yields
n * (a + 1) tokens in draft_step_ms + full(n, d + 1) ms; plain batched decoding yields n tokens
per full(n, 1) ms. The draft passes of a step run while any sequence still drafts: alone that is
d passes, in a batch nearly k (draft_step_ms models each sequence stopping after each token with
a fixed probability, which gives its mean d). d and a per draft length come from the profile's
policy table (calibration replays) or, without one, its validation figures. With other sequences
in the batch, drafting must be predicted MARGIN faster than plain: the prediction leaves out the
scheduler's per-step work, and measured at 2-8 streams it was up to ~10% optimistic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .speculation import speedup_over_plain
from .timing import time_jobs, write_batched_past

MARGIN = 0.10            # predicted gain a batch of 2 or more needs before it drafts (see above)


@dataclass(frozen=True)
class BatchCosts:
    """Pass times in ms measured through the packed graphs: full[i] = (a pass over sizes[i]
    sequences of one row each, of `width` rows each); draft[name][i] one draft position over
    sizes[i] sequences for profile `name`'s draft (body + head)."""
    sizes: tuple
    width: int
    full: tuple
    draft: dict

    def full_ms(self, n: float, rows: float) -> float:
        """A full pass over n sequences of `rows` rows each."""
        one = np.interp(n, self.sizes, [f[0] for f in self.full])
        wide = np.interp(n, self.sizes, [f[1] for f in self.full])
        return float(one + (wide - one) * (rows - 1) / max(self.width - 1, 1))

    def draft_ms(self, name: str, n: float) -> float:
        return float(np.interp(n, self.sizes, self.draft[name]))

    def draft_step_ms(self, name: str, n: int, k: int, d: float) -> float:
        """Expected ms of one step's draft passes for n sequences drafting at most k tokens, d on
        average: each goes on past a drafted token with probability q (1 + q + ... + q^(k-1) =
        d); pass j runs when any of them still drafts, over those that do."""
        q = _go_on_probability(d, k)
        total = 0.0
        for j in range(k):
            one = q ** j                      # a sequence drafts a (j+1)-th token
            some = 1.0 - (1.0 - one) ** n     # pass j runs
            if some <= 1e-12:
                break
            total += some * self.draft_ms(name, max(1.0, n * one / some))
        return total


def _go_on_probability(d: float, k: int) -> float:
    """q with 1 + q + ... + q^(k-1) = d (bisection; 0 for d <= 1, 1 for d >= k)."""
    if d <= 1.0:
        return 0.0
    if d >= k:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** j for j in range(k)) < d:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sizes_up_to(max_batch: int) -> tuple:
    """The batch sizes measured: 1, 2, 4, ... and max_batch."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return tuple(out + [max_batch])


def measure(full, drafts: dict, max_batch: int, width: int, context: int, reps: int = 5) -> BatchCosts:
    """BatchCosts through the packed full graph `full` and drafts {profile: (packed body, head
    GraphRunner)} (batching.PackedGraph), at `context` tokens of past in every slot. Writes
    scratch KV at positions 0.. of the slots (write_batched_past, then the timed passes): call it
    before any request is admitted."""
    sizes = sizes_up_to(max_batch)
    token = 10
    write_batched_past(full.cache, context)

    def segments(n, rows):
        return [([token] * rows, context)] * n + [([], context)] * (max_batch - n)

    jobs = {}
    for n in sizes:
        jobs[("full", n, 1)] = lambda n=n: full.run(segments(n, 1), list(range(n)))
        jobs[("full", n, width)] = lambda n=n: full.run(segments(n, width), list(range(n * width)))
        for body, head in drafts.values():              # (body, head) shared by profiles: timed once
            jobs[("draft", id(body), id(head), n)] = (
                lambda n=n, body=body, head=head: head.run_head(body.run(segments(n, 1), list(range(n)))[None]))
    ms = time_jobs(jobs, reps, "min")                   # the least disturbed run: others only add
    full_ms = tuple((ms[("full", n, 1)], ms[("full", n, width)]) for n in sizes)
    draft_ms = {name: tuple(ms[("draft", id(body), id(head), n)] for n in sizes)
                for name, (body, head) in drafts.items()}
    return BatchCosts(sizes, width, full_ms, draft_ms)



def _to_beat(n: int) -> float:
    """The speed-up over batched plain decoding a batch of n must predict: MARGIN from 2 on."""
    return 1 + (MARGIN if n > 1 else 0)


def model_draft_length(rows: list[tuple], costs: BatchCosts, name: str, n: int) -> int | None:
    """Of rows (k, drafted per step, accepted per step), the k with the best predicted tokens/s
    for n sequences drafting with profile `name`'s draft, or None where none beats plain."""
    best, best_sp = None, _to_beat(n)
    for k, d, a in rows:
        sp = speedup_over_plain(a, costs.draft_step_ms(name, n, k, d) + costs.full_ms(n, d + 1), costs.full_ms(n, 1))
        if sp > best_sp * (1 + 1e-9):
            best, best_sp = k, sp
    return best


def proposals_pay(drafted: float, accepted: float, costs: BatchCosts, n: int) -> bool:
    """Whether proposals that cost no draft pass (n-gram lookups), d drafted and a kept per step,
    beat plain decoding for n sequences."""
    return speedup_over_plain(accepted, costs.full_ms(n, drafted + 1), costs.full_ms(n, 1)) > _to_beat(n)
