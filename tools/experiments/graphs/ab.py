"""Time the full graphs of two bundles of one model side by side (e.g. one compiled before a
graph change and one after), and check each one's rows.

    python tools/experiments/graphs/ab.py BUNDLE_A BUNDLE_B [--context 200] [--rounds 25]

Passes of 1, 2, 4 and 9 rows through IOBinding on a KV cache of `context` positions, interleaved
rounds, minimum per bundle; prints whether every row of a 9-row pass equals the one-row pass of
the same position (exits 1 if not) and how far the two bundles' logits are apart (two graphs of
one model differ in their last bits where their float sequences differ; int8 activations then
move some rows' argmax).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from conflayers.runtime import contract, kernels
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    spec = Bundle.open(args.a).spec
    if Bundle.open(args.b).spec != spec:
        sys.exit("the two bundles are not of the same model")
    cpu = ["CPUExecutionProvider"]
    bound = {k: GraphRunner(create_session(os.path.join(p, "full.onnx"), cpu), list(range(spec.num_layers)),
                            contract.LOGITS).bind(KVCache(spec, args.context + 32))
             for k, p in (("A", args.a), ("B", args.b))}
    ids = np.random.default_rng(0).integers(100, spec.vocab_size - 100, 16).tolist()
    exact, rows = True, {}
    for k, r in bound.items():
        r.run(ids[:1] * args.context, 0)
        one = [r.run(ids[i:i + 1], args.context + i)[0] for i in range(9)]
        nine = r.run(ids[:9], args.context)
        same = all(np.array_equal(nine[i], one[i]) for i in range(9))
        exact &= same
        rows[k] = np.array(one)
        print(f"{k}: rows of a 9-row pass == one-row passes: {same}")
    agree = (rows["A"].argmax(-1) == rows["B"].argmax(-1)).mean()
    print(f"A vs B logits: max |difference| {np.abs(rows['A'] - rows['B']).max():.3g}, argmax agrees on "
          f"{agree:.0%} of 9 positions")
    widths = (1, 2, 4, 9)
    ms = time_jobs({(w, k): (lambda r=r, w=w: r.run(ids[:w], args.context)) for w in widths for k, r in bound.items()},
                   args.rounds, "min")
    print(f"\nms per pass, context {args.context}, min of {args.rounds} interleaved rounds ({kernels.describe()})")
    for w in widths:
        print(f"  {w} rows: A {ms[(w, 'A')]:6.2f}  B {ms[(w, 'B')]:6.2f}  B/A {ms[(w, 'B')] / ms[(w, 'A')]:.3f}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
