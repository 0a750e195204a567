"""Narrow 8-bit codes in 5/6-bit planes (qmatmul.h) against the same codes in bytes: one bundle's
full graph, two sessions, the same bits, timed side by side.

    python tools/experiments/qmatmul/planes.py bundles/gemma3-native [--context 200] [--rounds 15]

The first session is made with CONFLAYERS_QMATMUL_PLANES=off (every 8-bit matrix in bytes), the
second without (GGUF Q5_* matrices in 5-bit planes, Q6_K in 6-bit ones, on the AVX-512 engine).
Prints the weights each holds (kernels.qmatmul_layouts), whether every pass of
1, 2, 3, 9 and 16 rows gives the same logits bit for bit in both, and the ms per pass (IOBinding,
KV cache of `context` positions, interleaved rounds, minimum). Exits 1 when any bit differs.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnxruntime as ort

from conflayers.runtime import contract, kernels
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    said = kernels.describe()
    if "qmatmul:avx512" not in said:
        sys.exit(f"planes are read by the AVX-512 engine only; here: {said}")
    bundle = Bundle.open(args.bundle)
    spec, full = bundle.spec, bundle.full_graph
    bound = {}
    for name, env in (("bytes", "off"), ("planes", None)):
        if env:
            os.environ["CONFLAYERS_QMATMUL_PLANES"] = env
        else:
            os.environ.pop("CONFLAYERS_QMATMUL_PLANES", None)
        sess = create_session(full, ["CPUExecutionProvider"])
        bound[name] = GraphRunner(sess, list(range(spec.num_layers)), contract.LOGITS).bind(KVCache(spec, args.context + 32))
        print(f"{name:6s} session made; weights held now: {kernels.qmatmul_layouts(kernels.library())}")
    ids = np.random.default_rng(0).integers(100, spec.vocab_size - 100, 16).tolist()
    exact = True
    outs = {}
    for name, b in bound.items():
        b.run(ids[:1] * args.context, 0)
        outs[name] = [b.run(ids[:w], args.context) for w in (1, 2, 3, 9, 16)]
    for w, a, p in zip((1, 2, 3, 9, 16), outs["bytes"], outs["planes"]):
        same = np.array_equal(a.view(np.uint32), p.view(np.uint32))
        exact &= same
        print(f"{w:2d}-row pass: planes == bytes bit for bit: {same}")
    widths = (1, 2, 3, 9, 16)
    ms = time_jobs({(w, k): (lambda b=b, w=w: b.run(ids[:w], args.context)) for w in widths for k, b in bound.items()},
                   args.rounds, "min")
    print(f"\nms per pass of the full graph, context {args.context}, min of {args.rounds} interleaved rounds "
          f"({kernels.describe()}, onnxruntime {ort.__version__})")
    print("  variant " + "".join(f"{w:>3} rows " for w in widths))
    for k in bound:
        print(f"  {k:7s}" + "".join(f"{ms[(w, k)]:9.2f}" for w in widths))
    print("  bytes / planes " + " ".join(f"{ms[(w, 'bytes')] / ms[(w, 'planes')]:.2f}x" for w in widths))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
