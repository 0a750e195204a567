"""SlotAttention alone (one node, SmolLM2's heads: 9 query, 3 KV, 64 dims), ms per pass of 1 and
9 rows over 30 layers' caches at growing past lengths, over a cache of random values (never calloc'd zero pages, which
would be read from L1), for one or more builds of the kernel library side by side.

    python tools/experiments/attention/bench.py [--lib A.so --lib B.so] [--pasts 256,1024,2048,4000]
        [--kv float32,float16]

Each build's outputs are checked against the first's bit for bit, per KV cache type (a build that
changes the arithmetic says so); `--kv float16` adds SlotAttentionF16 over half caches. Compare builds with `bash tools/build_kernels.sh -o /tmp/variant.so -D...`.

Measured 2026-12-07 (2-core AVX2 EPYC, 2 threads, min of 8): 1 row 3.8 / 15.5 ms at 1024 / 4000
positions (4000: 184 MB of keys and values, ~12 GB/s), 9 rows 12.8 / 49.7 ms (compute-bound:
~20-30 core cycles a query and position against the 8 of its 16 FMAs). Variants tried, none
faster beyond the VM's noise: blocks of 27 queries (a KV head's whole 9-row pass in one task,
its keys and values read once), no head split on one-row passes, 8 and 32 KB tiles; and, in a
standalone copy of `attend`, bit-identical loops sharing each key load between two queries and
each value load between two heads of a row (within ~10%).

Measured 2026-12-07 on the AMD Zen 5 VM (AVX-512): the kept AVX-512 path (two queries per
instruction, attention.cc's attend_wide) against the AVX2 one, 9 rows 0.71 / 0.74 / 0.68 / 0.79x at
256 / 1024 / 2048 / 4000 positions. With it, 9 rows at 4000 positions split about 45% scores, 39%
values, 14% softmax (builds that skip a phase). Tried on top, none beyond the VM's noise: the 8
positions' dot-product chains in lockstep instead of one after another (0.99-1.10x); blocks of 18
and 27 queries (0.97-1.04x: the re-reads of keys and values come from cache); no head split on
one-row passes (1.0x); value sums on 16 lanes per query (1.03-1.16x, slower: the pair's one load
for two queries is what pays) and in blocks of 4 queries sharing each value load (0.92-0.98x at
4-9 rows, 1.26-1.32x slower at one row).

Measured 2026-12-07 (stop 43, the same VM), `--kv float32,float16`: SlotAttentionF16 over half caches
against the float caches, 1 row 0.58 / 0.64 / 0.73x at 4000 / 1024 / 256 positions, 3 rows 0.71-0.92x,
9 rows 0.89-1.03x (the multiply-adds, not the bytes, bound a 9-row pass). Converting a tile of
positions to float once per block of queries, instead of each query converting the halves it loads,
was slower everywhere (1 row 0.85-1.17x, 9 rows 1.03-1.16x of the float caches): the conversion's
stores and reloads cost more than the conversions it saves at 1-12 queries a block. A shuffle-based
reduction of a pair's 8 dot-product sums (one zmm tree for both queries instead of two 8-lane
sum8x8) gave the same bits and no measurable change (0.98x at 9 rows, measured while a CI job ran).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from conflayers.runtime import attention, kernels

HEADS, KV, H, HALF = 9, 3, 64, 32


def session(lib: str, length: int, threads: int, kv: str = "float32"):
    vi = helper.make_tensor_value_info
    cache = [1, KV, length, H]
    kt = TensorProto.FLOAT16 if kv == "float16" else TensorProto.FLOAT
    ins = [vi("q", TensorProto.FLOAT, [1, "T", (HEADS + 2 * KV) * H]), vi("past_key", kt, cache),
           vi("past_value", kt, cache), vi("seqlens", TensorProto.INT32, ["N"]),
           vi("cos", TensorProto.FLOAT, ["P", HALF]), vi("sin", TensorProto.FLOAT, ["P", HALF])]
    node = helper.make_node(attention.OP_F16 if kv == "float16" else attention.OP,
                            ["q", "", "", "past_key", "past_value", "seqlens", "cos", "sin"],
                            ["out", "present_key", "present_value"], domain=kernels.DOMAIN, num_heads=HEADS,
                            kv_num_heads=KV, scale=float(H) ** -0.5, do_rotary=1)
    outs = [vi("out", TensorProto.FLOAT, [1, "T", HEADS * H]), vi("present_key", kt, cache),
            vi("present_value", kt, cache)]
    m = helper.make_model(helper.make_graph([node], "a", ins, outs),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")   # several sessions share 2 cores
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", action="append", help="kernel library builds (default: the runtime's)")
    ap.add_argument("--pasts", default="256,1024,2048,4000")
    ap.add_argument("--rows", default="1,9")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="caches a pass reads (a model's layers)")
    ap.add_argument("--kv", default="float32", help="KV cache types: float32, float16 or both")
    args = ap.parse_args(argv)
    kvs = args.kv.split(",")
    # one column per (build, KV cache type) that build runs
    columns = []
    for lib in args.lib or [kernels.library()]:
        for kv in kvs:
            try:
                session(lib, 64, 1, kv)
            except Exception as e:        # noqa: BLE001 - an older build without SlotAttentionF16
                print(f"{lib} {kv}: skipped ({str(e).splitlines()[0][:80]})")
                continue
            columns.append((lib, kv))
    libs = [f"{lib} [{kv}]" for lib, kv in columns]
    pasts = [int(p) for p in args.pasts.split(",")]
    widths = [int(r) for r in args.rows.split(",")]
    length = max(pasts) + max(widths) + 8
    rng = np.random.default_rng(0)
    # one cache per layer, as a model has (30 for SmolLM2): a pass reads them all, from memory
    floats = [(rng.standard_normal((1, KV, length, H), dtype=np.float32),
               rng.standard_normal((1, KV, length, H), dtype=np.float32)) for _ in range(args.layers)]
    caches = {"float32": floats, "float16": [(k.astype(np.float16), v.astype(np.float16)) for k, v in floats]}
    angle = np.arange(length)[:, None] * (10000.0 ** (-np.arange(HALF) / HALF))
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    q = {n: rng.standard_normal((1, n, (HEADS + 2 * KV) * H), dtype=np.float32) for n in widths}
    sessions = [session(lib, length, args.threads, kv) for lib, kv in columns]
    bindings = {}
    for i in range(len(libs)):
        for past in pasts:
            for n in widths:
                for layer, cache in enumerate(caches[columns[i][1]]):
                    b = sessions[i].io_binding()
                    b.bind_cpu_input("q", q[n])
                    for name, arr in zip(("key", "value"), cache):
                        v = ort.OrtValue.ortvalue_from_numpy(arr)
                        b.bind_ortvalue_input(f"past_{name}", v)
                        b.bind_ortvalue_output(f"present_{name}", v)
                    b.bind_cpu_input("seqlens", np.array([past + n - 1], np.int32))
                    b.bind_cpu_input("cos", cos)
                    b.bind_cpu_input("sin", sin)
                    b.bind_output("out", "cpu")
                    bindings[(i, past, n, layer)] = b

    def run(i, past, n):
        """One pass over every layer's cache: seconds, and the last layer's output."""
        t = time.perf_counter()
        for layer in range(args.layers):
            sessions[i].run_with_iobinding(bindings[(i, past, n, layer)])
        dt = time.perf_counter() - t
        return dt, bindings[(i, past, n, args.layers - 1)].get_outputs()[-1].numpy()

    best = {}
    for _ in range(args.rounds):          # interleaved: the VM's noise hits every build alike
        for past in pasts:
            for n in widths:
                for i in range(len(libs)):
                    dt, out = run(i, past, n)
                    k = (i, past, n)
                    best[k] = min(best.get(k, 1e9), dt)
                    ref = next(j for j, c in enumerate(columns) if c[1] == columns[i][1])
                    if i != ref and not np.array_equal(out, run(ref, past, n)[1]):
                        print(f"!! {libs[i]} differs from {libs[ref]} at past {past}, {n} rows")
    for i, name in enumerate(libs):
        print(f"lib{i}: {name}")
    print(f"{'past':>6} {'rows':>5} " + " ".join(f"{'ms lib' + str(i):>10}" for i in range(len(libs)))
          + ("  " + " ".join(f"{'x lib' + str(i):>8}" for i in range(1, len(libs))) if len(libs) > 1 else ""))
    for past in pasts:
        for n in widths:
            ms = [best[(i, past, n)] * 1e3 for i in range(len(libs))]
            line = f"{past:>6} {n:>5} " + " ".join(f"{m:>10.3f}" for m in ms)
            if len(libs) > 1:
                line += "  " + " ".join(f"{m / ms[0]:>8.2f}" for m in ms[1:])
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
