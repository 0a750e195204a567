"""Benchmarks for the Ray modes (numbers for the README, not tests).

  python -m conflayers.tools.raybench sweep --calib gsm8k --calib humaneval ... -- COMPILE_ARGS
      the same cells compiled one after another with conflayers-compile, then with
      conflayers-sweep --ray (a fresh local Ray instance each time: its start-up is included);
      per-cell seconds, totals, and what N machines would take.
  python -m conflayers.tools.raybench serve BUNDLE
      conflayers-serve BUNDLE vs conflayers-serve BUNDLE --ray (1 replica x 2 CPUs, then
      2 replicas x 1 CPU): per-request latency (sequential requests, medians) and aggregate
      tokens/s with closed-loop clients, measured A/B interleaved on the same machine.

Timings on a shared machine are noisy: every comparison alternates its two sides.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import click

BIN = os.path.dirname(sys.executable)


@click.group()
def main():
    """Ray sweep and Ray Serve benchmarks."""


# -- sweep --------------------------------------------------------------------------------------


@main.command()
@click.option("--model", default="smollm2-135m-instruct", show_default=True)
@click.option("--calib", "calibs", multiple=True, required=True)
@click.option("--rounds", default=1, show_default=True, help="A/B rounds (sides alternate first).")
@click.option("--nodes", default="2,4,8", show_default=True, help="Machine counts to project the sweep onto.")
@click.argument("compile_args", nargs=-1, type=click.UNPROCESSED)
def sweep(model, calibs, rounds, nodes, compile_args):
    """Sequential conflayers-compile runs vs conflayers-sweep --ray, same cells."""
    work = tempfile.mkdtemp(prefix="raybench-sweep-")
    results = {"sequential": [], "ray": []}
    for r in range(rounds):
        for side in (("sequential", "ray") if r % 2 == 0 else ("ray", "sequential")):
            out = os.path.join(work, f"{side}-{r}")
            t0 = time.perf_counter()
            if side == "sequential":
                cells = []
                for calib in calibs:
                    c0 = time.perf_counter()
                    proc = subprocess.run([os.path.join(BIN, "conflayers-compile"), "--model", model, "--calib", calib,
                                           "--out", out, "--quiet", *compile_args], capture_output=True, text=True)
                    if proc.returncode:
                        raise click.ClickException(f"compile {calib}: {proc.stderr[-2000:]}")
                    cells.append(round(time.perf_counter() - c0, 1))
            else:
                proc = subprocess.run([os.path.join(BIN, "conflayers-sweep"), "--model", model, "--out-dir", out,
                                       "--ray", "--redo", "--json", "--no-progress",
                                       *[a for c in calibs for a in ("--calib", c)], "--", "--quiet", *compile_args],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise click.ClickException(f"sweep: {proc.stderr[-2000:]}")
                cells = [c["seconds"] for c in json.loads(proc.stdout)["cells"]]
            total = round(time.perf_counter() - t0, 1)
            results[side].append({"total_s": total, "cell_s": cells})
            click.echo(f"round {r} {side:10s} total {total:7.1f} s, cells {cells}", err=True)
    seq = statistics.mean(x["total_s"] for x in results["sequential"])
    ray = statistics.mean(x["total_s"] for x in results["ray"])
    cell = statistics.mean(c for x in results["ray"] for c in x["cell_s"])
    overhead = ray - sum(statistics.mean(x["cell_s"][i] for x in results["ray"]) for i in range(len(calibs)))
    summary = {"cells": list(calibs), "compile_args": list(compile_args), "sequential_s": round(seq, 1),
               "ray_s": round(ray, 1), "ray_vs_sequential": round(ray / seq, 3), "mean_cell_s": round(cell, 1),
               "ray_overhead_s": round(overhead, 1),
               "projected_s": {int(n): round(math.ceil(len(calibs) / int(n)) * cell + overhead, 1)
                               for n in nodes.split(",")},
               "runs": results}
    click.echo(json.dumps(summary, indent=1))


# -- serve --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: str, extra: list[str]):
        self.port = _free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([os.path.join(BIN, "conflayers-serve"), bundle, "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise click.ClickException(f"server {extra} exited:\n{self.log.read().decode()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.25)
        self.startup_s = round(time.perf_counter() - t0, 1)

    def post(self, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


PROMPTS = ["What is 17 * 23?", "Write a haiku about the sea.", "Explain what a prime number is.",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?"]


def latency(server: Server, n: int, max_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        server.post({"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens})
        out.append((time.perf_counter() - t0) * 1000)
    return out


def throughput(server: Server, clients: int, seconds: float, max_tokens: int) -> float:
    tokens, lock, end = [0], threading.Lock(), time.monotonic() + seconds

    def client(k):
        i = k
        while time.monotonic() < end:
            r = server.post({"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens})
            if time.monotonic() <= end + 0.5:
                with lock:
                    tokens[0] += r["usage"]["completion_tokens"]
            i += clients
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0] / (time.perf_counter() - t0)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--latency-requests", default=20, show_default=True)
@click.option("--clients", default=8, show_default=True)
@click.option("--seconds", default=20.0, show_default=True, help="Per throughput block.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
def serve(bundle, latency_requests, clients, seconds, rounds, max_tokens):
    """Single-process server vs Ray Serve replicas behind the same front."""
    report = {"bundle": os.path.basename(os.path.abspath(bundle)), "machine": f"{os.cpu_count()} CPU cores"}
    single = Server(bundle, [])
    report["startup_s"] = {"single": single.startup_s}
    try:
        for name, extra in (("ray 1x2cpu", ["--ray", "--replicas", "1", "--replica-cpus", "2"]),
                            ("ray 2x1cpu", ["--ray", "--replicas", "2", "--replica-cpus", "1"])):
            ray = Server(bundle, extra)
            report["startup_s"][name] = ray.startup_s
            try:
                for s in (single, ray):             # warm-up: first use of each profile adapts its policy
                    latency(s, 4, 8)
                lat = {"single": {1: [], 16: []}, name: {1: [], 16: []}}
                tps = {"single": [], name: []}
                for r in range(rounds):
                    order = ((single, "single"), (ray, name)) if r % 2 == 0 else ((ray, name), (single, "single"))
                    for mt in (1, 16):
                        for s, label in order:
                            lat[label][mt] += latency(s, latency_requests, mt)
                    for s, label in order:
                        tps[label].append(round(throughput(s, clients, seconds, max_tokens), 1))
                        click.echo(f"{label}: {tps[label][-1]} tok/s", err=True)
                med = {k: {mt: round(statistics.median(v), 2) for mt, v in d.items()} for k, d in lat.items()}
                report[name] = {
                    "latency_ms_median": med,
                    "added_latency_ms": {mt: round(med[name][mt] - med["single"][mt], 2) for mt in (1, 16)},
                    "tokens_per_s": tps, "clients": clients, "max_tokens": max_tokens}
                click.echo(json.dumps(report[name]), err=True)
            finally:
                ray.stop()
    finally:
        single.stop()
    click.echo(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
