"""An OpenAI-compatible HTTP server over one Engine, on the standard library only.

Why no web framework: the runtime must deploy where only numpy, onnxruntime and tokenizers are
allowed, and a completion server needs little: JSON in, JSON or Server-Sent Events out.

Admission, from the socket in (every bound is a flag of conflayers-serve):
  listen backlog 1024 -> at most --max-connections connection threads (one more connection gets a
  503 written by the accepting thread, then its input is drained so it sees the 503, not a reset)
  -> Host allow-list (bound to loopback) -> API key (--api-key) -> body of at most
  --max-body-bytes (413) -> at most --max-concurrency requests generate, --max-queue more wait
  their turn, the next gets 503 + Retry-After -> the engine checks the request (tokenized once,
  here, after admission) -> generation until the end, --request-timeout (finish_reason "length")
  or the client's disconnect (polled between decode steps, streaming or not).

Endpoints
  POST /v1/completions        prompt -> text         (OpenAI shape + a `conflayers` metrics object)
  POST /v1/chat/completions   messages -> message    (same)
  GET|HEAD /health            {"status": "ok", "profiles": [...], "default_profile": ...}
  GET  /v1/models             OpenAI model list (one model: the bundle's)
  GET  /metrics               Prometheus text format

Request fields (both POST endpoints): model (echoed, not used to route), prompt | messages,
max_tokens (alias max_completion_tokens; default 256, clamped to the context when not given),
temperature (default 0 = greedy, unlike OpenAI's 1: the lossless guarantee is exact for greedy),
top_p, top_k, seed, stop, stream, n (only 1), plus `task` (a profile name or "auto"; default the
bundle's default profile) and `speculate` (default true; false decodes with the full model only).
"""
from __future__ import annotations

import collections
import hmac
import ipaddress
import json
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import click

