"""N-gram drafting (prompt lookup): propose the tokens that followed the most recent earlier
occurrence of the text's last n tokens, in prompt + output so far. No model, no graphs.

NGramIndex keeps, for every n in 1..n_max, a map from each n-gram to the position right after its
most recent occurrence that has a follower; appending a token updates n_max entries, and a
proposal looks up at most n_max - n_min + 1 keys (O(n_max) per step, whatever the text length).

A proposal is deterministic given the text, so for sampling its draft distribution is a point
mass (one-hot q): speculative rejection then keeps a drafted token d with probability p(d) and on
rejection draws from p without d, which is exactly p.

How much of a match to propose depends on the machine: a verify pass of k + 1 tokens costs
~1.05x a step on an fp32 target but 3x at k = 8 on a 4-bit one on an AVX2 CPU (the int8
arithmetic of its extra rows), where the default 8-token proposals of a long-prompt task lost
(0.85x). Each proposal is therefore cut to the length k that maximizes expected tokens per unit
of verify cost, (1 + a + ... + a^k) / verify_cost(k + 1), with `a` the per-token acceptance so
far of the request's proposals from matches of the same length (MatchAcceptance: a 3-token
match is kept more often than a 1-token one, and one rate for all had let failed short matches
cut the long ones) and verify_cost the full graph's
curve measured on this machine (the engine sets NGramDrafter.verify_cost; None: the whole match,
as before). The curve is a sequence's alone; in a batch an extra row delays every sequence, so
proposals should be shorter still, and the batch planner decides whether they pay at all. A
request proposes the same under batching as alone. Output is unchanged whatever the length:
only what is proposed changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .draftplan import NGramPolicy  # noqa: F401 (imported from here too)
from .drafter import DraftJob
from .sampling import Sampler


class NGramIndex:
    """A token sequence with an index from n-gram (n <= n_max) to the position after its most
    recent occurrence that is followed by a token."""

    def __init__(self, n_max: int, tokens=()):
        self.n_max = n_max
        self.tokens: list[int] = []
        self.follow: list[dict] = [dict() for _ in range(n_max + 1)]   # follow[n][ngram] -> position
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        seq = self.tokens
        for t in tokens:
            i = len(seq)             # t's position: every n-gram ending at i - 1 is followed by it
            for n in range(1, min(self.n_max, i) + 1):
                self.follow[n][tuple(seq[i - n:i])] = i
            seq.append(int(t))

    def lookup(self, n_min: int, n_max: int, max_tokens: int) -> tuple[list[int], int]:
        """(the tokens that followed the most recent earlier occurrence of the last n tokens, n)
        for the longest n in n_max..n_min that matches; ([], 0) when none does."""
        seq = self.tokens
        for n in range(min(n_max, self.n_max, len(seq)), n_min - 1, -1):
            pos = self.follow[n].get(tuple(seq[len(seq) - n:]))
            if pos is not None:
                return seq[pos:pos + max_tokens], n
        return [], 0


def one_hot(tokens: list[int], vocab_size: int) -> list[np.ndarray]:
    """Point-mass draft distributions of deterministic proposals."""
    out = []
    for t in tokens:
        q = np.zeros(vocab_size)
        q[t] = 1.0
        out.append(q)
    return out


@dataclass
class AcceptanceEstimate:
    """Per-token acceptance of one request's n-gram proposals. A proposal's tokens are checked in
    order until one is rejected, so a step tried `accepted` tokens, plus one if it stopped at a
    rejection. Starts at `prior` over `weight` tries (a new request knows nothing of its text)."""
    prior: float = 0.5
    weight: float = 4.0
    accepted: int = 0
    tries: int = 0

    def update(self, proposed: int, accepted: int) -> None:
        self.accepted += accepted
        self.tries += accepted + (1 if accepted < proposed else 0)

    @property
    def rate(self) -> float:
        return (self.accepted + self.prior * self.weight) / (self.tries + self.weight)


class MatchAcceptance:
    """A request's AcceptanceEstimate per match length n (each from the prior until its own
    proposals are verified), and the totals over all of them."""

    def __init__(self):
        self.by_match: dict[int, AcceptanceEstimate] = {}

    def rate(self, n: int) -> float:
        return (self.by_match.get(n) or AcceptanceEstimate()).rate

    def update(self, n: int, proposed: int, accepted: int) -> None:
        self.by_match.setdefault(n, AcceptanceEstimate()).update(proposed, accepted)

    @property
    def accepted(self) -> int:
        return sum(e.accepted for e in self.by_match.values())

    @property
    def tries(self) -> int:
        return sum(e.tries for e in self.by_match.values())


def proposal_length(available: int, rate: float, verify_cost: Callable[[int], float]) -> int:
    """The k <= available that maximizes expected tokens per verify pass over its cost,
    (1 + rate + ... + rate^k) / verify_cost(k + 1); 0 when a plain step (1 / verify_cost(1))
    pays more than any proposal."""
    best_k, best = 0, 1.0 / verify_cost(1)
    expected = term = 1.0
    for k in range(1, available + 1):
        term *= rate
        expected += term
        value = expected / verify_cost(k + 1)
        if value > best:
            best_k, best = k, value
    return best_k


class NGramDrafter:
    """One profile's n-gram drafter, shared by all requests; bind() makes a request's.
    `verify_cost(n)`: a full-graph pass over n tokens in plain steps on this machine, set by the
    engine when it adapts the profile (None: proposals are not cut)."""
    model = None                  # no model draft: nothing for the engine to time or adapt

    def __init__(self, policy: NGramPolicy, vocab_size: int):
        self.policy = policy
        self.vocab_size = vocab_size
        self.verify_cost: Callable[[int], float] | None = None

    def bind(self, prompt: list[int]) -> "BoundNGramDrafter":
        return BoundNGramDrafter(self.policy, self.vocab_size, prompt, self.verify_cost)


class BoundNGramDrafter:
    """An n-gram drafter over one request's text: the prompt, then each step's last token (given
    to begin, every step, drafting or not: the index follows the text) and the drafted tokens the
    verify kept (given to feedback)."""

    def __init__(self, policy: NGramPolicy, vocab_size: int, prompt: list[int],
                 verify_cost: Callable[[int], float] | None = None):
        self.policy, self.vocab_size = policy, vocab_size
        self.index = NGramIndex(policy.n_max, prompt)
        self.in_sync = True
        self.verify_cost = verify_cost
        self.acceptance = MatchAcceptance()
        self._proposed = 0            # tokens of this step's proposal, when it is an n-gram one
        self._matched = 0             # the length of its match

    def observe(self, last_token: int, start: int) -> None:
        """Append the step's last token (at position `start`). A gap (positions decoded without
        this drafter) leaves the text unknown: the drafter then proposes nothing."""
        if len(self.index) != start:
            self.in_sync = False
        if self.in_sync:
            self.index.extend([last_token])

    def match(self, budget) -> tuple[list[int], int]:
        """This step's proposal and the length of its match (call after observe): the looked-up
        tokens, cut to the length that pays on this machine's verify curve (module docstring)."""
        if not self.in_sync or budget.limit <= 0 or not budget.ngram:
            return [], 0
        p = self.policy
        tokens, n = self.index.lookup(p.n_min, p.n_max, min(p.max_tokens, budget.limit))
        if tokens and self.verify_cost is not None:
            tokens = tokens[:proposal_length(len(tokens), self.acceptance.rate(n), self.verify_cost)]
        self._matched = n
        return tokens, n

    def proposing(self, tokens: list[int]) -> list[int]:
        """Record that this step proposes these looked-up tokens (feedback then counts them)."""
        self._proposed = len(tokens)
        return tokens

    def begin(self, last_token: int, start: int, sampler: Sampler, budget) -> DraftJob:
        self.observe(last_token, start)
        tokens, _ = self.match(budget)
        return fixed(self.proposing(tokens), sampler, self.vocab_size)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        """This step's proposal (whoever made it) and how many of its tokens the target kept."""
        if self._proposed:
            self.acceptance.update(self._matched, self._proposed, min(accepted, self._proposed))
            self._proposed = 0
        if self.in_sync:
            self.index.extend(tokens[:accepted])


