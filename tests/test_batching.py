"""Continuous batching (the scheduler's loop over several slots, scheduler.py, packing.py,
batchplan.py): every request's output equals its solo output.

The identity is asserted first (greedy, then seeded sampling); then admission, chunked prefill
and cancellation."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def batched(tiny_bundle):
    from conflayers.runtime import Engine
    # small slots and chunks so that 16 requests queue, join mid-stream and prefill in chunks;
    # drafting at every batch size so that batched draft and verify passes are exercised
    be = Engine.load(tiny_bundle, max_batch=6, prefill_chunk=8, spec_max_batch=99)
    yield be
    be.close()


def _requests():
    rng = np.random.default_rng(1)
    prompts = ["Janet has 3 apples and buys 5 more.", "The train leaves at 9", "def add(a, b):",
               "Write a short poem about the sea, the wind and the old lighthouse keeper.",
               "A farmer sells 40 eggs a day", "Question: what is 12 times 7?", "Summarize the article",
               "Translate the following sentence into French:"]
    tasks = [None, "int8skip", "fp32sub", "auto"]
    reqs = []
    for i in range(16):
        r = {"max_new_tokens": int(rng.integers(5, 48)), "task": tasks[i % 4]}
        if i % 5 == 3:
            r["prompt_ids"] = [int(t) for t in rng.integers(3, 380, int(rng.integers(30, 90)))]   # long: chunked
        else:
            r["prompt"] = prompts[i % len(prompts)]
        if i % 7 == 6:
            r["speculate"] = False
        if i == 9:
            r["stop"] = ["e"]
        reqs.append(r)
    return reqs


@pytest.fixture(params=[(a, p) for a in ("slot-attention", "gqa") for p in ("as-loaded", "pad-single", "pad-every")],
                ids=lambda v: "-".join(v))
def padded_engine(request, tiny_bundle, monkeypatch):
    """The tiny bundle's engine, its attention SlotAttention (the kernel library's) or ONNX
    Runtime's GroupQueryAttention (CONFLAYERS_ATTENTION=off: the packed graphs per width), its
    full graph's passes padded each way the runtime may pad them."""
    from conflayers.runtime import Engine, attention, contract
    mode, padding = request.param
    if mode == "gqa":
        monkeypatch.setenv("CONFLAYERS_ATTENTION", "off")
    elif not attention.available():
        pytest.skip("the kernel library (SlotAttention) is not built on this machine")
    eng = Engine.load(tiny_bundle, prompt_cache=False)
    pads = {"pad-single": contract.PAD_SINGLE, "pad-every": contract.PAD_EVERY}
    eng.full.padding = pads.get(padding, eng.full.padding)
    yield eng
    eng.close()


def test_packed_passes_are_bit_identical_to_solo_passes(padded_engine):
    """Chunked prefill, ragged passes (plain steps, verifies and a prompt chunk together, empty
    slots anywhere: each pass runs the graph packed for its busy slots, bound to them) and draft
    bodies give each sequence exactly its solo logits, under every padding."""
    from conflayers.runtime.ort_backend import KVCache
    from conflayers.runtime.packing import BatchedKVCache, PackedGraph
    eng = padded_engine
    rng = np.random.default_rng(0)
    cap, n_slots = 128, 4
    cache = BatchedKVCache(eng.spec, n_slots, cap)
    full = PackedGraph(eng.full, cache, eng.providers)
    assert full.slot_attention is (os.environ.get("CONFLAYERS_ATTENTION") != "off")
    prompts = [list(rng.integers(3, 300, n)) for n in (7, 23, 3)]
    solo, last = [], []
    for b, p in enumerate(prompts):
        c = KVCache(eng.spec, cap)
        g = eng.full.bind(c)
        ref = g.run(p, 0, logits_from=len(p) - 1)[-1]
        c.length = len(p)
        solo.append((c, g))
        pos = 0
        while pos < len(p):
            chunk = p[pos:pos + 5]
            segs = [([], cache.slot[s].length) for s in range(n_slots)]
            segs[b] = (chunk, pos)
            out = full.run(segs, [len(chunk) - 1])
            pos += len(chunk)
        cache.slot[b].length = len(p)
        assert np.array_equal(out[-1], ref)
        last.append(int(np.argmax(ref)))
    for widths in ([1, 4, 2, 0], [3, 1, 0, 0], [1, 1, 1, 0], [9, 0, 1, 0], [2, 1, 5, 0], [0, 2, 3, 0], [0, 1, 0, 0]):
        segs, offsets, at = [], [], 0
        for b in range(n_slots):
            w = widths[b] if b < len(prompts) else 0
            toks = [last[b]] + [int(t) for t in rng.integers(3, 300, w - 1)] if w else []
            segs.append((toks, cache.slot[b].length))
            offsets.append(at)
            at += w
        out = full.run(segs, list(range(at)))
        for b in range(len(prompts)):
            toks, start = segs[b]
            if not toks:
                continue
            c, g = solo[b]
            ref = g.run(toks, start)
            assert np.array_equal(out[offsets[b]:offsets[b] + len(toks)], ref), (widths, b)
            last[b] = int(np.argmax(ref[0]))
            c.length = cache.slot[b].length = start + 1
    drafter = eng.drafters["int8skip"]
    body = PackedGraph(drafter.body, cache, eng.providers)
    segs = [([last[b]], cache.slot[b].length) if b != 1 else ([], cache.slot[b].length) for b in range(3)]
    out = body.run(segs + [([], 0)], [0, 1])
    for r, b in enumerate((0, 2)):
        c, _ = solo[b]
        assert np.array_equal(out[r], drafter.body.bind(c).run([last[b]], c.length)[0])


