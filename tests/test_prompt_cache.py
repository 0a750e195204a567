"""The prompt cache (scheduler.py): a request reuses the KV its slot kept of a shared prompt
prefix. Output identity with fresh prefills comes first; then what is reused, and that idle
slots' scratch rows never touch what they keep."""
from __future__ import annotations

import threading

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cached_solo(tiny_bundle):
    from conflayers.runtime import Engine
    e = Engine.load(tiny_bundle)             # one slot, prompt cache on (the default)
    yield e
    e.close()


@pytest.fixture(scope="module")
def cached_batched(tiny_bundle):
    pytest.importorskip("onnx")
    from conflayers.runtime import Engine
    e = Engine.load(tiny_bundle, max_batch=3, prefill_chunk=8, spec_max_batch=99)
    yield e
    e.close()


def _conversation(engine, reference, task, turns=3):
    """A chat growing turn by turn: each prompt is the last prompt + the model's answer + a new
    user line, so the cache holds prompt and generated tokens (the latter written by verifies)."""
    ids, more = engine.encode("Janet has 3 apples and buys 5 more. How many"), []
    for turn in range(turns):
        got = engine.generate(prompt_ids=ids, task=task, max_new_tokens=20)
        want = reference.generate(prompt_ids=ids, task=task, max_new_tokens=20)
        assert got.token_ids == want.token_ids, (task, turn)
        assert want.metrics.cached_prompt_tokens == 0
        if turn:                             # all of the last prompt and all but the last answer token
            assert got.metrics.cached_prompt_tokens >= len(ids) - len(more) - 1, (task, turn)
        more = engine.encode(f" and then {turn + 2} more?")
        ids = ids + got.token_ids + more


@pytest.mark.parametrize("task", [None, "int8skip", "fp32sub"])
def test_conversation_turns_equal_fresh_prefills(tiny_engine, cached_solo, task):
    _conversation(cached_solo, tiny_engine, task)


def test_repeated_and_shared_prompts_equal_fresh_prefills(tiny_engine, cached_solo):
    system = "You are a careful assistant. Answer in one line. "
    prompts = [system + q for q in ("What is 12 times 7?", "What is 12 times 8?", "Name a colour.")]
    reused = []
    for p in prompts + prompts[-1:]:
        got = cached_solo.generate(p, task="int8skip", max_new_tokens=16)
        assert got.token_ids == tiny_engine.generate(p, task="int8skip", max_new_tokens=16).token_ids, p
        reused.append(got.metrics.cached_prompt_tokens)
    shared = len(cached_solo.encode(system)) - 2        # a token may straddle the join
    assert min(reused[1:3]) >= shared, reused           # the system prompt, kept from the last request
    # the repeat reuses all of its prompt but the last token
    assert reused[-1] == got.metrics.prompt_tokens - 1
    off = tiny_engine.generate(prompts[0], max_new_tokens=4)
    assert off.metrics.cached_prompt_tokens == 0


def test_batched_reuse_with_idle_slots_keeps_their_kv(tiny_engine, cached_batched):
    """A finished request's slot keeps its KV while other slots run batched passes (whose idle
    rows must land past it); a later request with that prompt reuses it and still equals the
    fresh prefill."""
    eng = cached_batched
    first = "Write a short poem about the sea, the wind and the old lighthouse keeper."
    assert eng.generate(first, max_new_tokens=12).token_ids == tiny_engine.generate(first, max_new_tokens=12).token_ids
    sched = eng.scheduler
    slot = next(b for b, kept in enumerate(sched._kept) if kept)
    n = len(sched._kept[slot])
    snap = [(sched.cache.k[i][slot, :, :n].copy(), sched.cache.v[i][slot, :, :n].copy()) for i in sched.cache.k]

    others = ["The train leaves at 9", "def add(a, b):"]
    out = {}
    threads = [threading.Thread(target=lambda p=p: out.__setitem__(p, eng.generate(p, task="int8skip", max_new_tokens=24)))
               for p in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for p in others:
        assert out[p].token_ids == tiny_engine.generate(p, task="int8skip", max_new_tokens=24).token_ids, p
    assert len(sched._kept[slot]) == n                  # the other requests took the empty slots
    for (k0, v0), i in zip(snap, sched.cache.k):
        assert np.array_equal(sched.cache.k[i][slot, :, :n], k0) and np.array_equal(sched.cache.v[i][slot, :, :n], v0), i

    again = eng.generate(first + " Make it rhyme.", max_new_tokens=12)
    assert again.token_ids == tiny_engine.generate(first + " Make it rhyme.", max_new_tokens=12).token_ids
    assert again.metrics.cached_prompt_tokens >= len(eng.encode(first)) - 2


def test_prompt_cache_off_prefills_whole(tiny_bundle):
    from conflayers.runtime import Engine
    e = Engine.load(tiny_bundle, prompt_cache=False)
    try:
        for _ in range(2):
            r = e.generate("The train leaves at 9", max_new_tokens=4)
            assert r.metrics.cached_prompt_tokens == 0
    finally:
        e.close()


def test_host_store_serves_a_prompt_its_slot_lost(tiny_engine, cached_solo):
    """One slot: A, then B (the slot now keeps B), then A again: A's KV comes back from host
    memory, bit for bit, and the output equals the fresh prefill."""
    a = "Question: a farmer sells 40 eggs a day at 2 dollars each. How much in a week?"
    b = "Translate the following sentence into French: the cat sleeps."
    for p in (a, b):
        cached_solo.generate(p, task="int8skip", max_new_tokens=10)
    hits = cached_solo.scheduler.store.hits
    again = cached_solo.generate(a, task="int8skip", max_new_tokens=10)
    assert again.token_ids == tiny_engine.generate(a, task="int8skip", max_new_tokens=10).token_ids
    assert again.metrics.cached_prompt_tokens == again.metrics.prompt_tokens - 1
    assert cached_solo.scheduler.store.hits == hits + 1


def test_prompt_store_round_trip_supersede_and_budget(tiny_engine):
    from conflayers.runtime.ort_backend import KVCache
    from conflayers.runtime.promptstore import PromptStore
    spec = tiny_engine.spec
    rng = np.random.default_rng(0)
    src, dst = KVCache(spec, 64), KVCache(spec, 64)
    for i in range(spec.num_layers):
        src.key_array(i)[:] = rng.standard_normal(src.key_array(i).shape)
        src.value_array(i)[:] = rng.standard_normal(src.value_array(i).shape)
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    store = PromptStore(per_token * 30, spec.num_layers)
    store.put(list(range(10)), src)
    store.put(list(range(20)), src)              # extends the first: it replaces it
    assert len(store) == 1 and store.nbytes == per_token * 20
    key, n = store.longest(list(range(15)) + [99])
    assert n == 15
    store.load(key, n, dst)
    for i in range(spec.num_layers):
        assert np.array_equal(dst.key_array(i)[0, :, :15], src.key_array(i)[0, :, :15])
        assert np.array_equal(dst.value_array(i)[0, :, :15], src.value_array(i)[0, :, :15])
        assert not dst.key_array(i)[0, :, 15:].any()
    store.put([7] * 12, src)                     # over budget together: the least recent goes
    assert len(store) == 1 and store.longest(list(range(20)))[1] == 0
    store.put([5] * 40, src)                     # larger than the whole budget: not kept
    assert store.longest([5] * 40)[1] == 0 and store.nbytes <= per_token * 30
