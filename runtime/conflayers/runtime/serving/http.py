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

import hmac
import ipaddress
import json
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..engine import EngineAPI, RequestError
from .admission import Admission, ClientGone, ServerLimits
from .metrics import CLIENT_CLOSED, PROMETHEUS_TYPE, Metrics
from .schema import (RETRY_AFTER_S, ApiError, _profile_hint, _usage, busy, chunk_body, completion_body, json_bytes,
                     parse_request)


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ROUTES = {  # path -> allowed methods (HEAD goes wherever GET does)
    "/v1/completions": ("POST",), "/v1/chat/completions": ("POST",),
    "/health": ("GET", "HEAD"), "/v1/models": ("GET", "HEAD"), "/metrics": ("GET", "HEAD"),
}
OPEN_PATHS = ("/health",)      # answered without the API key (load-balancer probes)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def escape_text(text: str) -> str:
    """Printable ASCII as is, anything else as a \\x/\\u escape: no control characters reach the log."""
    return "".join(c if " " <= c <= "~" and c != "\\" else
                   ("\\\\" if c == "\\" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
                   for c in text)


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

    def __init__(self, address, engine: EngineAPI, limits: ServerLimits, log_stream=None):
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
        if hasattr(self.engine, "max_batch"):     # a local Engine (Ray replicas report their own)
            batch = {"batch_active_sequences": ("Sequences in the decoding batch now (batch occupancy).",
                                                self.engine.active),
                     "batch_waiting_requests": ("Requests waiting for a batch slot.", self.engine.waiting),
                     "max_batch": ("Sequences decoded together at most (--max-batch).", self.engine.max_batch),
                     "kv_cache_bytes": ("Bytes of the batch's KV caches, allocated (--kv-cache float16 halves it).",
                                        self.engine.kv_cache_bytes)}
            guard = getattr(self.engine.planner, "guard", None)
            if guard is not None:
                batch["batch_drafting_paused_sizes"] = (
                    "Classes of batch sizes (2, 3-4, 5-8, ...) where the batch guard measured drafting "
                    "slower than plain batched decoding and turned it off.", len(guard.paused()))
                batch["batch_guard_switches"] = ("Times the batch guard turned drafting off or on again.",
                                                 guard.switches())
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


def make_server(engine: EngineAPI, host: str = "127.0.0.1", port: int = 8000, max_concurrency: int = 4,
                log_stream=None, **limits) -> ConflayersServer:
    """Bind (port 0 picks a free port: see server.server_address) without serving yet; run
    serve_forever() in a thread or the main loop, and shutdown() + server_close() to stop.
    limits: the other ServerLimits fields (max_queue, max_connections, max_body_bytes,
    request_timeout, api_key, allowed_hosts). Request log lines go to log_stream (default:
    sys.stderr at the time of writing)."""
    return ConflayersServer((host, port), engine, ServerLimits(max_concurrency=max_concurrency, **limits),
                            log_stream)
