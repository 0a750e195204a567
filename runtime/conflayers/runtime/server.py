"""An OpenAI-compatible HTTP server over one Engine, on the standard library only.

Why no web framework: the runtime must deploy where only numpy, onnxruntime and tokenizers are
allowed, and a completion server needs little: JSON in, JSON or Server-Sent Events out.
`http.server.ThreadingHTTPServer` gives one thread per connection; a semaphore caps how many
requests generate at once (the rest wait), because each running request holds a KV cache and
shares the CPU cores with the others.

Endpoints
  POST /v1/completions        prompt -> text         (OpenAI shape + a `conflayers` metrics object)
  POST /v1/chat/completions   messages -> message    (same)
  GET  /health                {"status": "ok", "profiles": [...], "default_profile": ...}
  GET  /v1/models             OpenAI model list (one model: the bundle's)
  GET  /metrics               Prometheus text format

Request fields (both POST endpoints): model (echoed, not used to route), prompt | messages,
max_tokens (alias max_completion_tokens; default 256, clamped to the context when not given),
temperature (default 0 = greedy, unlike OpenAI's 1: the lossless guarantee is exact for greedy),
top_p, top_k, seed, stop, stream, n (only 1), plus `task` (a profile name or "auto"; default the
bundle's default profile) and `speculate` (default true; false decodes with the full model only).
"""
from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import click

from .engine import Engine, RequestError

MAX_BODY_BYTES = 8 << 20
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ROUTES = {  # path -> allowed methods
    "/v1/completions": ("POST",), "/v1/chat/completions": ("POST",),
    "/health": ("GET",), "/v1/models": ("GET",), "/metrics": ("GET",),
}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499   # nginx's code for "client closed the request", used in metrics and logs


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# -- metrics ----------------------------------------------------------------------------------


