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

from dataclasses import dataclass

import numpy as np

from .drafter import Drafter
from .sampling import Sampler


@dataclass(frozen=True)
class NGramPolicy:
    n_min: int = 1              # shortest match used
    n_max: int = 3              # longest match tried first
    max_tokens: int = 8         # longest proposal
    min_match: int = 2          # hybrid: shorter matches are left to the model draft

    def __post_init__(self):
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min} n_max={self.n_max}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_match < 1:
            raise ValueError("min_match must be >= 1")

    def to_json(self) -> dict:
        return {"n_min": self.n_min, "n_max": self.n_max, "max_tokens": self.max_tokens,
                "min_match": self.min_match}

    @classmethod
    def from_json(cls, d: dict) -> "NGramPolicy":
        if not isinstance(d, dict):
            raise ValueError("the n-gram settings must be an object")
        kw = {}
        for k in ("n_min", "n_max", "max_tokens", "min_match"):
            if k in d:
                v = d[k]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{k} must be an integer, got {v!r}")
                kw[k] = v
        unknown = set(d) - {"n_min", "n_max", "max_tokens", "min_match"}
        if unknown:
            raise ValueError(f"unknown n-gram settings {sorted(unknown)}")
        return cls(**kw)


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

    def bind(self, cache, prompt: list[int]) -> "BoundNGramDrafter":
        return BoundNGramDrafter(self.policy, self.vocab_size, prompt)


class BoundNGramDrafter(Drafter):
    """An n-gram drafter over one request's text: the prompt, then each step's last token (given
    to propose) and the drafted tokens the verify kept (given by feedback)."""

    def __init__(self, policy: NGramPolicy, vocab_size: int, prompt: list[int]):
        self.policy, self.vocab_size = policy, vocab_size
        self.index = NGramIndex(policy.n_max, prompt)
        self.last: list[int] = []
        self.in_sync = True

    def observe(self, last_token: int, start: int) -> None:
        """Append the step's last token (at position `start`). A gap (positions decoded without
        this drafter) leaves the text unknown: the drafter then proposes nothing."""
        if len(self.index) != start:
            self.in_sync = False
        if self.in_sync:
            self.index.extend([last_token])
        self.last = []

    def match(self, limit: int) -> tuple[list[int], int]:
        """This step's proposal and the length of its match (call after observe)."""
        if not self.in_sync:
            return [], 0
        p = self.policy
        return self.index.lookup(p.n_min, p.n_max, min(p.max_tokens, limit))

    def kept(self, tokens: list[int]) -> None:
        """This step's proposal (whoever made it) and how the verify ended: see feedback."""
        self.last = tokens

    def propose(self, last_token: int, start: int, sampler: Sampler, limit: int):
        self.observe(last_token, start)
        tokens, _ = self.match(limit)
        self.last = tokens
        return tokens, (None if sampler.greedy else one_hot(tokens, self.vocab_size))

    def feedback(self, drafted: int, accepted: int) -> None:
        if self.in_sync:
            self.index.extend(self.last[:accepted])


class HybridDrafter:
    """Per step the n-gram proposal when its match is at least `policy.min_match` tokens long,
    else the model draft (a LayerSkipDrafter)."""

    def __init__(self, ngram: NGramDrafter, model):
        self.ngram, self.model = ngram, model

    @property
    def policy(self):
        return self.ngram.policy      # always drafts: the n-gram part costs nothing

    def bind(self, cache, prompt: list[int]) -> "BoundHybridDrafter":
        model = self.model.bind(cache) if self.model.policy is not None else None
        return BoundHybridDrafter(self.ngram.bind(cache, prompt), model)


class BoundHybridDrafter(Drafter):
    def __init__(self, ngram: BoundNGramDrafter, model: Drafter | None):
        self.ngram, self.model = ngram, model
        self.steps = {"ngram": 0, "model": 0}

    def propose(self, last_token: int, start: int, sampler: Sampler, limit: int):
        ng = self.ngram
        ng.observe(last_token, start)
        tokens, n = ng.match(limit)
        if tokens and (n >= ng.policy.min_match or self.model is None):
            self.steps["ngram"] += 1
            ng.kept(tokens)
            return tokens, (None if sampler.greedy else one_hot(tokens, ng.vocab_size))
        if self.model is None:
            return [], None if sampler.greedy else []
        self.steps["model"] += 1
        tokens, probs = self.model.propose(last_token, start, sampler, limit)
        ng.kept(tokens)
        return tokens, probs

    def feedback(self, drafted: int, accepted: int) -> None:
        self.ngram.feedback(drafted, accepted)
        if self.model is not None:
            self.model.feedback(drafted, accepted)
