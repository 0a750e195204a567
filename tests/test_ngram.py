"""N-gram and hybrid drafters (runtime/ngram.py): lossless first (greedy output token-identical to
plain decoding; sampled output distributed as the target's), then n-gram proposals on hand-made
sequences with known answers, then profiles (schema version 2, version 1 still loads) and bundles
with an n-gram profile (no draft graphs) and a hybrid one."""
from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest

from conflayers.runtime import Bundle, Engine
from conflayers.runtime.decoding import DecodeStats, generate
from conflayers.runtime.drafter import propose
from conflayers.runtime.ngram import HybridDrafter, NGramDrafter, NGramIndex, NGramPolicy
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.profile import PROFILE_SCHEMA_VERSION, Profile, ProfileError
from conflayers.runtime.sampling import Sampler

import tiny
from test_sampling import _projections, exact_joint_model

N_NEW = 40
PROMPTS = [
    "Janet has 3 apples and buys 5 more. Janet has 3 apples and buys",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    [{"role": "user", "content": "Repeat after me: the cat sat on the mat. the cat sat on the mat."}],
    "7",
]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


def ngram_profile(ident, task="ng", **settings):
    return {"schema": "conflayers.profile", "schema_version": 2, "task": task, "model": ident,
            "draft": {"kind": "ngram", "ngram": {"n_min": 1, "n_max": 3, "max_tokens": 6, **settings}}}


def hybrid_profile(ident, task="hy", min_match=2):
    p = tiny.profile_json(task, ident, "int8", skip_layers=[1], k=4)
    p["schema_version"] = 2
    p["draft"].update(kind="hybrid", ngram={"n_min": 1, "n_max": 3, "max_tokens": 6, "min_match": min_match})
    return p


@pytest.fixture(scope="module")
def ngram_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    out = str(tmp_path_factory.mktemp("ngram") / "tiny")
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=[
        lambda ident: ngram_profile(ident),
        lambda ident: hybrid_profile(ident),
        lambda ident: tiny.profile_json("model", ident, "int8", skip_layers=[1], k=4),   # version 1
    ])


@pytest.fixture(scope="module")
def engine(ngram_bundle):
    return Engine.load(ngram_bundle, guard=False)


# -- 1. lossless: greedy identity ------------------------------------------------------------------
@pytest.mark.parametrize("task", ["ng", "hy"])
def test_greedy_output_equals_plain(engine, task):
    drafted = 0
    for prompt in PROMPTS:
        plain = engine.generate(**_kw(prompt), speculate=False, max_new_tokens=N_NEW)
        spec = engine.generate(**_kw(prompt), task=task, max_new_tokens=N_NEW)
        assert spec.token_ids == plain.token_ids
        assert spec.metrics.speculative and spec.metrics.profile == task and spec.metrics.draft_steps > 0
        assert len(plain.token_ids) == N_NEW or plain.finish_reason == "stop"
        drafted += spec.metrics.drafted_tokens
    assert drafted > 0           # proposals were made (kept ones: test_greedy_identity_with_kept_proposals)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_generations_and_stop_tokens(engine, n):
    plain_long = engine.generate(PROMPTS[0], speculate=False, max_new_tokens=N_NEW).token_ids
    for task in ("ng", "hy"):
        assert engine.generate(PROMPTS[0], task=task, max_new_tokens=n).token_ids == plain_long[:n]
    # a stop id met inside a kept n-gram proposal ends the output exactly there
    ids = engine.encode(PROMPTS[0])
    stop = plain_long[n + 4]
    want = plain_long[:plain_long.index(stop) + 1]
    for task in ("ng", "hy"):
        cache = KVCache(engine.spec, 256)
        out = [t for it in generate(engine.full.bind(cache), ids, N_NEW, Sampler(),
                                    drafter=engine.drafters[task].bind(ids), stop_ids=frozenset([stop]))
               for t in it]
        assert out == want


def _greedy(engine, ids, n):
    return engine.generate(prompt_ids=ids, speculate=False, max_new_tokens=n).token_ids


def _loop(engine, ids, drafter, n, stop_ids=frozenset()):
    cache = KVCache(engine.spec, 256)
    bound = drafter.bind(ids)
    stats = DecodeStats()
    out = [t for it in generate(engine.full.bind(cache), ids, n, Sampler(), drafter=bound, stop_ids=stop_ids,
                                stats=stats) for t in it]
    return out, bound, stats


