"""N-gram drafting (prompt lookup): propose the tokens that followed the most recent earlier
occurrence of the text's last n tokens, in prompt + output so far. No model, no graphs.

NGramIndex keeps, for every n in 1..n_max, a map from each n-gram to the position right after its
most recent occurrence that has a follower; appending a token updates n_max entries, and a
proposal looks up at most n_max - n_min + 1 keys (O(n_max) per step, whatever the text length).

A proposal is deterministic given the text, so for sampling its draft distribution is a point
mass (one-hot q): speculative rejection then keeps a drafted token d with probability p(d) and on
rejection draws from p without d, which is exactly p.
"""
from __future__ import annotations


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


class NGramDrafter:
    """One profile's n-gram drafter, shared by all requests; bind() makes a request's."""
    model = None                  # no model draft: nothing for the engine to time or adapt

    def __init__(self, policy: NGramPolicy, vocab_size: int):
        self.policy = policy
        self.vocab_size = vocab_size

    def bind(self, prompt: list[int]) -> "BoundNGramDrafter":
        return BoundNGramDrafter(self.policy, self.vocab_size, prompt)


class BoundNGramDrafter:
    """An n-gram drafter over one request's text: the prompt, then each step's last token (given
    to begin, every step, drafting or not: the index follows the text) and the drafted tokens the
    verify kept (given to feedback)."""

    def __init__(self, policy: NGramPolicy, vocab_size: int, prompt: list[int]):
        self.policy, self.vocab_size = policy, vocab_size
        self.index = NGramIndex(policy.n_max, prompt)
        self.in_sync = True

    def observe(self, last_token: int, start: int) -> None:
        """Append the step's last token (at position `start`). A gap (positions decoded without
        this drafter) leaves the text unknown: the drafter then proposes nothing."""
        if len(self.index) != start:
            self.in_sync = False
        if self.in_sync:
            self.index.extend([last_token])

    def match(self, limit: int) -> tuple[list[int], int]:
        """This step's proposal and the length of its match (call after observe)."""
        if not self.in_sync or limit <= 0:
            return [], 0
        p = self.policy
        return self.index.lookup(p.n_min, p.n_max, min(p.max_tokens, limit))

    def begin(self, last_token: int, start: int, sampler: Sampler, budget) -> DraftJob:
        self.observe(last_token, start)
        tokens, _ = self.match(budget.limit) if budget.ngram else ([], 0)
        return fixed(tokens, sampler, self.vocab_size)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        """This step's proposal (whoever made it) and how many of its tokens the target kept."""
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
        tokens, n = ng.match(budget.limit) if budget.ngram else ([], 0)
        if tokens and (n >= ng.policy.min_match or self.model is None or budget.model <= 0):
            self.steps["ngram"] += 1
            return fixed(tokens, sampler, ng.vocab_size)
        if self.model is None or budget.model <= 0:
            return fixed([], sampler, ng.vocab_size)
        self.steps["model"] += 1
        return self.model.begin(last_token, start, sampler, budget)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        self.ngram.feedback(tokens, accepted)
        if self.model is not None:
            self.model.feedback(tokens, accepted)
