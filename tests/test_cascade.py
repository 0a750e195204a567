"""Draft cascades (runtime/cascade.py): lossless first (greedy output token-identical to plain
decoding; sampled output distributed as the target's), then what the stages did, then profiles
(schema version 3, versions 1 and 2 still load), bundles and the batched engine's fallback."""
from __future__ import annotations

import copy
import json
import os
from collections import Counter

import pytest

from conflayers.runtime import Bundle, Engine
from conflayers.runtime.bundle import BundleError
from conflayers.runtime.cascade import CascadeDrafter
from conflayers.runtime.decoding import DecodeStats, generate
from conflayers.runtime.drafter import LayerSkipDrafter, propose
from conflayers.runtime.ngram import HybridDrafter
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.profile import PROFILE_SCHEMA_VERSION, Profile, ProfileError
from conflayers.runtime.sampling import Sampler

import tiny
from test_sampling import _projections, exact_joint_model

N_NEW = 40
PROMPTS = [
    "Janet has 3 apples and buys 5 more.",
    "def add(a, b):\n    return a + b\n\n",
    [{"role": "user", "content": "Write a short poem about the sea."}],
    "7",
]
CASCADES = ["casc", "casc_sub", "three"]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


def _draft(ident, precision, **kw):
    return tiny.profile_json("x", ident, precision, **kw)["draft"]


def cascade_profile(ident, task, top: dict, stages: list[dict]) -> dict:
    p = tiny.profile_json(task, ident, **top)
    p["schema_version"] = 3
    p["draft"].update(kind="cascade", cascade={"stages": stages})
    return p


def _profiles(ident):
    return [
        cascade_profile(ident, "casc", {"precision": "int8", "skip_layers": [1], "k": 4},
                        [_draft(ident, "int4", skip_layers=[1, 2], k=2)]),
        cascade_profile(ident, "casc_sub", {"precision": "fp32", "skip_attention": [2], "k": 3,
                                            "confidence_stop": 0.3, "vocab_ids": list(range(3, 300))},
                        [_draft(ident, "int8", skip_layers=[1, 2], k=2, vocab_ids=list(range(3, 200)))]),
        cascade_profile(ident, "three", {"precision": "int8", "k": 5},
                        [_draft(ident, "int4", skip_layers=[1, 2], k=1), _draft(ident, "int4", skip_layers=[1], k=2)]),
        tiny.profile_json("model", ident, "int8", k=4),                     # schema version 1
        {**tiny.profile_json("hy", ident, "int8", skip_layers=[1], k=4), "schema_version": 2},
    ]


def _hybrid(p):
    p["draft"].update(kind="hybrid", ngram={"n_min": 1, "n_max": 3, "max_tokens": 6, "min_match": 2})
    return p


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    out = str(tmp_path_factory.mktemp("cascade") / "tiny")
    profiles = [lambda ident, i=i: _profiles(ident)[i] for i in range(4)]
    profiles.append(lambda ident: _hybrid(_profiles(ident)[4]))
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=profiles)


@pytest.fixture(scope="module")
def engine(cascade_bundle):
    return Engine.load(cascade_bundle, guard=False)


def _loop(engine, ids, task, n, sampler=None, stop_ids=frozenset()):
    cache = KVCache(engine.spec, 256)
    bound = engine.drafters[task].bind(ids)
    stats = DecodeStats()
    out = [t for it in generate(engine.full.bind(cache), ids, n, sampler or Sampler(), drafter=bound,
                                stop_ids=stop_ids, stats=stats) for t in it]
    return out, bound, stats


# -- 1. lossless: greedy identity ------------------------------------------------------------------
@pytest.mark.parametrize("task", CASCADES)
def test_greedy_output_equals_plain(engine, task):
    for prompt in PROMPTS:
        plain = engine.generate(**_kw(prompt), speculate=False, max_new_tokens=N_NEW)
        spec = engine.generate(**_kw(prompt), task=task, max_new_tokens=N_NEW)
        assert spec.token_ids == plain.token_ids
        assert spec.metrics.speculative and spec.metrics.profile == task and spec.metrics.draft_steps > 0
        assert len(plain.token_ids) == N_NEW or plain.finish_reason == "stop"