class Planted:
    """A drafter bound to another text than the prompt (as long as it): the tiny random model never
    repeats itself, so tests plant the text whose lookups propose what they want."""

    def __init__(self, drafter, text):
        self.drafter, self.text = drafter, text

    def bind(self, prompt):
        assert len(self.text) == len(prompt)
        return self.drafter.bind(self.text)


@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_greedy_identity_with_kept_proposals(engine, kind):
    """The drafter's text holds the plain continuation (one token of it changed): proposals are
    kept up to the change, rejected there, and the output is still plain decoding's."""
    ids = engine.encode(PROMPTS[0])
    plain = _greedy(engine, ids, 24)
    cont = list(plain[:18])
    cont[9] = (cont[9] + 1) % engine.spec.vocab_size
    seg = ids[-2:] + cont
    text = ids[:len(ids) - len(seg) - 2] + seg + ids[-2:]    # it ends as the prompt does
    ng = NGramDrafter(NGramPolicy(1, 3, 6, min_match=3), engine.spec.vocab_size)
    drafter = ng if kind == "ngram" else HybridDrafter(ng, engine.drafters["model"])
    out, bound, stats = _loop(engine, ids, Planted(drafter, text), 24)
    assert out == plain
    assert stats.accepted_tokens >= 8 and stats.drafted_tokens > stats.accepted_tokens
    if kind == "hybrid":       # 3-token matches while the plant lasts, then the model draft
        assert bound.steps["ngram"] > 0 and bound.steps["model"] > 0


def test_out_of_sync_drafter_proposes_nothing():
    d = NGramDrafter(NGramPolicy(), 10).bind([1, 2, 3, 1, 2])
    assert propose(d, 3, 5, Sampler(), 8) == ([1, 2, 3], None)
    d.feedback([1, 2, 3], 1)              # kept [1]; text: 1 2 3 1 2 3 1
    assert propose(d, 4, 7, Sampler(), 8)[0] == []     # 4 never seen: no match
    d.feedback([], 0)
    assert propose(d, 5, 99, Sampler(), 8)[0] == []    # positions skipped: the text is unknown
    assert propose(d, 5, 9, Sampler(), 8)[0] == []


# -- 2. lossless: sampling distribution ------------------------------------------------------------
E2E = [  # drafter, temperature, top_k, top_p, samples
    ("ngram", 1.0, 0, 1.0, 800),
    ("ngram", 0.5, 3, 1.0, 800),
    ("hybrid", 0.8, 0, 1.0, 800),
]
DEPTH = 3


def _sampling_plant(engine, ids, top_k):
    """A drafter text (as long as ids) that proposes, after each of the 3 likeliest first tokens c,
    the greedy continuation of ids + [c]; after the third, through a 1-token match only (so a
    hybrid with min_match 2 asks its model draft there)."""
    cache = KVCache(engine.spec, len(ids) + 1)
    logits = engine.full.bind(cache).run(ids, 0, logits_from=len(ids) - 1)[-1]
    seg = []
    for i, c in enumerate(np.argsort(-logits)[:3].tolist()):
        seg += [ids[-1] if i < 2 else 2, c] + _greedy(engine, ids + [c], 2)
    return ids[:len(ids) - len(seg) - 1] + seg + ids[-1:]    # it ends as the prompt does