def test_16_concurrent_requests_equal_their_solo_output(tiny_engine, batched):
    """16 requests of mixed lengths and tasks, more than the slots, half of them joining while
    the first half decode, three cancelled mid-stream: each greedy output equals Engine.generate's
    (a cancelled one: a prefix of it), and every slot is free at the end."""
    reqs = _requests()
    solo = [tiny_engine.generate(**r) for r in reqs]
    cancel = {2, 7, 12}
    out: dict[int, object] = {}
    errors = []

    def run(i):
        try:
            if i in cancel:
                ids = []
                chunks = batched.generate(stream=True, **reqs[i])
                for chunk in chunks:
                    ids.extend(chunk.token_ids)
                    if len(ids) >= 3:
                        break
                chunks.close()
                out[i] = ids
            else:
                out[i] = batched.generate(**reqs[i])
        except Exception as e:      # noqa: BLE001
            errors.append((i, e))

    first = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in first:
        t.start()
    time.sleep(0.05)                 # the rest join while the first ones decode
    rest = [threading.Thread(target=run, args=(i,)) for i in range(8, 16)]
    for t in rest:
        t.start()
    for t in first + rest:
        t.join(timeout=60)
    assert not errors, errors
    for i, r in enumerate(reqs):
        if i in cancel:
            assert out[i] == solo[i].token_ids[:len(out[i])], i
            continue
        assert out[i].token_ids == solo[i].token_ids, (i, r)
        assert out[i].text == solo[i].text
        assert out[i].finish_reason == solo[i].finish_reason
    assert any(out[i].metrics.draft_steps for i in range(16) if i not in cancel)   # batched speculation ran
    deadline = time.monotonic() + 5
    while (batched.active or batched.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.active == 0 and batched.waiting == 0


def test_a_newcomers_prompt_chunk_shrinks_as_more_streams_decode(tiny_engine, batched, monkeypatch):
    """Beside n decoding streams a prompt enters 2 x prefill_chunk / n tokens per step (at most
    prefill_chunk, at least MIN_CHUNK), so the delay it adds to them all stays about the same;
    outputs still equal solo."""
    from conflayers.runtime import scheduler as sched
    sc = batched.scheduler
    seen, real = [], sc._prefill_chunk

    def recording(s, decoding):
        chunk = real(s, decoding)
        seen.append((len(decoding), len(chunk), len(s.ids) - s.fed))
        return chunk
    monkeypatch.setattr(sc, "_prefill_chunk", recording)
    rng = np.random.default_rng(4)
    reqs = [{"prompt": f"Count from {i} to a hundred:", "max_new_tokens": 40} for i in range(5)]
    long_ids = [int(t) for t in rng.integers(3, 380, 70)]
    results, threads = {}, []

    def one(i, r):
        results[i] = batched.generate(**r).token_ids
    for i, r in enumerate(reqs):
        threads.append(threading.Thread(target=one, args=(i, r)))
        threads[-1].start()
    deadline = time.monotonic() + 60
    while batched.active < len(reqs) and time.monotonic() < deadline:
        time.sleep(0.002)
    reqs.append({"prompt_ids": long_ids, "max_new_tokens": 8})
    threads.append(threading.Thread(target=one, args=(5, reqs[-1])))
    threads[-1].start()
    for t in threads:
        t.join()
    for i, r in enumerate(reqs):
        assert results[i] == tiny_engine.generate(**r).token_ids, f"request {i} differs from solo"
    beside = [(n, size, left) for n, size, left in seen if n]
    assert any(n >= 3 for n, _, _ in beside), f"no chunk ran beside 3+ decoding streams: {seen}"
    for n, size, left in beside:
        want = min(sc.prefill_chunk, max(sched.MIN_CHUNK, 2 * sc.prefill_chunk // n))
        assert size == min(want, left), (n, size, left)


def test_seeded_sampling_equals_solo(tiny_engine, batched):
    """A seeded sampled request drafts as it would alone, so its sample is its solo sample."""
    args = [dict(prompt="The train leaves at 9", task=t, temperature=0.8, top_p=0.95, seed=s, max_new_tokens=30)
            for s, t in ((1, "int8skip"), (2, "fp32sub"), (3, None), (4, "int8skip"))]
    solo = [tiny_engine.generate(**a).token_ids for a in args]
    out = [None] * len(args)

    def run(i):
        out[i] = batched.generate(**args[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == solo


def test_speculation_follows_the_costs_measured_at_start(tiny_bundle, tiny_engine):
    """Without an override, the engine measures its packed passes when it starts (every size up
    to max_batch, both widths, each profile's draft) and each profile's draft length per batch
    size is the prediction from them (alone: the engine's policy): the limit is the first size
    where it is None."""
    from conflayers.runtime import batchcost
    from conflayers.runtime import Engine
    from conflayers.runtime.batchplan import model_rows
    be = Engine.load(tiny_bundle, max_batch=4)
    plan = be.planner
    try:
        c = plan.costs
        assert c.sizes == (1, 2, 4) and len(c.full) == 3 and set(c.draft) == set(tiny_engine.profiles)
        assert all(ms > 0 for f in c.full for ms in f) and all(ms > 0 for d in c.draft.values() for ms in d)
        for name in tiny_engine.profiles:
            policy = tiny_engine.adapt_policy(name)
            if policy is None:
                continue
            rows = model_rows(tiny_engine.bundle.profiles[name], policy)
            lengths = [plan.draft_length(name, n) for n in range(1, 5)]
            assert lengths[0] == policy.max_tokens          # alone: the engine's own policy
            if rows:
                assert lengths[1:] == [batchcost.model_draft_length(rows, c, name, n) for n in range(2, 5)]
            limit = plan.spec_batch_limit(name)
            assert 1 <= limit <= be.max_batch + 1 and all(lengths[: limit - 1])
            assert limit == be.max_batch + 1 or lengths[limit - 1] is None
            assert be.speculation_plan()[name] == \
                "model draft k " + ",".join(str(k) if k else "-" for k in lengths) + " (batch 1..4)"
        r = be.generate("def add(a, b):", task="int8skip", max_new_tokens=8)
        assert r.token_ids == tiny_engine.generate("def add(a, b):", task="int8skip", max_new_tokens=8).token_ids
    finally:
        be.close()


def test_batch_costs_are_timed_over_a_written_past(tiny_bundle, tiny_engine):
    """The start-up timings run over past positions that hold values (a never-written cache reads
    the kernel's zero page from L1), and those values never reach a request: outputs after it
    equal solo decoding's."""
    from conflayers.runtime import Engine
    from conflayers.runtime.timing import write_batched_past
    be = Engine.load(tiny_bundle, max_batch=4)
    try:
        cache = be.scheduler.cache
        for arr in list(cache.k.values()) + list(cache.v.values()):
            assert np.count_nonzero(arr[:, :, :8]) == arr[:, :, :8].size      # written by the timings
        prompts = ["def add(a, b):", "Janet has 3 apples", "7"]
        outs = [be.generate(p, task="int8skip", max_new_tokens=12).token_ids for p in prompts]
        assert outs == [tiny_engine.generate(p, task="int8skip", max_new_tokens=12).token_ids for p in prompts]
    finally:
        be.close()
    from conflayers.runtime.packing import BatchedKVCache
    fresh = BatchedKVCache(tiny_engine.spec, 2, 32)
    write_batched_past(fresh, 10)
    k = fresh.k[0]
    assert np.count_nonzero(k[:, :, :10]) == k[:, :, :10].size and not k[:, :, 10:].any()


def test_server_with_batched_engine(tiny_engine, batched):
    """conflayers-serve --max-batch: concurrent HTTP requests equal their solo completions and
    /metrics reports the batch occupancy."""
    from test_server import Client, parse_prometheus, start
    srv = start(batched, max_concurrency=6)
    try:
        c = Client(srv)
        bodies = [{"prompt": p, "max_tokens": 30, "task": t} for p, t in
                  (("def add(a, b):", "int8skip"), ("The train leaves at 9", None),
                   ("Janet has 3 apples", "fp32sub"), ("Summarize the article", "auto"))]
        solo = [tiny_engine.generate(b["prompt"], task=b["task"], max_new_tokens=30).text for b in bodies]
        got = [None] * len(bodies)

        def work(i):
            got[i] = c.post("/v1/completions", bodies[i])[1]["choices"][0]["text"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == solo
        # the same prompt again: its slot kept it, so all of it but its last token is reused
        again = [c.post("/v1/completions", bodies[0])[1] for _ in range(2)][-1]
        assert again["choices"][0]["text"] == solo[0]
        usage = again["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1, usage
        samples = parse_prometheus(c.get("/metrics")[1])
        names = {n for n, _ in samples}
        assert {"conflayers_batch_active_sequences", "conflayers_max_batch"} <= names
        assert samples[("conflayers_max_batch", frozenset())] == 6
    finally:
        srv.shutdown()
        srv.server_close()


def _costs(full, draft):
    from conflayers.runtime.batchcost import BatchCosts
    return BatchCosts((1, 2, 4, 8), 9, tuple(full), {"p": tuple(draft)})


def test_batch_costs_interpolate_and_extrapolate():
    c = _costs([(10, 18), (12, 28), (16, 48), (24, 88)], [2, 3, 4, 6])
    assert c.full_ms(1, 1) == 10 and c.full_ms(8, 9) == 88
    assert c.full_ms(3, 1) == 14 and c.full_ms(1, 5) == 14        # linear in n, in rows
    assert c.full_ms(1, 17) == 26                                  # past the measured width
    assert c.draft_ms("p", 6) == 5


@pytest.mark.parametrize("n,want", [(1, 6), (2, 4), (4, 2), (8, None)])
def test_draft_length_known_answers(n, want):
    """n * (a + 1) / (draft passes + full(n, d + 1)) against n / full(n, 1), for each row; from 2
    sequences on a draft needs a predicted gain of batchcost.MARGIN (n=4: k=2 at 1.12x)."""
    from conflayers.runtime.batchcost import model_draft_length
    # passes cheap in width alone, expensive in rows once batched (a CPU's shape)
    c = _costs([(10, 12), (11, 20), (12, 60), (16, 150)], [1, 1.2, 1.5, 2])
    rows = [(2, 1.8, 1.4), (4, 3.0, 2.0), (6, 3.8, 2.3)]
    assert model_draft_length(rows, c, "p", n) == want


@pytest.mark.parametrize("n,want", [(1, True), (2, True), (4, False), (8, False)])
def test_ngram_proposals_known_answers(n, want):
    """No draft pass: rows alone. n=4 predicts 1.09x, under the margin."""
    from conflayers.runtime.batchcost import proposals_pay
    c = _costs([(10, 12), (11, 20), (12, 60), (16, 150)], [1, 1, 1, 1])
    assert proposals_pay(2.4, 1.4, c, n) is want


def test_serve_cli_prints_the_batched_speculation_plan(tiny_bundle):
    """conflayers-serve --max-batch --prefill-chunk starts the batched engine and says at start-up
    what each profile drafts at each batch size; a chunk of 0 is refused before anything loads."""
    import subprocess
    import sys
    base = [sys.executable, "-m", "conflayers.runtime.serving.cli", tiny_bundle, "--host", "127.0.0.1", "--port", "0",
            "--max-batch", "2"]
    bad = subprocess.run(base + ["--prefill-chunk", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--prefill-chunk" in bad.stderr
    proc = subprocess.Popen(base + ["--prefill-chunk", "8"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " on http://" in line or len(lines) > 50:
                break
        text = "".join(lines)
        assert " on http://127.0.0.1:" in text and "batch 2" in text, text
        for name in ("int8skip", "fp32sub"):
            assert f"batched speculation, {name}: " in text and "(batch 1..2)" in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