@pytest.mark.parametrize("task", CASCADES)
def test_stages_ran_and_the_top_stage_decided(engine, task):
    """The lower stages proposed, the top stage kept some and rejected some of their tokens, and
    the target kept some of the cascade's: every path of the check and the verify ran."""
    ids = engine.encode(PROMPTS[0])
    plain = engine.generate(prompt_ids=ids, speculate=False, max_new_tokens=N_NEW).token_ids
    out, bound, stats = _loop(engine, ids, task, N_NEW)
    assert out == plain
    s = bound.stats
    assert s["rounds"] >= stats.draft_steps > 0
    assert 0 < s["lower_accepted"] < s["lower_drafted"]
    assert 0 < stats.accepted_tokens <= stats.drafted_tokens
    assert stats.drafted_tokens <= stats.draft_steps * engine.drafters[task].policy.max_tokens
    if task == "three":            # the middle stage is itself a cascade over the cheapest one
        assert isinstance(bound.lower, type(bound)) and bound.lower.stats["rounds"] > 0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_generations_and_stop_tokens(engine, n):
    plain_long = engine.generate(PROMPTS[0], speculate=False, max_new_tokens=N_NEW).token_ids
    ids = engine.encode(PROMPTS[0])
    stop = plain_long[n + 4]
    want = plain_long[:plain_long.index(stop) + 1]
    for task in CASCADES:
        assert engine.generate(PROMPTS[0], task=task, max_new_tokens=n).token_ids == plain_long[:n]
        assert _loop(engine, ids, task, N_NEW, stop_ids=frozenset([stop]))[0] == want


# -- 2. lossless: sampling distribution ------------------------------------------------------------
E2E = [  # cascade, temperature, top_k, top_p, tokens compared exactly, samples
    ("casc", 0.7, 0, 1.0, 3, 1000),
    ("casc_sub", 1.0, 3, 1.0, 4, 800),
]
DEPTH = 4      # the first token comes from the prefill; from the third on, the lower stage drafts


@pytest.mark.parametrize("task,temperature,top_k,top_p,exact_depth,n", E2E)
def test_sampling_distribution_end_to_end(engine, tiny_llama, task, temperature, top_k, top_p, exact_depth, n):
    """The first DEPTH sampled tokens of speculative sampling with a cascade against the exact joint
    distribution of the full model (its first exact_depth tokens, as test_sampling.py does for a
    single draft)."""
    ids = engine.encode(PROMPTS[0])
    truncated = top_k or top_p < 1.0
    levels = exact_joint_model(tiny_llama, ids, exact_depth, temperature, top_k, top_p,
                               eps=0.0 if truncated else 1e-4)
    cache = KVCache(engine.spec, len(ids) + DEPTH + 8)
    target = engine.full.bind(cache)
    drafter = engine.drafters[task]
    bound = drafter.bind(ids)
    spec, drafted, accepted = Counter(), 0, 0
    for seed in range(n):
        st = DecodeStats()
        out = [t for it in generate(target, ids, DEPTH, Sampler(temperature, top_p, top_k, seed=seed),
                                    drafter=bound, stats=st) for t in it]
        assert len(out) == DEPTH
        spec[tuple(out)] += 1
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
    assert 0 < accepted < drafted                 # the target kept and rejected cascade tokens
    assert 0 < bound.stats["lower_accepted"] < bound.stats["lower_drafted"]   # so did the top stage
    if truncated and exact_depth == DEPTH:
        assert set(spec) <= set(levels[-1]), "tokens outside the target's top-k/top-p support"
    ps, tvs = _projections(spec, levels, n)
    assert min(ps) > 1e-4, f"cascade sampling differs from the target: p={ps} tv={tvs}"

    # negative control: the target's first token, then the cascade's own proposals kept as they are
    own = Counter()
    for seed in range(n):
        s = Sampler(temperature, top_p, top_k, seed=10_000 + seed)
        first = s.pick(target.run(ids, 0, logits_from=len(ids) - 1)[-1])
        rest, q = propose(bound, first, len(ids), s, DEPTH - 1, cache)
        assert len(q) == len(rest) and all(abs(x.sum() - 1.0) < 1e-9 for x in q)
        if len(rest) < DEPTH - 1:             # the confidence stop ended the draft: skip the sample
            continue
        own[tuple([first] + rest)] += 1
    ps_q, _ = _projections(own, levels, sum(own.values()))
    assert min(ps_q) < 1e-6, f"the test cannot tell the cascade's proposals from the target: p={ps_q}"
    print(f"cascade {task} T={temperature} top_k={top_k}: speculative p={ps} tv={tvs}, own proposals p={ps_q}")


