"""Time the kernel library's AddBlockOffsets ops against the graph's plain offset correction.

    bash tools/build_kernels.sh          # setup.sh runs it
    python tools/experiments/block_offsets/bench.py bundles/smollm2-native [--context 200] [--rounds 20]
    BLOCK_OFFSETS_LIB=/tmp/v.so python ...   # a variant: bash tools/build_kernels.sh -o /tmp/v.so -DNO_TILE

The kernels' checks (exactness by construction, the fallback, a float64 reference) are
tests/test_kernels.py. This rewrites the native bundle's full graph (its AddBlockOffsets nodes)
into variants and times runtime passes of 1, 2, 3, 4 and 9 rows through IOBinding on a shared KV cache, interleaved
rounds, minimum per variant:
  plain       the ops' ONNX functions (no library): four plain nodes per matrix (+ a Cast of
              fp16 offsets, folded at load), the graph as it runs where the library is missing
  kernel      the bundle as compiled, with the library: AddBlockOffsets16 for Q4_1 (fp16 offsets,
              zero point 0), AddBlockOffsets for fp32 offsets (Q4_K)
  kernel32    the same with every offset in fp32 (exact too: what fp16 storage saves)
  one-node    one elementwise node (Abs of y) in its place (NOT exact: what a node alone costs)
  no-offsets  the correction dropped (NOT exact: the bound on what any formulation can save)
The variant graphs are written next to the bundle's full.onnx and removed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from conflayers.compiler.export import decoder_graph
from conflayers.runtime import contract, kernels
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache
from conflayers.runtime.timing import time_jobs

LIB = os.environ.get("BLOCK_OFFSETS_LIB") or kernels.BUILT     # another build to compare
DOMAIN = kernels.DOMAIN


def session(path: str, lib: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.log_severity_level = 3
    # one pool per session: spinning threads of the variant that ran last would steal the cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lib:
        so.register_custom_ops_library(LIB)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


OPS = ("AddBlockOffsets", "AddBlockOffsets16")


def variant(bundle: str, kind: str) -> tuple[str, list[str]]:
    """Write the full graph as `kind` next to full.onnx; returns (file name, files written)."""
    m = onnx.load(os.path.join(bundle, "full.onnx"), load_external_data=kind == "kernel32")
    g = m.graph
    ops = [n for n in g.node if n.op_type in OPS]
    if not ops:
        sys.exit(f"{bundle}/full.onnx has no AddBlockOffsets node: compile a native bundle with this checkout")
    halves = {n.input[2] for n in ops if n.op_type == "AddBlockOffsets16"}
    rename, nodes = {}, []
    for n in g.node:
        if n.op_type not in OPS:
            nodes.append(n)
        elif kind == "kernel32":
            nodes.append(helper.make_node("AddBlockOffsets", list(n.input), list(n.output), name=n.name, domain=DOMAIN))
        elif kind == "one-node":     # timing only: a cheap elementwise node on y in its place
            nodes.append(helper.make_node("Abs", [n.input[0]], list(n.output), name=n.name))
        else:                        # no-offsets
            rename[n.output[0]] = n.input[0]
    for n in nodes:
        n.input[:] = [rename.get(v, v) for v in n.input]
    del g.node[:]
    g.node.extend(nodes)
    name, extra = f"_exp_{kind}.onnx", []
    if kind == "kernel32":
        if not any(f.name == "AddBlockOffsets" for f in m.functions):
            m.functions.append(decoder_graph.add_block_offsets_function(False))
        for i, t in enumerate(g.initializer):
            if t.name in halves:
                g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
        extra = ["_exp_kernel32.bin"]
        onnx.save(m, os.path.join(bundle, name), save_as_external_data=True, location=extra[0], size_threshold=1024)
    else:
        onnx.save(m, os.path.join(bundle, name))
    return name, [name] + extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="a native-target bundle (conflayers-compile ... --target native)")
    ap.add_argument("--context", type=int, default=200, help="tokens of past in the KV cache")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    if not os.path.isfile(LIB):
        sys.exit(f"no {LIB}: run bash tools/build_kernels.sh first")
    spec = Bundle.open(args.bundle).spec
    files, bound = [], {}
    try:
        for kind in ("plain", "kernel", "kernel32", "one-node", "no-offsets"):
            name = "full.onnx"
            if kind not in ("plain", "kernel"):
                name, written = variant(args.bundle, kind)
                files += written
            runner = GraphRunner(session(os.path.join(args.bundle, name), lib=kind.startswith("kernel")),
                                 list(range(spec.num_layers)), contract.LOGITS)
            bound[kind] = runner.bind(KVCache(spec, args.context + 16))
        widths = (1, 2, 3, 4, 9)
        ms = time_jobs({(w, k): (lambda b=b, w=w: b.run([10] * w, args.context)) for w in widths for k, b in bound.items()},
                       args.rounds, "min")
    finally:
        for f in files:
            os.remove(os.path.join(args.bundle, f))
    print(f"\nms per pass of the full graph, context {args.context}, min of {args.rounds} interleaved rounds "
          f"({os.cpu_count()} threads without spinning, onnxruntime {ort.__version__})")
    print("  variant      " + "".join(f"{w:>3} rows " for w in widths) + "  1 row vs plain")
    for k in bound:
        print(f"  {k:11s}" + "".join(f"{ms[(w, k)]:9.2f}" for w in widths) + f"   {ms[(1, k)] / ms[(1, 'plain')]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
