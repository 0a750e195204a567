"""In-process load on one batched engine, no HTTP: C client threads share R requests (a task's
evaluation prompts, chat template, greedy), and the figures the load bench reports (tokens/s,
inter-token p50/p95/p99, time to first token) plus the scheduler's step costs, split by whether a
newcomer's prompt chunk rode in the step. What the scheduler alone does under load, without the
HTTP threads and the clients' sockets on the same cores.

    python tools/experiments/packing/inload.py bundles/smollm2-native [--conc 8] [--requests 32]
        [--tokens 128] [--chunks 32,8] [--kv float32] [--plain] [--fixed]

--chunks: the engine's prefill_chunk, one run each (outputs compared with the first run's);
--fixed: the rule before stop 43 (prefill_chunk tokens beside any number of decoding streams),
to compare with the shrinking chunk; --plain: speculate=False.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from conflayers.runtime import Engine
from conflayers.runtime import scheduler as sched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--chunks", default="32")
    ap.add_argument("--conc", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--kv", default="float32", choices=["float32", "float16"])
    ap.add_argument("--plain", action="store_true", help="decode plainly (speculate=False)")
    ap.add_argument("--fixed", action="store_true", help="prefill_chunk tokens beside any number of streams")
    a = ap.parse_args(argv)
    from conflayers.compiler.data import load_prompts
    eng = Engine.load(a.bundle, max_context=a.max_context, prompt_cache=False, kv_cache=a.kv)
    prompts = [p.text for p in load_prompts(a.task, "evaluation")][:a.requests]
    steps = []                 # (seconds, a prompt chunk rode along, sequences decoding)
    step = sched.Scheduler._step

    def timed(self):
        order = [s for s in self._order if not s.cancelled]
        chunk = any(s.token is None for s in order)
        t = time.perf_counter()
        step(self)
        steps.append((time.perf_counter() - t, chunk, sum(s.token is not None for s in order)))
    sched.Scheduler._step = timed
    if a.fixed:
        def fixed(self, s, decoding):
            size = self.prefill_chunk if decoding else sched.PREFILL_ALONE
            room = self.graph.pass_room(s.fed)
            return s.ids[s.fed:s.fed + (size if room is None else max(1, min(size, room)))]
        sched.Scheduler._prefill_chunk = fixed

    def run(chunk):
        eng.set_batching(max_batch=a.max_batch, prefill_chunk=chunk, prompt_cache=False)
        eng.generate("hello", max_new_tokens=4)
        steps.clear()
        todo, lock, res = list(range(len(prompts))), threading.Lock(), []

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                t0, times, ids = time.perf_counter(), [], []
                for c in eng.generate(messages=[{"role": "user", "content": prompts[i]}], max_new_tokens=a.tokens,
                                      stream=True, speculate=not a.plain):
                    if c.token_ids:
                        times.append(time.perf_counter() - t0)
                        ids += c.token_ids
                per = max(len(ids) - 1, 1) / max(len(times) - 1, 1)     # as the load bench counts
                with lock:
                    res.append((i, times[0], [(y - x) / per for x, y in zip(times, times[1:])], ids))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        itl = np.array([x for r in res for x in r[2]]) * 1e3
        ttft = [r[1] for r in res]
        with_chunk = [d for d, c, n in steps if c and n]
        full = [d for d, c, n in steps if not c and n >= a.conc - 1]
        return {"tps": sum(len(r[3]) for r in res) / wall, "itl": np.percentile(itl, [50, 95, 99]),
                "ttft": np.percentile(ttft, [50, 95]), "chunk_steps": len(with_chunk),
                "chunk_ms": np.median(with_chunk) * 1e3 if with_chunk else 0.0,
                "full_ms": np.median(full) * 1e3 if full else 0.0, "out": {r[0]: r[3] for r in res}}

    first = None
    for chunk in [int(c) for c in a.chunks.split(",")]:
        r = run(chunk)
        first = first or r["out"]
        same = all(first[k] == v for k, v in r["out"].items())
        print(f"conc {a.conc} prefill_chunk {chunk}{' (fixed)' if a.fixed else ''} kv {a.kv}: {r['tps']:.1f} tok/s, "
              f"ITL p50/95/99 {'/'.join(f'{x:.1f}' for x in r['itl'])} ms, TTFT p50/95 "
              f"{'/'.join(f'{x:.2f}' for x in r['ttft'])} s, {r['chunk_steps']} steps with a chunk (median "
              f"{r['chunk_ms']:.1f} ms), full-batch steps median {r['full_ms']:.1f} ms, outputs as the first run's: "
              f"{same}", flush=True)
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
