"""Draft cascades: a cheaper draft proposes for a stronger one, which proposes for the target.

The shape of ML-SpecQD (arXiv 2503.13565): the top stage (the draft that proposes for the target)
does not draft token by token. It runs speculative decoding itself against the stage below it:
the lower stage proposes a few tokens, the top stage scores them all in one pass over the shared
KV cache and keeps the agreed prefix plus its own next token (as the target's verify does), and
this repeats until the top stage has its k tokens or its confidence stop ends the draft. Those
tokens go to the target's verify like any draft's. Only the target's verify decides what is kept,
so the output is the target's whatever the stages propose.

Sampling: the top stage checks the lower stage's tokens with the speculative rejection rule, so
its tokens are distributed exactly as its own sampling would draw them; their draft distributions
q, handed to the target's verify, are the top stage's (over the full vocabulary).

KV cache: every stage writes the shared cache at the positions it is fed (past cache.length: scratch
that the next pass over those positions rewrites). The top stage's check pass rewrites what the
lower stage wrote, the target's verify what the top stage wrote. A lower stage may keep attention
only in layers the top stage keeps (profile.py checks it): a position the top stage decides on
without the lower stage having fed it (its own next token after a fully accepted proposal) then
has every KV row the lower stage reads.

A cascade keeps its compiled policy: the engine's per-machine adaptation (policy.py) times single
draft steps, which is not what a cascade spends (`model` is None, as for an n-gram drafter).
"""
from __future__ import annotations

import numpy as np

from .drafter import Budget, DraftJob, DraftPass, LayerSkipDrafter
from .sampling import Sampler, softmax_max


class CascadeDrafter:
    """A lower drafter (a LayerSkipDrafter, or a cascade of them) proposing for the top stage;
    shared by all requests, bind() makes a request's."""
    model = None                  # nothing for the engine to time or adapt (module docstring)

    def __init__(self, lower: "LayerSkipDrafter | CascadeDrafter", top: LayerSkipDrafter):
        self.lower, self.top = lower, top

    @classmethod
    def of(cls, stages: list[LayerSkipDrafter]) -> "CascadeDrafter":
        """A cascade of model drafts, cheapest first; the last proposes for the target."""
        if len(stages) < 2:
            raise ValueError("a cascade needs at least two stages")
        drafter = stages[0]
        for stage in stages[1:]:
            drafter = cls(drafter, stage)
        return drafter

    @property
    def policy(self):
        return self.top.policy

    @property
    def stages(self) -> list[LayerSkipDrafter]:
        lower = self.lower.stages if isinstance(self.lower, CascadeDrafter) else [self.lower]
        return lower + [self.top]

    def bind(self, prompt: list[int] | None = None) -> "BoundCascadeDrafter":
        return BoundCascadeDrafter(self, self.lower.bind(prompt))


class BoundCascadeDrafter:
    """A cascade for one request. `stats`: the top stage's check passes (rounds) and the lower
    stage's drafted and accepted tokens in them."""

    def __init__(self, drafter: CascadeDrafter, lower):
        self.drafter, self.lower = drafter, lower
        self.stats = {"rounds": 0, "lower_drafted": 0, "lower_accepted": 0}

    def begin(self, last_token: int, start: int, sampler: Sampler, budget) -> DraftJob:
        k = min(self.drafter.policy.max_tokens, budget.limit, budget.model)
        return CascadeJob(self, last_token, start, sampler, k)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        """The target's verify result concerns the top stage's tokens; the stages' policies are
        fixed (a lower n-gram stage is not supported), so there is nothing to learn here."""


class CascadeJob(DraftJob):
    """Rounds of: the lower stage's proposal (its own passes), then the top stage's check pass over
    [token] + those tokens, keeping the agreed prefix + the top stage's own next token, until the
    top stage has k tokens or its confidence stop ends the draft."""

    def __init__(self, bound: BoundCascadeDrafter, last_token: int, start: int, sampler: Sampler, k: int):
        super().__init__([], None if sampler.greedy else [], "model")
        self.bound, self.sampler, self.k = bound, sampler, k
        self.tok, self.start = last_token, start
        self.low = None            # the lower stage's job of this round
        self.checking = False      # the pass last named is the top stage's check
        self.done = k <= 0

    def next_pass(self) -> DraftPass | None:
        if self.done:
            return None
        if self.low is None:     # a new round; the check pass adds the top stage's own token
            room = self.k - len(self.tokens) - 1
            self.low = self.bound.lower.begin(self.tok, self.start + len(self.tokens), self.sampler,
                                              Budget(room, room, False))
        p = self.low.next_pass()
        self.checking = p is None
        if p is not None:
            return p
        top = self.bound.drafter.top             # the lower stage's tokens are in: the check pass
        return DraftPass(top.body, top.head, [self.tok] + self.low.tokens, self.start + len(self.tokens))

    def take(self, z: np.ndarray) -> None:
        if not self.checking:                    # rows of the lower stage's own pass
            self.low.take(z)
            return
        low, low_q = self.low.tokens, self.low.probs
        new, q, accepted, more = check(self.bound.drafter.top, low, low_q, z, self.sampler)
        stats = self.bound.stats
        stats["rounds"] += 1
        stats["lower_drafted"] += len(low)
        stats["lower_accepted"] += accepted
        self.tokens += new
        if self.probs is not None:
            self.probs += q
        self.tok, self.low = new[-1], None
        self.done = not more or len(self.tokens) >= self.k


def check(top: LayerSkipDrafter, low: list[int], low_q, z: np.ndarray, sampler: Sampler):
    """The top stage's scores z over [token] + low: (its tokens: the agreed prefix of low + its own
    next one, cut after a token below its confidence stop; their distributions (sampling); how
    many of low it kept; whether drafting goes on)."""
    ids, stop = top.vocab_ids, top.policy.confidence_stop
    if sampler.greedy:
        picks = np.argmax(z, axis=-1)
        preds = picks if ids is None else ids[picks]
        n = 0
        while n < len(low) and low[n] == preds[n]:
            n += 1
        new, q = low[:n] + [int(preds[n])], None
        conf = [softmax_max(z[j])[1] for j in range(n + 1)] if stop is not None else None
    else:
        p_sub = sampler.probs(z)
        p = p_sub if ids is None else _spread(p_sub, ids, top.vocab_size)
        n, nxt = sampler.verify_probs(low, low_q, p)
        new, q = low[:n] + [nxt], list(p[:n + 1])
        conf = p_sub[:n + 1].max(axis=-1)
    if stop is not None:
        below = [j for j, c in enumerate(conf) if c < stop]
        if below:
            cut = below[0] + 1
            return new[:cut], (None if q is None else q[:cut]), n, False
    return new, q, n, True


def _spread(p_sub: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Distributions over a head's vocabulary subset -> over the full vocabulary."""
    p = np.zeros((p_sub.shape[0], vocab_size))
    p[:, ids] = p_sub
    return p
