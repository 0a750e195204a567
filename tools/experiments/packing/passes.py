"""Time the batched engine's packed full-graph passes against the unpacked graph with as many rows.

    python tools/experiments/packing/passes.py bundles/smollm2-native [--max-batch 8] [--context 150]

For n busy slots of `--max-batch` (one token each, `context` tokens of past in every slot), times
PackedGraph.run (what the scheduler runs) and the solo graph's pass of n rows (the cost floor of n
rows through the weights), interleaved rounds, minimum per variant; prints ms per pass.
"""
from __future__ import annotations

import argparse

from conflayers.runtime.engine import Engine
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    eng = Engine.load(args.bundle, max_batch=args.max_batch, max_context=args.context + 64)
    packed, ctx, token = eng.scheduler.full, args.context, 10
    solo = eng.full.bind(KVCache(eng.spec, ctx + 64))
    sizes = sorted({1, 2, 3, 4, 6, args.max_batch} & set(range(1, args.max_batch + 1)))

    def segments(n):
        return [([token], ctx)] * n + [([], ctx)] * (args.max_batch - n)

    jobs = {}
    for n in sizes:
        jobs[("packed", n)] = lambda n=n: packed.run(segments(n), list(range(n)))
        jobs[("rows", n)] = lambda n=n: solo.run([token] * n, ctx)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"{'busy':>5} {'packed ms':>10} {'unpacked rows ms':>17} {'ratio':>6}")
    for n in sizes:
        print(f"{n:>5} {ms[('packed', n)]:>10.2f} {ms[('rows', n)]:>17.2f} {ms[('packed', n)] / ms[('rows', n)]:>6.2f}")
    status = open("/proc/self/status").read()
    rss = {k: int(status.split(k + ":")[1].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    print("resident MB:", ", ".join(f"{k} {v}" for k, v in rss.items()))
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
