"""The decoding loop: speculative greedy output is token-identical to plain greedy output (and to
HF transformers), rejected drafts are rolled back in the KV cache without recomputation, stop
tokens end the output exactly, and the speculation guard turns useless drafting off.

In every decoding test the lossless property (speculative == plain, token for token) is
asserted first."""
from __future__ import annotations

import numpy as np
import pytest

from conflayers.runtime import Engine
from conflayers.runtime.decoding import DecodeStats, SpeculationGuard, generate
from conflayers.runtime.drafter import Drafter, DraftJob
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.sampling import Sampler

import tiny

N_NEW = 32
PROMPTS = [
    "Janet has 3 apples and buys 5 more.",
    "def add(a, b):",
    "Translate the following sentence into French:",
    "7",
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Summarize the article about the city council meeting."}],
]
PROFILES = ["int8skip", "fp32sub"]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


def _flat(iterations):
    return [t for it in iterations for t in it]


def hf_greedy(model, ids, n, eos=1):
    """HF transformers greedy continuation of `ids`, without the final EOS."""
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=2)
    cont = out[0, len(ids):].tolist()
    if cont and cont[-1] == eos:
        cont = cont[:-1]
    return cont


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    """The tiny bundle with the guard off, so that drafting runs for the whole request."""
    return Engine.load(tiny_bundle, guard=False)


@pytest.fixture(scope="module")
def guard_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """A useless draft (only layer 0 kept, k=6) and a perfect one (no layer skipped, k=6)."""
    out = str(tmp_path_factory.mktemp("guard") / "tiny")
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=[
        lambda ident: tiny.profile_json("useless", ident, "fp32", skip_layers=[1, 2, 3], k=6),
        lambda ident: tiny.profile_json("full", ident, "fp32", skip_layers=[], k=6),
    ])


@pytest.fixture(scope="module")
def guard_engine(guard_bundle):
    return Engine.load(guard_bundle)


@pytest.fixture(scope="module")
def guard_engine_noguard(guard_bundle):
    return Engine.load(guard_bundle, guard=False)


_hf_cache: dict = {}


def _hf(model, ids, n):
    key = (tuple(ids), n)
    if key not in _hf_cache:
        _hf_cache[key] = hf_greedy(model, ids, n)
    return _hf_cache[key]


# -- 1. token identity -------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("pi", range(len(PROMPTS)))
def test_greedy_speculative_equals_plain_and_hf(engine, tiny_engine, tiny_llama, profile, pi):
    kw = _kw(PROMPTS[pi])
    plain = engine.generate(**kw, speculate=False, max_new_tokens=N_NEW)
    spec = engine.generate(**kw, task=profile, max_new_tokens=N_NEW)
    assert spec.token_ids == plain.token_ids
    guarded = tiny_engine.generate(**kw, task=profile, max_new_tokens=N_NEW)
    assert guarded.token_ids == plain.token_ids
    # the comparison is not vacuous: drafting ran, the plain run did not, the output is long
    assert spec.metrics.speculative and spec.metrics.profile == profile
    assert spec.metrics.draft_steps > 0 and spec.metrics.drafted_tokens > 0
    assert not plain.metrics.speculative and plain.metrics.draft_steps == 0
    assert len(plain.token_ids) == N_NEW or plain.finish_reason == "stop"
    assert spec.text == plain.text
    assert plain.token_ids == _hf(tiny_llama, engine.encode(**kw), N_NEW)


def test_some_drafts_are_accepted(engine):
    """Identity above must also cover kept drafts, not only rejections."""
    accepted = sum(engine.generate(**_kw(p), task="fp32sub", max_new_tokens=N_NEW).metrics.accepted_tokens
                   for p in PROMPTS)
    assert accepted > 0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_generations(engine, tiny_llama, profile, n):
    for prompt in (PROMPTS[0], PROMPTS[4]):
        kw = _kw(prompt)
        plain = engine.generate(**kw, speculate=False, max_new_tokens=n)
        spec = engine.generate(**kw, task=profile, max_new_tokens=n)
        assert spec.token_ids == plain.token_ids
        assert len(plain.token_ids) == n
        assert spec.metrics.completion_tokens == n
        assert plain.token_ids == _hf(tiny_llama, engine.encode(**kw), N_NEW)[:n]


