"""The search: which draft makes self-speculative decoding fastest, output unchanged.

Every draft is measured against the target: the full graph at the bundle's target precision
(fp32, int8/int4, or the GGUF file's own weights). Anchors first: for each draft precision, the
draft that skips nothing. They are cheap to evaluate, usually strong, and give the screening
(below) a bar from the start. (A draft that skips nothing at the target's own precision is the
target itself: it is a candidate only with a vocabulary subset.)

Phase 1, ConfLayers (faithful): iterate over calibration contexts; each iteration applies the
selection rule (skiprule.select) with the adaptive lambda to that context's confidence curve,
evaluates the candidate set against the full model (evaluate.evaluate, a draft at the target's
precision, the paper's
drafting policy: up to k_max tokens, stop below the draft-stop threshold), keeps the best set by
mean accepted tokens, adapts lambda from the skipped fraction, and stops when the acceptance
target is reached (acceptance >= target and mean accepted > its target) or after max_iterations
(or the time budget, or `patience` iterations without a new candidate).

Phase 2, cost-aware refinement: the user's objective is tokens/s, so for each draft precision the
skip sets along the confidence ranking (nothing skipped, the least confident layer, two, four,
..., the phase-1 best) are evaluated and then refined by measured local moves (add the next
ranked layer whole or only its MLP or attention; drop a skipped layer). For every evaluated draft
the drafting policy (k, confidence stop) and the vocabulary subset are chosen by replaying the
recorded blocks through the measured cost model. The answer is the best predicted tokens/s;
"skip nothing" is a legal answer.

Screening: an evaluation stops after a quarter of the reference tokens when its predicted
tokens/s is below screen_ratio x the best so far (its figures are then partial estimates, and
say so). Phase 1 may use at most phase1_share of the time budget, so phase 2 always runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from conflayers.runtime.draftplan import PRECISIONS, DraftPlan

from .costmodel import CostModel
from .evaluate import DraftRecord, evaluate, replay
from .skiprule import AdaptiveLambda, RuleSettings, confidence_ranking, select

STOP_THRESHOLDS = (None, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SearchSettings:
    context_window: int = 100
    target_skip_ratio: float = 0.4
    max_iterations: int = 100
    acceptance_target: float = 0.95
    mean_accepted_target: float = 4.0
    draft_stop_threshold: float = 0.8
    lambda_step: float = 0.05
    base_window: int = 2
    allow_skip_first: bool = False
    allow_skip_last: bool = False
    k_max: int = 8
    precisions: tuple = ()          # draft precisions; empty: the target's defaults (target.py)
    vocab_sizes: tuple = (4096, 8192, 16384)
    sublayers: bool = True
    refine_budget: int = 16
    patience: int = 25
    time_budget_s: float = 600.0
    screen_ratio: float = 0.7
    phase1_share: float = 0.5

    def validate(self, num_layers: int | None = None):
        """Raise ValueError naming every invalid hyper-parameter."""
        problems = []
        if not 0.0 < self.target_skip_ratio < 1.0:
            problems.append(f"target skip ratio must be in (0, 1), got {self.target_skip_ratio}")
        if self.context_window < 2:
            problems.append(f"context window W must be >= 2, got {self.context_window}")
        if self.max_iterations < 1:
            problems.append(f"max iterations must be >= 1, got {self.max_iterations}")
        if not 0.0 < self.acceptance_target <= 1.0:
            problems.append(f"acceptance target must be in (0, 1], got {self.acceptance_target}")
        if not 0.0 <= self.draft_stop_threshold < 1.0:
            problems.append(f"draft stop threshold must be in [0, 1), got {self.draft_stop_threshold}")
        if not 1 <= self.k_max <= 32:
            problems.append(f"max draft tokens must be in 1..32, got {self.k_max}")
        if not 0.0 < self.phase1_share <= 1.0:
            problems.append(f"phase-1 share must be in (0, 1], got {self.phase1_share}")
        if self.lambda_step <= 0:
            problems.append(f"lambda step must be > 0, got {self.lambda_step}")
        if self.base_window < 1:
            problems.append(f"base window must be >= 1, got {self.base_window}")
        if num_layers is not None and num_layers < 3 and not (self.allow_skip_first or self.allow_skip_last):
            problems.append(f"the model has {num_layers} layers: nothing to skip between first and last")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            problems.append(f"precisions must be among {', '.join(PRECISIONS)}, got {list(self.precisions)}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Choice:
    """The best drafting policy for one evaluated draft."""
    k: int
    confidence_stop: float | None
    vocab: int | None          # subset size, None = full vocabulary
    speedup: float             # predicted, vs plain decoding
    acceptance: float
    mean_accepted: float
    draft_ms: float


@dataclass
class Candidate:
    plan: DraftPlan
    origin: str
    record: DraftRecord
    choice: Choice
    paper: dict                # acceptance/mean accepted under the paper's policy (k_max, stop thr)


@dataclass
class SearchResult:
    best: Candidate
    candidates: list
    iterations: list = field(default_factory=list)
    phase1_best: Candidate | None = None
    final_lambda: float = 0.0
    ranking: list = field(default_factory=list)
    mean_confidence: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    stop_reason: str = ""
    seconds: dict = field(default_factory=dict)


class Search:
    def __init__(self, factory, spec, refs, max_new_tokens: int, cost: CostModel, settings: SearchSettings,
                 vocab_options_per_ref: list[dict], log=print, target: str = "fp32"):
        self.target = target        # the full graph's precision: its skip-nothing draft is the target itself
        self.factory, self.spec, self.refs = factory, spec, refs
        self.max_new = max_new_tokens
        self.cost, self.settings = cost, settings
        self.vocab_per_ref = vocab_options_per_ref
        self.log = log
        self.cache: dict[str, Candidate] = {}
        self.best: Candidate | None = None
        self.t0 = time.perf_counter()

    # -- evaluation of one draft ---------------------------------------------------------------
    def out_of_time(self, share: float = 1.0) -> bool:
        return time.perf_counter() - self.t0 > share * self.settings.time_budget_s

    def is_target(self, plan: DraftPlan) -> bool:
        """A draft that skips nothing at the target's precision computes what the target does;
        only its vocabulary subsets make it a draft."""
        return plan.precision == self.target and plan.skipped_fraction == 0

    def anchors(self):
        """Skip-nothing drafts of each draft precision (see the module docstring); at the
        target's own precision only when a vocabulary subset can make it cheaper."""
        for p in self.settings.precisions:
            plan = DraftPlan(self.spec.num_layers, precision=p)
            if not self.is_target(plan) or self.settings.vocab_sizes:
                self.evaluate(plan, f"anchor {p} (skip nothing)")

    def choose(self, plan: DraftPlan, record: DraftRecord) -> Choice:
        best = None
        for vocab, blocks in record.blocks.items():
            if vocab is None and self.is_target(plan):
                continue
            size = self.spec.vocab_size if vocab is None else vocab
            draft_ms = self.cost.draft_ms(plan, size)
            for k in range(1, self.settings.k_max + 1):
                for thr in STOP_THRESHOLDS:
                    r = replay(blocks, k, thr)
                    sp = self.cost.speedup(r, draft_ms)
                    if best is None or sp > best.speedup + 1e-9:
                        best = Choice(k, thr, vocab, sp, r.acceptance_rate, r.mean_accepted_tokens, draft_ms)
        return best or Choice(1, None, None, 0.0, 0.0, 0.0, 0.0)     # the target itself: never chosen

    def evaluate(self, plan: DraftPlan, origin: str) -> Candidate:
        key = plan.key
        if key in self.cache:
            return self.cache[key]
        body = self.factory.body(plan)
        head = self.factory.head(plan.precision)

        total = sum(len(r.output) for r in self.refs)

        def give_up(record: DraftRecord) -> bool:
            """Screening: after a quarter of the tokens, drop drafts far behind the best so far."""
            if self.best is None or record.tokens < 0.25 * total:
                return False
            return self.choose(plan, record).speedup < self.settings.screen_ratio * self.best.choice.speedup

        record = evaluate(body, head, self.spec, self.refs, self.settings.k_max, self.max_new,
                          vocab_options=self.vocab_per_ref,
                          min_stop=min(t for t in STOP_THRESHOLDS if t is not None), give_up=give_up)
        choice = self.choose(plan, record)
        paper = replay(record.blocks[None], self.settings.k_max, self.settings.draft_stop_threshold)
        cand = Candidate(plan, origin, record, choice,
                         {"acceptance": paper.acceptance_rate, "mean_accepted": paper.mean_accepted_tokens})
        self.cache[key] = cand
        if record.complete and (self.best is None or choice.speedup > self.best.choice.speedup):
            self.best = cand
        self.log(f"  {origin:<28} skip={_describe(plan):<24} {plan.precision:<5} "
                 f"acc={paper.acceptance_rate:.2f} mean_acc={paper.mean_accepted_tokens:.2f} | best policy k={choice.k} "
                 f"stop={choice.confidence_stop} vocab={choice.vocab or 'full'} -> predicted x{choice.speedup:.2f}"
                 + ("" if record.complete else " (screened out)"))
        return cand

    # -- phase 1: ConfLayers ------------------------------------------------------------------
    def conflayers(self, conf_per_context: np.ndarray, result: SearchResult):
        s = self.settings
        rule = RuleSettings(s.base_window, not s.allow_skip_first, not s.allow_skip_last)
        n_cand = len(rule.candidates(self.spec.num_layers))
        lam = AdaptiveLambda(target=s.target_skip_ratio, step=s.lambda_step)
        best: Candidate | None = None
        seen_at = 0
        result.stop_reason = f"max iterations ({s.max_iterations})"
        for it in range(s.max_iterations):
            ctx = it % len(conf_per_context)
            sel = select(conf_per_context[ctx], lam.value, rule)
            plan = DraftPlan(self.spec.num_layers, skip_layers=sel.skip, precision=self.target)
            new = plan.key not in self.cache
            cand = self.evaluate(plan, f"conflayers it={it} ctx={ctx}")
            if new:
                seen_at = it
            frac = len(sel.skip) / n_cand
            result.iterations.append({
                "iteration": it, "context": ctx, "lambda": lam.value, "skipped": list(sel.skip),
                "skipped_fraction": round(frac, 4), "acceptance": round(cand.paper["acceptance"], 4),
                "mean_accepted": round(cand.paper["mean_accepted"], 4),
                "predicted_speedup": round(cand.choice.speedup, 4), "screened_out": not cand.record.complete})
            # Keep-best by mean accepted tokens (a screened-out candidate counts with its partial
            # estimate: it was already far behind the product's best draft).
            if best is None or cand.paper["mean_accepted"] > best.paper["mean_accepted"]:
                best = cand
            if cand.paper["acceptance"] >= s.acceptance_target and cand.paper["mean_accepted"] > s.mean_accepted_target:
                result.stop_reason = f"acceptance target reached at iteration {it}"
                break
            lam.update(frac)
            if it - seen_at >= s.patience:
                result.stop_reason = f"no new candidate for {s.patience} iterations (at iteration {it})"
                break
            if self.out_of_time(s.phase1_share):
                result.stop_reason = (f"phase-1 share of the time budget ({s.phase1_share:.0%} of "
                                      f"{s.time_budget_s:.0f} s) spent at iteration {it}")
                break
        result.final_lambda = lam.value
        result.phase1_best = best
        return best

    # -- phase 2: cost-aware refinement --------------------------------------------------------
    def refine(self, ranking: list[int], phase1: Candidate | None):
        s = self.settings
        L = self.spec.num_layers
        budget = s.refine_budget
        for p in s.precisions:
            nothing = DraftPlan(L, precision=p)
            ladder = ([] if self.is_target(nothing) and not s.vocab_sizes else [[]]) + \
                [ranking[:n] for n in (1, 2, 4, 8) if n <= len(ranking)]
            if phase1 is not None and list(phase1.plan.skip_layers) not in ladder:
                ladder.append(list(phase1.plan.skip_layers))
            for skip in ladder:
                if self.out_of_time():
                    return
                self.evaluate(DraftPlan(L, skip_layers=skip, precision=p), f"ladder {p} {len(skip)} layers")
        # Local moves around the best draft, guided by the confidence ranking.
        while budget > 0 and not self.out_of_time():
            cur = self.best.plan
            moves = []
            nxt = [i for i in ranking if cur.keeps_attention(i) and cur.keeps_mlp(i)][:2]
            for i in nxt:
                moves.append((f"+layer {i}", DraftPlan(L, cur.skip_layers + (i,), cur.skip_attention, cur.skip_mlp, cur.precision)))
                if s.sublayers:
                    moves.append((f"+mlp {i}", DraftPlan(L, cur.skip_layers, cur.skip_attention, cur.skip_mlp + (i,), cur.precision)))
                    moves.append((f"+attn {i}", DraftPlan(L, cur.skip_layers, cur.skip_attention + (i,), cur.skip_mlp, cur.precision)))
            for i in cur.skip_layers:
                moves.append((f"-layer {i}", DraftPlan(L, tuple(x for x in cur.skip_layers if x != i), cur.skip_attention, cur.skip_mlp, cur.precision)))
            for i in cur.skip_mlp:
                moves.append((f"-mlp {i}", DraftPlan(L, cur.skip_layers, cur.skip_attention, tuple(x for x in cur.skip_mlp if x != i), cur.precision)))
            for i in cur.skip_attention:
                moves.append((f"-attn {i}", DraftPlan(L, cur.skip_layers, tuple(x for x in cur.skip_attention if x != i), cur.skip_mlp, cur.precision)))
            fresh = [(o, m) for o, m in moves if m.key not in self.cache]
            if not fresh:
                break
            before = self.best
            for origin, plan in fresh:
                if budget <= 0 or self.out_of_time():
                    break
                budget -= 1
                self.evaluate(plan, f"refine {origin}")
            if self.best is before:
                break


