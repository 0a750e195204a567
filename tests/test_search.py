"""The search loop: stop rules, keep-best, determinism, policy replay and the cost model."""
import numpy as np
import pytest

from conflayers.compiler.costmodel import CostModel
from conflayers.compiler.evaluate import BlockRecord, DraftRecord, PolicyResult, replay
from conflayers.compiler.search import Candidate, Choice, Search, SearchResult, SearchSettings
from conflayers.runtime.draftplan import DraftPlan


class FakeSpec:
    num_layers = 12
    vocab_size = 1000


def fake_search(settings, acceptance_of):
    """A Search whose evaluation is a function of the skip set (no graphs)."""
    s = Search(None, FakeSpec(), [], 64, None, settings, [])
    s.log = lambda *a: None

    def evaluate(plan, origin):
        key = plan.key
        if key not in s.cache:
            acc, mean = acceptance_of(plan.skip_layers)
            rec = DraftRecord(8, {None: []})
            s.cache[key] = Candidate(plan, origin, rec, Choice(4, None, None, mean / 2, acc, mean, 1.0),
                                     {"acceptance": acc, "mean_accepted": mean})
            s.evaluated.append(plan.skip_layers)
        return s.cache[key]

    s.evaluated = []
    s.evaluate = evaluate
    return s


def curves(n_ctx=5, L=12, seed=0):
    rng = np.random.default_rng(seed)
    return 1.0 + 0.1 * rng.standard_normal((n_ctx, L))


def test_stops_when_acceptance_target_reached():
    def acc(skip):  # small skip sets are accurate enough
        return (0.97, 4.5) if len(skip) <= 3 else (0.5, 1.0)
    s = fake_search(SearchSettings(target_skip_ratio=0.1, max_iterations=100, patience=1000), acc)
    res = SearchResult(None, [])
    best = s.conflayers(curves(), res)
    assert res.stop_reason.startswith("acceptance target reached")
    last = res.iterations[-1]
    assert last["acceptance"] >= 0.95 and last["mean_accepted"] > 4.0
    assert len(best.plan.skip_layers) <= 3
    assert len(res.iterations) < 100


def test_runs_to_the_iteration_limit_and_keeps_the_best_by_mean_accepted():
    def acc(skip):
        return (0.6, 2.0 - 0.1 * len(skip))      # never reaches the target; fewer skips is better
    s = fake_search(SearchSettings(max_iterations=7, patience=1000), acc)
    res = SearchResult(None, [])
    best = s.conflayers(curves(), res)
    assert len(res.iterations) == 7 and res.stop_reason.startswith("max iterations")
    means = [it["mean_accepted"] for it in res.iterations]
    assert best.paper["mean_accepted"] == max(means)


def test_patience_stops_when_no_new_candidate_appears():
    s = fake_search(SearchSettings(max_iterations=100, patience=3), lambda skip: (0.5, 1.0))
    res = SearchResult(None, [])
    flat = np.tile(1.0 + 0.1 * np.sin(np.arange(12.0)), (1, 1))   # one context: same set each time
    s.conflayers(flat, res)
    assert res.stop_reason.startswith("no new candidate for 3")
    assert len(res.iterations) <= 10


def test_lambda_adapts_towards_the_target_ratio():
    s = fake_search(SearchSettings(target_skip_ratio=0.1, max_iterations=30, patience=1000), lambda skip: (0.5, 1.0))
    res = SearchResult(None, [])
    s.conflayers(curves(), res)
    lams = [it["lambda"] for it in res.iterations]
    fracs = [it["skipped_fraction"] for it in res.iterations]
    assert fracs[0] > 0.35 and lams[-1] > lams[0]       # too many skipped at lambda 0 -> lambda rises
    assert fracs[-1] < fracs[0]


def test_search_is_deterministic():
    runs = []
    for _ in range(2):
        s = fake_search(SearchSettings(max_iterations=20, patience=1000), lambda skip: (0.6, 3.0 - 0.2 * len(skip)))
        res = SearchResult(None, [])
        s.conflayers(curves(seed=4), res)
        runs.append((res.iterations, s.evaluated))
    assert runs[0] == runs[1]