def _pick_stop(tokens, min_index, ok=lambda i: True):
    """A token of `tokens` whose first occurrence is at index >= min_index and satisfies ok."""
    for i, t in enumerate(tokens):
        if i >= min_index and tokens.index(t) == i and ok(i):
            return t, i
    pytest.fail("no usable stop token in the plain output")


@pytest.mark.parametrize("which", ["full", "int8skip", "fp32sub"])
def test_stop_token_mid_draft(engine, guard_engine_noguard, which):
    """Drive the loop directly with stop_ids = a token of the plain output: both modes end exactly
    at its first occurrence (the stop token included). With the perfect draft the stop token falls
    inside an accepted draft, so the kept drafts after it must be dropped."""
    eng = guard_engine_noguard if which == "full" else engine
    ids = eng.encode("Janet has 3 apples and buys 5 more.")
    cache = KVCache(eng.spec, 128)
    target = eng.full.bind(cache)
    plain_all = _flat(generate(target, ids, 40, Sampler()))
    k = eng.drafters[which].policy.max_tokens
    # with a perfect draft, iterations after the first yield k+1 tokens: indices 1..k+1, k+2..
    mid = (lambda i: (i - 1) % (k + 1) != k) if which == "full" else (lambda i: True)
    stop, i = _pick_stop(plain_all, 3, mid)
    expected = plain_all[: i + 1]

    plain_stats = DecodeStats()
    plain = _flat(generate(target, ids, 40, Sampler(), stop_ids=frozenset({stop}), stats=plain_stats))
    stats = DecodeStats()
    its = list(generate(target, ids, 40, Sampler(), drafter=eng.drafters[which].bind(ids),
                        stop_ids=frozenset({stop}), stats=stats))
    spec = _flat(its)
    assert spec == plain
    assert plain == expected
    assert stats.tokens == len(expected) == plain_stats.tokens
    assert stats.draft_steps > 0
    if which == "full":
        assert stats.accept_lengths[-1] + 1 > len(its[-1]), "the stop token was not mid-draft"


@pytest.mark.parametrize("profile", ["int8skip", "fp32sub", "full"])
def test_stop_token_first_token(engine, guard_engine_noguard, profile):
    eng = guard_engine_noguard if profile == "full" else engine
    ids = eng.encode("def add(a, b):")
    cache = KVCache(eng.spec, 64)
    target = eng.full.bind(cache)
    first = _flat(generate(target, ids, 1, Sampler()))[0]
    spec = list(generate(target, ids, 20, Sampler(), drafter=eng.drafters[profile].bind(ids),
                         stop_ids=frozenset({first})))
    plain = list(generate(target, ids, 20, Sampler(), stop_ids=frozenset({first})))
    assert spec == plain == [[first]]


@pytest.mark.parametrize("profile", ["int8skip", "fp32sub"])
def test_engine_end_token_matches_hf_eos(tiny_bundle, tiny_llama, profile):
    """An end token in the output (the engine's stop ids, here a token the tiny model does emit)
    ends the request with finish_reason 'stop', without the end token, as HF generate with that
    eos_token_id does."""
    eng = Engine.load(tiny_bundle, guard=False)
    kw = _kw(PROMPTS[1])
    base = eng.generate(**kw, speculate=False, max_new_tokens=40).token_ids
    stop, i = _pick_stop(base, 4)
    eng.stop_ids = frozenset({stop})
    plain = eng.generate(**kw, speculate=False, max_new_tokens=40)
    spec = eng.generate(**kw, task=profile, max_new_tokens=40)
    assert spec.token_ids == plain.token_ids
    assert plain.token_ids == base[:i]
    assert plain.finish_reason == spec.finish_reason == "stop"
    assert plain.token_ids == hf_greedy(tiny_llama, eng.encode(**kw), 40, eos=stop)