def test_seeded_sampling_is_reproducible(engine):
    runs = [engine.generate(PROMPTS[0], task="casc", temperature=0.9, top_k=20, seed=s, max_new_tokens=30).token_ids
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# -- 3. profiles and bundles -----------------------------------------------------------------------
def test_profile_round_trip_and_old_profiles_load(cascade_bundle):
    b = Bundle.open(cascade_bundle)
    assert PROFILE_SCHEMA_VERSION == 3
    casc, sub, three = b.profiles["casc"], b.profiles["casc_sub"], b.profiles["three"]
    assert casc.kind == "cascade" and casc.plan.precision == "int8" and casc.policy.max_tokens == 4
    assert [(s.plan.precision, s.plan.skip_layers, s.policy.max_tokens) for s in casc.stages] == [("int4", (1, 2), 2)]
    assert sub.stages[0].vocab_ids == list(range(3, 200)) and sub.vocab_ids == list(range(3, 300))
    assert [s.plan.skip_layers for s in three.stages] == [(1, 2), (1,)]
    again = Profile.from_json(json.loads(json.dumps(sub.raw)))
    assert (again.kind, again.stages, again.plan, again.policy) == (sub.kind, sub.stages, sub.plan, sub.policy)
    # versions 1 and 2 still load, with their kinds
    model, hy = b.profiles["model"], b.profiles["hy"]
    assert (model.raw["schema_version"], model.kind, model.stages) == (1, "model", [])
    assert (hy.raw["schema_version"], hy.kind) == (2, "hybrid")
    # the manifest names each stage's graphs; the reader hands them out cheapest first
    entry = b.manifest["profiles"]["three"]
    assert len(entry["stages"]) == 2 and "stages" not in b.manifest["profiles"]["model"]
    assert [g.kv_layers for g in b.stage_graphs("three")] == [[0, 3], [0, 2, 3]]
    assert b.stage_graphs("model") == []
    described = b.describe()["profiles"]["casc_sub"]["draft"]
    assert described["kind"] == "cascade" and described["stages"][0]["vocab_subset_size"] == 197
    e = Engine(b)
    assert isinstance(e.drafters["model"], LayerSkipDrafter) and isinstance(e.drafters["hy"], HybridDrafter)
    d = e.drafters["three"]
    assert isinstance(d, CascadeDrafter) and len(d.stages) == 3 and d.model is None
    assert [s.policy.max_tokens for s in d.stages] == [1, 2, 5]
    assert e.adapt_policy("three") == d.policy          # compiled policy kept (cascade.py)


IDENT = {"architecture": "llama", "num_layers": 4, "config_sha256": "a", "weights_sha256": "b"}


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(schema_version=2), "needs schema_version >= 3"),
    (lambda d: d["draft"].pop("cascade"), "draft.cascade"),
    (lambda d: d["draft"]["cascade"].update(stages=[]), "at least one stage"),
    (lambda d: d["draft"]["cascade"].update(order="up"), "unknown"),
    (lambda d: d["draft"]["cascade"]["stages"][0].pop("precision"), r"stages\[0\].precision"),
    (lambda d: d["draft"]["cascade"]["stages"][0].update(max_draft_tokens=0), r"stages\[0\]"),
    (lambda d: d["draft"]["cascade"]["stages"][0].update(vocab_subset={"size": 1, "token_ids": [True]}),
     "non-negative ints"),
    (lambda d: d["draft"].update(skip_layers=[1, 3]), r"keeps attention in layers \[3\].*top draft skips"),
    (lambda d: d.update(schema_version=4), "newer"),
])
def test_bad_cascade_profiles_are_refused(change, message):
    d = cascade_profile(IDENT, "c", {"precision": "int8", "skip_layers": [1]},
                        [_draft(IDENT, "int4", skip_layers=[1], skip_attention=[2], k=2)])
    Profile.from_json(copy.deepcopy(d))
    change(d)
    with pytest.raises(ProfileError, match=message):
        Profile.from_json(d)


