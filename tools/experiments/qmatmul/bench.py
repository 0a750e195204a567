"""Check and time the experimental QMatMul library against MatMulNBits (issue #21).

    bash tools/experiments/qmatmul/build.sh
    python tools/experiments/qmatmul/bench.py [--lib PATH] [--layers 30] [--rounds 8]

Builds two graphs of SmolLM2-135M's matrix shapes with random Q4_1-like blocks (per layer: fused
QKV 576->960, O 576->576, gate/up 576->3072, down 1536->576; an 8-bit 576->49152 head), one
with the graph's MatMulNBits + block-sum offsets, one with QMatMul nodes that carry that same
product as an ONNX function. Prints, and exits 1 when a check fails:
  - the function fallback (no library) equals the MatMulNBits graph bit for bit;
  - the kernel equals a float64 emulation of its arithmetic (int8 activations per block);
  - rows are bit-identical whatever the number of rows in the pass (1 vs 2..16);
then the milliseconds per pass of both at 1, 2, 4, 9 and 16 rows, interleaved, medians.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

HERE = os.path.dirname(os.path.abspath(__file__))
OPSETS = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]


def ref_attr(name):
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, name, onnx.AttributeProto.INT
    return a


def functions():
    """QMatMul and QMatMulOffsets as ONNX functions of MatMulNBits: what runs without the library."""
    attrs = ["K", "N", "bits", "block_size"]
    mm = h.make_node("MatMulNBits", ["x", "codes", "scales"], ["y0"], domain="com.microsoft", accuracy_level=4)
    mm.attribute.extend(ref_attr(a) for a in attrs)
    body = [mm,
            h.make_node("Constant", [], ["shape"], value=h.make_tensor("v", T.INT64, [4], [0, 0, -1, 32])),
            h.make_node("Reshape", ["x", "shape"], ["xb"]),
            h.make_node("Constant", [], ["axis"], value=h.make_tensor("a", T.INT64, [1], [-1])),
            h.make_node("ReduceSum", ["xb", "axis"], ["sums"], keepdims=0),
            h.make_node("MatMul", ["sums", "offsets"], ["corr"]),
            h.make_node("Add", ["y0", "corr"], ["y"])]
    with_offsets = h.make_function("conflayers", "QMatMulOffsets", ["x", "codes", "scales", "offsets"], ["y"],
                                   body, OPSETS, attributes=attrs)
    mm2 = h.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft", accuracy_level=4)
    mm2.attribute.extend(ref_attr(a) for a in attrs)
    plain = h.make_function("conflayers", "QMatMul", ["x", "codes", "scales"], ["y"], [mm2], OPSETS, attributes=attrs)
    return [with_offsets, plain]


def shapes(layers):
    out = []
    for layer in range(layers):
        out += [(f"l{layer}qkv", "x", 576, 960, 4), (f"l{layer}o", "x", 576, 576, 4),
                (f"l{layer}gu", "x", 576, 3072, 4), (f"l{layer}d", f"l{layer}gu_half", 1536, 576, 4)]
    return out + [("head", "x", 576, 49152, 8)]


def weights(layers, seed=0):
    rng = np.random.default_rng(seed)
    w = {}
    for tag, _, k, n, bits in shapes(layers):
        nb = k // 32
        w[tag] = (rng.integers(0, 256, size=(n, nb, 32 * bits // 8), dtype=np.uint8),
                  (rng.random((n, nb), dtype=np.float32) * 0.01).astype(np.float32),
                  None if bits == 8 else ((rng.random((nb, n), dtype=np.float32) - 0.5) * 0.01).astype(np.float32))
    return w


def graph(w, layers, custom: bool) -> onnx.ModelProto:
    nodes, inits, outs = [], [], []
    inits += [nh.from_array(np.array(v, np.int64), name) for name, v in
              (("shape", [0, 0, -1, 32]), ("axis", [-1]), ("zero", [0]), ("half", [1536]), ("last", [2]))]
    for tag, x, k, n, bits in shapes(layers):
        codes, scales, offsets = w[tag]
        inits += [nh.from_array(codes, tag + ".c"), nh.from_array(scales, tag + ".s")]
        ins = [x, tag + ".c", tag + ".s"]
        if offsets is not None:
            inits.append(nh.from_array(offsets, tag + ".o"))
            ins.append(tag + ".o")
        if custom:
            nodes.append(h.make_node("QMatMulOffsets" if offsets is not None else "QMatMul", ins, [tag], domain="conflayers",
                                     K=k, N=n, bits=bits, block_size=32))
        else:
            y0 = tag if offsets is None else tag + ".y0"
            nodes.append(h.make_node("MatMulNBits", ins[:3], [y0], domain="com.microsoft", K=k, N=n, bits=bits,
                                     block_size=32, accuracy_level=4))
            if offsets is not None:
                nodes += [h.make_node("Reshape", [x, "shape"], [tag + ".xb"]),
                          h.make_node("ReduceSum", [tag + ".xb", "axis"], [tag + ".sums"], keepdims=0),
                          h.make_node("MatMul", [tag + ".sums", tag + ".o"], [tag + ".corr"]),
                          h.make_node("Add", [y0, tag + ".corr"], [tag])]
        if tag.endswith("gu"):
            nodes.append(h.make_node("Slice", [tag, "zero", "half", "last"], [tag + "_half"]))
        outs.append(tag)
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, None, 576])],
                     [h.make_tensor_value_info(o, T.FLOAT, None) for o in outs], initializer=inits)
    return h.make_model(g, opset_imports=OPSETS + [h.make_opsetid("conflayers", 1)],
                        functions=functions() if custom else [])


def session(model_path, lib=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


def emulate(x, codes, scales, offsets, bits):
    """The kernel's arithmetic in float64: int8 activations per block of 32, centered codes."""
    m, k = x.shape
    nb = k // 32
    xb = x.reshape(m, nb, 32).astype(np.float64)
    d = np.abs(xb).max(-1) / 127
    qa = np.clip(np.rint(xb / np.where(d > 0, d, 1)[..., None]), -127, 127)
    q = codes.astype(np.float64) if bits == 8 else \
        np.stack([codes & 15, codes >> 4], -1).reshape(codes.shape[0], nb, 32).astype(np.float64)
    dot = np.einsum("mbj,nbj->mnb", qa, q - (1 << (bits - 1)))
    y = (dot * d[:, None, :] * scales[None].astype(np.float64)).sum(-1)
    if offsets is not None:
        y += xb.sum(-1) @ offsets.astype(np.float64)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(HERE, "build", "libconflayers_qmatmul.so"))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    if not os.path.exists(args.lib):
        sys.exit(f"bench.py: no library at {args.lib}: run  bash tools/experiments/qmatmul/build.sh")
    w = weights(args.layers)
    tmp = tempfile.mkdtemp(prefix="qmatmul-")
    paths = {}
    for name, custom in (("matmulnbits", False), ("qmatmul", True)):
        paths[name] = os.path.join(tmp, f"{name}.onnx")
        onnx.save(graph(w, args.layers, custom), paths[name], save_as_external_data=True, location=f"{name}.data")
    mlas, fallback, ours = session(paths["matmulnbits"]), session(paths["qmatmul"]), session(paths["qmatmul"], args.lib)
    rng = np.random.default_rng(1)
    ok = True

    x = rng.standard_normal((1, 16, 576)).astype(np.float32)
    same = all(np.array_equal(a, b) for a, b in zip(mlas.run(None, {"x": x}), fallback.run(None, {"x": x})))
    print(f"function fallback == MatMulNBits graph, bit for bit: {same}")
    ok &= same

    names = [o.name for o in ours.get_outputs()]
    full = dict(zip(names, ours.run(None, {"x": x})))
    worst = 0.0
    for tag, src, k, n, bits in shapes(args.layers)[:4] + shapes(args.layers)[-1:]:
        xin = x[0] if src == "x" else full[src.replace("_half", "")][0, :, :1536]
        ref = emulate(xin, *w[tag], bits)
        worst = max(worst, float(np.abs(full[tag][0] - ref).max() / (np.abs(ref).max() + 1e-30)))
    print(f"kernel vs float64 emulation: max relative error {worst:.2e}")
    ok &= worst < 1e-5

    rows_equal = True
    for m in (1, 2, 3, 5, 9, 16):
        part = dict(zip(names, ours.run(None, {"x": x[:, :m]})))
        rows_equal &= all(np.array_equal(part[t], full[t][:, :m]) for t in names if not t.endswith("gu"))
    print(f"rows bit-identical in passes of 1, 2, 3, 5, 9, 16 rows: {rows_equal}")
    ok &= rows_equal

    print(f"\nms per pass, median of {args.rounds} interleaved rounds of 10 (2 threads)")
    for m in (1, 2, 4, 9, 16):
        xm = rng.standard_normal((1, m, 576)).astype(np.float32)
        times = {"matmulnbits": [], "qmatmul": []}
        for _ in range(args.rounds):
            for name, s in (("matmulnbits", mlas), ("qmatmul", ours)):
                s.run(None, {"x": xm})
                t = time.perf_counter()
                for _ in range(10):
                    s.run(None, {"x": xm})
                times[name].append((time.perf_counter() - t) / 10 * 1e3)
        a, b = np.median(times["matmulnbits"]), np.median(times["qmatmul"])
        print(f"  rows {m:2d}: MatMulNBits + offsets {a:6.2f}   QMatMul {b:6.2f}   speed-up {a / b:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