def test_generation_to_the_end_of_the_context(tiny_bundle):
    """max_new_tokens that fills the KV cache exactly: drafts near the end must not overflow."""
    eng = Engine.load(tiny_bundle, max_context=48, guard=False)
    ids = eng.encode(PROMPTS[0])
    n = eng.capacity - len(ids) + 1
    plain = eng.generate(PROMPTS[0], speculate=False, max_new_tokens=n)
    for profile in PROFILES:
        spec = eng.generate(PROMPTS[0], task=profile, max_new_tokens=n)
        assert spec.token_ids == plain.token_ids
    assert len(plain.token_ids) == n or plain.finish_reason == "stop"


# -- 2. rollback at every acceptance length ------------------------------------------------------
def _assert_cache_prefix_equal(cache, ref, layers, what=""):
    n = cache.length
    assert n > 0
    for layer in range(layers):
        np.testing.assert_allclose(cache.key_array(layer)[..., :n, :], ref.key_array(layer)[..., :n, :],
                                   atol=1e-4, err_msg=f"keys of layer {layer} {what}")
        np.testing.assert_allclose(cache.value_array(layer)[..., :n, :], ref.value_array(layer)[..., :n, :],
                                   atol=1e-4, err_msg=f"values of layer {layer} {what}")


class ScriptedDrafter(Drafter):
    """Proposes the first j tokens of the true plain continuation, then wrong tokens up to k, with
    j taken from a schedule; like a real draft it writes into the KV cache beyond cache.length
    (here: garbage everywhere from the drafted position to the end of the cache)."""

    def __init__(self, cache, prompt_len, truth, schedule, num_layers, vocab, k):
        self.cache, self.P, self.truth = cache, prompt_len, truth
        self.schedule, self.layers, self.vocab, self.k = list(schedule), num_layers, vocab, k
        self.forced: list[int] = []
        self.feedbacks: list[tuple[int, int]] = []
        self.rng = np.random.default_rng(0)

    def feedback(self, tokens, accepted):
        self.feedbacks.append((len(tokens), accepted))

    def begin(self, last_token, start, sampler, budget):
        max_tokens = min(self.k, budget.limit, budget.model)
        assert start == self.cache.length
        t = start - self.P + 1                   # index in truth of the token after last_token
        assert self.truth[t - 1] == last_token
        j = min(self.schedule[len(self.forced)], max_tokens)
        self.forced.append(j)
        good = self.truth[t:t + j]
        bad = [(self.truth[t + m] + 1 + 7 * m) % self.vocab for m in range(j, max_tokens)]
        assert not bad or bad[0] != self.truth[t + j]
        for layer in range(self.layers):
            for arr in (self.cache.key_array(layer), self.cache.value_array(layer)):
                tail = arr[..., start:, :]
                tail[...] = 50.0 * self.rng.standard_normal(tail.shape, dtype=np.float32)
        return DraftJob(good + bad, None, "model")


@pytest.mark.parametrize("schedule", [[0, 1, 2, 3, 4, 4, 2, 0, 3, 1, 0, 4],
                                      [4, 4, 4, 4, 4, 4],
                                      [0, 0, 0, 0, 0, 0, 0, 0]])
