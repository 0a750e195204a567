"""Engine requests: streamed text equals the non-streamed result, incremental detokenisation of
multi-byte text, stop strings, early close of a stream, and bad requests."""
from __future__ import annotations

import gc
import time
import os

import numpy as np
import pytest

from conflayers.runtime import Engine, RequestError
from conflayers.runtime.textio import StreamDecoder, TextCodec

SMOL_TOKENIZER = "/tmp/smol_st/tokenizer.json"
PROMPTS = [
    "Janet has 3 apples and buys 5 more.",
    "def add(a, b):",
    "Write a short poem about the sea",
    [{"role": "user", "content": "What is 12 times 7?"}],
]
MODES = [dict(speculate=False), dict(task="int8skip"), dict(task="fp32sub")]
MULTIBYTE = [
    "Héllo wörld, ça va? Señor niño, naïve café, Ærøskøbing.",
    "你好，世界！今天天气很好。日本語のテキスト、한국어 텍스트.",
    "Emoji: 🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ ∑ ∞ — “quotes” … done",
    "mixed: a🙂b中c é\u0301 z\u200dw 🏳️‍🌈 end",
]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.load(tiny_bundle)


def _stream(engine, **kw):
    chunks = list(engine.generate(stream=True, **kw))
    assert chunks and chunks[-1].result is not None
    assert all(c.result is None for c in chunks[:-1])
    return chunks, chunks[-1].result


# -- streamed text == result text ----------------------------------------------------------------
@pytest.mark.parametrize("mode", range(len(MODES)))
@pytest.mark.parametrize("pi", range(len(PROMPTS)))
def test_stream_concatenation_equals_result(engine, pi, mode):
    kw = dict(_kw(PROMPTS[pi]), max_new_tokens=40, **MODES[mode])
    plain_ids = engine.generate(**_kw(PROMPTS[pi]), max_new_tokens=40, speculate=False).token_ids
    whole = engine.generate(**kw)
    assert whole.token_ids == plain_ids
    chunks, res = _stream(engine, **kw)
    assert res.token_ids == whole.token_ids
    assert "".join(c.text for c in chunks) == res.text == whole.text
    assert res.text == engine.codec.decode(res.token_ids)
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert sum(1 for c in chunks if c.text) > 1, "the text was not streamed incrementally"


def test_stream_sampled_concatenation_equals_result(engine):
    for mode in MODES:
        kw = dict(prompt=PROMPTS[0], max_new_tokens=30, temperature=0.9, top_k=20, seed=3, **mode)
        whole = engine.generate(**kw)
        chunks, res = _stream(engine, **kw)
        assert res.token_ids == whole.token_ids
        assert "".join(c.text for c in chunks) == res.text == whole.text == engine.codec.decode(res.token_ids)


