"""Load bench: closed-loop concurrent HTTP clients against conflayers-serve and ONNX Runtime GenAI's engine.

    python -m conflayers.tools.loadbench BUNDLE --systems batched,unbatched,genai --max-batch 8 \
        --concurrency 1,2,4,8,16 --requests 32 --max-tokens 128 --task gsm8k [--rss-requests 1000]
    python -m conflayers.tools.loadbench --url http://127.0.0.1:8000 --concurrency 1,2,4,8   # a running server

With a BUNDLE, the bench starts every server it needs itself, each a subprocess on 127.0.0.1 (port
chosen by the OS; its log in a temporary directory, kept and named when something fails), and
stops them at the end. Systems:

- `batched`: `conflayers-serve BUNDLE --max-batch N` (continuous batching), the bundle's default
  profile (speculative decoding where its policy pays); `batched-plain`: the same server, requests
  with `"speculate": false`;
- `unbatched`: `conflayers-serve BUNDLE --max-batch 1 --max-concurrency N` (one request decodes at
  a time, alone, the others wait); `unbatched-plain`: the same, `"speculate": false`;
- `batched-nocache`: `batched` with `--no-prompt-cache` (every prompt prefilled whole);
- `genai`: ONNX Runtime GenAI's batching engine (`og.Engine` / `og.Request`, onnxruntime-genai 0.18)
  over the model its builder makes from the bundle's Hugging Face checkpoint (`--genai-precision`,
  int4 by default: the precision of a Q4 GGUF; the same cached build as `conflayers-bench`'s
  genai-int4), served by `genai-serve` below;
- `llamacpp-server`: llama.cpp's own `llama-server` (tools/install_llama_server.sh builds it into
  .venv/bin) on the GGUF file the bundle's model came from (`--gguf` to name it), `--parallel
  N` slots (continuous batching), each with the KV room of a conflayers-serve slot, the same
  threads; requests ask for temperature 0 (its default is 0.8) and keep its prompt cache on (its
  default, as conflayers-serve's); `llamacpp-server-nocache`: the same server, `cache_prompt:
  false`. It formats prompts with the GGUF's chat template and decodes with its own kernels, so
  its tokens can differ from ours.

How the anchor is served (the choice): GenAI has no HTTP server of its own, so this module has a
small one, `python -m conflayers.tools.loadbench genai-serve` (standard library
ThreadingHTTPServer, 127.0.0.1 only). It speaks the subset of the chat / text completions API
the clients use (streaming Server-Sent Events, or one JSON body; `max_tokens`; greedy), so the
same closed-loop clients hit both systems over the same HTTP hop, and its RSS is one process's,
like conflayers-serve's. One scheduler thread owns the og.Engine (GenAI requires every engine
call from its owner thread): it admits new requests between `Engine.run` calls, hands each token
event to the request's HTTP thread and cancels the turn of a client that left. Prompts are the
same token ids as conflayers-serve's (the bundle's tokenizer and chat template, chat content
encoded as plain text), text is detokenized by the same stream decoder, generation stops at the
bundle's end-of-generation ids, and each request's GenAI session is capped at prompt +
max_tokens tokens (GenAI's default reserves a KV cache of the model's whole context per row).
GenAI 0.18's engine batches dynamically only for PagedAttention models, which its builder makes
for CUDA (fp16/bf16) alone; a CPU model gets its static batch scheduler: requests waiting when a
batch starts decode together, a newcomer waits until that whole batch has finished. Measured with
SmolLM2's int4 CPU model: at most 4 rows per pass, whatever `engine.static_batching.max_batch_size`
says (the bench sets it to --max-batch; it changes only the reported capability). The table's
`rows/pass` column shows what it did (sequences advanced per Engine.run, from the wrapper's /stats).

Each client streams a chat completion, then sends the next, until the level's requests (at least
one per client) are done. Per system and concurrency level: aggregate generated tokens/s (tokens
over the level's wall time), p50/p95/p99 time to first token, p50/p95/p99 inter-token latency
(gaps between streamed text chunks, each divided by the mean tokens per chunk: a speculative
step's tokens share its time) and errors (non-200 answers, in-band errors, broken streams). Levels
run interleaved (for each concurrency, every system in turn), so machine noise hits them alike.
Every server gets two warm-up requests first (the first request runs the adaptive-policy probe).
A server with a prompt cache (conflayers-serve's, llama-server's with `cache_prompt`) is primed
before each measured level: one-token requests over that level's prompts, not measured. The bench
repeats its prompts across systems and levels, so without it the first system on a shared server
(`batched` before `batched-plain`) prefilled every prompt while the next one found them cached:
at one stream that alone made `batched` look 0.82-0.86x `batched-plain` (time to first token
0.15 s against 0.02 s), a difference of order, not of decoding. Primed, every system with a cache
is measured at a warm cache; `batched-nocache` gives the figures of prompts never seen.
After each level of a speculative batched system the bench reads the server's batch guard from
its /metrics (the classes of batch sizes where the guard measured drafting slower than plain
batched steps and turned it off, and its switches so far: runtime/batchguard.py).
Every answer's text is kept per prompt and compared with the solo greedy answer (the first plain
conflayers system's at its lowest concurrency): conflayers' systems must match on every prompt at
every level (the bench exits 1 and names the prompts when one does not); the anchors' agreement is
reported for information (GenAI runs its own int4 weights, llama.cpp other kernels).

`--burst 200,1000` then, per server, connects that many clients at once and has them all send one
short non-streamed request together: answered (200), refused (429/503, with Retry-After or not),
other statuses, and broken (resets, refused connects, timeouts), which a server must never give.

`--rss-requests N` then sends each server N short requests (`--rss-max-tokens`, `--rss-concurrency`
clients, at most `--rss-time-limit` seconds) and samples its resident set (VmRSS of the server's
pid in /proc) before the first, after every `--rss-every` requests and after the last: the curve,
the growth over the run and over its second half (past the allocator's warm-up). With --url the
server is not ours: pass its pid with --server-pid for the RSS run.

Prompts come from a task's evaluation prompts (the compiler's task data) or a JSONL file of
{"prompt": ...} lines. Only loopback URLs are accepted. Standard library and numpy, besides the
task loader, the runtime's text codec (genai-serve) and the GenAI model build (genai).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# system -> (server kind, extra request fields)
SYSTEMS = {
    "batched": ("conflayers-batched", {}),
    "batched-plain": ("conflayers-batched", {"speculate": False}),
    "unbatched": ("conflayers", {}),
    "unbatched-plain": ("conflayers", {"speculate": False}),
    "genai": ("genai-engine", {}),
    "batched-nocache": ("conflayers-batched-nocache", {}),
    # llama.cpp's own server defaults to temperature 0.8 and streams usage only when asked. Its
    # prompt cache reuses a slot's KV of a prompt prefix, as conflayers-serve's does (both on by
    # default); the -nocache systems turn each off (the bench repeats prompts across levels)
    "llamacpp-server": ("llamacpp-server", {"temperature": 0, "stream_options": {"include_usage": True},
                                            "cache_prompt": True}),
    "llamacpp-server-nocache": ("llamacpp-server", {"temperature": 0, "stream_options": {"include_usage": True},
                                                    "cache_prompt": False}),
}
DEFAULT_SYSTEMS = "batched,unbatched,genai"
WARMUP_REQUESTS = 2


class LoadBenchError(Exception):
    """Bad input or a server that would not start: one `Error:` line, exit status 2."""


# ----------------------------------------------------------------------------- clients

def load_prompts(task: str, n: int) -> list[str]:
    if task.endswith(".jsonl"):
        with open(task) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r["prompt"] for r in rows][:n]
    from conflayers.compiler.data import load_prompts as task_prompts   # torch-free
    return [p.text for p in task_prompts(task, "evaluation")[:n]]


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise LoadBenchError(f"--url {url}: the load bench only drives servers on this machine "
                             f"({', '.join(LOOPBACK)})")
    return url


def one_request(url, prompt: str, max_tokens: int, extra: dict | None = None, timeout: float = 600.0) -> dict:
    """One streamed chat completion: its time to first token, inter-token gaps, completion tokens
    (the server's usage) and total time; {"error": ...} for a refusal, an in-band error or a
    stream that ends before its [DONE]."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, **(extra or {})})
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"error": str(resp.status)}
        times, pieces, tokens, done, usage, cached, prompt_tokens = [], [], 0, False, False, None, None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if ev.get("error"):
                return {"error": "in-band"}
            if ev.get("usage"):
                tokens, usage = ev["usage"].get("completion_tokens", tokens), True
                cached = ev.get("conflayers", {}).get("cached_prompt_tokens", cached)
                prompt_tokens = ev["usage"].get("prompt_tokens")
            elif ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter() - t0)
                pieces.append(ev["choices"][0]["delta"]["content"])
    finally:
        conn.close()
    if not (done and usage):
        return {"error": "truncated"}
    end = time.perf_counter() - t0
    # the gaps between streamed text chunks, each shared by the tokens it carries (on average)
    per_chunk = max(tokens - 1, 1) / max(len(times) - 1, 1)
    itl = [(b - a) / per_chunk for a, b in zip(times, times[1:])]
    return {"ttft": times[0] if times else end, "itl": itl, "tokens": tokens, "seconds": end,
            "text": "".join(pieces),
            # conflayers-serve's: whether the prompt cache held the whole prompt (its last token is
            # always fed), None from a server that does not say
            "prompt_cached": None if cached is None or not prompt_tokens else cached >= prompt_tokens - 1}