def fixed(tokens: list[int], sampler: Sampler, vocab_size: int) -> DraftJob:
    """A finished proposal of deterministic tokens (point-mass draft distributions)."""
    return DraftJob(list(tokens), None if sampler.greedy else one_hot(tokens, vocab_size))


class HybridDrafter:
    """Per step the n-gram proposal when its match is at least `policy.min_match` tokens long,
    else the model draft (a LayerSkipDrafter)."""

    def __init__(self, ngram: NGramDrafter, model):
        self.ngram, self.model = ngram, model

    @property
    def policy(self):
        return self.ngram.policy      # always drafts: the n-gram part costs nothing

    def bind(self, prompt: list[int]) -> "BoundHybridDrafter":
        model = self.model.bind(prompt) if self.model.policy is not None else None
        return BoundHybridDrafter(self.ngram.bind(prompt), model)


class BoundHybridDrafter:
    def __init__(self, ngram: BoundNGramDrafter, model):
        self.ngram, self.model = ngram, model
        self.steps = {"ngram": 0, "model": 0}

    def begin(self, last_token: int, start: int, sampler: Sampler, budget) -> DraftJob:
        ng = self.ngram
        ng.observe(last_token, start)
        tokens, n = ng.match(budget)
        if tokens and (n >= ng.policy.min_match or self.model is None or budget.model <= 0):
            self.steps["ngram"] += 1
            return fixed(ng.proposing(tokens), sampler, ng.vocab_size)
        if self.model is None or budget.model <= 0:
            return fixed([], sampler, ng.vocab_size)
        self.steps["model"] += 1
        return self.model.begin(last_token, start, sampler, budget)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        self.ngram.feedback(tokens, accepted)
        if self.model is not None:
            self.model.feedback(tokens, accepted)
