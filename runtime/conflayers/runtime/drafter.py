"""Drafters: cheap proposers of the next few tokens (the candidate generators).

The scheduler (scheduler.py, the one decoding loop) knows a drafter only through two calls per
step, as transformers' CandidateGenerator and llama.cpp's common/speculative.cpp do: `begin` makes
this step's proposal, `feedback` tells how many of its tokens the target kept. A proposal is a
DraftJob the scheduler drives: `next_pass` names the draft pass it needs (a draft body and head
over some tokens at some position), the scheduler runs it, batched with the other sequences'
passes over the same graphs, and hands the rows back to `take`, until `next_pass` says None; then
`tokens` (and with sampling `probs`, the draft distributions over the full vocabulary) are the
proposal. An n-gram proposal needs no pass at all.

Every drafter kind has bind(prompt) -> a per-request bound drafter (its own state: an n-gram
index, step counters); the shared one holds the sessions. ngram.py has prompt lookup and the
hybrid of n-gram and model drafts, cascade.py draft cascades.

A LayerSkipDrafter is a subgraph of the full model (its kept layers, maybe quantized) plus a head
that scores the full vocabulary or a frequent-token subset. It reads and writes the full model's
KV cache for its kept layers, so it needs no prefill of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .draftplan import DraftPolicy  # noqa: F401 (a draft's policy; imported from here too)
from .ort_backend import GraphRunner, KVCache
from .sampling import Sampler, softmax_max


@dataclass(frozen=True)
class Budget:
    """What one step's proposal may take: `limit` tokens in all (the request's room and the verify
    boundaries), at most `model` of them from a model draft (0: none; the batch planner lowers it
    as the batch grows), n-gram proposals only if `ngram`."""
    limit: int
    model: int
    ngram: bool = True

    @classmethod
    def alone(cls, limit: int) -> "Budget":
        """A sequence decoding alone: its drafter's own policy decides."""
        return cls(limit, limit, True)


NOTHING = Budget(0, 0, False)


@dataclass(frozen=True)
class DraftPass:
    """One draft pass a proposal needs: `tokens` fed to `body` at positions start.., then `head`
    over the rows it returns."""
    body: GraphRunner
    head: GraphRunner
    tokens: list
    start: int


@dataclass
class DraftJob:
    """A proposal being made; the base class is a finished one (no pass needed: an n-gram
    proposal). `kind`: "ngram" or "model" (what the batch planner counts it as)."""
    tokens: list = field(default_factory=list)
    probs: list | None = None
    kind: str = "ngram"

    def next_pass(self) -> DraftPass | None:
        return None

    def take(self, z: np.ndarray) -> None:
        """The head's scores [len(pass.tokens), head vocabulary] of the pass next_pass named."""
        raise RuntimeError("this proposal needs no draft pass")


class Drafter(Protocol):
    """What the scheduler asks of a request's bound drafter, each step."""

    def begin(self, last_token: int, start: int, sampler: Sampler, budget: Budget) -> DraftJob:
        """This step's proposal after last_token (not yet in the cache, at position `start`)."""
        ...

    def feedback(self, tokens: list[int], accepted: int) -> None:
        """After the verify: the proposal's tokens and how many of them the target kept."""
        ...


def propose(drafter: Drafter, last_token: int, start: int, sampler: Sampler, limit: int,
            cache: KVCache | None = None) -> tuple[list[int], list | None]:
    """A bound drafter's proposal after `last_token` (at position `start`) as it would make it
    alone, its draft passes run directly on `cache` (no scheduler; tests and tools): (tokens,
    draft distributions or None when greedy)."""
    job = drafter.begin(last_token, start, sampler, Budget.alone(limit))
    bound = {}
    while (p := job.next_pass()) is not None:
        if id(p.body) not in bound:
            bound[id(p.body)] = p.body.bind(cache)
        hidden = bound[id(p.body)].run(p.tokens, p.start)
        job.take(p.head.run_head(hidden[None])[0])
    return job.tokens, job.probs


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

    def bind(self, prompt: list[int] | None = None) -> "BoundDrafter":
        return BoundDrafter(self)

    def stepper(self, cache: KVCache):
        """One draft step on `cache` as a function (token, position) -> scores over the head's
        vocabulary (what probe.py and the GPU check time)."""
        body = self.body.bind(cache)

        def step(token: int, position: int) -> np.ndarray:
            return self.head.run_head(body.run([token], position)[None])[0, -1]
        return step


class BoundDrafter:
    """A LayerSkipDrafter for one request. Its policy is fixed, so feedback is a no-op."""

    def __init__(self, drafter: LayerSkipDrafter):
        self.drafter = drafter

    def begin(self, last_token: int, start: int, sampler: Sampler, budget: Budget) -> DraftJob:
        k = min(self.drafter.policy.max_tokens, budget.limit, budget.model)
        return ModelJob(self.drafter, last_token, start, sampler, k)

    def feedback(self, tokens: list[int], accepted: int) -> None:
        pass


class ModelJob(DraftJob):
    """Token-by-token drafting with a LayerSkipDrafter: up to k tokens, stopping after one whose
    confidence is below the policy's stop."""

    def __init__(self, drafter: LayerSkipDrafter, last_token: int, start: int, sampler: Sampler, k: int):
        super().__init__([], None if sampler.greedy else [], "model")
        self.drafter, self.sampler, self.k = drafter, sampler, k
        self.last, self.start = last_token, start
        self.done = k <= 0

    def next_pass(self) -> DraftPass | None:
        if self.done:
            return None
        return DraftPass(self.drafter.body, self.drafter.head, [self.last], self.start + len(self.tokens))

    def take(self, z: np.ndarray) -> None:
        tok, q, more = draft_token(self.drafter, z[-1], self.sampler)
        self.tokens.append(tok)
        if q is not None:
            self.probs.append(q)
        self.last = tok
        self.done = not more or len(self.tokens) >= self.k


def draft_token(drafter: LayerSkipDrafter, z: np.ndarray, sampler: Sampler):
    """One drafted token from the draft's scores z over its head's vocabulary: (token, its draft
    distribution over the full vocabulary or None when greedy, whether drafting goes on under the
    confidence stop)."""
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