class Metrics:
    """Process-wide counters behind one lock (handlers run on many threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}          # (endpoint, status) -> count
        self.tokens: dict[str, list[int]] = {}                  # profile -> [generated, drafted, accepted]
        self.disconnects = 0
        self.inflight = 0
        self.running = 0
        self.latency: dict[str, list] = {}                      # endpoint -> [bucket counts, sum, count]

    def begin(self):
        with self._lock:
            self.inflight += 1

    def end(self):
        with self._lock:
            self.inflight -= 1

    def set_running(self, delta: int):
        with self._lock:
            self.running += delta

    def count_request(self, endpoint: str, status: int, seconds: float | None = None):
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status == CLIENT_CLOSED:
                self.disconnects += 1
            if seconds is not None:
                buckets, total, n = self.latency.get(endpoint, ([0] * len(LATENCY_BUCKETS), 0.0, 0))
                buckets = [c + (seconds <= b) for c, b in zip(buckets, LATENCY_BUCKETS)]
                self.latency[endpoint] = [buckets, total + seconds, n + 1]

    def count_tokens(self, profile: str | None, generated: int, drafted: int = 0, accepted: int = 0):
        with self._lock:
            row = self.tokens.setdefault(profile or "none", [0, 0, 0])
            row[0] += generated
            row[1] += drafted
            row[2] += accepted

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            out = ["# HELP conflayers_requests_total HTTP requests answered, by endpoint and status "
                   f"({CLIENT_CLOSED} = the client disconnected mid-stream).",
                   "# TYPE conflayers_requests_total counter"]
            out += [f'conflayers_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            for i, (name, text) in enumerate([
                    ("generated_tokens", "Tokens generated (returned to clients), by draft profile."),
                    ("draft_tokens", "Tokens proposed by the draft, by draft profile."),
                    ("accepted_tokens", "Draft tokens the full model accepted, by draft profile.")]):
                out += [f"# HELP conflayers_{name}_total {text}", f"# TYPE conflayers_{name}_total counter"]
                out += [f'conflayers_{name}_total{{profile="{p}"}} {row[i]}'
                        for p, row in sorted(self.tokens.items())]
            out += ["# HELP conflayers_client_disconnects_total Streams the client closed before the end.",
                    "# TYPE conflayers_client_disconnects_total counter",
                    f"conflayers_client_disconnects_total {self.disconnects}",
                    "# HELP conflayers_inflight_requests Generation requests being served or waiting.",
                    "# TYPE conflayers_inflight_requests gauge",
                    f"conflayers_inflight_requests {self.inflight}",
                    "# HELP conflayers_running_requests Generation requests generating now (<= max concurrency).",
                    "# TYPE conflayers_running_requests gauge",
                    f"conflayers_running_requests {self.running}",
                    "# HELP conflayers_request_seconds Generation request latency, including queueing.",
                    "# TYPE conflayers_request_seconds histogram"]
            for e, (buckets, total, n) in sorted(self.latency.items()):
                out += [f'conflayers_request_seconds_bucket{{endpoint="{e}",le="{b}"}} {c}'
                        for b, c in zip(LATENCY_BUCKETS, buckets)]
                out += [f'conflayers_request_seconds_bucket{{endpoint="{e}",le="+Inf"}} {n}',
                        f'conflayers_request_seconds_sum{{endpoint="{e}"}} {total:.6f}',
                        f'conflayers_request_seconds_count{{endpoint="{e}"}} {n}']
            return "\n".join(out) + "\n"


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
    """The client closed the connection while we were writing a stream."""


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
                         "endpoint": path if path in ROUTES else "other", "recorded": False,
                         "generation": path in GENERATION_PATHS and method == "POST"}
        self._tokens = 0
        status = 500
        if self._request["generation"]:
            self.server.metrics.begin()
        try:
            status = self._route(method, path)
        except ApiError as e:
            status = self._fail(e)
        except ClientGone:
            status = CLIENT_CLOSED
        except (BrokenPipeError, ConnectionResetError):
            status = CLIENT_CLOSED
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            self._log_traceback()
            status = self._fail(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
        finally:
            self._record(status)

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
        allowed = ROUTES.get(path)
        if allowed is None:
            raise ApiError(404, f"no such endpoint: {method} {path}", kind="not_found_error")
        if method not in allowed:
            self._allow = ", ".join(allowed)
            raise ApiError(405, f"{method} is not allowed on {path}; use {self._allow}",
                           kind="method_not_allowed")
        if path == "/health":
            return self._send_json(200, self._health())
        if path == "/v1/models":
            return self._send_json(200, self._models())
        if path == "/metrics":
            return self._send(200, self.server.metrics.render().encode(), PROMETHEUS_TYPE)
        return self._generate(chat=path == "/v1/chat/completions")

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
        with self.server.limiter:
            self.server.metrics.set_running(+1)
            try:
                try:
                    out = engine.generate(stream=stream, **args)
                except RequestError as e:
                    field = names.get(e.param, e.param)
                    raise ApiError(400, e.message_for(field), field) from None
                if stream:
                    return self._stream(out, rid, model, chat, _profile_hint(engine, args))
                self._count(out.metrics.to_dict(), out.metrics.completion_tokens)
                return self._send_json(200, completion_body(rid, model, chat, out))
            finally:
                self.server.metrics.set_running(-1)

    def _stream(self, chunks, rid: str, model: str, chat: bool, profile_hint: str | None) -> int:
        """Server-Sent Events; on a client disconnect close the generator so generation stops
        and its KV cache returns to the pool. Tokens of an unfinished stream are counted under
        the profile the request asked for (the engine reports the one it used only at the end)."""
        created, tokens, result, counted = int(time.time()), 0, None, False
        try:
            self._start_sse()
            if chat:
                self._sse(chunk_body(rid, model, chat, created, delta={"role": "assistant", "content": ""}))
            for chunk in chunks:
                tokens += len(chunk.token_ids)
                result = chunk.result or result
                if chunk.text:
                    self._sse(chunk_body(rid, model, chat, created, delta={"content": chunk.text},
                                         text=chunk.text))
            metrics = result.metrics.to_dict()
            self._count(metrics, metrics["completion_tokens"])
            counted = True
            self._record(200)
            last = chunk_body(rid, model, chat, created, delta={}, text="", finish_reason=result.finish_reason)
            last.update(usage=_usage(metrics), conflayers=metrics)
            self._sse(last)
            self._write(b"data: [DONE]\n\n")
            return 200
        except ClientGone:
            if not counted:
                self._count({"profile": profile_hint}, tokens)
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, then close
            self._log_traceback()
            if not counted:
                self._count({"profile": profile_hint}, tokens)
            try:
                self._sse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body())
            except ClientGone:
                pass
            return 500
        finally:
            chunks.close()

    def _count(self, metrics: dict, generated: int):
        self._tokens = generated
        self.server.metrics.count_tokens(metrics.get("profile"), generated, metrics.get("drafted_tokens", 0),
                                         metrics.get("accepted_tokens", 0))

    # -- I/O ------------------------------------------------------------------------------------
    def _read_json(self):
        ctype = self.headers.get("Content-Type")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length must be an integer") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        try:
            raw = self.rfile.read(length) if length > 0 else b""
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, "timed out reading the request body") from None
        if ctype and ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(400, f"Content-Type must be application/json, got {ctype!r}")
        if not raw:
            raise ApiError(400, "the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _fail(self, e: ApiError) -> int:
        """Send an error body (if the response has not started) and keep the server going."""
        if getattr(self, "_sse_started", False):
            return e.status
        extra = {"Allow": self._allow} if e.status == 405 and getattr(self, "_allow", None) else {}
        try:
            return self._send_json(e.status, e.body(), extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return e.status

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> int:
        return self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

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
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes):
        try:
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise ClientGone() from None

    # -- logging --------------------------------------------------------------------------------
    def _log(self, method: str, status: int, seconds: float):
        line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {method} {self.path} "
                f"{status} tokens={getattr(self, '_tokens', 0)} {seconds:.3f}s\n")
        self.server.log(line)

    def _log_traceback(self):
        self.server.log(traceback.format_exc())


class ConflayersServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the engine, the concurrency limiter and the metrics."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, max_concurrency: int, log_stream=None):
        super().__init__(address, Handler)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.limiter = threading.BoundedSemaphore(max_concurrency)
        self.metrics = Metrics()
        self.log_stream = log_stream
        self._log_lock = threading.Lock()
        self.started = int(time.time())
        self.model_name = engine.bundle.manifest.get("model", {}).get("name") or engine.bundle.path

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
                log_stream=None) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free port: see server.server_address) without serving yet; run
    serve_forever() in a thread or the main loop, and shutdown() + server_close() to stop.
    Request log lines go to log_stream (default: sys.stderr at the time of writing)."""
    return ConflayersServer((host, port), engine, max_concurrency, log_stream)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command(name="conflayers-serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for all interfaces; there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0 picks a free one).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Cap each request's KV cache at N tokens (prompt + output); default the bundle's context.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where to run: cpu, cuda (needs onnxruntime-gpu), or auto (cuda when available).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests generating at once; more wait their turn. Each holds a KV cache of "
                   "--max-context tokens.")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (default: all cores, or $CONFLAYERS_THREADS).")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the bundle's files at load "
              "(faster start for large bundles; sizes are still checked).")