def test_invalid_hyper_parameters_are_named():
    with pytest.raises(ValueError, match=r"target skip ratio must be in \(0, 1\)"):
        SearchSettings(target_skip_ratio=1.2).validate()
    with pytest.raises(ValueError, match="context window W must be >= 2"):
        SearchSettings(context_window=1).validate()
    with pytest.raises(ValueError, match="precisions must be among"):
        SearchSettings(precisions=("fp16",)).validate()
    with pytest.raises(ValueError, match="nothing to skip"):
        SearchSettings().validate(num_layers=2)


def block(matches, conf, available=None):
    return BlockRecord(np.array(matches, bool), np.array(conf, np.float32), available or len(matches))


def test_replay_fixed_k_and_confidence_stop():
    blocks = [block([1, 1, 1, 0, 1], [0.9, 0.9, 0.6, 0.3, 0.9]),
              block([0, 0], [0.4, 0.2], available=5),           # drafting stopped early: all dead + low
              block([1, 1, 1, 1, 1], [0.95, 0.9, 0.85, 0.7, 0.99])]
    r = replay(blocks, 5, None)
    assert (r.draft_steps, r.drafted_tokens, r.accepted_tokens) == (3, 15, 3 + 0 + 5)
    r = replay(blocks, 2, None)
    assert (r.draft_steps, r.drafted_tokens, r.accepted_tokens) == (3, 6, 2 + 0 + 2)
    r = replay(blocks, 5, 0.8)     # stop after the first token below 0.8 (inclusive)
    assert (r.drafted_tokens, r.accepted_tokens) == (3 + 1 + 4, 3 + 0 + 4)
    assert r.acceptance_rate == pytest.approx(7 / 8) and r.mean_accepted_tokens == pytest.approx(7 / 3)


def test_cost_model_prediction():
    cm = CostModel(context=100, full_ms=[20.0, 22.0, 24.0, 26.0, 28.0],
                   base_ms={"int8": 1.0}, attn_ms={"int8": 0.1}, mlp_ms={"int8": 0.2},
                   head_ms={"int8": {"1000": 2.0, "100": 0.5}})
    plan = DraftPlan(10, skip_layers=(3,), skip_mlp=(5,), precision="int8")
    assert cm.draft_ms(plan, 1000) == pytest.approx(1.0 + 9 * 0.1 + 8 * 0.2 + 2.0)
    assert cm.draft_ms(plan, 550) == pytest.approx(1.0 + 0.9 + 1.6 + 1.25)      # interpolated head
    # 10 steps, 4 drafted each, 3 accepted each: 40 tokens in 10 * (4 * 5 + verify(5)=28) ms
    r = PolicyResult(4, None, draft_steps=10, drafted_tokens=40, accepted_tokens=30)
    assert cm.speedup(r, 5.0) == pytest.approx((40 / 10) / ((4 * 5.0 + 28.0) / 20.0))
    assert cm.verify_ms(2.5) == pytest.approx(23.0) and cm.verify_ms(7) == pytest.approx(32.0)
    assert cm.verify_relative()[0] == 1.0


def recording_search(settings, acceptance_of, seconds_per_eval=0.0):
    """fake_search that records (precision, skip set) and advances the search's clock by
    seconds_per_eval per evaluation (a simulated slow evaluator for the time-budget rules)."""
    s = fake_search(settings, acceptance_of)
    inner, plans = s.evaluate, []

    def evaluate(plan, origin):
        plans.append((plan.precision, tuple(plan.skip_layers)))
        s.t0 -= seconds_per_eval
        return inner(plan, origin)

    s.evaluate, s.plans = evaluate, plans
    return s


def test_anchors_are_the_skip_nothing_drafts_cheaper_than_the_target():
    # without vocabulary subsets, the target's own precision skipping nothing is the target itself
    s = recording_search(SearchSettings(precisions=("fp32", "int8", "int4"), vocab_sizes=()), lambda skip: (0.9, 3.0))
    s.anchors()
    assert s.plans == [("int8", ()), ("int4", ())]
    # with them, it is a draft (the whole model, a smaller head), never chosen with the full vocabulary
    s = recording_search(SearchSettings(precisions=("fp32", "int8")), lambda skip: (0.9, 3.0))
    s.anchors()
    assert s.plans == [("fp32", ()), ("int8", ())]


