"""conflayers-serve: the command line of the HTTP server (and of its Ray Serve replicas)."""
from __future__ import annotations

import signal

import click

from ..attention import KV_CACHE_HELP, KV_CACHES
from ..device import available_providers
from ..engine import Engine, RequestLimits
from ..packing import BatchingError
from .http import make_server


DEFAULT_CPU_BATCH = 8          # --max-batch on the CPU: 8 streams measured 1.4x the tok/s of unbatched


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def deploy_from_cli(bundle: str, address: str, replicas: int | None, autoscale: str | None, replica_cpus: float,
                    max_batch: int, max_concurrency: int, engine_args: dict) -> tuple:
    """conflayers-serve --ray: the RayEngine, and the front's concurrency (every replica full)."""
    from ..bundle import Bundle
    from ..cli import CliError
    from ..ray_serve import deploy, parse_autoscale
    from ..rayutil import RayMissing
    Bundle.open(bundle, verify=False)      # a bad path fails here, in a line, not in every replica
    try:
        bounds = parse_autoscale(autoscale) if autoscale else None
        per_replica = max(max_concurrency, max_batch) if max_batch > 1 else max_concurrency
        engine = deploy(bundle, address, engine_args, replicas or 1, bounds, replica_cpus, max_batch, per_replica)
    except (RayMissing, ValueError) as e:
        raise CliError(str(e)) from None
    most = bounds[1] if bounds else (replicas or 1)
    return engine, per_replica * most


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
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Decode up to N requests together (continuous batching, one pass per step, CPU; "
                   f"needs the onnx package). Default: {DEFAULT_CPU_BATCH} on the CPU, 1 on a GPU. "
                   "1: requests decode one at a time.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --max-batch: a newcomer's prompt enters the batch N tokens per step beside one "
                   "or two decoding streams, 2N/n beside n (at least 4), so the streams already decoding "
                   "wait at most one such chunk per step. Larger: sooner first tokens, a longer tail.")
@click.option("--no-prompt-cache", is_flag=True,
              help="Prefill every prompt whole. By default a request reuses the KV of the longest "
                   "prompt prefix it shares with an earlier request (a repeat, a system prompt, "
                   "earlier turns), kept in its batch slot or in host memory: same output, less prefill.")
@click.option("--prompt-cache-mb", type=click.FloatRange(min=0), default=1024, show_default=True,
              help="Host memory for the KV of recent requests (least recently used first out); "
                   "0: only what the batch slots keep.")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default="float32", show_default=True,
              help=KV_CACHE_HELP)
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


def main(bundle, host, port, max_context, device, max_concurrency, max_batch, prefill_chunk, no_prompt_cache,
         prompt_cache_mb, kv_cache, max_queue,
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
    from ..cli import CliError, friendly_errors

    limits = RequestLimits(max_messages=max_messages, max_stop_strings=max_stop, max_stop_chars=max_stop_chars,
                           special_tokens_in_prompt=allow_special_tokens_in_prompt)

    if ray_address is None and (replicas or autoscale):
        raise click.UsageError("--replicas and --autoscale need --ray")
    if replicas and autoscale:
        raise click.UsageError("--replicas and --autoscale exclude each other")

    if max_batch is None:        # batching pays on the CPU (packed passes); a GPU decodes one at a time
        gpu = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available_providers())
        max_batch = 1 if gpu else DEFAULT_CPU_BATCH

    @friendly_errors
    def start():
        if ray_address is not None:      # Ray Serve replicas behind this same front (ray_serve.py)
            engine, concurrency = deploy_from_cli(
                bundle, ray_address, replicas, autoscale, replica_cpus, max_batch, max_concurrency,
                dict(device=device, max_context=max_context, num_threads=num_threads, verify=not no_verify,
                     limits=limits, prompt_cache=not no_prompt_cache, prompt_cache_mb=prompt_cache_mb,
                     kv_cache=kv_cache))
        else:
            try:
                engine = Engine.load(bundle, device=device, max_context=max_context, num_threads=num_threads,
                                     verify=not no_verify, limits=limits, max_batch=max_batch,
                                     prefill_chunk=prefill_chunk, prompt_cache=not no_prompt_cache,
                                     prompt_cache_mb=prompt_cache_mb, kv_cache=kv_cache)
            except BatchingError as e:
                raise CliError(f"--max-batch: {e}") from None
            if max_batch > 1:
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
    held = getattr(server.engine, "kv_cache_bytes", None)      # None: Ray replicas hold the caches
    kv = f"KV cache {kv_cache}" + (f" ({held / 2 ** 20:.0f} MB)" if held is not None else "")
    click.echo(f"conflayers-serve: {server.model_name} on http://{h}:{p} (profiles: "
               f"{', '.join(server.engine.profiles) or 'none'}; default {server.engine.bundle.default_profile}; "
               f"max concurrency {server.max_concurrency}, batch {max_batch}, {kv}, queue {max_queue}, "
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
