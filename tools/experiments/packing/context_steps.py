"""Time a bundle's one-token full step, a 9-token verify and each profile's draft step (its draft
body + head) at growing context lengths: what attention costs as the context grows, and so what
a draft that skips attention saves there (run once with and once without
CONFLAYERS_ATTENTION=off to compare SlotAttention with GroupQueryAttention). `--isa avx2,avx512`
loads one engine per SlotAttention path (CONFLAYERS_ATTENTION_ISA) and times them side by side,
checking that their logits are equal bit for bit.

    python tools/experiments/packing/context_steps.py bundles/smollm2-native [--contexts 128,512,1024,2048]
        [--isa avx2,avx512]
"""
from __future__ import annotations

import argparse
import os

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
    ap.add_argument("--isa", help="SlotAttention paths to time side by side, e.g. avx2,avx512")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    isas = args.isa.split(",") if args.isa else [None]
    engines = {}
    for isa in isas:                       # SlotAttention reads it when a session is made
        if isa is not None:
            os.environ["CONFLAYERS_ATTENTION_ISA"] = isa
        engines[isa] = Engine.load(args.bundle, guard=False, adapt=False, max_context=max(contexts) + 16)
    eng = engines[isas[0]]
    cache = KVCache(eng.spec, max(contexts) + 16)
    # Real bytes in every position: a never-written (calloc'd) cache reads the kernel's shared
    # zero page, from L1, and so hides what attention's KV reads cost.
    rng = np.random.default_rng(0)
    for layer in range(eng.spec.num_layers):
        for arr in (cache.key_array(layer), cache.value_array(layer)):
            arr[...] = rng.standard_normal(arr.shape, dtype=np.float32) * 0.1
    jobs, runs = {}, {}
    for isa, e in engines.items():
        run = runs[isa] = e.full.bind(cache)
        drafts = {name: d.model.stepper(cache) for name, d in e.drafters.items() if getattr(d, "model", None) is not None}
        for c in contexts:
            jobs[(isa, "step", c)] = lambda c=c, run=run: run.run([10], c)
            jobs[(isa, "verify", c)] = lambda c=c, run=run: run.run([10] * 9, c)
            for name, step in drafts.items():
                jobs[(isa, name, c)] = lambda c=c, step=step: step(10, c)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"attention: {'SlotAttention' if attention.available() else 'GroupQueryAttention'}")
    for isa in isas:
        if isa is not None:
            print(f"CONFLAYERS_ATTENTION_ISA={isa}")
        head = f"{'context':>8} {'step ms':>8} {'verify-9 ms':>12} {'verify/step':>12}"
        head += "".join(f" {'draft ' + n + ' ms':>18} {'draft/step':>10}" for n in drafts)
        print(head)
        for c in contexts:
            step, verify = ms[(isa, "step", c)], ms[(isa, "verify", c)]
            line = f"{c:>8} {step:>8.2f} {verify:>12.2f} {verify / step:>12.2f}"
            line += "".join(f" {ms[(isa, n, c)]:>18.2f} {ms[(isa, n, c)] / step:>10.2f}" for n in drafts)
            print(line)
    if len(isas) > 1:
        print(f"{isas[1]} / {isas[0]}: " + "; ".join(
            f"{c}: step {ms[(isas[1], 'step', c)] / ms[(isas[0], 'step', c)]:.2f}x, verify-9 "
            f"{ms[(isas[1], 'verify', c)] / ms[(isas[0], 'verify', c)]:.2f}x" for c in contexts))
        for c in contexts:                 # the same cache, the same rows: the same logits
            want = runs[isas[0]].run([10] * 9, c)
            for isa in isas[1:]:
                if not np.array_equal(runs[isa].run([10] * 9, c), want):
                    print(f"!! {isa} logits differ from {isas[0]}'s at context {c}")
                    return 1
    for e in engines.values():
        e.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
