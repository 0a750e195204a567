"""Speculation under batching: per profile and batch size, how far a greedy request drafts.

Batching and speculation both spend spare compute; on a CPU the batch soon uses it all. With n
sequences in the batch (decoding or still prefilling), a greedy request drafts with its profile's
model draft only as far as draft_length(profile, n) says (the draft length whose predicted
tokens/s beats batched plain decoding most, or none), and takes n-gram proposals only where
ngram_proposes(profile, n): predictions from what the batched passes cost on this machine
(batchcost.py, measured through the scheduler's packed graphs before any request), and for
n-gram proposals from their acceptance as served (proposal_rate). Alone (n = 1) a request drafts
as its drafter's policy for this machine says. A seeded sampled request always drafts as alone
(the scheduler does not ask the planner for it), so it reproduces its solo sample. What these
decisions give as served is measured by the batch guard (batchguard.py), which turns drafting off
at batch sizes where it runs slower than plain batched decoding.
"""
from __future__ import annotations

from . import batchcost
from .batchguard import BatchGuard
from .cascade import CascadeDrafter
from .drafter import LayerSkipDrafter
from .ngram import HybridDrafter, NGramDrafter

OBSERVE_AFTER = 64          # verified n-gram proposals before their served rate replaces the figures


class BatchPlanner:
    """Decisions for an engine's profiles (engine: drafters, bundle, adapt_policy, capacity).
    `spec_max_batch`: draft while fewer than that many sequences decode (tests; None: from the
    measured costs)."""

    def __init__(self, engine, max_batch: int, spec_max_batch: int | None = None):
        self.engine, self.max_batch, self.spec_max_batch = engine, int(max_batch), spec_max_batch
        self.costs: batchcost.BatchCosts | None = None
        self._decisions: dict[tuple, int | bool | None] = {}
        self._proposals: dict[str, tuple[int, int, int]] = {}    # profile -> n-gram (steps, drafted, kept)
        # an override (tests) is followed as given; else what the decisions give is measured
        self.guard = BatchGuard() if spec_max_batch is None else None

    def drafting_allowed(self, batch: int) -> bool:
        """Whether a step over `batch` sequences may draft at all (the batch guard; alone: yes)."""
        return batch < 2 or self.guard is None or self.guard.allows(batch)

    def observe_step(self, batch: int, drafting: bool, tokens: int, seconds: float):
        """A step over `batch` decoding sequences, none prefilling, run with drafting allowed or
        not, that gave `tokens` in `seconds` (what the batch guard learns from)."""
        if self.guard is not None:
            self.guard.record(batch, drafting, tokens, seconds)

    def measure(self, scheduler) -> None:
        """BatchCosts at the widest step any profile may take, through the scheduler's packed
        graphs (batchcost.measure); call before any request is admitted."""
        if self.spec_max_batch is not None or not self.engine.drafters:
            return
        widths, drafts = [2], {}
        for name, drafter in self.engine.drafters.items():
            profile, model, ngram = self.engine.bundle.profiles[name], batched_draft(drafter), ngram_part(drafter)
            if model is not None:
                drafts[name] = (scheduler.packed(model.body), model.head)
                if model.policy is not None:
                    widths.append(model.policy.max_tokens + 1)
            widths += [r.k + 1 for r in profile.policy_table or []]
            if ngram is not None:
                widths.append(ngram.policy.max_tokens + 1)
        width = min(max(widths), 16)
        context = max(1, min(128, self.engine.capacity - width - 2))
        self.costs = batchcost.measure(scheduler.full, drafts, self.max_batch, width, context)

    def draft_length(self, name: str, batch: int) -> int | None:
        """How many tokens profile `name`'s model draft drafts at most when `batch` sequences
        decode (None: none)."""
        model = batched_draft(self.engine.drafters[name])
        policy = model.policy if model is not None else None
        if policy is None:
            return None
        if self.spec_max_batch is not None:
            return policy.max_tokens if batch < self.spec_max_batch else None
        if batch <= 1:
            return policy.max_tokens          # alone: the engine's own choice for this machine
        key = (name, "model", batch)
        if key not in self._decisions:
            rows = model_rows(self.engine.bundle.profiles[name], policy)
            # nothing to predict from: draft only when decoding alone
            self._decisions[key] = batchcost.model_draft_length(rows, self.costs, name, batch) \
                if rows and self.costs is not None else None
        return self._decisions[key]

    def ngram_proposes(self, name: str, batch: int) -> bool:
        """Whether profile `name`'s n-gram proposals are taken when `batch` sequences decode."""
        if self.spec_max_batch is not None:
            return batch < self.spec_max_batch
        key = (name, "ngram", batch)
        if key not in self._decisions:
            rate = self.proposal_rate(name)
            if rate is not None and self.costs is not None:
                self._decisions[key] = batchcost.proposals_pay(*rate, self.costs, batch)
            else:
                self._decisions[key] = batch < 2
        return self._decisions[key]

    def proposal_rate(self, name: str) -> tuple[float, float] | None:
        """(drafted, accepted) per n-gram proposal of profile `name`: as served here once
        OBSERVE_AFTER proposals were verified, else the profile's validation figures (a hybrid's
        mix its n-gram and model steps, so they are only a first guess)."""
        steps, drafted, accepted = self._proposals.get(name, (0, 0, 0))
        if steps >= OBSERVE_AFTER:
            return drafted / steps, accepted / steps
        return figures_rate(self.engine.bundle.profiles[name])

    def observe_proposal(self, name: str, drafted: int, accepted: int):
        """Count a verified n-gram proposal; the decisions follow the served rate, revised at
        OBSERVE_AFTER proposals and each doubling after."""
        steps, d, a = self._proposals.get(name, (0, 0, 0))
        steps += 1
        self._proposals[name] = (steps, d + drafted, a + accepted)
        if steps >= OBSERVE_AFTER and steps & (steps - 1) == 0:
            for key in [k for k in list(self._decisions) if k[0] == name and k[1] == "ngram"]:
                del self._decisions[key]

    def spec_batch_limit(self, name: str, kind: str = "model") -> int:
        """The smallest batch at which profile `name` stops drafting with its model draft (kind
        "model") or taking n-gram proposals (kind "ngram"); max_batch + 1 when it never does."""
        for n in range(1, self.max_batch + 1):
            if not (self.draft_length(name, n) if kind == "model" else self.ngram_proposes(name, n)):
                return n
        return self.max_batch + 1

    def speculation_plan(self) -> dict[str, str]:
        """Per drafting profile, what a greedy request drafts at each batch size, in words (the
        server prints it at start-up)."""
        out = {}
        for name, drafter in sorted(self.engine.drafters.items()):
            if self.engine.adapt_policy(name) is None:
                out[name] = "plain decoding (no drafting pays on this machine)"
                continue
            parts = []
            if batched_draft(drafter) is not None:
                ks = [self.draft_length(name, n) for n in range(1, self.max_batch + 1)]
                parts.append("model draft k " + ",".join(str(k) if k else "-" for k in ks))
            if ngram_part(drafter) is not None:
                on = [self.ngram_proposes(name, n) for n in range(1, self.max_batch + 1)]
                parts.append("n-gram " + ",".join("y" if x else "-" for x in on))
            out[name] = "; ".join(parts) + f" (batch 1..{self.max_batch})"
        return out