def run_clients(url, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
                extra: dict | None = None, deadline: float | None = None, on_done=None) -> tuple[list, float]:
    """`concurrency` closed-loop clients share `requests` requests (none started after `deadline`,
    a time.monotonic() value); on_done(count) runs after each answer, under the clients' lock.
    Returns (results, wall seconds)."""
    lock = threading.Lock()
    todo = list(range(requests))
    results = []

    def client():
        while True:
            with lock:
                if not todo or (deadline is not None and time.monotonic() >= deadline):
                    return
                i = todo.pop(0)
            try:
                r = one_request(url, prompts[i % len(prompts)], max_tokens, extra)
            except Exception as e:        # noqa: BLE001 - counted as an error
                r = {"error": type(e).__name__}
            with lock:
                results.append({**r, "prompt": i % len(prompts)})
                if on_done is not None:
                    on_done(len(results))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(results: list, wall: float, concurrency: int) -> dict:
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_kinds": errors, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_ms": _pct(itl, 50) * 1000, "itl_p95_ms": _pct(itl, 95) * 1000,
            "itl_p99_ms": _pct(itl, 99) * 1000,
            "prompt_cache_hits": sum(bool(r.get("prompt_cached")) for r in ok)
            if any(r.get("prompt_cached") is not None for r in ok) else None}


def has_prompt_cache(kind: str, extra: dict) -> bool:
    """Whether a system's server keeps prompts' KV between requests (primed before each level)."""
    if kind.startswith("conflayers"):
        return not kind.endswith("-nocache")          # the -nocache kinds start with --no-prompt-cache
    return kind == "llamacpp-server" and bool(extra.get("cache_prompt"))


def run_level(url, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
              extra: dict | None = None, outputs: dict | None = None) -> dict:
    """One level's summary; each answer's text goes to outputs[prompt index] as (concurrency, text)."""
    results, wall = run_clients(url, prompts, concurrency, max(requests, concurrency), max_tokens, extra)
    if outputs is not None:
        for r in results:
            if "error" not in r:
                outputs.setdefault(r["prompt"], []).append((concurrency, r["text"]))
    return summarize(results, wall, concurrency)