def test_rollback_every_acceptance_length(engine, schedule):
    k = 4
    # a last fully accepted step, so that the length cap never shortens a scheduled draft
    schedule = schedule + [k]
    spec = engine.spec
    ids = engine.encode(PROMPTS[0])
    n_new = 1 + sum(j + 1 for j in schedule)
    cap = len(ids) + n_new + 2 * k + 8
    ref = KVCache(spec, cap)
    truth = _flat(generate(engine.full.bind(ref), ids, n_new, Sampler()))
    assert ref.length == len(ids) + n_new - 1

    cache = KVCache(spec, cap)
    target = engine.full.bind(cache)
    calls = []
    run = target.run
    target.run = lambda tokens, start, logits_from=0, full_logits=False: (calls.append((len(tokens), start)),
                                                                         run(tokens, start, logits_from, full_logits))[1]
    drafter = ScriptedDrafter(cache, len(ids), truth, schedule, spec.num_layers, spec.vocab_size, k)
    stats = DecodeStats()
    out = []
    for i, new in enumerate(generate(target, ids, n_new, Sampler(), drafter=drafter, stats=stats)):
        out.extend(new)
        assert out == truth[:len(out)]
        assert cache.length == len(ids) + len(out) - 1
        _assert_cache_prefix_equal(cache, ref, spec.num_layers, f"after iteration {i}")
    assert out == truth
    assert stats.accept_lengths == drafter.forced == schedule
    assert stats.accepted_tokens == sum(schedule) and stats.drafted_tokens == k * len(schedule)
    assert drafter.feedbacks == [(k, j) for j in schedule]        # told after every verify
    # no recomputation: one prefill and then one full pass per iteration, at increasing positions
    assert len(calls) == 1 + len(schedule) == 1 + stats.full_passes
    assert [s for _, s in calls[1:]] == [len(ids) + sum(j + 1 for j in schedule[:i]) for i in range(len(schedule))]
    assert all(n == k + 1 for n, _ in calls[1:])
    # the garbage was really there: beyond what the last verify wrote it is still in the cache
    tail = cache.key_array(0)[..., cache.length + k + 1:, :]
    assert tail.size and np.abs(tail).max() > 10.0


@pytest.mark.parametrize("which", ["int8skip", "fp32sub", "full"])
def test_real_drafts_leave_cache_equal_to_plain(engine, guard_engine_noguard, which):
    eng = guard_engine_noguard if which == "full" else engine
    spec = eng.spec
    ids = eng.encode(PROMPTS[2])
    n_new = 40
    ref = KVCache(spec, 128)
    truth = _flat(generate(eng.full.bind(ref), ids, n_new, Sampler()))
    cache = KVCache(spec, 128)
    drafter = eng.drafters[which]
    stats = DecodeStats()
    out = []
    for new in generate(eng.full.bind(cache), ids, n_new, Sampler(), drafter=drafter.bind(ids), stats=stats):
        out.extend(new)
        assert out == truth[:len(out)]
        _assert_cache_prefix_equal(cache, ref, spec.num_layers)
    assert out == truth
    assert stats.draft_steps > 0
    if which == "full":
        assert stats.acceptance_rate == 1.0


# -- 4. the speculation guard -------------------------------------------------------------------
def test_guard_stops_a_useless_draft(guard_engine, guard_engine_noguard):
    for prompt in (PROMPTS[0], PROMPTS[5]):
        kw = _kw(prompt)
        plain = guard_engine.generate(**kw, speculate=False, max_new_tokens=60)
        spec = guard_engine.generate(**kw, task="useless", max_new_tokens=60)
        assert spec.token_ids == plain.token_ids
        assert len(plain.token_ids) == 60
        m = spec.metrics
        assert m.guard_stopped_at is not None
        assert m.draft_steps <= 8          # the guard's min_steps: drafting stopped right after
        assert m.guard_stopped_at < 20
        assert m.acceptance_rate < 0.3
        # without the guard the same draft runs for the whole request
        unguarded = guard_engine_noguard.generate(**kw, task="useless", max_new_tokens=60)
        assert unguarded.token_ids == plain.token_ids
        assert unguarded.metrics.guard_stopped_at is None and unguarded.metrics.draft_steps > 20


def test_full_model_draft_accepts_everything(guard_engine):
    """skip_layers=[] is the full model itself: every draft is kept. (On this CPU such a draft is
    still slower than plain decoding, k full steps + one verify per k+1 tokens, so the guard is
    right to turn it off; the cheap-and-good case is test_guard_keeps_a_cheap_good_draft.)"""
    plain = guard_engine.generate(PROMPTS[3], speculate=False, max_new_tokens=40)
    spec = guard_engine.generate(PROMPTS[3], task="full", max_new_tokens=40)
    assert spec.token_ids == plain.token_ids
    assert spec.metrics.acceptance_rate == 1.0
    assert spec.metrics.draft_steps > 0 and spec.metrics.accepted_tokens >= 6


