"""conflayers-serve --ray: Ray Serve replicas behind the same HTTP front. On a local Ray instance
(2 CPUs, started once for this file): 2 replicas answer 20 concurrent requests exactly as the
local engine does, errors are the single-process server's, and killing a replica mid-load loses
only the requests it was generating (clean 503s), after which Serve brings it back."""
from __future__ import annotations

import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")

from test_server import Client  # noqa: E402 - the HTTP client of the server tests

from conflayers.runtime import Engine  # noqa: E402
from conflayers.runtime.serving.http import make_server  # noqa: E402

PER_REPLICA = 4
PROMPTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):", "The train leaves at 9",
           "Write a short poem about the sea."]
TASKS = [None, "int8skip", "fp32sub"]
HANG_GUARD_S = 120


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory, tiny_tokenizer_dir):
    """A small random Llama, slow enough (~3 ms a token) that a long request is still generating
    when a replica is killed; the end-of-text token is never greedy (its output row is zero while
    random logits have a positive maximum), so requests run to max_tokens."""
    import tiny
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.2, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[1].zero_()
    return tiny.make_bundle(str(tmp_path_factory.mktemp("ray_serve") / "bundle"), model, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def local(slow_bundle):
    return Engine.load(slow_bundle, num_threads=1)


@pytest.fixture(scope="module")
def front(ray_local, slow_bundle):
    """2 replicas (1 CPU each) and the HTTP front, as conflayers-serve BUNDLE --ray --replicas 2 runs them."""
    from conflayers.runtime.ray_serve import deploy
    t0 = time.perf_counter()
    engine = deploy(slow_bundle, None, {}, replicas=2, replica_cpus=1, concurrency=PER_REPLICA)
    print(f"\nServe deployment (2 replicas) ready: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    server = make_server(engine, "127.0.0.1", 0, 2 * PER_REPLICA, log_stream=io.StringIO())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _request(i: int, max_tokens: int) -> tuple[str, dict]:
    prompt, task = PROMPTS[i % len(PROMPTS)], TASKS[i % len(TASKS)]
    chat = i % 2 == 1
    body = {"max_tokens": max_tokens, **({"task": task} if task else {})}
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def _expected(local, path: str, body: dict, cache: dict):
    key = json.dumps([path, body], sort_keys=True)
    if key not in cache:
        kw = {"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]}
        cache[key] = local.generate(**kw, task=body.get("task"), max_new_tokens=body["max_tokens"])
    return cache[key]


def _text(path: str, response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


def test_20_concurrent_requests_equal_the_local_engine(front, local):
    engine, client, cache = front.engine, Client(front), {}
    reqs = [_request(i, 24) for i in range(20)]
    # greedy token identity, through the Ray hop (the front's engine: a Serve handle)
    def direct(req):
        path, body = req
        kw = {"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]}
        return engine.generate(**kw, task=body.get("task"), max_new_tokens=body["max_tokens"])
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(direct, reqs, timeout=HANG_GUARD_S))
    for (path, body), r in zip(reqs, results):
        assert r.token_ids == _expected(local, path, body, cache).token_ids
    # and the same through the HTTP front, streaming every other request
    def http(i):
        path, body = reqs[i]
        if i % 4 < 2:
            return client.post(path, body)
        status, text = client.post(path, {**body, "stream": True})
        events = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
        content = "".join(c["choices"][0].get("delta", {}).get("content", "") if path.endswith("chat/completions")
                          else c["choices"][0].get("text", "") for c in events)
        return status, {"choices": [{"message": {"content": content}, "text": content}]}
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(http, range(20), timeout=HANG_GUARD_S))
    for (path, body), (status, response) in zip(reqs, answers):
        assert status == 200, response
        assert _text(path, response) == _expected(local, path, body, cache).text


def test_errors_and_info_are_the_single_process_servers(front, local):
    alone = make_server(local, "127.0.0.1", 0, 4, log_stream=io.StringIO())
    threading.Thread(target=alone.serve_forever, daemon=True).start()
    try:
        ray_client, local_client = Client(front), Client(alone)
        bad = [("/v1/completions", {"prompt": "x", "max_tokens": -3}),
               ("/v1/completions", {"prompt": "x", "task": "nope"}),
               ("/v1/chat/completions", {"messages": "not a list"}),
               ("/v1/completions", {"prompt": "x", "temperature": "hot"}),
               ("/v1/completions", {"n": 2, "prompt": "x"})]
        for path, body in bad:
            got, want = ray_client.post(path, body), local_client.post(path, body)
            assert got == want and got[0] == 400
        assert ray_client.request("GET", "/nowhere") == local_client.request("GET", "/nowhere")
        health = ray_client.get("/health")[1]
        assert health["profiles"] == local.profiles and health["default_profile"] == local.bundle.default_profile
        assert health["max_context"] == local.capacity
    finally:
        alone.shutdown()
        alone.server_close()


def _replicas(ray) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "EngineReplica" in a["name"])


def _running_replicas() -> int:
    from ray import serve
    app = serve.status().applications.get("conflayers")
    if app is None:
        return 0
    dep = app.deployments["EngineReplica"]
    return dep.replica_states.get("RUNNING", 0)


def test_a_killed_replica_loses_only_its_inflight_requests_and_comes_back(front, local, ray_local):
    ray, client, cache = ray_local, Client(front), {}
    before = _replicas(ray)
    assert len(before) == 2
    reqs = [_request(i % 4 * 3, 160) for i in range(20)]      # 2 prompts x chat/completion, plain
    results: list = [None] * 20

    def run(i):
        path, body = reqs[i]
        stream = i % 2 == 0
        status, out = client.post(path, {**body, "stream": stream})
        results[i] = (stream, status, out)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(20)]
    started = front.metrics.ttft.n
    for t in threads:
        t.start()
    end = time.monotonic() + HANG_GUARD_S
    while front.metrics.ttft.n - started < 2 * PER_REPLICA:       # both replicas are generating their 4 requests
        assert time.monotonic() < end, "the requests never started"
        time.sleep(0.01)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(HANG_GUARD_S)
        assert not t.is_alive(), "a request hung after its replica died"

    failed = []
    for i, (stream, status, out) in enumerate(results):
        path, body = reqs[i]
        if stream:
            events = [e[len("data: "):] for e in out.split("\n\n") if e]
            payloads = [json.loads(e) for e in events if e != "[DONE]"]
            if "error" in payloads[-1]:
                assert events[-1] != "[DONE]"
                failed.append(payloads[-1]["error"])
                continue
            assert events[-1] == "[DONE]"
            text = "".join(p["choices"][0].get("delta", {}).get("content", "") if "messages" in body
                           else p["choices"][0].get("text", "") for p in payloads)
        else:
            if status != 200:
                assert status == 503, out
                failed.append(out["error"])
                continue
            text = _text(path, out)
        assert text == _expected(local, path, body, cache).text
    # only what the killed replica was generating (at most its 4 slots) is lost, with a clean error
    assert 1 <= len(failed) <= PER_REPLICA
    for err in failed:
        assert err["type"] == "server_error" and "replica" in err["message"] and "retry" in err["message"]

    end = time.monotonic() + HANG_GUARD_S
    while _running_replicas() < 2 or len(_replicas(ray)) < 2:     # Serve replaces the dead replica
        assert time.monotonic() < end, "the killed replica was not replaced"
        time.sleep(0.2)
    assert before[0] not in _replicas(ray)
    with ThreadPoolExecutor(8) as pool:
        again = list(pool.map(lambda i: client.post(*_request(i, 16)), range(8), timeout=HANG_GUARD_S))
    for i, (status, out) in enumerate(again):
        path, body = _request(i, 16)
        assert status == 200 and _text(path, out) == _expected(local, path, body, cache).text