# conflayers' systems are lossless: every answer to a prompt, at every concurrency, speculative or
# not, batched or not, must be the plain solo greedy one. The anchors are told apart: GenAI runs
# other weights (its builder's), llama.cpp the same GGUF through other kernels, so their agreement
# is information, not a check.
LOSSLESS_KINDS = ("conflayers-batched", "conflayers-batched-nocache", "conflayers", "url")
REFERENCE_ORDER = ("unbatched-plain", "batched-plain", "unbatched", "batched", "url")


def output_check(outputs: dict[str, dict], systems: list[tuple[str, str]]) -> dict:
    """Compares answers per prompt. The reference answer of a prompt is the first plain system's
    (REFERENCE_ORDER) answer at the lowest concurrency it ran at (concurrency 1: solo greedy).
    Per system: prompts and answers seen, prompts whose answers all equal the reference (every
    answer, every level), and for lossless systems the prompt indices that differ."""
    kind_of = dict(systems)
    ref_name = next((n for n in REFERENCE_ORDER if n in outputs and kind_of.get(n) in LOSSLESS_KINDS), None)
    if ref_name is None:
        return {}
    reference = {p: min(answers)[1] for p, answers in outputs[ref_name].items()}
    check = {"reference": ref_name,
             "reference_concurrency": min(c for answers in outputs[ref_name].values() for c, _ in answers),
             "systems": {}}
    for name, per_prompt in outputs.items():
        common = [p for p in per_prompt if p in reference]
        differ = sorted(p for p in common if any(t != reference[p] for _, t in per_prompt[p]))
        check["systems"][name] = {"lossless": kind_of[name] in LOSSLESS_KINDS, "prompts": len(common),
                                  "answers": sum(len(per_prompt[p]) for p in common),
                                  "identical": len(common) - len(differ), "differ": differ}
    return check


def output_lines(check: dict) -> list[str]:
    if not check:
        return []
    lines = [f"outputs, per prompt against {check['reference']}'s answer at concurrency "
             f"{check['reference_concurrency']}:"]
    for name, c in check["systems"].items():
        what = "lossless, must match" if c["lossless"] else "other weights or kernels, for information"
        tail = f"; DIFFER: prompts {c['differ'][:10]}" if c["lossless"] and c["differ"] else ""
        lines.append(f"  {name}: {c['identical']} of {c['prompts']} prompts identical over all "
                     f"{c['answers']} answers ({what}){tail}")
    return lines


def lossless_failures(check: dict) -> list[str]:
    return [name for name, c in check.get("systems", {}).items() if c["lossless"] and c["differ"]]


# ----------------------------------------------------------------------------- bursts

def burst(url, prompt: str, n: int, max_tokens: int = 8, extra: dict | None = None,
          timeout: float = 300.0) -> dict:
    """n clients connect first, then all send one non-streamed chat request at once. Counts the
    answers (200), the refusals (429/503, and how many of them said Retry-After), other statuses,
    and the broken ones (a reset, a refused connect, a timeout: what a burst must never cause)."""
    u = urlsplit(url)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       **(extra or {})}).encode()
    results: list = [None] * n
    go = threading.Event()

    def one(i):
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
            conn.connect()
            go.wait()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            results[i] = (r.status, r.getheader("Retry-After"))
            conn.close()
        except Exception as e:        # noqa: BLE001 - counted: what this measures
            results[i] = type(e).__name__

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(1.0)                   # every client connects (or is turned away at accept) first
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join(timeout + 10)
    statuses: dict[str, int] = {}
    broken: dict[str, int] = {}
    for r in results:
        if isinstance(r, tuple):
            statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
        else:
            broken[r or "unfinished"] = broken.get(r or "unfinished", 0) + 1
    refused = [r for r in results if isinstance(r, tuple) and r[0] in (429, 503)]
    return {"connections": n, "answered": statuses.get("200", 0), "refused": len(refused),
            "refused_with_retry_after": sum(1 for r in refused if r[1]), "statuses": statuses,
            "broken": broken, "seconds": round(time.perf_counter() - t0, 2)}


def burst_lines(bursts: dict) -> list[str]:
    lines = []
    for kind, runs in bursts.items():
        for b in runs:
            other = {k: v for k, v in b["statuses"].items() if k not in ("200", "429", "503")}
            lines.append(f"burst of {b['connections']} against {kind}: {b['answered']} answered, {b['refused']} "
                         f"refused (429/503; {b['refused_with_retry_after']} with Retry-After)"
                         + (f", other statuses {other}" if other else "")
                         + (f", BROKEN {b['broken']}" if b["broken"] else ", none broken")
                         + f", {b['seconds']:.1f} s")
    return lines


# ----------------------------------------------------------------------------- resident memory

def read_rss_kb(pid: int) -> int:
    """VmRSS of process `pid` in kB, from /proc/<pid>/status (Linux)."""
    with open(f"/proc/{int(pid)}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no VmRSS (a zombie or a kernel thread?)")


def rss_run(url, pid: int, prompts: list[str], requests: int, concurrency: int = 4, max_tokens: int = 8,
            every: int = 100, time_limit: float = 900.0, extra: dict | None = None) -> dict:
    """`requests` short requests from `concurrency` clients (none started after `time_limit`
    seconds); the server's VmRSS before the first, after every `every` answers and after the last."""
    samples = [(0, read_rss_kb(pid))]

    def on_done(count):
        if count % every == 0:
            samples.append((count, read_rss_kb(pid)))

    results, wall = run_clients(url, prompts, concurrency, requests, max_tokens, extra,
                                deadline=time.monotonic() + time_limit, on_done=on_done)
    if samples[-1][0] != len(results):
        samples.append((len(results), read_rss_kb(pid)))
    mb = [(n, kb / 1024.0) for n, kb in samples]
    mid = min(mb, key=lambda s: abs(s[0] - len(results) / 2))
    return {"pid": pid, "requests": len(results), "asked": requests, "stopped_at_time_limit": len(results) < requests,
            "errors": sum(1 for r in results if "error" in r), "concurrency": concurrency, "max_tokens": max_tokens,
            "wall_s": wall, "rss_mb": [[n, round(v, 1)] for n, v in mb],
            "growth_mb": mb[-1][1] - mb[0][1], "growth_second_half_mb": mb[-1][1] - mid[1]}