class OracleDrafter(Drafter):
    """A free and perfect draft: proposes the true continuation (k tokens) instantly."""

    def __init__(self, prompt_len, truth, k):
        self.P, self.truth, self.k = prompt_len, truth, k

    def begin(self, last_token, start, sampler, budget):
        t = start - self.P + 1
        return DraftJob(self.truth[t:t + min(self.k, budget.limit, budget.model)], None, "model")


def test_guard_keeps_a_cheap_good_draft(guard_engine):
    eng = guard_engine
    ids = eng.encode(PROMPTS[0])
    cache = KVCache(eng.spec, 256)
    target = eng.full.bind(cache)
    truth = _flat(generate(target, ids, 120, Sampler()))
    guard = SpeculationGuard(eng.bundle.profiles["full"].verify_cost)
    stats = DecodeStats()
    its = list(generate(target, ids, 120, Sampler(), drafter=OracleDrafter(len(ids), truth, 8),
                        guard=guard, stats=stats))
    assert _flat(its) == truth
    assert guard.active and stats.guard_stopped_at is None
    # every step drafted but the check's plain steps (one check: after min_steps, then 2x as many)
    assert len(its) - 1 < 1 + 3 * guard.min_steps + guard.probe_steps
    assert stats.draft_steps == len(its) - 1 - guard.probe_steps > guard.min_steps
    assert stats.acceptance_rate == 1.0


def test_guard_stops_when_an_oracle_draft_is_slow(guard_engine, monkeypatch):
    """The same perfect draft, made slow: the guard must turn it off and the output stays put."""
    import time as _time
    eng = guard_engine
    ids = eng.encode(PROMPTS[0])
    cache = KVCache(eng.spec, 256)
    target = eng.full.bind(cache)
    truth = _flat(generate(target, ids, 80, Sampler()))
    oracle = OracleDrafter(len(ids), truth, 2)

    class Slow(Drafter):
        def begin(self, *a):
            _time.sleep(0.02)
            return oracle.begin(*a)

    guard = SpeculationGuard(lambda n: 1.0)
    stats = DecodeStats()
    out = _flat(generate(target, ids, 80, Sampler(), drafter=Slow(), guard=guard, stats=stats))
    assert out == truth
    assert not guard.active
    assert stats.draft_steps == guard.min_steps
    assert stats.guard_stopped_at == 1 + 3 * guard.min_steps


def test_speculation_guard_synthetic():
    cost = lambda n: 1.0 + 0.04 * (n - 1)
    seen = []

    def spy(n):
        seen.append(n)
        return cost(n)

    # drafting costs more than it saves: 1 token per 5.2 ms vs plain 1.2 ms / 1.16 per token
    g = SpeculationGuard(spy, min_steps=8)
    for i in range(7):
        g.record(produced=1, drafted=4, draft_s=0.004, verify_s=0.0012)
        assert g.active, f"turned off after {i + 1} steps, before min_steps"
    g.record(produced=1, drafted=4, draft_s=0.004, verify_s=0.0012)
    assert not g.active
    assert seen and all(n == 5 for n in seen)
    # once off, it stays off for the request even if later steps look good
    g.record(produced=5, drafted=4, draft_s=0.0, verify_s=0.0012)
    assert not g.active

    # drafting pays: 5 tokens per 2.16 ms vs plain ~1 ms per token
    g = SpeculationGuard(cost, min_steps=8)
    for _ in range(50):
        g.record(produced=5, drafted=4, draft_s=0.001, verify_s=0.00116)
    assert g.active

    # the tolerance: plain rate is 1 token per (verify_s / cost(2)) = 1/1ms here
    def run(spec_rate, tol=0.03):
        g = SpeculationGuard(lambda n: 1.0, min_steps=4, tolerance=tol)
        verify = 0.001
        for _ in range(4):
            total = 1.0 / spec_rate          # seconds for one produced token
            g.record(produced=1, drafted=1, draft_s=total - verify, verify_s=verify)
        return g.active

    assert run(1000.0 * (1 - 0.015)) is True      # 1.5% slower: within the tolerance
    assert run(1000.0 * (1 - 0.06)) is False      # 6% slower: off
    assert run(1000.0 * (1 - 0.06), tol=0.1) is True