from .engine import Engine, RequestError, RequestLimits

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ROUTES = {  # path -> allowed methods (HEAD goes wherever GET does)
    "/v1/completions": ("POST",), "/v1/chat/completions": ("POST",),
    "/health": ("GET", "HEAD"), "/v1/models": ("GET", "HEAD"), "/metrics": ("GET", "HEAD"),
}
OPEN_PATHS = ("/health",)      # answered without the API key (load-balancer probes)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
RATE_WINDOW_S = 10.0           # generated tokens/s is averaged over this many recent seconds
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499   # nginx's code for "client closed the request", used in metrics and logs
RETRY_AFTER_S = 1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class ServerLimits:
    """The server's resource bounds (conflayers-serve flags). Request-meaning limits (messages,
    stop strings, special tokens) are the engine's: RequestLimits."""
    max_concurrency: int = 4          # requests generating at once
    max_queue: int = 64               # requests waiting for one of those slots; the next gets 503
    max_connections: int = 128        # connection threads; the next connection gets 503
    max_body_bytes: int = 4 << 20     # larger bodies get 413, unread
    request_timeout: float = 600.0    # seconds from arrival: queueing + generation
    api_key: str | None = None        # required as "Authorization: Bearer KEY" (not for /health)
    allowed_hosts: tuple = ()         # Host header names accepted besides the loopback names

    def __post_init__(self):
        for name in ("max_concurrency", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queue < 0 or self.max_body_bytes < 1 or not self.request_timeout > 0:
            raise ValueError("max_queue must be >= 0, max_body_bytes >= 1 and request_timeout > 0")


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def busy(message: str) -> ApiError:
    return ApiError(503, message, kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


def json_bytes(obj) -> bytes:
    """UTF-8 JSON; falls back to ASCII escapes when a string holds a lone surrogate (an echoed
    field), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj).encode()


def escape_text(text: str) -> str:
    """Printable ASCII as is, anything else as a \\x/\\u escape: no control characters reach the log."""
    return "".join(c if " " <= c <= "~" and c != "\\" else
                   ("\\\\" if c == "\\" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
                   for c in text)


def label(value) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- metrics ----------------------------------------------------------------------------------


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float, times: int = 1):
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.n += times

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lb = f"{{{labels}}}" if labels else ""
        return out + [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{lb} {self.sum:.6f}",
                      f"{name}_count{lb} {self.n}"]


class Metrics:
    """Process-wide counters behind one lock (handlers run on many threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}          # (endpoint, status) -> count
        self.tokens: dict[str, list[int]] = {}                  # profile -> [generated, drafted, accepted]
        self.disconnects = 0
        self.inflight = 0
        self.rejected_connections = 0
        self.latency: dict[str, Histogram] = {}                 # endpoint -> request seconds
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.recent: collections.deque = collections.deque()    # (monotonic time, tokens)
        self.started = time.monotonic()

    def begin(self):
        with self._lock:
            self.inflight += 1

    def end(self):
        with self._lock:
            self.inflight -= 1

    def count_request(self, endpoint: str, status: int, seconds: float | None = None):
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status == CLIENT_CLOSED:
                self.disconnects += 1
            if seconds is not None:
                self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_rejected_connection(self):
        with self._lock:
            self.rejected_connections += 1

    def count_tokens(self, profile: str | None, generated: int, drafted: int = 0, accepted: int = 0):
        with self._lock:
            row = self.tokens.setdefault(profile or "none", [0, 0, 0])
            row[0] += generated
            row[1] += drafted
            row[2] += accepted

    def observe_tokens(self, n: int, first: bool, seconds: float):
        """n tokens just arrived: the first of a request (seconds = time to first token, from
        arrival) or later ones (seconds = the wait since the previous tokens, shared by the n)."""
        now = time.monotonic()
        with self._lock:
            if first:
                self.ttft.observe(seconds)
            elif n:
                self.itl.observe(seconds / n, n)
            if n:
                self.recent.append((now, n))
            self._prune(now)

    def _prune(self, now: float):
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def render(self, gauges: dict) -> str:
        """Prometheus text exposition format 0.0.4. gauges: name -> (help, value) from the server."""
        with self._lock:
            now = time.monotonic()
            self._prune(now)
            window = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
            rate = sum(n for _, n in self.recent) / window
            out = ["# HELP conflayers_requests_total HTTP requests answered, by endpoint and status "
                   f"({CLIENT_CLOSED} = the client disconnected).",
                   "# TYPE conflayers_requests_total counter"]
            out += [f'conflayers_requests_total{{endpoint="{label(e)}",status="{label(s)}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            for i, (name, text) in enumerate([
                    ("generated_tokens", "Tokens generated (returned to clients), by draft profile."),
                    ("draft_tokens", "Tokens proposed by the draft, by draft profile."),
                    ("accepted_tokens", "Draft tokens the full model accepted, by draft profile.")]):
                out += [f"# HELP conflayers_{name}_total {text}", f"# TYPE conflayers_{name}_total counter"]
                out += [f'conflayers_{name}_total{{profile="{label(p)}"}} {row[i]}'
                        for p, row in sorted(self.tokens.items())]
            out += ["# HELP conflayers_acceptance_rate Draft tokens accepted / proposed since start, by profile.",
                    "# TYPE conflayers_acceptance_rate gauge"]
            out += [f'conflayers_acceptance_rate{{profile="{label(p)}"}} {row[2] / row[1]:.6f}'
                    for p, row in sorted(self.tokens.items()) if row[1]]
            out += [f"# HELP conflayers_generated_tokens_per_second Tokens generated per second, all requests, "
                    f"over the last {RATE_WINDOW_S:g} s.",
                    "# TYPE conflayers_generated_tokens_per_second gauge",
                    f"conflayers_generated_tokens_per_second {rate:.3f}",
                    "# HELP conflayers_client_disconnects_total Requests the client closed before the end.",
                    "# TYPE conflayers_client_disconnects_total counter",
                    f"conflayers_client_disconnects_total {self.disconnects}",
                    "# HELP conflayers_rejected_connections_total Connections answered 503 at accept "
                    "(--max-connections reached).",
                    "# TYPE conflayers_rejected_connections_total counter",
                    f"conflayers_rejected_connections_total {self.rejected_connections}",
                    "# HELP conflayers_inflight_requests Generation requests being served or waiting.",
                    "# TYPE conflayers_inflight_requests gauge",
                    f"conflayers_inflight_requests {self.inflight}"]
            for name, (text, value) in gauges.items():
                out += [f"# HELP conflayers_{name} {text}", f"# TYPE conflayers_{name} gauge",
                        f"conflayers_{name} {value}"]
            out += ["# HELP conflayers_time_to_first_token_seconds From a request's arrival (queueing "
                    "included) to its first generated token.",
                    "# TYPE conflayers_time_to_first_token_seconds histogram"]
            out += self.ttft.render("conflayers_time_to_first_token_seconds")
            out += ["# HELP conflayers_inter_token_latency_seconds Time per generated token after the first "
                    "(a speculative step's tokens share its time).",
                    "# TYPE conflayers_inter_token_latency_seconds histogram"]
            out += self.itl.render("conflayers_inter_token_latency_seconds")
            out += ["# HELP conflayers_request_seconds Generation request latency, including queueing.",
                    "# TYPE conflayers_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.render("conflayers_request_seconds", f'endpoint="{label(e)}"')
            return "\n".join(out) + "\n"


class Admission:
    """max_concurrency requests generate at once; up to max_queue more wait, in arrival order;
    beyond that, or past the request's deadline while waiting, 503 with Retry-After."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self.running = self.waiting = 0
        self._cond = threading.Condition()

    def enter(self, deadline: float, client_gone) -> None:
        with self._cond:
            if self.running < self.slots and self.waiting == 0:
                self.running += 1
                return
            if self.waiting >= self.queue:
                raise busy(f"the server is busy ({self.running} requests generating, {self.waiting} "
                           f"waiting, the queue's limit); retry in {RETRY_AFTER_S} s")
            self.waiting += 1
            try:
                while self.running >= self.slots:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise busy("the request timed out waiting for a free generation slot")
                    self._cond.wait(min(left, 0.25))
                    if client_gone():
                        raise ClientGone()
                self.running += 1
            finally:
                self.waiting -= 1

    def leave(self):
        with self._cond:
            self.running -= 1
            self._cond.notify()


# -- request parsing --------------------------------------------------------------------------

# Request fields passed to Engine.generate under another name; the engine checks every value.
ENGINE_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                "stop": "stop", "task": "task", "speculate": "speculate"}


def parse_request(body, chat: bool) -> tuple[dict, dict]:
    """An OpenAI-style body as Engine.generate keyword arguments (+ 'stream'), and the map from
    the engine's parameter names back to the body's fields, for error bodies. Only the HTTP
    shape is checked here (what decides the response form, which fields carry the prompt);
    whether the values are valid is the engine's to say."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    max_field = "max_completion_tokens" if body.get("max_tokens") is None and \
        body.get("max_completion_tokens") is not None else "max_tokens"
    fields = {**ENGINE_NAMES, max_field: "max_new_tokens"}
    args = {name: body[f] for f, name in fields.items() if body.get(f) is not None}
    args.setdefault("max_new_tokens", None)        # absent: as many as fit, up to the engine's default
    args.update(_prompt_input(body, chat), stream=stream)
    return args, {name: f for f, name in fields.items()}


def _prompt_input(body: dict, chat: bool) -> dict:
    """prompt= or messages= for Engine.generate: the field must be there; a completion prompt may
    be a list of exactly one string (OpenAI's batch shape)."""
    field = "messages" if chat else "prompt"
    value = body.get(field)
    if value is None:
        raise ApiError(400, f"'{field}' is required", field)
    if not chat and isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise ApiError(400, "'prompt' must be a string (a list of exactly one string is accepted; "
                                "batches and token-id prompts are not supported)", "prompt")
        value = value[0]
    return {field: value}


def _profile_hint(engine: Engine, args: dict) -> str | None:
    """The profile label a request's tokens go under when it ends before the engine says."""
    if not args.get("speculate", True):
        return None
    return args.get("task") or engine.bundle.default_profile


# -- responses --------------------------------------------------------------------------------


def _usage(metrics: dict) -> dict:
    p, c = metrics["prompt_tokens"], metrics["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(rid: str, model: str, chat: bool, result) -> dict:
    metrics = result.metrics.to_dict()
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(metrics), "conflayers": metrics}


def chunk_body(rid: str, model: str, chat: bool, created: int, delta: dict | None = None,
               text: str | None = None, finish_reason: str | None = None) -> dict:
    """One SSE chunk in OpenAI's streaming shape (delta for chat, text for completions)."""
    if chat:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}


# -- the handler ------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""


class Handler(BaseHTTPRequestHandler):
    server: "ConflayersServer"
    protocol_version = "HTTP/1.1"
    server_version = "conflayers"
    timeout = 120      # seconds a socket read/write may block (idle keep-alive, stalled uploads)

    # Quiet: one line per request comes from _log, not from http.server.
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    # -- routing --------------------------------------------------------------------------------
    def _dispatch(self, method: str):
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._request = {"t0": time.perf_counter(), "method": method,
                         "deadline": time.monotonic() + self.server.limits.request_timeout,
                         "endpoint": path if path in ROUTES else "other", "recorded": False,
                         "generation": path in GENERATION_PATHS and method == "POST"}
        self._tokens = 0
        self._unread = self._body_length()     # request body bytes not read yet
        status = 500
        if self._request["generation"]:
            self.server.metrics.begin()
        try:
            status = self._route(method, path)
        except ApiError as e:
            status = self._fail(e)
        except ClientGone:
            status = CLIENT_CLOSED
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            status = CLIENT_CLOSED
            self.close_connection = True
        except Exception:  # noqa: BLE001 - one bad request must not take the server down
            status = self._fail(self._internal_error())
        finally:
            self._record(status)
            if self._unread:
                self._drain()

    def _internal_error(self) -> ApiError:
        """Log the traceback under a fresh id; the client gets the id only, never the exception
        text (which can name files, graph nodes or request content)."""
        eid = uuid.uuid4().hex[:16]
        self.server.log(f"internal error {eid} on {self.command} {escape_text(self.path)}:\n{traceback.format_exc()}")
        return ApiError(500, f"internal server error (id {eid}; the server log has the details)",
                        kind="server_error")

    def _record(self, status: int):
        """Count and log the request once, just before its last bytes go out: a client that
        reads its response and then scrapes /metrics finds its own request counted."""
        r = self._request
        if r["recorded"]:
            return
        r["recorded"] = True
        seconds = time.perf_counter() - r["t0"]
        if r["generation"]:
            self.server.metrics.end()
        self.server.metrics.count_request(r["endpoint"], status, seconds if r["generation"] else None)
        self._log(r["method"], status, seconds)

    def _route(self, method: str, path: str) -> int:
        self._check_host()
        if path not in OPEN_PATHS:
            self._check_key()
        allowed = ROUTES.get(path)
        if allowed is None:
            raise ApiError(404, f"no such endpoint: {method} {escape_text(path)}", kind="not_found_error")
        if method not in allowed:
            allow = ", ".join(allowed)
            raise ApiError(405, f"{method} is not allowed on {path}; use {allow}",
                           kind="method_not_allowed", headers={"Allow": allow})
        if path == "/health":
            return self._send_json(200, self._health())
        if path == "/v1/models":
            return self._send_json(200, self._models())
        if path == "/metrics":
            return self._send(200, self.server.metrics.render(self.server.gauges()).encode(), PROMETHEUS_TYPE)
        return self._generate(chat=path == "/v1/chat/completions")

    def _check_host(self):
        """DNS rebinding: a web page whose name resolves to 127.0.0.1 must not reach a loopback
        server from a browser. Only the loopback names (and --allowed-host) are accepted."""
        allowed = self.server.allowed_hosts
        host = self.headers.get("Host")
        if allowed is not None and host is not None and host.strip().lower() not in allowed:
            raise ApiError(403, f"Host {escape_text(host)!r} is not allowed; use localhost, 127.0.0.1 or [::1] "
                                "(or start the server with --allowed-host NAME)", kind="permission_error")

    def _check_key(self):
        key = self.server.limits.api_key
        if key is None:
            return
        given = self.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.strip().encode(errors="replace"), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    # -- GET endpoints --------------------------------------------------------------------------
    def _health(self) -> dict:
        engine = self.server.engine
        return {"status": "ok", "model": self.server.model_name, "profiles": engine.profiles,
                "default_profile": engine.bundle.default_profile, "max_context": engine.capacity,
                "max_concurrency": self.server.max_concurrency}

    def _models(self) -> dict:
        engine = self.server.engine
        return {"object": "list", "data": [{
            "id": self.server.model_name, "object": "model", "created": self.server.started,
            "owned_by": "conflayers",
            "conflayers": {"profiles": engine.profiles, "default_profile": engine.bundle.default_profile,
                           "max_context": engine.capacity}}]}

    # -- generation -----------------------------------------------------------------------------
    def _generate(self, chat: bool) -> int:
        engine = self.server.engine
        body = self._read_json()
        args, names = parse_request(body, chat)
        stream = args.pop("stream")
        model = body.get("model") if isinstance(body.get("model"), str) else self.server.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        deadline = self._request["deadline"]
        self.server.admission.enter(deadline, self._client_gone)
        try:
            try:    # the engine checks and tokenizes the request here, once, inside the slot
                chunks = engine.generate(stream=True, deadline=deadline, **args)
            except RequestError as e:
                field = names.get(e.param, e.param)
                raise ApiError(400, e.message_for(field), field) from None
            chunks = self._follow(chunks, _profile_hint(engine, args))
            if stream:
                return self._stream(chunks, rid, model, chat)
            result = None
            for chunk in chunks:
                result = chunk.result or result
            return self._send_json(200, completion_body(rid, model, chat, result))
        finally:
            self.server.admission.leave()

    def _follow(self, chunks, profile_hint: str | None):
        """The engine's chunks, for either response form: stops generating (closing the engine's
        generator returns its KV cache) as soon as the client is gone, polled after every decode
        step; records time to first token, inter-token latency and the request's tokens. Tokens
        of an unfinished request go under the profile it asked for (the engine reports the one it
        used only at the end)."""
        metrics, t0 = self.server.metrics, self._request["t0"]
        last, tokens, result = None, 0, None
        try:
            for chunk in chunks:
                now = time.perf_counter()
                result = chunk.result or result
                n = result.metrics.completion_tokens - tokens if chunk.result else len(chunk.token_ids)
                metrics.observe_tokens(n, last is None, now - (t0 if last is None else last))
                last, tokens = now, tokens + n
                yield chunk
                if result is None and self._client_gone():
                    raise ClientGone()
        finally:
            chunks.close()
            m = result.metrics.to_dict() if result else {"profile": profile_hint}
            self._tokens = tokens
            metrics.count_tokens(m.get("profile"), tokens, m.get("drafted_tokens", 0), m.get("accepted_tokens", 0))

    def _client_gone(self) -> bool:
        """True when the client has closed its end (EOF or reset), without consuming anything it
        may have sent: a readable socket whose peek returns no bytes."""
        sock = self.connection
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLPRI)
                if not poller.poll(0):
                    return False
            elif not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, chunks, rid: str, model: str, chat: bool) -> int:
        """Server-Sent Events. An error after the headers went out is reported in-band."""
        created, result = int(time.time()), None
        try:
            self._start_sse()
            if chat:
                self._sse(chunk_body(rid, model, chat, created, delta={"role": "assistant", "content": ""}))
            for chunk in chunks:
                result = chunk.result or result
                if chunk.text:
                    self._sse(chunk_body(rid, model, chat, created, delta={"content": chunk.text},
                                         text=chunk.text))
            metrics = result.metrics.to_dict()
            self._record(200)
            last = chunk_body(rid, model, chat, created, delta={}, text="", finish_reason=result.finish_reason)
            last.update(usage=_usage(metrics), conflayers=metrics)
            self._sse(last)
            self._write(b"data: [DONE]\n\n")
            return 200
        except ClientGone:
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, then close
            error = e if isinstance(e, ApiError) else self._internal_error()
            try:
                self._sse(error.body())
            except ClientGone:
                pass
            return error.status
        finally:
            chunks.close()

    # -- I/O ------------------------------------------------------------------------------------
    def _body_length(self) -> int:
        """The request body's announced size (chunked: unknown, read up to the body limit)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self.server.limits.max_body_bytes
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _read_json(self):
        ctype = self.headers.get("Content-Type")
        limit = self.server.limits.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length must be an integer") from None
        if length > limit:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        try:
            raw = self.rfile.read(length) if length > 0 else b""
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, "timed out reading the request body") from None
        self._unread = 0
        if ctype and ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(400, f"Content-Type must be application/json, got {escape_text(ctype)!r}")
        if not raw:
            raise ApiError(400, "the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except ValueError:    # an integer beyond Python's int_max_str_digits (4,300)
            raise ApiError(400, "the request body holds a number with too many digits") from None

    def _drain(self):
        """The response is out but the request body was never read (413, 401, ...): half-close,
        then read and drop what the client still sends (bounded in time), because closing a
        socket with unread input sends a reset, which the client would see instead of our answer."""
        left, self._unread = self._unread, 0
        self.close_connection = True
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            end = time.monotonic() + 5.0
            while left > 0 and time.monotonic() < end:
                data = self.rfile.read1(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def _fail(self, e: ApiError) -> int:
        """Send an error body (if the response has not started) and keep the server going."""
        if getattr(self, "_sse_started", False):
            return e.status
        try:
            return self._send_json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return e.status

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> int:
        return self._send(status, json_bytes(obj), "application/json", headers)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status >= 400:
            self.close_connection = True
            self.send_header("Connection", "close")
        self._record(status)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")     # the body ends when the connection does
        self.end_headers()
        self._sse_started = True
        self.close_connection = True
        self._write(b"")

    def _sse(self, obj: dict):
        self._write(b"data: " + json_bytes(obj) + b"\n\n")

    def _write(self, data: bytes):
        try:
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise ClientGone() from None

    # -- logging --------------------------------------------------------------------------------
    def _log(self, method: str, status: int, seconds: float):
        line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {method} {escape_text(self.path)} "
                f"{status} tokens={getattr(self, '_tokens', 0)} {seconds:.3f}s\n")
        self.server.log(line)


REJECT_BODY = json_bytes(busy("the server has too many open connections; retry later").body())
REJECT_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                   b"Retry-After: " + str(RETRY_AFTER_S).encode() + b"\r\nConnection: close\r\n"
                   b"Content-Length: " + str(len(REJECT_BODY)).encode() + b"\r\n\r\n" + REJECT_BODY)


class ConflayersServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the engine, the admission limits and the metrics, with a
    listen backlog of 1024 and at most max_connections connection threads."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024       # listen backlog (socketserver's default of 5 resets bursts)
    reject_linger_s = 5.0           # how long a refused connection is drained before closing

    def __init__(self, address, engine: Engine, limits: ServerLimits, log_stream=None):
        super().__init__(address, Handler)
        self.engine = engine
        self.limits = limits
        self.max_concurrency = limits.max_concurrency
        self.admission = Admission(limits.max_concurrency, limits.max_queue)
        self._connections = threading.BoundedSemaphore(limits.max_connections)
        self.open_connections = 0
        self._conn_lock = threading.Lock()
        self._refused: dict[socket.socket, float] = {}   # refused connection -> drain deadline
        self.metrics = Metrics()
        self.log_stream = log_stream
        self._log_lock = threading.Lock()
        self.started = int(time.time())
        self.model_name = engine.bundle.manifest.get("model", {}).get("name") or engine.bundle.path
        self.allowed_hosts = self._host_allow_list(address[0], self.server_address[1], limits.allowed_hosts)

    @staticmethod
    def _host_allow_list(host: str, port: int, extra) -> frozenset | None:
        """Host header values accepted: bound to loopback (or given extra names), the loopback
        names with or without the port, plus the extras; otherwise None (any Host)."""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not extra:
            return None
        names = [*LOOPBACK_NAMES, *(h.strip().lower() for h in extra)]
        return frozenset(n for name in names for n in (name, f"{name}:{port}"))

    def gauges(self) -> dict:
        a = self.admission
        batch = {}
        if hasattr(self.engine, "max_batch"):     # a BatchedEngine (--max-batch > 1)
            batch = {"batch_active_sequences": ("Sequences in the decoding batch now (batch occupancy).",
                                                self.engine.active),
                     "batch_waiting_requests": ("Requests waiting for a batch slot.", self.engine.waiting),
                     "max_batch": ("Sequences decoded together at most (--max-batch).", self.engine.max_batch)}
        return {**batch, "running_requests": ("Generation requests generating now.", a.running),
                "queued_requests": ("Generation requests waiting for a slot.", a.waiting),
                "max_concurrency": ("Requests that may generate at once (--max-concurrency).", a.slots),
                "max_queue": ("Requests that may wait for a slot (--max-queue).", a.queue),
                "open_connections": ("Connections being served.", self.open_connections),
                "max_connections": ("Connections served at once (--max-connections).",
                                    self.limits.max_connections)}

    # -- connection threads -------------------------------------------------------------------
    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            self._refuse(request)
            return
        with self._conn_lock:
            self.open_connections += 1
        try:
            super().process_request(request, client_address)     # starts the connection's thread
        except BaseException:
            self._done_with_connection()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done_with_connection()

    def _done_with_connection(self):
        with self._conn_lock:
            self.open_connections -= 1
        self._connections.release()

    def _refuse(self, sock: socket.socket):
        """503 on the accepting thread, without blocking it: the response fits the socket buffer;
        the connection is half-closed and drained in service_actions until the client closes."""
        self.metrics.count_rejected_connection()
        try:
            sock.setblocking(False)
            sock.send(REJECT_RESPONSE)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._refused) >= 4096:         # a flood: no more draining, just close
            sock.close()
            return
        self._refused[sock] = time.monotonic() + self.reject_linger_s
        self._drain_refused()

    def _drain_refused(self):
        now = time.monotonic()
        for sock, deadline in list(self._refused.items()):
            done = now >= deadline
            try:
                while not done:
                    data = sock.recv(1 << 16)
                    done = not data
            except BlockingIOError:
                pass
            except OSError:
                done = True
            if done:
                del self._refused[sock]
                sock.close()

    def service_actions(self):
        """Called by serve_forever between requests (every poll interval at most)."""
        if self._refused:
            self._drain_refused()

    def server_close(self):
        super().server_close()
        for sock in list(self._refused):
            sock.close()
        self._refused.clear()

    # -- logging ------------------------------------------------------------------------------
    def log(self, text: str):
        """One writer at a time, so lines from concurrent requests never interleave."""
        stream = self.log_stream or sys.stderr
        with self._log_lock:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    def handle_error(self, request, client_address):
        """A connection-level failure (e.g. a reset during parsing) is logged, never fatal."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return
        self.log(f"error while serving {client_address}:\n{traceback.format_exc()}")


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, max_concurrency: int = 4,
                log_stream=None, **limits) -> ConflayersServer:
    """Bind (port 0 picks a free port: see server.server_address) without serving yet; run
    serve_forever() in a thread or the main loop, and shutdown() + server_close() to stop.
    limits: the other ServerLimits fields (max_queue, max_connections, max_body_bytes,
    request_timeout, api_key, allowed_hosts). Request log lines go to log_stream (default:
    sys.stderr at the time of writing)."""
    return ConflayersServer((host, port), engine, ServerLimits(max_concurrency=max_concurrency, **limits),
                            log_stream)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command(name="conflayers-serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for all interfaces: set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0 picks a free one).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Cap each request's KV cache at N tokens (prompt + output); default the bundle's context.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where to run: cpu, cuda (needs onnxruntime-gpu), or auto (cuda when available).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests generating at once. Each holds a KV cache of --max-context tokens.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode up to N requests together (continuous batching, one pass per step, CPU; "
                   "needs the onnx package). 1: each request decodes alone on its thread.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --max-batch: a newcomer's prompt enters the batch N tokens per step, so the "
                   "streams already decoding wait at most one such chunk per step.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a generation slot; beyond that, 503 with Retry-After.")