def _describe(plan: DraftPlan) -> str:
    parts = []
    if plan.skip_layers:
        parts.append(",".join(map(str, plan.skip_layers)))
    if plan.skip_mlp:
        parts.append("mlp:" + ",".join(map(str, plan.skip_mlp)))
    if plan.skip_attention:
        parts.append("attn:" + ",".join(map(str, plan.skip_attention)))
    return " ".join(parts) or "-"


def run_search(factory, spec, refs, max_new_tokens, cost, settings, vocab_options_per_ref,
               attn_conf: np.ndarray, mlp_conf: np.ndarray, log=print, target: str = "fp32") -> SearchResult:
    """Phase 1 then phase 2; returns every evaluated candidate and the best by predicted tokens/s."""
    conf = attn_conf + mlp_conf
    search = Search(factory, spec, refs, max_new_tokens, cost, settings, vocab_options_per_ref, log, target)
    result = SearchResult(best=None, candidates=[])
    t = time.perf_counter()
    log("anchors: drafts that skip nothing, per quantized precision")
    search.anchors()
    result.seconds["anchors"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    log(f"phase 1: ConfLayers iterations ({target} drafts, adaptive lambda)")
    phase1 = search.conflayers(conf, result)
    result.seconds["conflayers"] = round(time.perf_counter() - t, 1)
    mean = conf.mean(axis=0)
    rule = RuleSettings(settings.base_window, not settings.allow_skip_first, not settings.allow_skip_last)
    sel = select(mean, result.final_lambda, rule)
    result.mean_confidence = [round(float(x), 6) for x in mean]
    result.thresholds = [None if np.isnan(x) else round(float(x), 6) for x in sel.thresholds]
    result.ranking = confidence_ranking(sel.margin)
    t = time.perf_counter()
    log(f"phase 2: cost-aware refinement over precisions {', '.join(settings.precisions)} "
        f"(confidence ranking {result.ranking[:8]}...)")
    search.refine(result.ranking, phase1)
    result.seconds["refine"] = round(time.perf_counter() - t, 1)
    result.candidates = list(search.cache.values())
    result.best = search.best
    return result
