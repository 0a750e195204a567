"""The batch guard (batchguard.py): drafting in a batch is measured against plain batched steps
taken in turn, and turned off where it loses, on again where it pays; output never changes."""
from __future__ import annotations

import threading
import time

import pytest

from conflayers.runtime.batchguard import BatchGuard, size_class


def _steps(guard, n, steps, draft_rate, plain_rate):
    """Run `steps` steps at batch n as the guard asks, a drafting step giving draft_rate tokens/s
    and a plain one plain_rate; returns how many of them drafted."""
    drafted = 0
    for _ in range(steps):
        d = guard.allows(n)
        drafted += d
        guard.record(n, d, 10, 10 / (draft_rate if d else plain_rate))
    return drafted


def test_size_classes():
    assert [size_class(n) for n in (2, 3, 4, 5, 8, 9, 16)] == [2, 4, 4, 8, 8, 16, 16]


def test_drafting_that_loses_goes_off_and_comes_back_when_it_pays():
    g = BatchGuard(min_steps=8, probe_steps=4, max_period=32, strikes=2)
    assert g.allows(5)
    # drafting at 0.8x plain: two checks (8 + 4 steps each) turn it off, at 5-8 only
    _steps(g, 6, 24, 80, 100)
    assert g.paused() == [8] and not g.allows(7) and g.allows(3)
    # off, it runs plain, probing drafting now and then: two probes in a row that measure it
    # paying turn it on
    drafted = _steps(g, 8, 12, 130, 100)
    assert drafted == 4 and g.paused() == [8]
    drafted = _steps(g, 8, 12, 130, 100)
    assert drafted == 4 and g.paused() == [] and g.switches() == 2


def test_one_lucky_probe_does_not_turn_a_losing_draft_on():
    g = BatchGuard(min_steps=8, probe_steps=4, strikes=2)
    _steps(g, 4, 24, 80, 100)                 # off
    assert g.paused() == [4]
    _steps(g, 4, 12, 130, 100)                # one probe that wins
    assert g.paused() == [4]
    _steps(g, 4, 12, 80, 100)                 # the next loses: the count starts again
    _steps(g, 4, 12, 130, 100)
    assert g.paused() == [4]


def test_one_noisy_probe_does_not_turn_a_paying_draft_off():
    g = BatchGuard(min_steps=8, probe_steps=4, strikes=2)
    _steps(g, 4, 12, 80, 100)                 # one check that loses
    assert g.paused() == []
    _steps(g, 4, 12, 130, 100)                # the next wins: the count of strikes starts again
    _steps(g, 4, 20, 80, 100)                 # one more loss (period 16 now): still one strike
    assert g.paused() == []


def test_a_settled_class_probes_less_and_less():
    g = BatchGuard(min_steps=8, probe_steps=4, max_period=64, strikes=2)
    drafted = _steps(g, 4, 1000, 130, 100)
    plain = 1000 - drafted
    assert g.paused() == [] and g.steps(4) == (drafted, plain)
    assert plain < 0.1 * 1000                 # periods 8, 16, 32, 64, 64, ...: a few % of the steps


def test_steps_with_no_time_or_alone_are_not_counted():
    g = BatchGuard()
    g.record(1, True, 10, 0.01)
    g.record(4, True, 10, 0.0)
    assert g.steps(1) == (0, 0) and g.steps(4) == (0, 0)


@pytest.fixture(scope="module")
def figures_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """The tiny model with an int8 layer-skip profile whose validation figures claim a good draft
    (what the batch planner predicts from)."""
    import tiny

    def profile(ident):
        p = tiny.profile_json("int8skip", ident, "int8", skip_layers=[1], k=4)
        p["figures"] = {"acceptance_rate": 0.9, "mean_accepted_tokens": 3.0}
        return p
    return tiny.make_bundle(str(tmp_path_factory.mktemp("guard") / "b"), tiny_llama, tiny_tokenizer_dir,
                            profiles=[profile])


def test_a_draft_slowed_under_load_is_turned_off_and_output_stays_identical(figures_bundle):
    """The start-up timings predicted drafting at batch 2-4 (the full passes took 10 ms longer
    while they were timed); then each draft pass takes 15 ms longer (what load on the machine, or acceptance unlike the profile's, does to a plan). The
    guard measures drafting losing against its plain probes and turns it off at batch 3-4; every
    request's output equals its solo output, probes and drafting steps alike."""
    from conflayers.runtime import Engine
    from conflayers.runtime.batchguard import BatchGuard
    solo = Engine.load(figures_bundle, prompt_cache=False)
    be = Engine.load(figures_bundle, max_batch=4, prompt_cache=False)
    try:
        name = "int8skip"

        def slowed(run, seconds):
            def slow(*a, **k):
                time.sleep(seconds)
                return run(*a, **k)
            return slow
        full = be.scheduler.full
        full.run = slowed(type(full).run.__get__(full), 0.010)
        be.planner.measure(be.scheduler)
        del full.run
        planned = [be.planner.draft_length(name, n) for n in (2, 3, 4)]
        assert all(planned), planned
        be.planner.guard = guard = BatchGuard(min_steps=3, probe_steps=2, strikes=2)
        body = be.drafters[name].body
        packed = be.scheduler.packed(body)
        packed.run = slowed(packed.run, 0.015)
        prompts = ["Janet has 3 apples and buys 5 more.", "The train leaves at 9", "def add(a, b):",
                   "A farmer sells 40 eggs a day"]
        want = [solo.generate(p, task=name, max_new_tokens=64).token_ids for p in prompts]
        got = [None] * len(prompts)

        def work(i):
            got[i] = be.generate(prompts[i], task=name, max_new_tokens=64)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.token_ids for r in got] == want
        assert any(r.metrics.draft_steps for r in got)          # batched drafting ran first
        drafting, plain = guard.steps(4)
        assert plain > 0 and drafting > 0
        assert guard.paused() == [4], (guard.steps(4), guard.steps(2))
        from test_server import Client, parse_prometheus, start      # the server's /metrics says so
        srv = start(be)
        try:
            samples = parse_prometheus(Client(srv).get("/metrics")[1])
            assert samples[("conflayers_batch_drafting_paused_sizes", frozenset())] == 1
            assert samples[("conflayers_batch_guard_switches", frozenset())] == guard.switches() >= 1
        finally:
            srv.shutdown()
            srv.server_close()
    finally:
        be.close()
        solo.close()
