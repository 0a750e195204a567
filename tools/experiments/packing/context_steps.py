"""Time a bundle's one-token full step and a 9-token verify at growing context lengths, to see
what attention costs as the context grows (run once with and once without
CONFLAYERS_ATTENTION=off to compare SlotAttention with GroupQueryAttention).

    python tools/experiments/packing/context_steps.py bundles/smollm2-native [--contexts 128,512,1024,2048]
"""
from __future__ import annotations

import argparse

from conflayers.runtime import attention
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    b = Bundle.open(args.bundle, verify=False)
    full = GraphRunner(create_session(b.full_graph, ["CPUExecutionProvider"]), list(range(b.spec.num_layers)), "logits")
    run = full.bind(KVCache(b.spec, max(contexts) + 16))
    jobs = {}
    for c in contexts:
        jobs[("step", c)] = lambda c=c: run.run([10], c)
        jobs[("verify", c)] = lambda c=c: run.run([10] * 9, c)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"attention: {'SlotAttention' if attention.available() else 'GroupQueryAttention'}")
    print(f"{'context':>8} {'step ms':>8} {'verify-9 ms':>12} {'verify/step':>12}")
    for c in contexts:
        print(f"{c:>8} {ms[('step', c)]:>8.2f} {ms[('verify', c)]:>12.2f} {ms[('verify', c)] / ms[('step', c)]:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