def main(bundle, host, port, max_context, device, max_concurrency, num_threads, no_verify):
    """Serve a compiled BUNDLE over an OpenAI-compatible HTTP API.

    \b
    POST /v1/completions       {"prompt": "...", ...}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /health, /v1/models, /metrics (Prometheus text format)

    \b
    Request fields: model (echoed back, not used), max_tokens (default 256,
    lowered to fit the context), temperature (default 0 = greedy, unlike
    OpenAI's 1), top_p, top_k, seed, stop, stream (Server-Sent Events),
    task (a profile name or "auto"; default the bundle's default profile),
    speculate (default true; false = full model only, same greedy output).

    Responses follow OpenAI's shapes plus a `conflayers` object with the
    generation metrics. Logs one line per request to stderr.
    """
    from .cli import CliError, friendly_errors

    @friendly_errors
    def start():
        engine = Engine.load(bundle, device=device, max_context=max_context, num_threads=num_threads,
                             verify=not no_verify)
        try:
            return make_server(engine, host, port, max_concurrency)
        except OSError as e:
            raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    server = start()
    signal.signal(signal.SIGTERM, _interrupt)     # `kill` / container stop: close the socket cleanly
    h, p = server.server_address[:2]
    click.echo(f"conflayers-serve: {server.model_name} on http://{h}:{p} (profiles: "
               f"{', '.join(server.engine.profiles) or 'none'}; default {server.engine.bundle.default_profile}; "
               f"max concurrency {max_concurrency}; device {server.engine.device})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("conflayers-serve: shutting down", err=True)
    finally:
        server.server_close()


if __name__ == "__main__":  # pragma: no cover
    main()
