"""The drafting policy for this machine: draft length k and confidence stop with the best
predicted tokens/s, from a profile's recorded acceptance statistics and costs measured here.

A profile's `policy_table` (written by the compiler) holds, for its draft and vocabulary and for
every (k, confidence stop) the compiler considered, what replaying its calibration steps gave:
mean tokens drafted and accepted per speculative step. These do not depend on the hardware; the
costs do. A step that drafts d tokens on average and keeps a of them yields a + 1 tokens (the
verify pass adds its own) for d * draft_ms + verify_ms(d + 1); plain decoding yields one token
per verify_ms(1). This is the compiler's prediction (compiler/costmodel.py CostModel.speedup),
so with the compiling machine's costs `choose` returns the compiled policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .draftplan import DraftPolicy
from .speculation import speedup_over_plain

TABLE_COLUMNS = ["k", "confidence_stop", "drafted_per_step", "accepted_per_step"]


@dataclass(frozen=True)
class PolicyRow:
    k: int
    confidence_stop: float | None      # None: no stop (written as 0 in the table)
    drafted_per_step: float
    accepted_per_step: float

    @property
    def policy(self) -> DraftPolicy:
        return DraftPolicy(self.k, self.confidence_stop)


@dataclass(frozen=True)
class MachineCosts:
    """What a drafting policy's speed depends on, in ms: verify_ms[n-1] is a full-graph pass over
    n tokens (verify_ms[0] a plain decoding step), draft_ms one draft step (body + head)."""
    verify_ms: tuple
    draft_ms: float

    def verify(self, n: float) -> float:
        """Full-graph pass over n tokens (interpolated for a mean width, extrapolated beyond)."""
        v = self.verify_ms
        if n <= len(v):
            return float(np.interp(n, np.arange(1, len(v) + 1), v))
        return v[-1] + (v[-1] - v[0]) / max(len(v) - 1, 1) * (n - len(v))

    def verify_cost(self, n: int) -> float:
        """A verify of n tokens in units of a plain step (what SpeculationGuard needs)."""
        return self.verify(n) / self.verify_ms[0]


def parse_table(d) -> list[PolicyRow]:
    """A profile's policy_table section -> rows; ValueError naming what is wrong."""
    if not isinstance(d, dict) or d.get("columns") != TABLE_COLUMNS or not isinstance(d.get("rows"), list):
        raise ValueError(f"must be an object with columns {TABLE_COLUMNS} and a list of rows")
    rows = []
    for r in d["rows"]:
        if not (isinstance(r, list) and len(r) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             for x in r)):
            raise ValueError(f"row {r!r} must be 4 numbers")
        k, stop, drafted, accepted = r
        if k != int(k) or not 1 <= k <= 64 or not 0.0 <= stop < 1.0 or not 0.0 <= accepted <= drafted <= k:
            raise ValueError(f"row {r!r} is out of range (1 <= k <= 64, 0 <= stop < 1, "
                             "0 <= accepted <= drafted <= k)")
        rows.append(PolicyRow(int(k), float(stop) or None, float(drafted), float(accepted)))
    if not rows:
        raise ValueError("has no rows")
    return rows


def rows_from_figures(policy: DraftPolicy | None, figures: dict) -> list[PolicyRow] | None:
    """The one row a profile without a policy table still tells: its compiled policy with the
    acceptance measured at compile time (figures: acceptance_rate and mean_accepted_tokens, the
    runtime's on validation prompts, else the search's). None where the figures do not say."""
    if policy is None:
        return None
    accepted = figures.get("mean_accepted_tokens", figures.get("search_mean_accepted_tokens"))
    rate = figures.get("acceptance_rate", figures.get("search_acceptance"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (accepted, rate)) or rate <= 0:
        return None
    drafted = min(float(policy.max_tokens), accepted / rate)
    return [PolicyRow(policy.max_tokens, policy.confidence_stop, drafted, min(float(accepted), drafted))]


def predicted_speedup(row: PolicyRow, costs: MachineCosts) -> float:
    """Predicted tokens/s of speculative decoding with this row's policy relative to plain."""
    step_ms = row.drafted_per_step * costs.draft_ms + costs.verify(row.drafted_per_step + 1)
    return speedup_over_plain(row.accepted_per_step, step_ms, costs.verify_ms[0])


def choose(rows: list[PolicyRow], costs: MachineCosts, min_speedup: float = 1.0) -> DraftPolicy | None:
    """The row with the best predicted speed-up (the first of equals, as the compiler picks), or
    None when none beats `min_speedup`: then plain decoding is faster on this machine."""
    best, best_sp = None, 0.0
    for row in rows:
        sp = predicted_speedup(row, costs)
        if best is None or sp > best_sp + 1e-9:
            best, best_sp = row, sp
    return best.policy if best is not None and best_sp > min_speedup else None