@pytest.mark.parametrize("kind,temperature,top_k,top_p,n", E2E)
def test_sampling_distribution_end_to_end(engine, tiny_llama, kind, temperature, top_k, top_p, n):
    """The first DEPTH sampled tokens with n-gram proposals (one-hot q) or hybrid drafts against the
    exact joint distribution of the full model."""
    ids = engine.encode(PROMPTS[0])
    truncated = top_k or top_p < 1.0
    levels = exact_joint_model(tiny_llama, ids, DEPTH, temperature, top_k, top_p, eps=0.0 if truncated else 1e-4)
    ng = NGramDrafter(NGramPolicy(1, 3, 4, min_match=2), engine.spec.vocab_size)
    drafter = Planted(ng if kind == "ngram" else HybridDrafter(ng, engine.drafters["model"]),
                      _sampling_plant(engine, ids, top_k))
    cache = KVCache(engine.spec, len(ids) + DEPTH + 8)
    target = engine.full.bind(cache)
    drafted = accepted = 0
    steps = Counter()
    spec = Counter()
    for seed in range(n):
        st = DecodeStats()
        bound = drafter.bind(ids)
        out = [t for it in generate(target, ids, DEPTH, Sampler(temperature, top_p, top_k, seed=seed),
                                    drafter=bound, stats=st) for t in it]
        assert len(out) == DEPTH
        spec[tuple(out)] += 1
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
        steps.update(getattr(bound, "steps", {}))
    assert 0 < accepted < drafted          # kept drafts and rejections (residual draws) both ran
    if kind == "hybrid":
        assert steps["ngram"] > 0 and steps["model"] > 0
    if truncated:
        assert set(spec) <= set(levels[-1]), "tokens outside the target's top-k/top-p support"
    ps, tvs = _projections(spec, levels, n)
    assert min(ps) > 1e-4, f"speculative sampling differs from the target: p={ps} tv={tvs}"

    # negative control: keeping every n-gram proposal (as if q were p) is told apart
    biased = Counter()
    for seed in range(n):
        s = Sampler(temperature, top_p, top_k, seed=20_000 + seed)
        first = s.pick(target.run(ids, 0, logits_from=len(ids) - 1)[-1])
        rest = propose(ng.bind(drafter.text), first, len(ids), Sampler(), DEPTH - 1)[0]
        if len(rest) < DEPTH - 1:
            cache.length = len(ids)
            rest = [t for it in generate(target, ids + [first], DEPTH - 1, s) for t in it]
        biased[tuple([first] + rest)[:DEPTH]] += 1
    ps_q, _ = _projections(biased, levels, n)
    assert min(ps_q) < 1e-6


# -- 3. n-gram proposals with known answers --------------------------------------------------------
@pytest.mark.parametrize("seq,n_min,n_max,k,want", [
    ([1, 2, 3, 4, 1, 2], 1, 3, 8, ([3, 4, 1, 2], 2)),          # "1 2" seen before: what followed it
    ([1, 2, 3, 4, 1, 2], 1, 3, 2, ([3, 4], 2)),                # cut to the longest proposal
    ([1, 2, 3, 9, 2, 3, 7, 2, 3], 1, 3, 2, ([7, 2], 2)),       # the most recent occurrence wins
    ([5, 1, 2, 3, 6, 1, 2, 3], 1, 3, 3, ([6, 1, 2], 3)),       # the longest n is tried first
    ([7, 2, 3, 8, 1, 2, 3, 9, 4, 2, 3], 1, 3, 2, ([9, 4], 2)),  # no 3-gram match: the 2-gram's
    ([1, 2, 3, 4, 5], 1, 3, 4, ([], 0)),                       # nothing repeats
    ([1, 2, 3, 4, 3], 2, 3, 4, ([], 0)),                       # only a 1-gram matches, n_min 2
    ([1, 2, 3, 4, 3], 1, 3, 4, ([4, 3], 1)),                   # ...which n_min 1 takes
    ([4, 4, 4, 4], 1, 3, 5, ([4], 3)),                         # the match may run into the suffix
    ([], 1, 3, 4, ([], 0)),
])
def test_ngram_lookup_known_answers(seq, n_min, n_max, k, want):
    assert NGramIndex(n_max, seq).lookup(n_min, n_max, k) == want


def test_ngram_index_incremental_equals_batch_and_brute_force():
    import random
    rng = random.Random(3)
    seq = [rng.randrange(4) for _ in range(300)]
    inc = NGramIndex(3)
    for i, t in enumerate(seq):
        inc.extend([t])
        got = inc.lookup(1, 3, 5)
        assert got == NGramIndex(3, seq[:i + 1]).lookup(1, 3, 5)
        for n in (3, 2, 1):          # brute force: the latest earlier start j with the same n tokens
            if i + 1 <= n:
                continue
            tail = seq[i + 1 - n:i + 1]
            js = [j for j in range(i + 1 - n) if seq[j:j + n] == tail]
            if js:
                assert got == (seq[js[-1] + n:min(js[-1] + n + 5, i + 1)], n)
                break
        else:
            assert got == ([], 0)


