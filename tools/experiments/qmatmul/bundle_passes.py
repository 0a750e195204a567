"""Time a bundle's full graph with the kernel library's QMatMul (its fastest engine here: AMX or
AVX2; CONFLAYERS_QMATMUL picks another) against the same graph's ONNX functions (MatMulNBits +
AddBlockOffsets, what runs without the library's QMatMul), and check its rows.

    bash tools/build_kernels.sh          # setup.sh runs it
    python tools/experiments/qmatmul/bundle_passes.py bundles/smollm2-native [--context 200] [--rounds 15]

Passes of 1, 2, 3, 4, 9 and 16 rows through IOBinding on a KV cache of `context` positions,
interleaved rounds, minimum per variant. "functions" is the bundle's graph with its QMatMul nodes
renamed so the library does not claim them (ONNX Runtime inlines their functions); the library
still computes AddBlockOffsets there. Prints, and exits 1 when it fails, whether every row of the
QMatMul variant's passes equals the one-row pass of the same position. (On an AVX2-only CPU the
functions' exact one-token step is their 2-row pass: the runtime pads it there.)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

from conflayers.compiler.export import decoder_graph
from conflayers.runtime import contract, kernels
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
from conflayers.runtime.timing import time_jobs

OPS = decoder_graph.QMATMUL_OPS


def functions_variant(bundle: str) -> str:
    """full.onnx with QMatMul* renamed to Fn* (functions copied): written next to it."""
    m = onnx.load(os.path.join(bundle, "full.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type in OPS and n.domain == kernels.DOMAIN:
            n.op_type = "Fn" + n.op_type
    for f in list(m.functions):
        if f.name in OPS:
            g = onnx.FunctionProto()
            g.CopyFrom(f)
            g.name = "Fn" + f.name
            m.functions.append(g)
    path = os.path.join(bundle, "_exp_functions.onnx")
    onnx.save(m, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    said = kernels.describe()
    if "qmatmul:" not in said or "qmatmul:off" in said:
        sys.exit(f"the kernel library runs no QMatMul here ({said})")
    spec = Bundle.open(args.bundle).spec
    extra = functions_variant(args.bundle)
    try:
        cpu = ["CPUExecutionProvider"]
        bound = {k: GraphRunner(create_session(p, cpu), list(range(spec.num_layers)), contract.LOGITS)
                 .bind(KVCache(spec, args.context + 32))
                 for k, p in (("functions", extra), ("qmatmul", os.path.join(args.bundle, "full.onnx")))}
        rng = np.random.default_rng(0)
        ids = rng.integers(100, spec.vocab_size - 100, 16).tolist()
        exact = True
        for k, b in bound.items():
            b.run(ids[:1] * args.context, 0)                           # a context to attend over
            one = [b.run(ids[i:i + 1], args.context + i)[0] for i in range(16)]
            for w in (2, 3, 9, 16):
                rows = b.run(ids[:w], args.context)
                same = all(np.array_equal(rows[i], one[i]) for i in range(w))
                exact &= same or k == "functions"
                print(f"{k:9s} rows of a {w:2d}-row pass == one-row passes: {same}")
        widths = (1, 2, 3, 4, 9, 16)
        ms = time_jobs({(w, k): (lambda b=b, w=w: b.run(ids[:w], args.context)) for w in widths for k, b in bound.items()},
                       args.rounds, "min")
    finally:
        os.remove(extra)
    print(f"\nms per pass of the full graph, context {args.context}, min of {args.rounds} interleaved rounds "
          f"({kernels.describe()}, onnxruntime {ort.__version__})")
    print("  variant    " + "".join(f"{w:>3} rows " for w in widths) + "   9 rows / 1 row")
    for k in bound:
        print(f"  {k:10s}" + "".join(f"{ms[(w, k)]:9.2f}" for w in widths) + f"   {ms[(9, k)] / ms[(1, k)]:.2f}x")
    print("  qmatmul vs functions " + " ".join(f"{ms[(w, 'functions')] / ms[(w, 'qmatmul')]:.2f}x" for w in widths))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