# ----------------------------------------------------------------------------- servers

class ServerProcess:
    """A server subprocess on 127.0.0.1 whose log (stdout + stderr) goes to a file; ready once its
    start line names the URL and GET /health answers 200."""

    def __init__(self, name: str, cmd: list[str], log_path: str, env: dict | None = None):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.url = None
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def speculation_plan(self) -> dict:
        """What conflayers-serve --max-batch printed at start-up: per profile, what it drafts at
        each batch size ({} for other servers)."""
        pattern = re.compile(r"^conflayers-serve: batched speculation, (\S+): (.*)$", re.M)
        try:
            with open(self.log_path, errors="replace") as f:
                return dict(pattern.findall(f.read()))
        except OSError:
            return {}

    def wait_ready(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        pattern = re.compile(r" on (http://127\.0\.0\.1:\d+)")
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise LoadBenchError(f"{self.name} exited with status {self.proc.returncode} while starting "
                                     f"({self.log_path}):\n{self.log_tail()}")
            if self.url is None:
                m = pattern.search(self.log_tail(50))
                if m:
                    self.url = m.group(1)
            if self.url is not None:
                try:
                    u = urlsplit(self.url)
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
                    conn.request("GET", "/health")
                    ok = conn.getresponse().status == 200
                    conn.close()
                    if ok:
                        return self.url
                except OSError:
                    pass
            time.sleep(0.2)
        raise LoadBenchError(f"{self.name} was not ready after {timeout:.0f} s ({self.log_path}):\n{self.log_tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def conflayers_command(bundle: str, batched: bool, max_batch: int, max_context: int | None,
                       prefill_chunk: int | None = None, prompt_cache: bool = True,
                       kv_cache: str = "float32") -> list[str]:
    cmd = [sys.executable, "-m", "conflayers.runtime.serving.cli", bundle, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--max-batch", str(max_batch)] if batched else ["--max-batch", "1", "--max-concurrency", str(max_batch)]
    if not prompt_cache:
        cmd.append("--no-prompt-cache")
    if max_context:
        cmd += ["--max-context", str(max_context)]
    if prefill_chunk and batched:
        cmd += ["--prefill-chunk", str(prefill_chunk)]
    if kv_cache != "float32":
        cmd += ["--kv-cache", kv_cache]
    return cmd


def genai_command(bundle: str, model_dir: str, max_batch: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "conflayers.tools.loadbench", "genai-serve", "--bundle", bundle,
            "--model-dir", model_dir, "--max-batch", str(max_batch), "--threads", str(threads), "--port", "0"]


def llama_server_path() -> str | None:
    """llama-server next to this Python (where tools/install_llama_server.sh puts it), else on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "llama-server")
    return exe if os.access(exe, os.X_OK) else shutil.which("llama-server")


def llamacpp_server_command(bundle: str, gguf: str | None, max_batch: int, max_context: int | None,
                            threads: int) -> list[str]:
    """llama.cpp's llama-server (tools/install_llama_server.sh) on the GGUF file the bundle's model
    came from: --max-batch parallel slots (continuous batching), each with the KV room a
    conflayers-serve slot has. Raises Unavailable with what to do."""
    from conflayers.runtime.bundle import read_manifest

    from .bench_systems import Unavailable, locate_gguf
    exe = llama_server_path()
    if not exe:
        raise Unavailable("llama-server is not installed: run bash tools/install_llama_server.sh")
    manifest = read_manifest(os.path.abspath(bundle))
    path = locate_gguf(manifest["model"], gguf)
    per_slot = max_context or int(manifest.get("max_context") or 2048)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # llama-server needs a port number
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [exe, "-m", path, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(max_batch),
            "--ctx-size", str(per_slot * max_batch), "--threads", str(threads), "--threads-batch", str(threads)]


def build_genai_model(bundle: str, precision: str, hf_model: str | None, log) -> str:
    """The GenAI model directory of the bundle's model: conflayers-bench's cached build
    (bench_systems.genai_model_dir). Raises Unavailable with the reason."""
    from conflayers.runtime.bundle import read_manifest

    from .bench_systems import Unavailable, genai_model_dir, resolve_hf_dir
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"onnxruntime-genai is not installed ({e}); pip install conflayers[bench]") from None
    model = read_manifest(os.path.abspath(bundle))["model"]
    hf_dir = resolve_hf_dir(model, hf_model)
    return genai_model_dir(hf_dir, model.get("name") or "model", log, precision=precision)


def http_json(url: str, path: str, timeout: float = 10.0) -> dict | None:
    u = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return json.loads(data) if resp.status == 200 else None
    except (OSError, ValueError):
        return None


def batch_guard(url: str) -> dict | None:
    """A conflayers server's batch guard as its /metrics say (runtime/batchguard.py):
    {"paused_sizes": classes of batch sizes where drafting is off now, "switches": since start},
    or None from a server without one (unbatched, --max-batch 1, not conflayers)."""
    u = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10.0)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
    except (OSError, UnicodeDecodeError):
        return None
    if resp.status != 200:
        return None
    values = {}
    for line in text.splitlines():
        for key in ("batch_drafting_paused_sizes", "batch_guard_switches"):
            if line.startswith(f"conflayers_{key} "):
                values[key] = int(float(line.split()[1]))
    if len(values) < 2:
        return None
    return {"paused_sizes": values["batch_drafting_paused_sizes"], "switches": values["batch_guard_switches"]}


# ----------------------------------------------------------------------------- GenAI engine server

class _Job:
    def __init__(self, ids: list[int], max_tokens: int):
        self.ids, self.max_tokens = ids, max_tokens
        self.events: queue.Queue = queue.Queue()     # ("token", id) ... ("end", finish reason, error or None)
        self.cancelled = threading.Event()
        self.request = None
        self.turn = None
        self.finished = False       # the scheduler saw its last event (or cancelled it at a stop id)


def _cancel_turn(job: _Job):
    try:
        job.request.cancel_turn(job.turn)
    except Exception:  # noqa: BLE001 - the turn may have ended inside the engine already
        pass


class GenAIEngineHost:
    """One og.Engine, owned by a scheduler thread: it admits submitted requests between
    Engine.run calls, routes each token event to its request and cancels the turns of requests
    whose client left. stats: passes (Engine.run calls that advanced a sequence), rows (sequences
    advanced, summed) and the most in one pass."""

    def __init__(self, model_dir: str, threads: int, max_batch: int, stop_ids):
        self.model_dir, self.threads, self.max_batch = model_dir, threads, max_batch
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.stats = {"passes": 0, "rows": 0, "max_rows": 0, "requests": 0, "capability_max_batch": None}
        self._inbox: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="genai-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, ids: list[int], max_tokens: int) -> _Job:
        job = _Job(ids, max_tokens)
        self._inbox.put(job)
        return job

    def cancel(self, job: _Job):
        job.cancelled.set()
        self._inbox.put(None)          # wake the scheduler if it is idle

    def _main(self):
        try:
            import onnxruntime_genai as og
            config = og.Config(self.model_dir)
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads}}}, "engine": {"static_batching": {
                    "max_batch_size": self.max_batch}}}))
            model = og.Model(config)
            engine = og.Engine(model)
            from .bench_systems import genai_window
            window = genai_window(self.model_dir)
            self.stats["capability_max_batch"] = engine.get_capabilities().configured_max_batch_size
            buf = engine.create_event_buffer(max(64, 4 * self.max_batch))
        except BaseException as e:      # noqa: BLE001 - re-raised in the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        token_flag, done_flag = int(og.EngineEventFlags.TOKEN), int(og.EngineEventFlags.TURN_FINISHED)
        failed_flag = int(og.EngineEventFlags.FAILED)
        active: list[_Job] = []

        def finish(job: _Job, reason: str, error: str | None = None):
            if not job.finished:
                job.finished = True
                job.events.put(("end", reason, error))

        while True:
            new = []
            try:
                item = self._inbox.get(block=not active)
                while True:
                    if item is not None:
                        new.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            for job in new:
                if job.cancelled.is_set():
                    finish(job, "cancelled")
                    continue
                try:
                    opts = og.RequestOptions()
                    opts.set_max_session_tokens(max(len(job.ids) + job.max_tokens, window))
                    job.request = engine.create_request(options=opts)
                    turn = og.TurnOptions(job.request)
                    turn.set_max_generated_tokens(job.max_tokens)
                    job.turn = job.request.begin_turn(np.asarray(job.ids, dtype=np.int32), turn)
                    active.append(job)
                    self.stats["requests"] += 1
                except Exception as e:  # noqa: BLE001 - this request fails, the engine carries on
                    finish(job, "error", f"{type(e).__name__}: {e}")
            for job in active:
                if job.cancelled.is_set() and not job.finished:
                    _cancel_turn(job)
                    finish(job, "cancelled")
            if not active:
                continue
            if not engine.has_pending_requests():     # every turn ended without its event (not expected)
                for job in active:
                    finish(job, "error", "the engine dropped the request")
                    job.request.close()
                active.clear()
                continue
            try:
                engine.run(buf)
            except Exception as e:  # noqa: BLE001 - fail what is running; the next requests try again
                for job in active:
                    finish(job, "error", f"{type(e).__name__}: {e}")
                active.clear()
                continue
            rows = 0
            for k in range(len(buf)):
                ev = buf[k]
                req = ev.request
                job = next((j for j in active if j.request == req), None)
                flags = int(ev.flags)
                if flags & token_flag:
                    rows += 1
                    if job is not None and not job.finished:
                        tok = int(ev.token)
                        job.events.put(("token", tok))
                        if tok in self.stop_ids:
                            if not flags & done_flag:
                                _cancel_turn(job)      # the row stops at the next step
                            finish(job, "stop")
                if job is not None and flags & (done_flag | failed_flag):
                    if flags & failed_flag:
                        finish(job, "error", ev.error_code.name)
                    else:
                        finish(job, "stop" if ev.finish_reason.name in ("EOS", "STOP_STRING") else "length")
                    active.remove(job)
                    job.request.close()
            if rows:
                self.stats["passes"] += 1
                self.stats["rows"] += rows
                self.stats["max_rows"] = max(self.stats["max_rows"], rows)


class _GenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "genai-engine-serve"
    MAX_BODY = 4 << 20

    def log_message(self, format, *args):      # noqa: A002 - quiet: thousands of requests in an RSS run
        pass

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_HEAD(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_GET(self):
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/stats":
            self._json(200, dict(self.server.host.stats))
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            return self._error(404, f"no route {self.path}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length > self.MAX_BODY:
            return self._error(413, "body too large")
        codec = self.server.codec
        try:
            body = json.loads(self.rfile.read(length))
            ids = codec.encode_chat(body["messages"]) if chat else codec.encode(body["prompt"])
            max_tokens = int(body.get("max_tokens") or 256)
            if max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
        except (KeyError, TypeError, ValueError) as e:     # ChatError is a ValueError
            return self._error(400, f"bad request: {e}")
        host = self.server.host
        job = host.submit(ids, max_tokens)
        try:
            if body.get("stream"):
                self._stream(job, chat, len(ids))
            else:
                self._complete(job, chat, len(ids))
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if not job.finished:
                host.cancel(job)

    def _tokens(self, job: _Job):
        """(text delta, None) per decoded piece, then (tail, (finish_reason, completion tokens, error))."""
        dec, n = self.server.codec.stream(), 0
        stop_ids = self.server.host.stop_ids
        while True:
            kind, *rest = job.events.get(timeout=self.server.request_timeout)
            if kind == "token":
                if rest[0] in stop_ids:
                    yield dec.flush(), ("stop", n, None)
                    return
                n += 1
                delta = dec.push([rest[0]])
                if delta:
                    yield delta, None
            else:
                reason, error = rest
                yield dec.flush(), ("stop" if reason == "stop" else "length", n, error)
                return

    def _stream(self, job: _Job, chat: bool, prompt_tokens: int):
        rid, created = f"genai-{uuid.uuid4().hex[:12]}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def chunk(delta: str | None, finish=None, usage=None):
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {} if delta is None else {"content": delta}
            else:
                choice["text"] = delta or ""
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": "genai-engine", "choices": [choice]}
            if usage:
                obj["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            self.wfile.write(b"data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                                     "model": "genai-engine", "choices": [{"index": 0, "delta": {
                                                         "role": "assistant", "content": ""},
                                                         "finish_reason": None}]}).encode() + b"\n\n")
        try:
            for text, end in self._tokens(job):
                if text:
                    chunk(text)
                if end is not None:
                    finish, n, error = end
                    if error:
                        self.wfile.write(b"data: " + json.dumps({"error": {"message": error}}).encode() + b"\n\n")
                        return
                    chunk(None, finish, {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                         "total_tokens": prompt_tokens + n})
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
        except queue.Empty:
            self.wfile.write(b"data: " + json.dumps({"error": {"message": "timed out"}}).encode() + b"\n\n")

    def _complete(self, job: _Job, chat: bool, prompt_tokens: int):
        parts = []
        try:
            for text, end in self._tokens(job):
                parts.append(text)
                if end is not None:
                    finish, n, error = end
        except queue.Empty:
            return self._error(503, "timed out")
        if error:
            return self._json(500, {"error": {"message": error, "type": "server_error"}})
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": finish,
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        self._json(200, {"id": f"genai-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else
                         "text_completion", "created": int(time.time()), "model": "genai-engine",
                         "choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                        "total_tokens": prompt_tokens + n}})


class GenAIEngineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, host: GenAIEngineHost, codec, request_timeout: float = 600.0):
        self.host, self.codec, self.request_timeout = host, codec, request_timeout
        super().__init__(address, _GenAIHandler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def genai_serve_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m conflayers.tools.loadbench genai-serve",
                                 description="ONNX Runtime GenAI's engine (og.Engine) behind a minimal streaming "
                                             "chat/text completions endpoint, on 127.0.0.1, for the load bench.")
    ap.add_argument("--bundle", required=True, help="conflayers bundle: its tokenizer, chat template and stop ids")
    ap.add_argument("--model-dir", required=True, help="the GenAI model directory (genai_config.json)")
    ap.add_argument("--max-batch", type=int, default=8, help="engine.static_batching.max_batch_size")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's count)")
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    from conflayers.runtime.bundle import Bundle

    from .bench_systems import runtime_threads
    bundle = Bundle.open(a.bundle, verify=False)          # tokenizer and template only: no graph is loaded
    host = GenAIEngineHost(a.model_dir, a.threads or runtime_threads(), a.max_batch, bundle.stop_ids)
    server = GenAIEngineServer((a.host, a.port), host, bundle.codec, a.request_timeout)
    signal.signal(signal.SIGTERM, _interrupt)          # the bench stops it with SIGTERM
    h, p = server.server_address[:2]
    print(f"genai-serve: {os.path.basename(a.model_dir.rstrip('/'))} on http://{h}:{p} (og.Engine, "
          f"capability max batch {host.stats['capability_max_batch']}, threads {host.threads})", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ----------------------------------------------------------------------------- the bench

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("conflayers", "onnxruntime", "onnxruntime-genai"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def markdown_table(report: dict) -> str:
    rows = ["| system | conc | reqs | errors | tok/s | TTFT p50 / p95 / p99 s | ITL p50 / p95 / p99 ms | rows/pass |",
            "|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        rp = r.get("rows_per_pass")
        ttft = " / ".join(_fmt(r[f"ttft_p{q}_s"], ".2f") for q in (50, 95, 99))
        itl = " / ".join(_fmt(r[f"itl_p{q}_ms"], ".1f") for q in (50, 95, 99))
        rows.append(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                    f"{_fmt(r['tokens_per_s'], '.1f')} | {ttft} | {itl} | "
                    f"{'-' if rp is None else f'{rp[0]:.1f} (max {rp[1]})'} |")
    for name, why in report.get("skipped", {}).items():
        rows.append(f"| {name} | skipped: {why} | | | | | | |")
    for kind, server in report.get("servers", {}).items():
        for name, plan in server.get("speculation_plan", {}).items():
            rows.append(f"\n{kind} speculation plan, {name}: {plan}")
    return "\n".join(rows)


def rss_table(report: dict) -> str:
    out = []
    for server, r in report.get("rss", {}).items():
        if "error" in r:
            out.append(f"{server}: RSS run failed: {r['error']}")
            continue
        curve = ", ".join(f"{n}: {mb:.0f}" for n, mb in r["rss_mb"])
        out.append(f"{server} (pid {r['pid']}): {r['requests']} requests x {r['max_tokens']} tokens, "
                   f"{r['concurrency']} clients, {r['errors']} errors, {r['wall_s']:.0f} s"
                   f"{' (stopped at the time limit)' if r['stopped_at_time_limit'] else ''}; RSS MB after n requests: "
                   f"{curve}; growth {r['growth_mb']:+.1f} MB, second half {r['growth_second_half_mb']:+.1f} MB")
    return "\n".join(out)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m conflayers.tools.loadbench", description=__doc__.split("\n\n")[0],
                                 epilog="Systems: " + ", ".join(SYSTEMS) + ". Subcommand: genai-serve (see "
                                        "genai-serve --help).")
    ap.add_argument("bundle", nargs="?", help="a compiled bundle: the bench starts the servers itself")
    ap.add_argument("--url", help="instead of a bundle: a running server on this machine")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, for --rss-requests")
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"with a bundle (default {DEFAULT_SYSTEMS})")
    ap.add_argument("--max-batch", type=int, default=8,
                    help="batched: --max-batch; unbatched: --max-concurrency; genai: its max batch (default 8)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="conflayers-serve --max-context (KV cache per request; default the bundle's)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="the batched conflayers-serve's --prefill-chunk (prompt tokens per pass beside "
                         "decoding streams; default the server's)")
    ap.add_argument("--kv-cache", default="float32", choices=["float32", "float16"],
                    help="conflayers-serve --kv-cache, every conflayers system alike (default float32)")
    ap.add_argument("--genai-precision", default="int4", choices=["int4", "fp32"],
                    help="the GenAI builder's precision (default int4)")
    ap.add_argument("--hf-model", help="the model GenAI's builder converts (default: the bundle's model)")
    ap.add_argument("--gguf", help="llamacpp-server: the GGUF file (default: the one the bundle's model came from)")
    ap.add_argument("--task", default="gsm8k", help="a named task (its evaluation prompts) or a .jsonl file")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--burst", default="", help="after the levels, bursts of these many simultaneous connections "
                                                "per server (comma-separated, e.g. 200,1000; each needs as many "
                                                "open files: see ulimit -n)")
    ap.add_argument("--rss-requests", type=int, default=0, help="N short requests per server, sampling its RSS")
    ap.add_argument("--rss-concurrency", type=int, default=4)
    ap.add_argument("--rss-max-tokens", type=int, default=8)
    ap.add_argument("--rss-every", type=int, default=100)
    ap.add_argument("--rss-time-limit", type=float, default=900.0, help="seconds per server (default 900)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the report as JSON (- or no "
                                                                         "FILE: stdout, instead of the tables)")
    a = ap.parse_args(argv)
    if bool(a.bundle) == bool(a.url):
        raise LoadBenchError("give a BUNDLE (the bench starts the servers) or --url (a running server)")
    try:
        a.levels = [int(x) for x in a.concurrency.split(",")]
    except ValueError:
        raise LoadBenchError(f"--concurrency {a.concurrency}: a comma-separated list of integers") from None
    if not a.levels or min(a.levels) < 1 or max(a.levels) > 256:
        raise LoadBenchError("--concurrency: each level must be 1..256")
    if a.requests < 1 or a.max_tokens < 1 or a.rss_requests < 0 or a.rss_every < 1 or a.rss_concurrency < 1:
        raise LoadBenchError("--requests, --max-tokens, --rss-every and --rss-concurrency must be positive")
    try:
        a.burst = [int(x) for x in a.burst.split(",") if x.strip()]
    except ValueError:
        raise LoadBenchError(f"--burst {a.burst}: a comma-separated list of integers") from None
    if any(not 1 <= n <= 10_000 for n in a.burst):
        raise LoadBenchError("--burst: each burst must be 1..10000 connections")
    if a.prefill_chunk is not None and a.prefill_chunk < 1:
        raise LoadBenchError("--prefill-chunk must be positive")
    if a.rss_requests > 100_000:
        raise LoadBenchError("--rss-requests: at most 100000")
    a.system_names = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in a.system_names if s not in SYSTEMS]
    if a.bundle and (unknown or not a.system_names):
        raise LoadBenchError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(SYSTEMS)}")
    if a.url:
        check_loopback(a.url)
        if a.rss_requests and not a.server_pid:
            raise LoadBenchError("--rss-requests with --url needs --server-pid")
    return a


def run_bench(a) -> dict:
    from .bench_systems import Unavailable, runtime_threads
    prompts = load_prompts(a.task, max(a.requests, max(a.levels), 64))
    if not prompts:
        raise LoadBenchError(f"--task {a.task}: no prompts")
    threads = runtime_threads()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "bundle": a.bundle, "url": a.url, "task": a.task, "prompts": len(prompts),
              "concurrency": a.levels, "requests_per_level": a.requests, "max_tokens": a.max_tokens,
              "max_batch": a.max_batch, "kv_cache": a.kv_cache, "threads": threads, "cpus": os.cpu_count(),
              "platform": f"{platform.system()} {platform.machine()}", "versions": _versions(),
              "systems": [], "servers": {}, "skipped": {}, "levels": [], "rss": {}, "outputs": {},
              "bursts": {}}
    outputs: dict[str, dict] = {}
    servers: dict[str, ServerProcess] = {}
    urls: dict[str, str] = {}
    logdir = tempfile.mkdtemp(prefix="loadbench-")
    keep_logs = False
    try:
        if a.url:
            systems = [("url", "url", {})]
            urls["url"] = a.url
        else:
            systems = [(name, *SYSTEMS[name]) for name in a.system_names]
            for kind in dict.fromkeys(k for _, k, _ in systems):
                log = os.path.join(logdir, f"{kind}.log")
                if kind == "genai-engine":
                    try:
                        model_dir = build_genai_model(a.bundle, a.genai_precision, a.hf_model, _log)
                    except Unavailable as e:
                        for name, k, _ in systems:
                            if k == kind:
                                report["skipped"][name] = str(e)
                        continue
                    report["genai_model_dir"] = model_dir
                    cmd = genai_command(a.bundle, model_dir, a.max_batch, threads)
                elif kind == "llamacpp-server":
                    try:
                        cmd = llamacpp_server_command(a.bundle, a.gguf, a.max_batch, a.max_context, threads)
                    except Unavailable as e:
                        for name, k, _ in systems:
                            if k == kind:
                                report["skipped"][name] = str(e)
                        continue
                else:
                    cmd = conflayers_command(a.bundle, kind.startswith("conflayers-batched"), a.max_batch,
                                             a.max_context, a.prefill_chunk, prompt_cache=has_prompt_cache(kind, {}),
                                             kv_cache=a.kv_cache)
                # one at a time: the batched server times its passes at start-up (its speculation
                # plan), which another server loading beside it would distort
                _log(f"starting {kind}: {' '.join(cmd[1:])}")
                srv = servers[kind] = ServerProcess(kind, cmd, log)
                urls[kind] = srv.wait_ready(a.startup_timeout)
                report["servers"][kind] = {"url": urls[kind], "pid": srv.pid, "command": srv.cmd[1:]}
                plan = srv.speculation_plan()
                if plan:
                    report["servers"][kind]["speculation_plan"] = plan
                _log(f"{kind} ready on {urls[kind]} (pid {srv.pid}, RSS {read_rss_kb(srv.pid) / 1024:.0f} MB)"
                     + "".join(f"; {name}: {p}" for name, p in plan.items()))
            systems = [s for s in systems if s[1] in urls]
        report["systems"] = [name for name, _, _ in systems]
        for name, kind, extra in systems:            # warm-up: the first request probes the draft policy
            for _ in range(WARMUP_REQUESTS):
                r = one_request(urls[kind], prompts[0], 8, extra)
                if "error" in r:
                    _log(f"warning: {name}'s warm-up request failed ({r['error']})")
        for c in a.levels:
            for name, kind, extra in systems:
                if has_prompt_cache(kind, extra):     # module docstring: every system at a warm cache
                    run_clients(urls[kind], prompts, c, max(a.requests, c), 1, extra)
                before = http_json(urls[kind], "/stats") if kind == "genai-engine" else None
                row = {"system": name, **run_level(urls[kind], prompts, c, a.requests, a.max_tokens, extra,
                                                   outputs.setdefault(name, {}))}
                after = http_json(urls[kind], "/stats") if before else None
                if after and after["passes"] > before["passes"]:
                    row["rows_per_pass"] = [(after["rows"] - before["rows"]) / (after["passes"] - before["passes"]),
                                            after["max_rows"]]
                guard = batch_guard(urls[kind]) if kind.startswith("conflayers") and extra.get("speculate", True) \
                    else None
                if guard is not None:
                    row["batch_guard"] = guard
                report["levels"].append(row)
                _log(f"{name:>16} c={c:<3} {row['requests']} requests, {row['errors']} errors, "
                     f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 {_fmt(row['ttft_p50_s'], '.2f')} s, "
                     f"ITL p50 {_fmt(row['itl_p50_ms'], '.1f')} ms"
                     + (f", whole prompt cached {row['prompt_cache_hits']}/{row['requests']}"
                        if row["prompt_cache_hits"] is not None else "")
                     + (f", batch guard: drafting off at {guard['paused_sizes']} size class(es), "
                        f"{guard['switches']} switches so far" if guard is not None else ""))
        report["outputs"] = output_check(outputs, [(name, kind) for name, kind, _ in systems])
        first_extra: dict[str, dict] = {}              # a burst per server, as its first system asks
        for _, kind, extra in systems:
            first_extra.setdefault(kind, extra)
        for kind, system_extra in (first_extra.items() if a.burst else []):
            extra = {k: v for k, v in system_extra.items() if k != "stream_options"}   # not streamed
            for n in a.burst:
                b = burst(urls[kind], prompts[0], n, extra=extra)
                report["bursts"].setdefault(kind, []).append(b)
                _log(burst_lines({kind: [b]})[0])
        if a.rss_requests:
            pids = {"url": a.server_pid} if a.url else {k: s.pid for k, s in servers.items()}
            for kind, pid in pids.items():
                extra = next(e for _, k, e in systems if k == kind)
                _log(f"RSS run: {a.rss_requests} requests against {kind} (pid {pid}) ...")
                try:
                    report["rss"][kind] = rss_run(urls[kind], pid, prompts, a.rss_requests, a.rss_concurrency,
                                                  a.rss_max_tokens, a.rss_every, a.rss_time_limit, extra)
                except OSError as e:
                    report["rss"][kind] = {"error": str(e)}
        for kind, srv in servers.items():
            if srv.proc.poll() is not None:
                keep_logs = True
                raise LoadBenchError(f"{kind} died during the bench ({srv.log_path}):\n{srv.log_tail()}")
        if any(r["errors"] for r in report["levels"]):
            keep_logs = True
    except LoadBenchError:
        keep_logs = True
        raise
    finally:
        for srv in servers.values():
            srv.stop()
        if keep_logs:
            _log(f"server logs kept in {logdir}")
            report["logs"] = logdir
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["genai-serve"]:
        return genai_serve_main(argv[1:])
    try:
        a = parse_args(argv)
        report = run_bench(a)
    except LoadBenchError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if a.json:
        text = json.dumps(report, indent=1)
        if a.json == "-":
            print(text)
            return 0
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(f"load bench {report['date']}: {report['bundle'] or report['url']}, task {report['task']}, "
          f"{report['requests_per_level']} requests per level (at least the concurrency), max_tokens "
          f"{report['max_tokens']}, max batch {report['max_batch']}, {report['threads']} threads, "
          f"{report['cpus']} CPUs, onnxruntime {report['versions']['onnxruntime']}, onnxruntime-genai "
          f"{report['versions']['onnxruntime-genai']}")
    print(markdown_table(report))
    for line in output_lines(report["outputs"]) + burst_lines(report["bursts"]):
        print(line)
    if report["rss"]:
        print()
        print(rss_table(report))
    failed = lossless_failures(report["outputs"])
    if failed:
        print(f"Error: {', '.join(failed)} answered some prompts differently from "
              f"{report['outputs']['reference']} (see the outputs lines): not lossless", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