def _edited(cascade_bundle, tmp_path, fn):
    import shutil
    dst = str(tmp_path / "b")
    shutil.copytree(cascade_bundle, dst)
    mpath = os.path.join(dst, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    fn(m)
    with open(mpath, "w") as f:
        json.dump(m, f)
    return dst


@pytest.mark.parametrize("fn,message", [
    (lambda m: m["profiles"]["three"]["stages"].pop(), r"2 cascade stage\(s\).*graphs for 1"),
    (lambda m: m["profiles"]["casc"].pop("stages"), r"1 cascade stage\(s\).*graphs for 0"),
    (lambda m: m["profiles"]["casc_sub"]["stages"][0].update(head=m["profiles"]["casc_sub"]["head"]),
     "cascade stage 0 draft drafts over 197 tokens, its head graph scores 297"),
    (lambda m: m["profiles"]["casc"]["stages"][0].update(body="nope"), "cascade stage 0 draft body 'nope'"),
    (lambda m: m["profiles"]["three"]["stages"].reverse(), "cascade stage 0 draft keeps attention"),
])
def test_bundle_reader_checks_the_stages(cascade_bundle, tmp_path, fn, message):
    with pytest.raises(BundleError, match=message):
        Bundle.open(_edited(cascade_bundle, tmp_path, fn), verify=False)


def test_json_schema_takes_cascades():
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles",
                           "profile.schema.json")) as f:
        schema = json.load(f)
    ident = {"name": "tiny", **IDENT, "config_sha256": "a" * 64, "weights_sha256": "b" * 64}
    good = cascade_profile(ident, "c", {"precision": "int8"}, [_draft(ident, "int4", skip_layers=[1], k=2)])
    jsonschema.validate(good, schema)
    for change in (lambda d: d["draft"].pop("cascade"), lambda d: d["draft"]["cascade"].update(stages=[]),
                   lambda d: d["draft"]["cascade"]["stages"][0].pop("max_draft_tokens")):
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# -- 4. in a batch: a cascade's rounds (lower passes, top check passes) batched with others -------
def test_cascades_in_a_batch_equal_plain(engine):
    """Cascade requests decoded together (their lower stages' and check passes packed into shared
    passes, beside a plain request) give each its plain output."""
    import threading
    plain = [engine.generate(**_kw(p), speculate=False, max_new_tokens=N_NEW).token_ids for p in PROMPTS]
    engine.set_batching(4, prefill_chunk=8, spec_max_batch=99)
    try:
        out = [None] * (len(PROMPTS) + 1)

        def go(i):
            speculate = i < len(PROMPTS)
            out[i] = engine.generate(**_kw(PROMPTS[i % len(PROMPTS)]), task=CASCADES[i % len(CASCADES)],
                                     max_new_tokens=N_NEW, speculate=speculate)
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(out))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for i, r in enumerate(out):
            assert r.token_ids == plain[i % len(PROMPTS)]
        assert all(r.metrics.draft_steps > 0 for r in out[:-1]) and out[-1].metrics.draft_steps == 0
    finally:
        engine.set_batching(1)