def test_drafter_feedback_tracks_the_text():
    """The bound drafter sees the prompt, each step's last token and the kept drafts only."""
    d = NGramDrafter(NGramPolicy(n_min=1, n_max=2, max_tokens=3), 50).bind([10, 11, 12, 13, 10])
    assert propose(d, 11, 5, Sampler(), 3)[0] == [12, 13, 10]
    d.feedback([12, 13, 10], 1)              # text: 10 11 12 13 10 11 12 ; verify's token 20 comes next
    assert d.index.tokens == [10, 11, 12, 13, 10, 11, 12]
    assert propose(d, 20, 7, Sampler(), 3)[0] == []
    d.feedback([], 0)
    assert propose(d, 12, 8, Sampler(), 2)[0] == [20, 12]   # "12" was last followed by 20 (at 7)
    s = Sampler(0.7, seed=0)
    d2 = NGramDrafter(NGramPolicy(), 50).bind([1, 2, 1])
    tokens, probs = propose(d2, 2, 3, s, 4)
    assert tokens == [1, 2] and len(probs) == 2
    assert all(q.shape == (50,) and q[t] == 1.0 and q.sum() == 1.0 for q, t in zip(probs, tokens))


# -- 4. profiles and bundles -----------------------------------------------------------------------
def test_profile_kinds_round_trip(ngram_bundle):
    b = Bundle.open(ngram_bundle)
    assert PROFILE_SCHEMA_VERSION >= 2          # 3 added cascades (test_cascade.py)
    ng, hy, model = b.profiles["ng"], b.profiles["hy"], b.profiles["model"]
    assert (ng.kind, ng.plan, ng.policy) == ("ngram", None, None)
    assert ng.ngram == NGramPolicy(1, 3, 6, 2)
    assert hy.kind == "hybrid" and hy.ngram.min_match == 2 and list(hy.plan.skip_layers) == [1]
    assert model.kind == "model" and model.ngram is None and model.raw["schema_version"] == 1
    again = Profile.from_json(json.loads(json.dumps(hy.raw)))
    assert (again.kind, again.ngram, again.policy) == (hy.kind, hy.ngram, hy.policy)
    assert b.draft_graphs("ng") is None and b.draft_graphs("hy") is not None
    assert "body" not in b.manifest["profiles"]["ng"]
    assert b.describe()["profiles"]["ng"]["draft"]["kind"] == "ngram"
    e = Engine(b)
    assert isinstance(e.drafters["ng"], NGramDrafter) and isinstance(e.drafters["hy"], HybridDrafter)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["draft"].update(kind="cascade"), "draft.kind"),
    (lambda d: d["draft"].pop("ngram"), "draft.ngram"),
    (lambda d: d["draft"]["ngram"].update(n_min=4), "n_min <= n_max"),
    (lambda d: d["draft"]["ngram"].update(max_tokens=True), "max_tokens"),
    (lambda d: d["draft"]["ngram"].update(window=3), "unknown"),
    (lambda d: d.update(schema_version=4), "newer"),
])
def test_bad_ngram_profiles_are_refused(change, message):
    d = ngram_profile({"architecture": "llama", "num_layers": 4, "config_sha256": "a", "weights_sha256": "b"})
    Profile.from_json(copy.deepcopy(d))
    change(d)
    with pytest.raises(ProfileError, match=message):
        Profile.from_json(d)


def test_json_schema_takes_the_new_kinds():
    jsonschema = pytest.importorskip("jsonschema")
    import os
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles",
                           "profile.schema.json")) as f:
        schema = json.load(f)
    ident = {"name": "tiny", "architecture": "llama", "num_layers": 4, "config_sha256": "a" * 64,
             "weights_sha256": "b" * 64}
    jsonschema.validate(ngram_profile(ident), schema)
    jsonschema.validate(hybrid_profile(ident), schema)
    bad = hybrid_profile(ident)
    bad["draft"].pop("ngram")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = ngram_profile(ident)
    bad["draft"]["kind"] = "model"           # a model draft needs its precision and k
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_bench_ngram_system(tiny_bundle, tmp_path):
    """conflayers-bench's `ngram` system: the runtime with an n-gram drafter on the full graph,
    lossless first, and drafting ran."""
    from conflayers.tools.bench import main
    out = tmp_path / "bench.json"
    rc = main([str(a) for a in (tiny_bundle, "--task", "gsm8k", "--num-prompts", 2,
                                "--max-new-tokens", 24, "--systems", "plain,ngram,auto", "--json", out)])
    assert rc == 0
    rows = {s["name"]: s for s in json.loads(out.read_text())["systems"]}
    assert rows["ngram"]["identical_to_plain"] is True and rows["ngram"]["status"] == "ok"
    assert rows["ngram"]["mean_accepted_tokens"] is not None
    assert rows["auto"]["identical_to_plain"] is True     # the bundle's own profiles are untouched
    assert Bundle.open(tiny_bundle).profiles.keys() == {"int8skip", "fp32sub"}