# -- incremental detokenisation of multi-byte text -------------------------------------------------
def _codecs(tiny_tokenizer_dir):
    out = [("tiny", TextCodec(os.path.join(tiny_tokenizer_dir, "tokenizer.json")))]
    if os.path.isfile(SMOL_TOKENIZER):
        out.append(("smollm2", TextCodec(SMOL_TOKENIZER)))
    return out


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_decoder_multibyte(tiny_tokenizer_dir, text):
    for name, codec in _codecs(tiny_tokenizer_dir):
        ids = codec.encode(text)
        full = codec.decode(ids)
        assert full == text, f"{name}: the tokenizer does not round-trip the text"
        # characters are split across tokens (otherwise this test would test nothing)
        pieces = [codec.decode([i]) for i in ids]
        assert any("\ufffd" in p for p in pieces), f"{name}: no character is split across tokens"
        for sizes in ([1], [2, 1, 3], [5]):
            dec = StreamDecoder(codec)
            out, pos, j = [], 0, 0
            while pos < len(ids):
                step = sizes[j % len(sizes)]
                out.append(dec.push(ids[pos:pos + step]))
                pos += step
                j += 1
            out.append(dec.flush())
            assert "".join(out) == full, f"{name}: streamed text differs"
            assert not any("\ufffd" in c for c in out), f"{name}: a chunk holds a broken character"
            assert dec.text == full
            emitted = sum(1 for c in out[:-1] if c)
            assert emitted >= max(2, (len(out) - 1) // 3), f"{name}: text was not emitted incrementally"


def test_stream_decoder_random_token_sequences(tiny_tokenizer_dir):
    """Arbitrary ids (as a random model emits them, invalid UTF-8 included): the deltas still add up
    to decode(all ids)."""
    rng = np.random.default_rng(0)
    for name, codec in _codecs(tiny_tokenizer_dir):
        vocab = codec.tok.get_vocab_size()
        for _ in range(20):
            ids = [int(i) for i in rng.integers(0, vocab, size=30)]
            dec = StreamDecoder(codec)
            out = [dec.push([i]) for i in ids] + [dec.flush()]
            assert "".join(out) == codec.decode(ids), name


# -- stop strings ---------------------------------------------------------------------------------
def _printable_piece(text, length, start=4):
    for i in range(start, len(text) - length):
        piece = text[i:i + length]
        if piece.isprintable() and "\ufffd" not in piece and piece.strip() == piece and piece:
            return piece
    pytest.fail("no printable piece in the output")


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_stop_strings(engine, mode):
    for prompt, length in ((PROMPTS[0], 3), (PROMPTS[1], 1), (PROMPTS[2], 5)):
        kw = dict(prompt=prompt, max_new_tokens=60, **MODES[mode])
        full = engine.generate(**kw).text
        stop = _printable_piece(full, length)
        expected = full[:full.index(stop)]
        res = engine.generate(stop=stop, **kw)
        assert res.text == expected
        assert res.finish_reason == "stop"
        chunks, sres = _stream(engine, stop=[stop, "\x00never"], **kw)
        assert "".join(c.text for c in chunks) == sres.text == expected
        assert sres.finish_reason == "stop"
        assert stop not in "".join(c.text for c in chunks)
        # a stop string that never occurs changes nothing
        res = engine.generate(stop=["NEVER-IN-OUTPUT"], **kw)
        assert res.text == full and res.finish_reason == "length"


def test_stop_strings_earliest_wins(engine):
    full = engine.generate(PROMPTS[2], max_new_tokens=60, speculate=False).text
    a = _printable_piece(full, 2, start=20)
    b = _printable_piece(full, 4, start=6)
    cut = min(full.index(a), full.index(b))
    for mode in MODES:
        res = engine.generate(PROMPTS[2], max_new_tokens=60, stop=[a, b], **mode)
        assert res.text == full[:cut]
        chunks, sres = _stream(engine, prompt=PROMPTS[2], max_new_tokens=60, stop=[a, b], **mode)
        assert "".join(c.text for c in chunks) == full[:cut]


# -- early close frees the request's slot --------------------------------------------------------
def _idle(eng, timeout=10.0) -> bool:
    """Whether the engine's loop holds no request within `timeout` (a closed stream leaves its
    slot at the loop's next step)."""
    deadline = time.monotonic() + timeout
    while (eng.active or eng.waiting) and time.monotonic() < deadline:
        time.sleep(0.005)
    return eng.active == 0 and eng.waiting == 0


def test_closing_a_stream_frees_its_slot(tiny_bundle):
    eng = Engine.load(tiny_bundle, max_batch=2)
    assert eng.active == 0 and eng.waiting == 0
    s1 = eng.generate(PROMPTS[0], max_new_tokens=40, stream=True, task="fp32sub")
    next(s1)
    s2 = eng.generate(PROMPTS[1], max_new_tokens=40, stream=True, speculate=False)
    next(s2)
    s1.close()
    s2.close()
    assert _idle(eng)
    # the slots are reused, and a reused slot (with stale KV contents) gives the same output
    fresh = Engine.load(tiny_bundle).generate(PROMPTS[0], max_new_tokens=40, task="fp32sub")
    s3 = eng.generate(PROMPTS[0], max_new_tokens=40, stream=True, task="fp32sub")
    *_, last = s3
    assert last.result.token_ids == fresh.token_ids
    assert _idle(eng)
    # a stream dropped without close is released when it is collected
    s4 = eng.generate(PROMPTS[2], max_new_tokens=40, stream=True)
    next(s4)
    del s4
    gc.collect()
    assert _idle(eng)
    # a stream never started holds no slot
    s5 = eng.generate(PROMPTS[2], max_new_tokens=40, stream=True)
    assert eng.active == 0 and eng.waiting == 0
    s5.close()
    eng.close()


# -- bad requests -----------------------------------------------------------------------------------
BAD = [  # (arguments, message, the parameter the error names)
    (dict(prompt="hi", task="nope"), r"unknown task 'nope'", "task"),
    (dict(prompt="hi", task=5), r"task must be a profile name", "task"),
    (dict(prompt="hi", temperature=-0.5), r"temperature", "temperature"),
    (dict(prompt="hi", temperature="hot"), r"temperature must be a finite number", "temperature"),
    (dict(prompt="hi", temperature=0.7, top_p=0.0), r"top_p", "top_p"),
    (dict(prompt="hi", temperature=0.7, top_p=1.5), r"top_p", "top_p"),
    (dict(prompt="hi", temperature=0.7, top_k=-1), r"top_k", "top_k"),
    (dict(prompt="hi", seed=-1), r"seed must be >= 0", "seed"),
    (dict(prompt="hi", seed="abc"), r"seed must be an integer", "seed"),
    (dict(prompt="hi", max_new_tokens=0), r"max_new_tokens", "max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=-3), r"max_new_tokens", "max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=2.5), r"max_new_tokens", "max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=64), r"max_new_tokens.*context", "max_new_tokens"),
    (dict(prompt="apples " * 80, max_new_tokens=1), r"prompt.*context", "prompt"),
    (dict(messages=[{"role": "user", "content": "apples " * 80}], max_new_tokens=1), r"messages.*context",
     "messages"),
    (dict(messages="hello"), r"messages must be a non-empty list", "messages"),
    (dict(messages=[]), r"messages must be a non-empty list", "messages"),
    (dict(messages=[{"content": "hi"}]), r"messages\[0\]\.role", "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), r"messages\[0\]\.role.*wizard", "messages"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": 5}]),
     r"messages\[1\]\.content must be a string", "messages"),
    (dict(messages=[{"role": "user", "content": None}]), r"messages\[0\]\.content", "messages"),
    (dict(messages=["hi"]), r"messages\[0\]", "messages"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]),
     r"exactly one of prompt, messages or prompt_ids", "messages"),
    (dict(prompt="hi", prompt_ids=[5]), r"exactly one of prompt, messages or prompt_ids", "prompt_ids"),
    (dict(), r"exactly one of prompt, messages or prompt_ids", "prompt"),
    (dict(prompt=""), r"prompt", "prompt"),
    (dict(prompt_ids=[]), r"prompt_ids must be a non-empty list of token ids", "prompt_ids"),
    (dict(prompt_ids=[5, 384]), r"prompt_ids must be .* token ids in 0..383", "prompt_ids"),
    (dict(prompt_ids=[5, -1]), r"prompt_ids", "prompt_ids"),
    (dict(prompt_ids=[5, True]), r"prompt_ids", "prompt_ids"),
    (dict(prompt_ids="5 6"), r"prompt_ids", "prompt_ids"),
    (dict(prompt_ids=list(range(3, 70)), max_new_tokens=1), r"prompt_ids is 67 tokens.*context", "prompt_ids"),
    (dict(prompt="hi", stop=[""]), r"stop", "stop"),
    (dict(prompt="hi", stop=5), r"stop must be a non-empty string", "stop"),
    (dict(prompt="hi", speculate="yes"), r"speculate must be true or false", "speculate"),
]


