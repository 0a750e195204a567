"""Time a bundle's full graph on each QMatMul engine this CPU runs, side by side in one process:
a one-token step and verify passes of 2, 4 and 9 tokens over a written cache, interleaved rounds,
and the logits of every engine checked equal bit for bit (the engines' contract, qmatmul.h).
`off` runs QMatMul's ONNX functions (MatMulNBits): timed for reference, its logits differ by
rounding and are not checked.

    python tools/experiments/qmatmul/engines.py bundles/smollm2-native [--engines avx512,avx2] [--context 128]

An engine may name a variant build of the library (tools/build_kernels.sh -o X.so -D...):
--engines avx512,avx512@/tmp/x.so times the built library's engine against that build's.

The engine is chosen when a session registers the kernel library (CONFLAYERS_QMATMUL), so each
engine gets its own engine load here; the weights' repacked copy is shared between them.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from conflayers.runtime import kernels
from conflayers.runtime.engine import Engine
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.timing import time_jobs, write_past

WIDTHS = (1, 2, 4, 9)


def engines_here() -> list[str]:
    here = []
    for name in ("amx", "avx512", "avx2", "scalar"):
        os.environ["CONFLAYERS_QMATMUL"] = name
        if f"qmatmul:{name}" in kernels.cpu_path(kernels.BUILT).split():
            here.append(name)
    del os.environ["CONFLAYERS_QMATMUL"]
    return here


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--engines", help="comma-separated (default: every engine here but scalar)")
    ap.add_argument("--context", type=int, default=128, help="past positions of the timed passes")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    names = args.engines.split(",") if args.engines else [e for e in engines_here() if e != "scalar"]
    runs, logits = {}, {}
    for name in names:
        engine, _, lib = name.partition("@")
        os.environ["CONFLAYERS_QMATMUL"] = engine
        os.environ["CONFLAYERS_KERNELS"] = lib or kernels.BUILT
        kernels.library.cache_clear()
        eng = Engine.load(args.bundle, guard=False, adapt=False, max_context=args.context + 32)
        cache = KVCache(eng.spec, args.context + 16)
        write_past(cache, args.context)
        runs[name] = run = eng.full.bind(cache)
        tokens = list(range(100, 100 + max(WIDTHS)))
        logits[name] = {w: np.array(run.run(tokens[:w], args.context), copy=True) for w in WIDTHS}
    os.environ.pop("CONFLAYERS_QMATMUL", None)
    os.environ.pop("CONFLAYERS_KERNELS", None)
    checked = [n for n in names if n.partition("@")[0] != "off"]
    same = all(np.array_equal(logits[n][w], logits[checked[0]][w]) for n in checked for w in WIDTHS)
    jobs = {(n, w): (lambda r=runs[n], w=w: r.run([10] * w, args.context)) for n in names for w in WIDTHS}
    ms = time_jobs(jobs, args.rounds, "median")
    print(f"{args.bundle}: full graph, {args.context} positions of past, median of {args.rounds} interleaved rounds")
    width = max(9, max(len(n) for n in names) + 1)
    print(f"{'engine':<{width}}" + "".join(f"{'verify-' + str(w) if w > 1 else 'step':>11}" for w in WIDTHS) + "   verify-9 / step")
    for n in names:
        print(f"{n:<{width}}" + "".join(f"{ms[(n, w)]:>9.2f}ms" for w in WIDTHS) + f"   {ms[(n, 9)] / ms[(n, 1)]:.2f}x")
    if len(names) > 1:
        base = names[-1]
        for n in names[:-1]:
            print(f"{n} / {base}: " + ", ".join(f"{ms[(n, w)] / ms[(base, w)]:.2f}" for w in WIDTHS))
    print(f"logits of every engine identical ({', '.join(checked)}):", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