# -- 5. under continuous batching ------------------------------------------------------------------
@pytest.mark.parametrize("spec_max_batch", [99, 2])
def test_batched_ngram_and_hybrid_equal_solo_and_draft(engine, spec_max_batch):
    """Under continuous batching, n-gram and hybrid requests propose as they would alone and
    their drafts join the batched verify pass: each greedy output equals its solo output, each
    seeded sample its solo sample, and a greedy request drafts and keeps what it does alone.
    With drafting off above a batch of 1 (spec_max_batch=2), greedy requests step plainly while
    others decode and the index still follows their text."""
    import threading

    args = []
    for i, p in enumerate(PROMPTS * 3):
        a = dict(_kw(p), task=("ng", "hy", "model")[i % 3], max_new_tokens=N_NEW - 3 * i)
        if i % 4 == 3:
            a.update(temperature=0.9, top_k=20, seed=i)
        args.append(a)
    solo = [engine.generate(**a) for a in args]
    engine.set_batching(4, prefill_chunk=16, spec_max_batch=spec_max_batch)
    out = [None] * len(args)

    def run(i):
        out[i] = engine.generate(**args[i])

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.set_batching(1)
    assert [o.token_ids for o in out] == [s.token_ids for s in solo]
    for task in ("ng", "hy"):
        metrics = [o.metrics for a, o in zip(args, out) if a["task"] == task]
        assert all(m.profile == task and m.speculative for m in metrics)
        assert sum(m.drafted_tokens for m in metrics) > 0
        if spec_max_batch < 99:
            continue
        # a greedy request's proposals are its solo ones (the index follows the same text)
        greedy = [(o.metrics, s.metrics) for a, o, s in zip(args, out, solo) if a["task"] == task and "seed" not in a]
        assert [(b.drafted_tokens, b.accepted_tokens, b.draft_steps) for b, _ in greedy] == \
            [(m.drafted_tokens, m.accepted_tokens, m.draft_steps) for _, m in greedy]


def test_batched_ngram_decisions_follow_the_served_acceptance(engine):
    """Until OBSERVE_AFTER proposals are verified, n-gram decisions come from the profile's
    figures (none here: proposals only alone); then from the rate served, revised as it changes;
    the model draft's plan is untouched. Costs are set by hand so the answers are known."""
    from conflayers.runtime.batchcost import BatchCosts, proposals_pay
    from conflayers.runtime.batchplan import OBSERVE_AFTER
    engine.set_batching(4)
    be = engine.planner
    try:
        be.costs = BatchCosts((1, 2, 4), 9, ((10, 12), (11, 20), (12, 60)), {"hy": (1, 1, 1)})
        be._decisions.clear()
        assert be.proposal_rate("ng") is None                       # no figures in this profile
        assert [be.ngram_proposes("ng", n) for n in (1, 2, 4)] == [True, False, False]
        model_plan = [be.draft_length("hy", n) for n in (1, 2, 3, 4)]
        for _ in range(OBSERVE_AFTER - 1):
            be.observe_proposal("ng", 6, 6)                        # every proposal kept
        assert be.proposal_rate("ng") is None and be.ngram_proposes("ng", 2) is False    # not yet
        be.observe_proposal("ng", 6, 6)
        assert be.proposal_rate("ng") == (6.0, 6.0)
        assert [be.ngram_proposes("ng", n) for n in (1, 2, 4)] == [True, True, True]
        for _ in range(3 * OBSERVE_AFTER):
            be.observe_proposal("ng", 6, 0)                        # then none kept
        assert be.proposal_rate("ng") == (6.0, 1.5)
        assert [be.ngram_proposes("ng", n) for n in (1, 2, 4)] == [proposals_pay(6.0, 1.5, be.costs, n)
                                                                  for n in (1, 2, 4)] == [True, True, False]
        assert [be.draft_length("hy", n) for n in (1, 2, 3, 4)] == model_plan
    finally:
        engine.set_batching(1)


# -- 6. how much of a match to propose: the verify curve of this machine -------------------------
STEEP = [1.0, 1.17, 1.28, 1.62, 1.93, 2.26, 2.48, 2.69, 3.01]   # SmolLM2 native, AVX2 EPYC, 843 tokens


def _curve(values):
    return lambda n: values[n - 1] if n <= len(values) else values[-1] + 0.3 * (n - len(values))


