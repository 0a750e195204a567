"""conflayers-serve --ray: the engine as Ray Serve replicas, behind the same HTTP server.

The HTTP front is serving/http.py's own server (same routes, parsing, admission, limits, metrics and
error bodies, by construction); only its engine is replaced by RayEngine, which sends each
request to a replica through a Serve deployment handle and streams the chunks back. Ray Serve
places the replicas (one or more per node), balances requests over them, scales their number
(--autoscale) and replaces a replica that dies; a request that was generating on a dead replica
ends with a 503 error body (in-band on a stream) saying so, and the client may retry.

Why not Serve's own HTTP proxy: the front would need a second copy of the server's request
handling (Host check, API key, body limits, admission, error shapes, metrics); with a handle the
Ray hop is one streaming call per request and nothing is duplicated. Run one front per machine
that takes traffic (each talks to the same replicas by the deployment's name).
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine import RequestError, stream_or_result
from .rayutil import connect, import_ray
from .serving.schema import RETRY_AFTER_S, ApiError

APP_NAME = "conflayers"
_END = object()           # a replica's pump thread is done (never leaves the replica)


class EngineReplica:
    """One Ray Serve replica: an Engine over a bundle on this node (batching up to max_batch)."""

    def __init__(self, bundle: str, engine_args: dict, max_batch: int, concurrency: int):
        from .engine import Engine
        self.engine = Engine.load(bundle, max_batch=max_batch, **engine_args)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="conflayers-replica")

    def info(self) -> dict:
        e = self.engine
        return {"profiles": e.profiles, "default_profile": e.bundle.default_profile, "capacity": e.capacity,
                "device": e.device, "manifest_model": e.bundle.manifest.get("model", {}), "path": e.bundle.path}

    async def generate(self, args: dict, timeout_s: float | None):
        """Engine.generate(stream=True, **args) on a worker thread; yields lists of what is ready
        (StreamChunk, or a dict for a refused request or a failure). Cancelled (the client went
        away, or the front gave up), the engine's generator is closed: its KV cache slot is freed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump():
            try:
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                try:
                    chunks = self.engine.generate(stream=True, deadline=deadline, **args)
                except RequestError as e:
                    put({"request_error": [e.template, e.param]})
                    return
                try:
                    for chunk in chunks:
                        put(chunk)
                        if stop.is_set():
                            break
                finally:
                    chunks.close()
            except Exception:  # noqa: BLE001 - reported to the front as a 500 with an id
                eid = uuid.uuid4().hex[:16]
                print(f"conflayers replica: internal error {eid}:\n{traceback.format_exc()}", file=sys.stderr,
                      flush=True)
                put({"error": f"the replica failed (id {eid}; the replica's log has the details)"})
            finally:
                put(_END)

        loop.run_in_executor(self.pool, pump)
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                items = [x for x in batch if x is not _END]
                if items:
                    yield items
                if len(items) < len(batch):
                    return
        finally:
            stop.set()


@dataclass
class BundleInfo:
    """What the HTTP server reads from engine.bundle."""
    path: str
    default_profile: str | None
    manifest: dict = field(default_factory=dict)


def replica_lost(e: Exception) -> ApiError:
    return ApiError(503, "the replica serving this request stopped before it finished "
                         f"({type(e).__name__}); it is being replaced: retry the request",
                    kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


class RayEngine:
    """The Engine interface serving/http.py uses (generate, profiles, capacity, device, bundle), over a
    Serve deployment handle."""

    def __init__(self, handle, info: dict, ray):
        from ray.serve.exceptions import RayServeException
        self.handle, self._ray, self._serve_error = handle, ray, RayServeException
        self.profiles = info["profiles"]
        self.capacity = info["capacity"]
        self.device = f"ray ({info['device']} replicas)"
        self.bundle = BundleInfo(info["path"], info["default_profile"], {"model": info["manifest_model"]})

    def generate(self, *, stream: bool = False, deadline: float | None = None, **args):
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        responses = self.handle.options(stream=True).generate.remote(args, timeout)
        first = self._next(responses)     # a refused request raises here, as Engine.generate does
        return stream_or_result(self._chunks(responses, first), stream)

    def _next(self, responses):
        ray = self._ray
        try:
            items = next(responses)
        except StopIteration:
            raise
        except ray.exceptions.RayTaskError as e:      # should not happen: the replica catches errors
            raise RuntimeError(f"the replica failed: {e}") from None
        except (ray.exceptions.RayError, self._serve_error) as e:
            raise replica_lost(e) from None
        for item in items:
            if isinstance(item, dict) and "request_error" in item:
                template, param = item["request_error"]
                raise RequestError(template, param)
            if isinstance(item, dict):
                raise RuntimeError(item["error"])
        return items

    def _chunks(self, responses, first):
        done = False
        try:
            items = first
            while True:
                yield from items
                try:
                    items = self._next(responses)
                except StopIteration:
                    done = True
                    return
        finally:
            if not done:
                responses.cancel()      # client gone or front stopped: the replica stops generating

    def close(self):
        serve = import_ray(serve=True).serve
        serve.delete(APP_NAME)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN,MAX (two integers), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"--autoscale {text}: need 1 <= MIN <= MAX")
    return lo, hi


def deploy(bundle: str, address: str | None, engine_args: dict, replicas: int = 1,
           autoscale: tuple[int, int] | None = None, replica_cpus: float = 1.0, max_batch: int | None = None,
           concurrency: int = 4, init_args: dict | None = None) -> RayEngine:
    """Start (or update) the Serve deployment of `bundle` and return its RayEngine. concurrency:
    requests one replica generates at once (its max_ongoing_requests); more wait in Serve's router.
    max_batch: requests a replica decodes together (None: all its ongoing ones on the CPU, one at
    a time on a GPU).
    Every replica loads the bundle from the same path: a shared file system or the same copy on
    every node."""
    import os
    ray = connect(address, **(init_args or {}))
    serve = import_ray(serve=True).serve
    serve.start(proxy_location="Disabled")          # the HTTP front is ours
    scale = {"num_replicas": replicas} if autoscale is None else {"autoscaling_config": {
        "min_replicas": autoscale[0], "max_replicas": autoscale[1], "target_ongoing_requests": concurrency}}
    deployment = serve.deployment(
        name="EngineReplica", max_ongoing_requests=concurrency,
        ray_actor_options={"num_cpus": replica_cpus}, health_check_period_s=2.0, **scale)(EngineReplica)
    engine_args = {"num_threads": max(1, int(replica_cpus)),
                   **{k: v for k, v in engine_args.items() if v is not None}}
    if max_batch is None:
        max_batch = concurrency if engine_args.get("device", "cpu") == "cpu" else 1
    handle = serve.run(deployment.bind(os.path.abspath(bundle), engine_args, max_batch, concurrency),
                       name=APP_NAME, route_prefix=None)
    info = handle.info.remote().result()
    return RayEngine(handle, info, ray)
