"""Load bench: N concurrent closed-loop HTTP clients against a running conflayers-serve.

    python -m conflayers.tools.loadbench --url http://127.0.0.1:8000 --task gsm8k \
        --concurrency 1,2,4,8 --requests 8 --max-tokens 64

Each client streams a completion (Server-Sent Events), then sends the next, until the level's
requests are done. Per concurrency level: aggregate generated tokens/s (tokens over wall time),
p50/p95 time to first token, p50/p95 inter-token latency (gaps between streamed text chunks, each
divided by the mean tokens per chunk: a speculative step's tokens share its time) and errors. Prompts come from
a task's test prompts (the compiler's task data) or a JSONL file of {"prompt": ...} lines.
Standard library only, besides the task loader.
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

import numpy as np


def load_prompts(task: str, n: int) -> list[str]:
    if task.endswith(".jsonl"):
        with open(task) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r["prompt"] for r in rows][:n]
    from conflayers.compiler.data import load_prompts as task_prompts   # torch-free
    return [p.text for p in task_prompts(task, "evaluation")[:n]]


def one_request(url, prompt: str, max_tokens: int, timeout: float = 600.0) -> dict:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        conn.close()
        return {"error": resp.status}
    times, tokens = [], 0
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"].get("completion_tokens", tokens)
        elif ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
            times.append(time.perf_counter() - t0)
    conn.close()
    end = time.perf_counter() - t0
    # the gaps between streamed text chunks, each shared by the tokens it carries (on average)
    per_chunk = max(tokens - 1, 1) / max(len(times) - 1, 1)
    itl = [(b - a) / per_chunk for a, b in zip(times, times[1:])]
    return {"ttft": times[0] if times else end, "itl": itl, "tokens": tokens, "seconds": end}


def run_level(url, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    lock = threading.Lock()
    todo = list(range(requests))
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                r = one_request(url, prompts[i % len(prompts)], max_tokens)
            except Exception as e:        # noqa: BLE001 - counted as an error
                r = {"error": type(e).__name__}
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")    # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "itl_p50_ms": pct(itl, 50) * 1000, "itl_p95_ms": pct(itl, 95) * 1000}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--task", default="gsm8k", help="a named task (its test prompts) or a .jsonl file")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    prompts = load_prompts(a.task, max(a.requests, max(levels)))
    one_request(a.url, prompts[0], 4)                        # warm-up (first-use policy probe)
    rows = [run_level(a.url, prompts, c, a.requests, a.max_tokens) for c in levels]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'conc':>4} {'reqs':>4} {'err':>3} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} {'ITL p50 ms':>10} {'p95':>7}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['tokens_per_s']:>7.1f} "
              f"{r['ttft_p50_s']:>9.2f} {r['ttft_p95_s']:>7.2f} {r['itl_p50_ms']:>10.1f} {r['itl_p95_ms']:>7.1f}")


if __name__ == "__main__":
    main()
