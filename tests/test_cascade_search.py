"""The compiler's cascade search (compiler/cascade_search.py): replays on hand-made records with
known answers (the top stage alone equals ngram_search's model walk; rounds of a lower stage that
always or never agrees), the choice (a cascade only where predicted, and measured, faster) and the
profile it writes."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conflayers.compiler import cascade_search as cs
from conflayers.compiler import ngram_search as ns
from conflayers.compiler.costmodel import CostModel
from conflayers.compiler.evaluate import BlockRecord, DraftRecord, Reference
from conflayers.compiler.search import Candidate, Choice
from conflayers.runtime.draftplan import DraftPlan
from conflayers.runtime.profile import Profile

L, V, K = 4, 384, 8
COST = CostModel(context=64, full_ms=[10.0 + i for i in range(9)],            # verify_ms(n) = 9 + n
                 base_ms={"int8": 1.0, "int4": 0.5}, attn_ms={"int8": 0.5, "int4": 0.25},
                 mlp_ms={"int8": 0.5, "int4": 0.25}, head_ms={"int8": {str(V): 1.0}, "int4": {str(V): 0.5}},
                 draft_relative={"int8": [1.0 + 0.1 * i for i in range(9)]})
TOP_MS, LOW_MS = 6.0, 3.0      # int8 and int4 drafts of all 4 layers, full vocabulary


def _refs():
    rng = np.random.default_rng(0)
    return [Reference(prompt=rng.integers(10, 300, 20).tolist(), output=rng.integers(10, 300, 60).tolist())
            for _ in range(3)]


def _record(refs, accept: int) -> DraftRecord:
    """A k_max walk whose every block agrees with the reference for `accept` tokens."""
    blocks = []
    for ref in refs:
        pos, t = len(ref.prompt), len(ref.sequence) - 1
        while min(K, t - pos, 1000 - (pos - len(ref.prompt) + 1) - 1) >= 1:
            n = min(K, t - pos)
            blocks.append(BlockRecord(np.arange(n) < accept, np.full(n, 0.95, np.float32), n))
            pos += blocks[-1].accepted_full + 1
    return DraftRecord(K, {None: blocks})


def _cand(refs, plan, accept, k=4, origin="x"):
    ch = Choice(k=k, confidence_stop=None, vocab=None, speedup=1.0, acceptance=0.9, mean_accepted=2.0,
                draft_ms=COST.draft_ms(plan, V))
    return Candidate(plan, origin, _record(refs, accept), ch, {})


TOP = DraftPlan(L, precision="int8")
LOW = DraftPlan(L, precision="int4")


def test_top_stage_alone_equals_the_model_walk():
    refs = _refs()
    top = _cand(refs, TOP, accept=3)
    stage = cs.as_stage(top, refs, 1000, COST, V)
    assert stage.ms == pytest.approx(TOP_MS)
    w = cs.walk(cs.top_steps(refs, stage, 4, None, 1000), stage, COST)
    blocks = top.record.blocks[None]
    model = ns.walk(refs, [ns.follower_table(r.sequence)[0] for r in refs], 1000, COST, None, None,
                    (blocks, blocks, ns.model_block_positions(refs, blocks, K, 1000), 4, None, TOP_MS, 4, 3))
    assert (w.steps, w.drafted, w.accepted, w.tokens) == (model.steps, model.drafted, model.accepted, model.tokens)
    assert w.ms == pytest.approx(model.ms)


def test_rounds_of_a_lower_stage_that_always_or_never_agrees():
    refs = _refs()
    top = cs.as_stage(_cand(refs, TOP, accept=K), refs, 1000, COST, V)
    steps = cs.top_steps(refs, top, 4, None, 1000)
    assert {(d, a, most) for _, _, d, a, most in steps if d == 4} == {(4, 4, 4)}
    full = [s for s in steps if s[2] == 4]
    # always agrees: one round per step, 3 lower tokens + the top's own, one check pass of 4
    agree = cs.as_stage(_cand(refs, LOW, accept=K), refs, 1000, COST, V)
    w = cs.walk(full, top, COST, agree, 3, None)
    assert w.rounds == len(full) and w.lower_drafted == 3 * len(full) and w.lower_accepted == 3 * len(full)
    assert w.ms == pytest.approx(len(full) * (3 * LOW_MS + COST.check_ms(TOP, V, 4) + COST.verify_ms(5)))
    assert COST.check_ms(TOP, V, 4) == pytest.approx(TOP_MS * 1.3)
    # never agrees: every round drafts one token and keeps only the top stage's own
    never = cs.as_stage(_cand(refs, LOW, accept=0), refs, 1000, COST, V)
    w = cs.walk(full, top, COST, never, 1, None)
    assert w.rounds == 4 * len(full) and w.lower_accepted == 0
    assert w.lower_drafted == 3 * len(full)            # the last round leaves no room for a lower token
    alone = cs.walk(full, top, COST)
    assert w.ms > alone.ms                              # such a cascade costs more than the top alone


def _result(refs, lower_accept, lower_plan=LOW):
    best = _cand(refs, TOP, accept=K, origin="anchor int8")
    low = _cand(refs, lower_plan, accept=lower_accept, origin="anchor int4")
    return SimpleNamespace(best=best, candidates=[best, low])


def test_search_picks_a_cascade_only_where_predicted_and_measured_faster():
    refs = _refs()
    section = cs.search(refs, 1000, COST, _result(refs, K), V, K, log=lambda *_: None)
    assert section["kind"] == "cascade" and section["stages"][0]["precision"] == "int4"
    assert section["predicted_speedup"] > section["single_predicted_speedup"] * cs.MARGIN
    assert "predicted" in section["why"] and section["candidates"]

    calls = []

    def slower(*args):
        calls.append(args)
        return {"prompts": 2, "single_tokens_per_s": 50.0, "cascade_tokens_per_s": 40.0}
    section = cs.search(refs, 1000, COST, _result(refs, K), V, K, measure=slower, log=lambda *_: None)
    assert calls and section["kind"] == "model" and "measured slower" in section["why"]
    assert section["measured"]["cascade_tokens_per_s"] == 40.0

    # a lower stage that never agrees: no cascade, and the reason names the best one tried
    section = cs.search(refs, 1000, COST, _result(refs, 0), V, K, log=lambda *_: None)
    assert section["kind"] == "model" and "no cascade is predicted" in section["why"]
    # no cheaper draft (or one keeping attention where the top stage does not): nothing to try
    section = cs.search(refs, 1000, COST, _result(refs, K, DraftPlan(L, precision="int8", skip_mlp=[1])), V, K)
    assert section["kind"] == "model" and "no evaluated draft costs less" in section["why"]


def _profile():
    ident = {"architecture": "llama", "num_layers": L, "config_sha256": "a", "weights_sha256": "b"}
    return {"schema": "conflayers.profile", "schema_version": 3, "task": "t", "model": ident,
            "draft": {**TOP.to_json(), "max_draft_tokens": 4, "confidence_stop": None, "vocab_subset": None},
            "search": {}, "figures": {"predicted_speedup": 1.2}}


def test_apply_writes_a_loadable_cascade_profile():
    refs = _refs()
    section = cs.search(refs, 1000, COST, _result(refs, K), V, K, log=lambda *_: None)
    section["stages"][0]["vocab"] = 100          # as if the lower stage drafted over a subset
    p = _profile()
    cs.apply(p, section, lambda size: range(3, 3 + size))
    prof = Profile.from_json(p)
    assert prof.kind == "cascade" and prof.policy.max_tokens == section["top"]["k"]
    assert prof.stages[0].plan == LOW and prof.stages[0].vocab_ids == list(range(3, 103))
    assert p["figures"]["predicted_speedup"] == section["predicted_speedup"]
    assert p["search"]["cascade"] is section
    # an n-gram / hybrid choice predicted faster keeps its kind; the cascade section says why
    p = _profile()
    p["draft"].update(kind="hybrid", ngram={"n_min": 1, "n_max": 3, "max_tokens": 5, "min_match": 2})
    p["search"]["drafter"] = {"kind": "hybrid", "predicted_speedup": 99.0}
    section = cs.search(refs, 1000, COST, _result(refs, K), V, K, log=lambda *_: None)
    cs.apply(p, section, lambda size: range(size))
    assert Profile.from_json(p).kind == "hybrid" and "hybrid drafter is predicted faster" in section["why"]
    # no cascade: only the section is recorded
    p = _profile()
    cs.apply(p, {"kind": "model", "why": "-"}, None)
    assert "kind" not in p["draft"] and p["search"]["cascade"]["kind"] == "model"