def batched_draft(drafter) -> LayerSkipDrafter | None:
    """The model draft whose policy and costs stand for a profile's drafter in the planner: the
    drafter itself, a cascade's top stage (its k bounds the cascade's proposal), a hybrid's model
    part, or None for an n-gram drafter."""
    if isinstance(drafter, CascadeDrafter):
        return drafter.top
    if isinstance(drafter, HybridDrafter):
        return drafter.model
    return drafter if isinstance(drafter, LayerSkipDrafter) else None


def ngram_part(drafter) -> NGramDrafter | None:
    """The n-gram proposer of an n-gram or hybrid profile's drafter, else None."""
    if isinstance(drafter, HybridDrafter):
        return drafter.ngram
    return drafter if isinstance(drafter, NGramDrafter) else None


def model_rows(profile, policy) -> list[tuple]:
    """(k, drafted per step, accepted per step) for the draft lengths up to the policy's, at its
    confidence stop: from the profile's policy table, else its validation figures (one row)."""
    rows = [(r.k, r.drafted_per_step, r.accepted_per_step) for r in profile.policy_table or []
            if r.confidence_stop == policy.confidence_stop and r.k <= policy.max_tokens]
    if not rows:
        rate = figures_rate(profile)
        rows = [(policy.max_tokens, *rate)] if rate is not None else []
    return rows


def figures_rate(profile) -> tuple[float, float] | None:
    """(drafted, accepted) per step as the profile's validation measured them (a hybrid's mix
    its n-gram and model steps), or None when it has no such figures."""
    fig = profile.figures
    rate, a = fig.get("acceptance_rate"), fig.get("mean_accepted_tokens")
    if isinstance(rate, bool) or isinstance(a, bool) or not isinstance(rate, (int, float)) \
            or not isinstance(a, (int, float)) or rate <= 0 or a <= 0:
        return None
    return a / rate, float(a)