@click.option("--max-connections", type=click.IntRange(min=1), default=128, show_default=True,
              help="Connections served at once (one thread each); beyond that a new connection gets 503.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds from a request's arrival: still waiting for a slot then, it gets 503; "
                   "generating, it ends there with finish_reason 'length'.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=4 << 20, show_default=True,
              help="Largest request body; a larger one gets 413 before it is read.")
@click.option("--max-messages", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Most messages in a chat request (400 beyond).")
@click.option("--max-stop", type=click.IntRange(min=0), default=16, show_default=True,
              help="Most stop strings in a request (400 beyond).")
@click.option("--max-stop-chars", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest stop string, in characters (400 beyond).")
@click.option("--allow-special-tokens-in-prompt", is_flag=True,
              help="Encode control-token text (e.g. '<|im_end|>') in a raw /v1/completions prompt as "
                   "control tokens. Chat message content is always plain text.")
@click.option("--api-key", envvar="CONFLAYERS_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (401 without).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also accept this Host header (repeatable). Bound to loopback, only localhost, "
                   "127.0.0.1 and [::1] are accepted otherwise (403), against DNS rebinding.")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (default: all cores, or $CONFLAYERS_THREADS).")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the bundle's files at load "
              "(faster start for large bundles; sizes are still checked).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Generate on Ray Serve replicas (needs conflayers[ray]): on the cluster at ADDRESS (auto, "
                   "host:6379, ray://host:10001), or a local Ray instance when none is given. This server "
                   "stays the HTTP front; every replica loads BUNDLE from the same path.")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="With --ray: replicas [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN,MAX",
              help="With --ray: let Ray Serve scale between MIN and MAX replicas by ongoing requests.")
