"""Time a bundle's one-token full step, a 9-token verify and each profile's draft step (its draft
body + head) at growing context lengths: what attention costs as the context grows, and so what
a draft that skips attention saves there (run once with and once without
CONFLAYERS_ATTENTION=off to compare SlotAttention with GroupQueryAttention).

    python tools/experiments/packing/context_steps.py bundles/smollm2-native [--contexts 128,512,1024,2048]
"""
from __future__ import annotations

import argparse

import numpy as np

from conflayers.runtime import attention
from conflayers.runtime.engine import Engine
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    eng = Engine.load(args.bundle, guard=False, adapt=False, max_context=max(contexts) + 16)
    cache = KVCache(eng.spec, max(contexts) + 16)
    # Real bytes in every position: a never-written (calloc'd) cache reads the kernel's shared
    # zero page, from L1, and so hides what attention's KV reads cost.
    rng = np.random.default_rng(0)
    for layer in range(eng.spec.num_layers):
        for arr in (cache.key_array(layer), cache.value_array(layer)):
            arr[...] = rng.standard_normal(arr.shape, dtype=np.float32) * 0.1
    run = eng.full.bind(cache)
    drafts = {name: d.model.stepper(cache) for name, d in eng.drafters.items() if getattr(d, "model", None) is not None}
    jobs = {}
    for c in contexts:
        jobs[("step", c)] = lambda c=c: run.run([10], c)
        jobs[("verify", c)] = lambda c=c: run.run([10] * 9, c)
        for name, step in drafts.items():
            jobs[(name, c)] = lambda c=c, step=step: step(10, c)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"attention: {'SlotAttention' if attention.available() else 'GroupQueryAttention'}")
    head = f"{'context':>8} {'step ms':>8} {'verify-9 ms':>12} {'verify/step':>12}"
    head += "".join(f" {'draft ' + n + ' ms':>18} {'draft/step':>10}" for n in drafts)
    print(head)
    for c in contexts:
        line = f"{c:>8} {ms[('step', c)]:>8.2f} {ms[('verify', c)]:>12.2f} {ms[('verify', c)] / ms[('step', c)]:>12.2f}"
        line += "".join(f" {ms[(n, c)]:>18.2f} {ms[(n, c)] / ms[('step', c)]:>10.2f}" for n in drafts)
        print(line)
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