def test_the_target_itself_is_never_chosen_with_the_full_vocabulary():
    cm = CostModel(context=100, full_ms=[20.0] * 9, base_ms={"fp32": 1.0}, attn_ms={"fp32": 0.5},
                   mlp_ms={"fp32": 0.5}, head_ms={"fp32": {"1000": 5.0, "100": 0.5}})
    s = Search(None, FakeSpec(), [], 64, cm, SearchSettings(), [])
    perfect = [block([1] * 8, [0.99] * 8) for _ in range(4)]
    rec = DraftRecord(8, {None: perfect, 100: perfect})
    whole = DraftPlan(FakeSpec.num_layers, precision="fp32")
    assert s.choose(whole, rec).vocab == 100
    assert s.choose(whole, DraftRecord(8, {None: perfect})).speedup == 0.0


def test_the_target_precision_follows_the_target():
    """A native target: its skip-nothing draft is the target; fp32 is just another draft."""
    s = recording_search(SearchSettings(precisions=("native", "fp32"), vocab_sizes=()), lambda skip: (0.9, 3.0))
    s.target = "native"
    s.anchors()
    assert s.plans == [("fp32", ())]


def test_phase1_stops_at_its_share_of_the_time_budget():
    settings = SearchSettings(max_iterations=100, patience=1000, time_budget_s=10.0, phase1_share=0.5)
    s = recording_search(settings, lambda skip: (0.5, 1.0), seconds_per_eval=1.0)
    res = SearchResult(None, [])
    s.conflayers(curves(), res)
    assert res.stop_reason.startswith("phase-1 share of the time budget")
    assert 5 <= len(res.iterations) <= 7                 # ~5 s of the 10 s budget, then it stops
    assert not s.out_of_time()                           # phase 2 still has time


def test_refinement_ladder_never_evaluates_the_fp32_full_model():
    s = recording_search(SearchSettings(precisions=("fp32", "int8"), refine_budget=0, vocab_sizes=()),
                         lambda skip: (0.8, 2.0))
    s.refine([3, 5, 1, 7, 2, 9, 4, 8, 6, 10], None)
    assert ("fp32", ()) not in s.plans and ("int8", ()) in s.plans
    assert ("fp32", (3,)) in s.plans and ("int8", (1, 3, 5, 7)) in s.plans


def test_screening_drops_a_draft_far_behind_the_best_after_a_quarter(monkeypatch):
    """A draft whose partial prediction is below screen_ratio x the best so far stops after a
    quarter of the reference tokens, is marked incomplete and can never become the best."""
    import conflayers.compiler.search as search_mod

    class Factory:
        def body(self, plan):
            return None

        def head(self, precision):
            return None

    refs = [type("Ref", (), {"output": list(range(100))})() for _ in range(4)]    # 400 tokens
    s = Search(Factory(), FakeSpec(), refs, 64, None, SearchSettings(screen_ratio=0.7), [])
    s.log = lambda *a: None
    speed = {(): 2.0, (1,): 1.9, (2,): 1.0}                  # predicted speed-up per skip set
    s.choose = lambda plan, record: Choice(4, None, None, speed[plan.skip_layers], 0.9, 3.0, 1.0)

    def fake_evaluate(body, head, spec, refs, k, max_new, vocab_options, min_stop, give_up):
        rec = DraftRecord(k, {None: []})
        for r in refs:                                         # asked after each reference
            rec.tokens += len(r.output)
            if give_up(rec):
                rec.complete = False
                break
        return rec

    monkeypatch.setattr(search_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(search_mod, "replay", lambda blocks, k, thr: PolicyResult(k, thr, 10, 30, 27))
    best = s.evaluate(DraftPlan(12, precision="int8"), "anchor")
    close = s.evaluate(DraftPlan(12, skip_layers=(1,), precision="int8"), "close")
    far = s.evaluate(DraftPlan(12, skip_layers=(2,), precision="int8"), "far")
    assert best.record.complete and close.record.complete     # no best yet / within 0.7x: run fully
    assert not far.record.complete and far.record.tokens == 100
    assert s.best is best
