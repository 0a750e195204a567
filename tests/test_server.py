"""The OpenAI-compatible server: outputs equal the Engine's, streams equal non-streams, bad input
gets a 4xx with an error body and the server lives on, disconnects and concurrency are safe."""
from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from conflayers.runtime.serving.http import make_server

PROMPTS = ["Janet has 3 apples and buys 5 more.", "Translate the following sentence into French:",
           "def add(a, b):", "Write a short poem about the sea."]


class Client:
    def __init__(self, server):
        host, port = server.server_address[:2]
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"

    def request(self, method, path, body=None, raw: bytes | None = None, ctype="application/json"):
        """(status, parsed JSON or text). body is JSON-encoded; raw is sent as is."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None and ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype_out, text = r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            status, ctype_out, text = e.code, e.headers.get("Content-Type", ""), e.read().decode()
        return status, json.loads(text) if ctype_out.startswith("application/json") else text

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path):
        return self.request("GET", path)

    def sse(self, path, body) -> list:
        """The `data:` payloads of a stream, JSON-decoded except the final [DONE]."""
        status, text = self.post(path, {**body, "stream": True})
        assert status == 200
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        payloads = [e[len("data: "):] for e in events]
        assert payloads[-1] == "[DONE]"
        return [json.loads(p) for p in payloads[:-1]]


LOG = io.StringIO()


def start(engine, max_concurrency=4):
    server = make_server(engine, "127.0.0.1", 0, max_concurrency, log_stream=LOG)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start(tiny_engine)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server)


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def parse_prometheus(text: str) -> dict:
    """{(name, frozenset(labels)): value}; asserts every sample follows a TYPE line."""
    typed, samples = set(), {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"{name} has no TYPE line"
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def metrics_after_next_request(client, before: dict, endpoint: str, poll: float = 0.02) -> dict:
    """/metrics once the server has counted one more request on `endpoint` than in `before`
    (the count lands after the handler ends; gives up after 10 s and returns the last sample)."""
    deadline = time.time() + 10
    while True:
        after = parse_prometheus(client.get("/metrics")[1])
        if total(after, "conflayers_requests_total", endpoint=endpoint) > \
                total(before, "conflayers_requests_total", endpoint=endpoint) or time.time() >= deadline:
            return after
        time.sleep(poll)


# -- basic endpoints --------------------------------------------------------------------------

def test_health_and_models(client, tiny_engine):
    status, body = client.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert body["profiles"] == ["fp32sub", "int8skip"] and body["default_profile"] == "int8skip"
    status, body = client.get("/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "tiny"


def test_completion_equals_engine_and_is_lossless(client, tiny_engine):
    expected = tiny_engine.generate(PROMPTS[0], max_new_tokens=30)
    texts = set()
    for extra in ({}, {"speculate": False}, {"task": "fp32sub"}, {"task": "auto"}):
        status, body = client.post("/v1/completions", {"model": "whatever", "prompt": PROMPTS[0],
                                                       "max_tokens": 30, **extra})
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == "whatever"
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["finish_reason"] == expected.finish_reason
        texts.add(choice["text"])
        cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
        assert body["usage"] == {"prompt_tokens": expected.metrics.prompt_tokens,
                                 "completion_tokens": len(expected.token_ids),
                                 "total_tokens": expected.metrics.prompt_tokens + len(expected.token_ids)}
        assert cached == 0                   # this engine prefills every prompt whole (no prompt cache)
        assert body["conflayers"]["speculative"] == (extra.get("speculate", True))
    assert texts == {expected.text}
    status, body = client.post("/v1/completions", {"prompt": [PROMPTS[0]], "max_tokens": 30})
    assert status == 200 and body["choices"][0]["text"] == expected.text


def test_chat_completion_equals_engine(client, tiny_engine):
    expected = tiny_engine.generate(messages=chat(PROMPTS[1]), max_new_tokens=25)
    for extra in ({}, {"speculate": False}):
        status, body = client.post("/v1/chat/completions", {"messages": chat(PROMPTS[1]), "max_tokens": 25,
                                                            **extra})
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
        assert body["conflayers"]["completion_tokens"] == len(expected.token_ids)


def test_default_max_tokens_fits_the_context(client, tiny_engine):
    long_prompt = " ".join(["apples"] * 400)
    n = len(tiny_engine.encode(long_prompt))
    assert tiny_engine.capacity - n + 1 < 256
    status, body = client.post("/v1/completions", {"prompt": long_prompt, "speculate": False})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] <= tiny_engine.capacity - n + 1


def test_sampling_with_seed(client):
    req = {"prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 5}
    a, b = client.post("/v1/completions", req)[1], client.post("/v1/completions", req)[1]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


# -- streaming --------------------------------------------------------------------------------

def test_stream_completion(client):
    req = {"prompt": PROMPTS[3], "max_tokens": 40}
    _, plain = client.post("/v1/completions", req)
    chunks = client.sse("/v1/completions", req)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert last["conflayers"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert last["usage"] == plain["usage"]


def test_stream_chat(client):
    req = {"messages": chat(PROMPTS[0]), "max_tokens": 40, "task": "fp32sub"}
    _, plain = client.post("/v1/chat/completions", req)
    chunks = client.sse("/v1/chat/completions", req)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["conflayers"]["profile"] == "fp32sub"


# -- bad input --------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
BAD = [
    ("invalid json", C, b"{nope", "application/json", 400, None),
    ("empty body", C, b"", "application/json", 400, None),
    ("not an object", C, b"[1, 2]", "application/json", 400, None),
    ("wrong content type", C, b'{"prompt": "x"}', "text/plain", 400, None),
    ("missing prompt", C, {"max_tokens": 5}, None, 400, "prompt"),
    ("empty prompt", C, {"prompt": ""}, None, 400, "prompt"),
    ("prompt list of two", C, {"prompt": ["a", "b"]}, None, 400, "prompt"),
    ("token-id prompt", C, {"prompt": [1, 2, 3]}, None, 400, "prompt"),
    ("missing messages", CH, {"prompt": "x"}, None, 400, "messages"),
    ("empty messages", CH, {"messages": []}, None, 400, "messages"),
    ("bad role", CH, {"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages"),
    ("message not object", CH, {"messages": ["hello"]}, None, 400, "messages"),
    ("content not string", CH, {"messages": [{"role": "user", "content": 5}]}, None, 400, "messages"),
    ("unknown task", C, {"prompt": "x", "task": "nope"}, None, 400, "task"),
    ("negative temperature", C, {"prompt": "x", "temperature": -0.5}, None, 400, "temperature"),
    ("string temperature", C, {"prompt": "x", "temperature": "hot"}, None, 400, "temperature"),
    ("top_p zero", C, {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("top_p above one", C, {"prompt": "x", "top_p": 1.5}, None, 400, "top_p"),
    ("max_tokens zero", C, {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens float", C, {"prompt": "x", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("max_tokens beyond context", C, {"prompt": "x", "max_tokens": 100000}, None, 400, "max_tokens"),
    ("prompt beyond context", C, {"prompt": "apples " * 600, "max_tokens": 1}, None, 400, "prompt"),
    ("bad stop", C, {"prompt": "x", "stop": [""]}, None, 400, "stop"),
    ("bad stream flag", C, {"prompt": "x", "stream": "yes"}, None, 400, "stream"),
    ("n above one", C, {"prompt": "x", "n": 2}, None, 400, "n"),
    ("bad seed", C, {"prompt": "x", "seed": "abc"}, None, 400, "seed"),
    ("negative seed", C, {"prompt": "x", "seed": -1}, None, 400, "seed"),
    ("bad speculate flag", C, {"prompt": "x", "speculate": "no"}, None, 400, "speculate"),
    ("max_completion_tokens zero", CH, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     None, 400, "max_completion_tokens"),
    ("chat beyond context", CH, {"messages": [{"role": "user", "content": "apples " * 600}], "max_tokens": 1},
     None, 400, "messages"),
]


@pytest.mark.parametrize("name, path, body, ctype, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(client, name, path, body, ctype, status, param):
    if isinstance(body, bytes):
        got, err = client.post(path, None, raw=body, ctype=ctype)
    else:
        got, err = client.post(path, body)
    assert got == status, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param
    assert client.get("/health")[0] == 200


def test_streaming_bad_input_is_a_plain_error(client):
    status, err = client.post(C, {"prompt": "x", "stream": True, "max_tokens": 100000})
    assert status == 400 and err["error"]["param"] == "max_tokens"
    # the engine's message, in this API's field names
    assert "max_tokens" in err["error"]["message"] and "max_new_tokens" not in err["error"]["message"]


def test_unknown_path_and_wrong_method(client):
    status, err = client.get("/v2/nothing")
    assert status == 404 and "error" in err
    status, err = client.get(C)
    assert status == 405 and "error" in err
    status, err = client.post("/health", {"x": 1})
    assert status == 405
    status, err = client.request("DELETE", "/v1/models")
    assert status == 405
    assert client.get("/health")[0] == 200


def test_garbage_http_does_not_kill_the_server(client):
    with socket.create_connection((client.host, client.port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        s.recv(1000)
    assert client.get("/health")[0] == 200


# -- disconnects, concurrency, metrics --------------------------------------------------------

def _long_prompt(engine, n):
    """A prompt whose greedy output runs the full n tokens (no end token), so the stream is
    still going when the client hangs up."""
    for p in PROMPTS + ["Summarize the article", "A farmer sells 40 eggs a day", "Question:"]:
        if engine.generate(p, max_new_tokens=n, speculate=False).finish_reason == "length":
            return p
    pytest.skip("the tiny model ends every candidate prompt early")


def test_client_disconnect_mid_stream(client, tiny_engine):
    prompt = _long_prompt(tiny_engine, 400)
    before = parse_prometheus(client.get("/metrics")[1])
    body = json.dumps({"prompt": prompt, "max_tokens": 400, "stream": True, "speculate": False}).encode()
    s = socket.create_connection((client.host, client.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(200).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    s.close()
    after = metrics_after_next_request(client, before, C, poll=0.05)
    assert total(after, "conflayers_requests_total", endpoint=C, status="499") == \
        total(before, "conflayers_requests_total", endpoint=C, status="499") + 1
    assert total(after, "conflayers_client_disconnects_total") >= 1
    assert total(after, "conflayers_inflight_requests") == 0 and total(after, "conflayers_running_requests") == 0
    # generation stopped early: fewer tokens than asked were counted
    gained = total(after, "conflayers_generated_tokens_total") - total(before, "conflayers_generated_tokens_total")
    assert 0 < gained < 400
    deadline = time.monotonic() + 10
    while tiny_engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.active == 0                # the closed stream gave its slot back
    status, body = client.post(C, {"prompt": prompt, "max_tokens": 5})
    assert status == 200


def test_concurrent_requests_equal_solo_outputs(tiny_engine):
    srv = start(tiny_engine, max_concurrency=2)     # 4 clients, 2 at a time: some must wait
    try:
        c = Client(srv)
        reqs = [(C, {"prompt": p, "max_tokens": 60}) if i % 2 == 0 else
                (CH, {"messages": chat(p), "max_tokens": 60, "task": "fp32sub"}) for i, p in enumerate(PROMPTS)]
        solo = [c.post(path, body)[1] for path, body in reqs]
        plain = [c.post(path, {**body, "speculate": False})[1] for path, body in reqs]
        text = lambda r: r["choices"][0].get("text", r["choices"][0].get("message", {}).get("content"))
        assert [text(r) for r in solo] == [text(r) for r in plain]       # lossless first
        results = [None] * len(reqs)

        def work(i):
            path, body = reqs[i]
            if i == 3:
                results[i] = c.sse(path, body)
            else:
                results[i] = c.post(path, body)[1]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in (0, 2):
            assert results[i]["choices"][0]["text"] == solo[i]["choices"][0]["text"]
        assert results[1]["choices"][0]["message"] == solo[1]["choices"][0]["message"]
        streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in results[3])
        assert streamed == solo[3]["choices"][0]["message"]["content"]
        samples = parse_prometheus(c.get("/metrics")[1])
        assert total(samples, "conflayers_requests_total", status="200") >= 8
    finally:
        srv.shutdown()
        srv.server_close()


def test_metrics_counters_increase(client):
    status, text = client.get("/metrics")
    assert status == 200 and isinstance(text, str)
    before = parse_prometheus(text)
    client.post(C, {"prompt": PROMPTS[0], "max_tokens": 12})
    client.post(C, {"prompt": ""})
    after = parse_prometheus(client.get("/metrics")[1])
    assert total(after, "conflayers_requests_total", endpoint=C, status="200") == \
        total(before, "conflayers_requests_total", endpoint=C, status="200") + 1
    assert total(after, "conflayers_requests_total", endpoint=C, status="400") == \
        total(before, "conflayers_requests_total", endpoint=C, status="400") + 1
    assert total(after, "conflayers_generated_tokens_total", profile="int8skip") == \
        total(before, "conflayers_generated_tokens_total", profile="int8skip") + 12
    assert total(after, "conflayers_draft_tokens_total") > total(before, "conflayers_draft_tokens_total")
    assert total(after, "conflayers_accepted_tokens_total") >= total(before, "conflayers_accepted_tokens_total")
    assert total(after, "conflayers_request_seconds_count", endpoint=C) == \
        total(before, "conflayers_request_seconds_count", endpoint=C) + 2
    assert ("conflayers_request_seconds_bucket", frozenset({("endpoint", C), ("le", "+Inf")})) in after
    assert total(after, "conflayers_inflight_requests") == 0


def test_one_log_line_per_request(client):
    client.post(C, {"prompt": PROMPTS[1], "max_tokens": 7})
    client.get("/nowhere")
    lines = LOG.getvalue().splitlines()
    assert re.search(r" POST /v1/completions 200 tokens=7 \d+\.\d{3}s$", lines[-2]), lines[-2]
    assert re.search(r" GET /nowhere 404 tokens=0 \d+\.\d{3}s$", lines[-1]), lines[-1]
    assert "Traceback" not in LOG.getvalue()
