"""Time a bundle's one-token full step, a 9-token verify and each profile's draft step (its draft
body + head) at growing context lengths: what attention costs as the context grows, and so what
a draft that skips attention saves there (run once with and once without
CONFLAYERS_ATTENTION=off to compare SlotAttention with GroupQueryAttention). `--isa avx2,avx512`
loads one engine per SlotAttention path (CONFLAYERS_ATTENTION_ISA) and `--kv float32,float16` one
per KV cache type, timed side by side; engines with the same KV cache type are checked to give
equal logits bit for bit.

    python tools/experiments/packing/context_steps.py bundles/smollm2-native [--contexts 128,512,1024,2048]
        [--isa avx2,avx512] [--kv float32,float16]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from conflayers.runtime import attention
from conflayers.runtime.engine import Engine
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--isa", help="SlotAttention paths to time side by side, e.g. avx2,avx512")
    ap.add_argument("--kv", default="float32", help="KV cache types to time side by side: float32,float16")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    isas = args.isa.split(",") if args.isa else [None]
    variants = [(isa, kv) for isa in isas for kv in args.kv.split(",")]
    engines = {}
    for isa, kv in variants:               # SlotAttention reads the ISA when a session is made
        if isa is not None:
            os.environ["CONFLAYERS_ATTENTION_ISA"] = isa
        engines[(isa, kv)] = Engine.load(args.bundle, guard=False, adapt=False, max_context=max(contexts) + 16,
                                         kv_cache=kv)
    # Real bytes in every position: a never-written (calloc'd) cache reads the kernel's shared
    # zero page, from L1, and so hides what attention's KV reads cost. One cache per KV type,
    # the same values (rounded to half in a half cache).
    caches = {}
    for v, e in engines.items():
        if v[1] in caches:
            continue
        cache = caches[v[1]] = e.full.new_cache(e.spec, max(contexts) + 16)
        rng = np.random.default_rng(0)
        for layer in range(e.spec.num_layers):
            for arr in (cache.key_array(layer), cache.value_array(layer)):
                arr[...] = rng.standard_normal(arr.shape, dtype=np.float32) * 0.1
    jobs, runs, names = {}, {}, []
    for v, e in engines.items():
        cache = caches[v[1]]
        run = runs[v] = e.full.bind(cache)
        drafts = {name: d.model.stepper(cache) for name, d in e.drafters.items() if getattr(d, "model", None) is not None}
        names = list(drafts)
        for c in contexts:
            jobs[(v, "step", c)] = lambda c=c, run=run: run.run([10], c)
            jobs[(v, "verify", c)] = lambda c=c, run=run: run.run([10] * 9, c)
            for name, step in drafts.items():
                jobs[(v, name, c)] = lambda c=c, step=step: step(10, c)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"attention: {'SlotAttention' if attention.available() else 'GroupQueryAttention'}")
    label = {v: " ".join(x for x in (f"CONFLAYERS_ATTENTION_ISA={v[0]}" if v[0] else "", f"kv_cache {v[1]}") if x)
             for v in variants}
    for v in variants:
        print(label[v])
        head = f"{'context':>8} {'step ms':>8} {'verify-9 ms':>12} {'verify/step':>12}"
        head += "".join(f" {'draft ' + n + ' ms':>18} {'draft/step':>10}" for n in names)
        print(head)
        for c in contexts:
            step, verify = ms[(v, "step", c)], ms[(v, "verify", c)]
            line = f"{c:>8} {step:>8.2f} {verify:>12.2f} {verify / step:>12.2f}"
            line += "".join(f" {ms[(v, n, c)]:>18.2f} {ms[(v, n, c)] / step:>10.2f}" for n in names)
            print(line)
    first = variants[0]
    for v in variants[1:]:
        print(f"{label[v]} / {label[first]}: " + "; ".join(
            f"{c}: step {ms[(v, 'step', c)] / ms[(first, 'step', c)]:.2f}x, verify-9 "
            f"{ms[(v, 'verify', c)] / ms[(first, 'verify', c)]:.2f}x" for c in contexts))
    for c in contexts:                     # the same cache, the same rows: the same logits
        for v in variants:
            ref = next(u for u in variants if u[1] == v[1])
            if v != ref and not np.array_equal(runs[v].run([10] * 9, c), runs[ref].run([10] * 9, c)):
                print(f"!! {label[v]} logits differ from {label[ref]}'s at context {c}")
                return 1
    for e in engines.values():
        e.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
