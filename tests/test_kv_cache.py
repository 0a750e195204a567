"""KV caches in float16 (Engine(kv_cache="float16"), attention.py's SlotAttentionF16): speculative
output equals plain decoding with the same cache, alone, batched and from the prompt cache; the
caches are halves; the logits stay those of the float32 cache to rounding; and where the half
cache cannot run, a clear error says what to do."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner

from conflayers.runtime import Engine, attention

import tiny

N_NEW = 28
PROMPTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):", "7",
           [{"role": "user", "content": "What is 12 times 7?"}]]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


@pytest.fixture(scope="module")
def library(kernel_library):
    pytest.importorskip("onnx")
    if not attention.available():
        pytest.skip("SlotAttention does not run here (kernel library or onnx missing)")
    return kernel_library


@pytest.fixture(scope="module")
def native_bundle(library, tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """The tiny Llama's own Q4_1 weights as the target, a layer-skip and an n-gram profile."""
    out = str(tmp_path_factory.mktemp("kv16") / "tiny-Q4_1")
    profiles = [lambda ident: tiny.profile_json("native_skip", ident, "native", skip_layers=[1], k=4),
                lambda ident: tiny.profile_json("int4_all", ident, "int4", k=3, confidence_stop=0.2)]
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=profiles, target="native",
                            gguf_type="Q4_1")


@pytest.fixture(scope="module")
def half(native_bundle):
    e = Engine.load(native_bundle, guard=False, prompt_cache=False, kv_cache="float16")
    yield e
    e.close()


@pytest.mark.parametrize("task", ["native_skip", "int4_all"])
def test_speculative_greedy_equals_plain_with_a_half_cache(half, task):
    drafted = 0
    for prompt in PROMPTS:
        plain = half.generate(**_kw(prompt), max_new_tokens=N_NEW, speculate=False)
        spec = half.generate(**_kw(prompt), task=task, max_new_tokens=N_NEW)
        assert spec.token_ids == plain.token_ids, f"{task}: speculative output differs on {prompt!r}"
        drafted += spec.metrics.drafted_tokens
    assert drafted > 0


def test_the_caches_are_halves_and_the_logits_those_of_float32_to_rounding(half, library, tiny_bundle):
    """On the fp32 target (a 4-bit one quantizes each activation row to int8, which turns the
    rounding into flips of a code): the logits within the halves' rounding of float32's."""
    assert half.kv_cache == "float16" and half.full.kv_dtype == np.float16
    half = Engine.load(tiny_bundle, guard=False, prompt_cache=False, kv_cache="float16")
    full32 = Engine.load(tiny_bundle, guard=False, prompt_cache=False)
    assert full32.full.kv_dtype == np.float32
    ids = half.encode("Janet has 3 apples and buys 5 more. How many apples does she have now?")
    got = {}
    for name, e in (("half", half), ("float", full32)):
        cache = e.full.new_cache(e.spec, len(ids) + 8)
        assert cache.key_array(0).dtype == e.full.kv_dtype
        got[name] = e.full.bind(cache).run(ids, 0)
        if name == "half":       # what the pass wrote: exact halves
            assert cache.key_array(0).dtype == np.float16 and np.isfinite(cache.key_array(0)).all()
    scale = float(np.abs(got["float"]).max())
    assert np.abs(got["half"] - got["float"]).max() <= 5e-3 * scale     # measured 1.8e-3
    assert not np.array_equal(got["half"], got["float"])       # the rounding is real


def test_batched_and_prompt_cached_requests_equal_solo_with_a_half_cache(half, native_bundle):
    batched = Engine.load(native_bundle, guard=False, kv_cache="float16", max_batch=3, prefill_chunk=6,
                          spec_max_batch=99, prompt_cache_mb=16)
    try:
        from conflayers.runtime.packing import BatchedKVCache
        cache = batched.scheduler.cache
        assert cache.slot[1].key_array(0).dtype == np.float16
        floats = BatchedKVCache(batched.spec, cache.slots, cache.capacity)
        assert cache.nbytes * 2 == floats.nbytes > 0       # half the memory (conflayers-serve prints it)
        assert half.scheduler.cache.nbytes * 2 == half.full.new_cache(half.spec, half.capacity).nbytes * 2 \
            == BatchedKVCache(half.spec, 1, half.capacity).nbytes
        want = {i: half.generate(**_kw(p), task="native_skip", max_new_tokens=N_NEW).token_ids
                for i, p in enumerate(PROMPTS)}
        for _ in range(2):       # the second round reuses the prompts' KV (slots and host store)
            got, errors = {}, []

            def one(i, p):
                try:
                    got[i] = batched.generate(**_kw(p), task="native_skip", max_new_tokens=N_NEW)
                except Exception as e:      # noqa: BLE001 - reported below
                    errors.append(e)
            threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            for i in want:
                assert got[i].token_ids == want[i], f"prompt {i}: batched output differs from solo"
        assert any(r.metrics.cached_prompt_tokens > 0 for r in got.values())
        from test_server import Client, parse_prometheus, start      # the server's /metrics says what it takes
        srv = start(batched)
        try:
            samples = parse_prometheus(Client(srv).get("/metrics")[1])
            assert samples[("conflayers_kv_cache_bytes", frozenset())] == cache.nbytes
        finally:
            srv.shutdown()
            srv.server_close()
    finally:
        batched.close()


def test_a_half_cache_that_cannot_run_is_refused_with_what_to_do(native_bundle, monkeypatch):
    with pytest.raises(attention.KVCacheError, match="kv_cache must be one of float32, float16"):
        Engine.load(native_bundle, kv_cache="bfloat16")
    with pytest.raises(attention.KVCacheError, match="on the CPU only"):
        attention.check_kv_cache("float16", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("CONFLAYERS_ATTENTION", "off")
    with pytest.raises(attention.KVCacheError, match=r"needs the kernel library's SlotAttention.*--kv-cache float32"):
        Engine.load(native_bundle, kv_cache="float16")


def test_run_cli_takes_the_kv_cache(native_bundle, monkeypatch):
    from conflayers.runtime.cli import run_main
    runner = CliRunner()
    ok = runner.invoke(run_main, [native_bundle, "-p", "7", "-n", "8", "--kv-cache", "float16", "--json"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(run_main, [native_bundle, "-p", "7", "--kv-cache", "float8"])
    assert bad.exit_code == 2 and "float8" in bad.output
    monkeypatch.setenv("CONFLAYERS_ATTENTION", "off")
    off = runner.invoke(run_main, [native_bundle, "-p", "7", "-n", "8", "--kv-cache", "float16"])
    assert off.exit_code != 0 and "Error: a float16 KV cache needs" in off.output