@pytest.fixture(scope="module")
def small_engine(tiny_bundle):
    return Engine.load(tiny_bundle, max_context=64)


@pytest.mark.parametrize("kw,match,param", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests(small_engine, kw, match, param, stream):
    kw = {"max_new_tokens": 8, **kw}
    with pytest.raises(RequestError, match=match) as e:
        small_engine.generate(stream=stream, **kw)
    assert e.value.param == param
    assert small_engine.active == 0 and small_engine.waiting == 0    # refused before it took a slot


def test_prompt_ids_equal_the_encoded_prompt(small_engine):
    """prompt_ids skips the tokenizer: the same ids give the same output and metrics."""
    ids = small_engine.encode(PROMPTS[0])
    by_text = small_engine.generate(PROMPTS[0], max_new_tokens=12)
    by_ids = small_engine.generate(prompt_ids=ids, max_new_tokens=12)
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == by_text.text
    assert by_ids.metrics.prompt_tokens == len(ids)


def test_default_max_new_tokens_fits_the_context(small_engine):
    """max_new_tokens=None: as many as fit (the context is 64 here, below the default 256)."""
    ids = small_engine.encode(PROMPTS[0])
    r = small_engine.generate(PROMPTS[0], max_new_tokens=None, speculate=False)
    assert r.finish_reason == "stop" or len(r.token_ids) == small_engine.capacity - len(ids) + 1


def test_error_message_renders_with_a_front_end_name(small_engine):
    with pytest.raises(RequestError) as e:
        small_engine.generate(PROMPTS[0], max_new_tokens=1000)
    assert "max_new_tokens" in str(e.value)
    other = e.value.message_for("max_tokens")
    assert "max_tokens" in other and "max_new_tokens" not in other


def test_context_limits_are_exact(small_engine):
    """The largest request that fits is served (both modes agree); one more token is refused."""
    ids = small_engine.encode(PROMPTS[0])
    n = small_engine.capacity - len(ids) + 1
    plain = small_engine.generate(PROMPTS[0], max_new_tokens=n, speculate=False)
    spec = small_engine.generate(PROMPTS[0], max_new_tokens=n, task="int8skip")
    assert spec.token_ids == plain.token_ids
    with pytest.raises(RequestError, match=rf"at most {n}"):
        small_engine.generate(PROMPTS[0], max_new_tokens=n + 1)
