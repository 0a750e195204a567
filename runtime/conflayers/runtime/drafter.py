"""Drafters: cheap proposers of the next few tokens (the candidate generators).

The decoding loop knows drafters only through the Drafter protocol (propose, then feedback after
each verify), so other drafters plug into the same loop: ngram.py has prompt lookup (n-gram) and
the hybrid of n-gram and model drafts. Every drafter kind has bind(cache, prompt) -> a Drafter.

A LayerSkipDrafter is a subgraph of the full model (its kept layers, maybe quantized) plus a
head that scores the full vocabulary or a frequent-token subset. It reads and writes the full
model's KV cache for its kept layers, so it needs no prefill of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ort_backend import BoundGraph, GraphRunner, KVCache
from .sampling import Sampler, softmax_max


@dataclass(frozen=True)
class DraftPolicy:
    max_tokens: int = 5                       # k: most tokens drafted per step
    confidence_stop: float | None = None      # stop drafting after a token whose top-1 prob is below

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.confidence_stop is not None and not 0.0 <= self.confidence_stop < 1.0:
            raise ValueError("confidence_stop must be in [0, 1)")


class Drafter:
    """What the decoding loop asks of a drafter for one request (bound to its KV cache).

    The drafter owns its policy: how many tokens to propose (never more than `limit`, the tokens
    the request may still take) and when to stop early."""

    def propose(self, last_token: int, start: int, sampler: Sampler, limit: int) \
            -> tuple[list[int], list[np.ndarray] | None]:
        """Tokens to follow last_token (which sits at position `start`), and with a sampling
        sampler their draft distributions over the full vocabulary (None when greedy)."""
        raise NotImplementedError

    def feedback(self, drafted: int, accepted: int) -> None:
        """After each verify: how many of the drafted tokens the full model kept."""


class LayerSkipDrafter:
    """The sessions of one profile's draft, shared by all requests; bind() makes a request's.

    `policy` starts as the profile's compiled one; the engine may replace it once with the policy
    chosen for this machine (policy.py), or None when no drafting pays here (then the engine
    decodes plainly and never binds it)."""

    def __init__(self, body: GraphRunner, head: GraphRunner, vocab_ids: np.ndarray | None,
                 vocab_size: int, policy: DraftPolicy | None):
        self.body, self.head = body, head
        self.vocab_ids = None if vocab_ids is None else np.asarray(vocab_ids, np.int64)
        self.vocab_size = vocab_size
        self.policy = policy

    @property
    def model(self) -> "LayerSkipDrafter":
        """The model draft whose policy the engine adapts (a hybrid drafter has one too)."""
        return self

    def bind(self, cache: KVCache, prompt: list[int] | None = None) -> "BoundDrafter":
        return BoundDrafter(self, self.body.bind(cache))


class BoundDrafter(Drafter):
    """A LayerSkipDrafter on one request's KV cache. Its policy is fixed, so feedback is a no-op."""

    def __init__(self, drafter: LayerSkipDrafter, body: BoundGraph):
        self.drafter = drafter
        self.body = body

    def logits(self, token: int, position: int) -> np.ndarray:
        """Draft scores for the token after `token` at `position` (over the head's vocabulary)."""
        hidden = self.body.run([token], position)
        return self.drafter.head.run_head(hidden[None])[0, -1]

    def propose(self, last_token: int, start: int, sampler: Sampler, limit: int):
        policy = self.drafter.policy
        tokens, probs = [], ([] if not sampler.greedy else None)
        tok = last_token
        for j in range(min(policy.max_tokens, limit)):
            tok, q, more = draft_token(self.drafter, self.logits(tok, start + j), sampler)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if not more:
                break
        return tokens, probs


def draft_token(drafter: LayerSkipDrafter, z: np.ndarray, sampler: Sampler):
    """One drafted token from the draft's scores z over its head's vocabulary: (token, its draft
    distribution over the full vocabulary or None when greedy, whether drafting goes on under the
    confidence stop). Shared by the single-request and the batched loops."""
    stop, ids = drafter.policy.confidence_stop, drafter.vocab_ids
    q = None
    if sampler.greedy:
        if stop is None:
            idx, conf = int(np.argmax(z)), 1.0
        else:
            idx, conf = softmax_max(z)
    else:
        q_sub = sampler.probs(z)
        idx = sampler.draw(q_sub)
        conf = float(q_sub.max())
        if ids is None:
            q = q_sub
        else:
            q = np.zeros(drafter.vocab_size)
            q[ids] = q_sub
    tok = int(idx if ids is None else ids[idx])
    return tok, q, stop is None or conf >= stop