@click.option("--replica-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: CPUs each replica reserves (and its ONNX Runtime threads, unless --num-threads).")
def main(bundle, host, port, max_context, device, max_concurrency, max_batch, prefill_chunk, max_queue,
         max_connections, request_timeout, max_body_bytes, max_messages, max_stop, max_stop_chars,
         allow_special_tokens_in_prompt, api_key, allowed_hosts, num_threads, no_verify, ray_address, replicas,
         autoscale, replica_cpus):
    """Serve a compiled BUNDLE over an OpenAI-compatible HTTP API.

    \b
    POST /v1/completions       {"prompt": "...", ...}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /health (also HEAD), /v1/models, /metrics (Prometheus text format)

    \b
    Request fields: model (echoed back, not used), max_tokens (default 256,
    lowered to fit the context), temperature (default 0 = greedy, unlike
    OpenAI's 1), top_p, top_k, seed, stop, stream (Server-Sent Events),
    task (a profile name or "auto"; default the bundle's default profile),
    speculate (default true; false = full model only, same greedy output).

    Responses follow OpenAI's shapes plus a `conflayers` object with the
    generation metrics. Refusals are 4xx/503 with an OpenAI-style error body;
    a 500 carries only an id to find in the log. Logs one line per request
    to stderr. A client that disconnects stops its generation.
    """
    from .cli import CliError, friendly_errors

    limits = RequestLimits(max_messages=max_messages, max_stop_strings=max_stop, max_stop_chars=max_stop_chars,
                           special_tokens_in_prompt=allow_special_tokens_in_prompt)

    if ray_address is None and (replicas or autoscale):
        raise click.UsageError("--replicas and --autoscale need --ray")
    if replicas and autoscale:
        raise click.UsageError("--replicas and --autoscale exclude each other")

    @friendly_errors
    def start():
        if ray_address is not None:      # Ray Serve replicas behind this same front (ray_serve.py)
            from .ray_serve import deploy_from_cli
            engine, concurrency = deploy_from_cli(
                bundle, ray_address, replicas, autoscale, replica_cpus, max_batch, max_concurrency,
                dict(device=device, max_context=max_context, num_threads=num_threads, verify=not no_verify,
                     limits=limits))
        else:
            engine = Engine.load(bundle, device=device, max_context=max_context, num_threads=num_threads,
                                 verify=not no_verify, limits=limits)
            concurrency = max_concurrency
        if max_batch > 1 and ray_address is None:
            from .batching import BatchedEngine, BatchingError
            try:
                engine = BatchedEngine(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
            except BatchingError as e:
                raise CliError(f"--max-batch: {e}") from None
            for name, plan in engine.speculation_plan().items():
                click.echo(f"conflayers-serve: batched speculation, {name}: {plan}", err=True)
            concurrency = max(max_concurrency, max_batch)   # every batch slot can be filled
        try:
            return make_server(engine, host, port, concurrency, max_queue=max_queue,
                               max_connections=max_connections, max_body_bytes=max_body_bytes,
                               request_timeout=request_timeout, api_key=api_key or None,
                               allowed_hosts=tuple(allowed_hosts))
        except OSError as e:
            raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    server = start()
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` / container stop: close the socket cleanly
    h, p = server.server_address[:2]
    click.echo(f"conflayers-serve: {server.model_name} on http://{h}:{p} (profiles: "
               f"{', '.join(server.engine.profiles) or 'none'}; default {server.engine.bundle.default_profile}; "
               f"max concurrency {server.max_concurrency}, batch {max_batch}, queue {max_queue}, "
               f"connections {max_connections}; "
               f"API key {'required' if api_key else 'off'}; device {server.engine.device})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("conflayers-serve: shutting down", err=True)
    finally:
        server.server_close()
        if ray_address is not None:
            server.engine.close()      # the replicas go with their front


if __name__ == "__main__":  # pragma: no cover
    main()