def test_guard_keeps_drafting_only_on_measured_plain_steps():
    """The cost-model estimate of a plain step may be too slow (a verify's cost grows with the
    context faster than a step's): a draft the estimate keeps is kept only if it beats plain steps
    measured on the request itself, checked again as the context grows."""
    cost = lambda n: 1.0            # says a verify costs one plain step: plain estimated at 2 ms
    spec = dict(produced=2, drafted=2, draft_s=0.001, verify_s=0.002)   # 2 tokens per 3 ms

    # measured plain steps of 1.2 ms (833 tok/s) beat 667 tok/s: off after two such checks
    g = SpeculationGuard(cost, min_steps=8, probe_steps=4)
    for check in range(2):
        for _ in range(8):                        # the second check comes as soon as the first
            assert g.drafting()
            g.record(**spec)
        assert g.active and not g.drafting()      # the estimate kept it; waiting for plain steps
        for i in range(4):
            g.record_plain(0.0012)
    assert not g.active and not g.drafting()

    # one losing check (a noisy probe) followed by a winning one: drafting goes on
    g = SpeculationGuard(cost, min_steps=8, probe_steps=4)
    for plain_s in (0.0012, 0.002):
        for _ in range(8):
            g.record(**spec)
        for _ in range(4):
            g.record_plain(plain_s)
    assert g.drafting()

    # measured plain steps of 2 ms (500 tok/s): kept; the next check comes after 16 steps
    g = SpeculationGuard(cost, min_steps=8, probe_steps=4)
    for _ in range(8):
        g.record(**spec)
    for _ in range(4):
        g.record_plain(0.002)
    assert g.drafting()
    for _ in range(15):
        g.record(**spec)
        assert g.drafting()
    g.record(**spec)
    assert not g.drafting()
    # ... where plain got faster relative to drafting (each check measures again)
    for _ in range(4):
        g.record_plain(0.001)
    for _ in range(16):
        g.record(**spec)
    for _ in range(4):
        g.record_plain(0.001)
    assert not g.active

    # plain steps taken in a batch are not timed: no decision from them, drafting resumes
    g = SpeculationGuard(cost, min_steps=8, probe_steps=4)
    for _ in range(8):
        g.record(**spec)
    for _ in range(4):
        g.record_plain(None)
    assert g.active and g.drafting()



def test_guard_counts_steps_without_drafts_as_plain():
    """An n-gram drafter that found no match verifies its token alone: a plain step. Such steps
    are the plain side of the comparison (no probe needed when there are enough of them), never
    the drafting side, so a draft is not judged by the steps where it proposed nothing."""
    g = SpeculationGuard(lambda n: 1.0, min_steps=8, probe_steps=4)
    for _ in range(20):                           # no match yet: 1 token per 2.1 ms, lookup included
        g.record(produced=1, drafted=0, draft_s=0.0001, verify_s=0.002)
        assert g.drafting()
    for _ in range(8):                            # matches: 3 tokens per 3 ms
        g.record(produced=3, drafted=3, draft_s=0.0001, verify_s=0.0029)
    assert g.active and g.drafting()              # checked on the 20 plain steps: no probe asked
    for _ in range(16):                           # matches that lose to plain steps of 2.1 ms
        g.record(produced=1, drafted=3, draft_s=0.0001, verify_s=0.0029)
    assert g.active and not g.drafting()          # no plain steps since the check: a probe
    for _ in range(4):
        g.record_plain(0.0021)
    assert g.active                               # one losing check: a strike
    for _ in range(16):
        g.record(produced=1, drafted=3, draft_s=0.0001, verify_s=0.0029)
        g.record(produced=1, drafted=0, draft_s=0.0001, verify_s=0.002)
    assert not g.active                           # the second, on the plain steps in between