def test_proposal_length_follows_the_verify_curve():
    """Known answers: a free verify takes the whole match; on the steep 4-bit curve a half-kept
    proposal pays at 2 tokens, a 95%-kept one at 7, a 10%-kept one not at all."""
    from conflayers.runtime.ngram import proposal_length
    flat = _curve([1.0] * 9)
    assert proposal_length(8, 0.5, flat) == 8
    assert proposal_length(8, 0.5, _curve(STEEP)) == 2
    assert proposal_length(8, 0.95, _curve(STEEP)) == 7
    assert proposal_length(3, 0.95, _curve(STEEP)) == 3
    assert proposal_length(8, 0.1, _curve(STEEP)) == 0
    assert proposal_length(0, 0.95, flat) == 0


def test_acceptance_estimate_counts_the_tokens_tried():
    from conflayers.runtime.ngram import AcceptanceEstimate
    a = AcceptanceEstimate(prior=0.5, weight=4.0)
    assert a.rate == 0.5
    a.update(3, 3)                     # all kept: three tries, no rejection seen
    a.update(4, 1)                     # one kept, the second rejected: two tries
    assert (a.accepted, a.tries) == (4, 5)
    assert a.rate == pytest.approx((4 + 2) / (5 + 4))


def test_acceptance_is_kept_per_match_length():
    """Proposals from 1-token matches that fail do not cut those from 3-token matches that are
    kept: each length has its own estimate (from the prior until its first verify), and on the
    steep curve the two get different lengths."""
    from conflayers.runtime.ngram import MatchAcceptance, proposal_length
    a = MatchAcceptance()
    assert a.rate(1) == a.rate(3) == 0.5
    for _ in range(6):
        a.update(1, 4, 0)              # 1-token matches: the first token rejected
        a.update(3, 4, 4)              # 3-token matches: every token kept
    assert a.rate(1) < 0.5 < a.rate(3) and a.rate(2) == 0.5
    assert (a.accepted, a.tries) == (24, 30)
    assert a.rate(1) == pytest.approx(2 / 10) and a.rate(3) == pytest.approx(26 / 28)
    assert proposal_length(8, a.rate(1), _curve(STEEP)) == 1       # one rate for both (0.76): 2 tokens each
    assert proposal_length(8, a.rate(3), _curve(STEEP)) == 7


def test_proposals_are_cut_by_the_verify_curve_and_output_stays_plain(engine):
    """Lossless first: the planted text proposes plain decoding's continuation; with the steep
    curve its proposals are cut (from the 0.5 prior, 2 tokens pay; 3 once most are kept) and the
    output is still plain decoding's; without a curve whole 6-token matches go, as before."""
    ids = engine.encode(PROMPTS[0])
    plain = _greedy(engine, ids, 24)
    seg = ids[-2:] + list(plain[:20])
    text = ids[:len(ids) - len(seg) - 2] + seg + ids[-2:]
    longest = {}
    for name, curve in (("whole", None), ("cut", _curve(STEEP))):
        ng = NGramDrafter(NGramPolicy(1, 3, 6), engine.spec.vocab_size)
        ng.verify_cost = curve
        out, bound, stats = _loop(engine, ids, Planted(ng, text), 24)
        assert out == plain
        assert stats.accepted_tokens >= 12
        longest[name] = max(stats.accept_lengths)
        assert bound.acceptance.accepted == stats.accepted_tokens
        assert stats.accepted_tokens <= bound.acceptance.tries <= stats.accepted_tokens + stats.draft_steps
    assert longest["whole"] == 6 and 2 <= longest["cut"] <= 3


def test_an_ngram_profile_gets_this_machines_verify_curve(ngram_bundle):
    """adapt: the engine times the full graph for the n-gram profile (widths 1..max_tokens + 1)
    and gives that curve to its drafter and guard; adapt=False keeps the compiled curve, and a
    profile without one proposes whole matches."""
    e = Engine.load(ngram_bundle, guard=False)
    assert e.adapt_policy("ng") is not None
    costs = e.machine_costs["ng"]
    assert len(costs.verify_ms) == 7 and costs.draft_ms == 0.0
    assert all(b >= a for a, b in zip(costs.verify_ms, costs.verify_ms[1:])) and costs.verify_ms[0] > 0
    assert e.drafters["ng"].verify_cost(1) == 1.0 and e.drafters["ng"].verify_cost(7) >= 1.0
    e.close()
    fixed = Engine.load(ngram_bundle, guard=False, adapt=False)
    fixed.adapt_policy("ng")
    assert fixed.machine_costs["ng"] is None and fixed.drafters["ng"].verify_cost is None   # no cost model
    fixed.close()
