"""Would a lossless screening of the 8-bit head pay? (experiment, answer: no, on Gemma 3 270M)

    python tools/experiments/head_screening/screen.py bundles/gemma3-native [--positions 400] [--rows 50]

The idea: read a 4-bit copy of the head (half the bytes of its 8-bit blocks), bound each column's
error rigorously, and compute exact 8-bit logits only for the columns whose bound reaches the best
lower bound: greedy argmax unchanged, the full head's bytes read only for the candidates. This
takes real hidden states (the head's input over the README's text, teacher-forced), the head's
own 8-bit blocks and the kernel's int8 activations, makes a round-to-nearest 4-bit copy of each
block of 32 (asymmetric, as Q4_1; and symmetric), and prints per row how many of the vocabulary's
columns stay candidates under a Cauchy-Schwarz bound (per block: |d| ||q||_2 ||W8 - W4||_2) and an
L1 bound (|d| ||q||_1 max|W8 - W4|). Screening pays only if few columns survive.
Measured 2026-12-07 (AVX2 EPYC, Gemma 3 270M, 50 rows): 414 to 179,356 of 262,144 columns
survive with the tighter bound (median tens of thousands): the 4-bit copy's bound (~8 logits)
is wider than the gap between the top logit and the bulk. Not used.
What is used instead (2026-12-08, head.py, screened.py): the top 6 bits of the head's own 8-bit
codes, with the low 2 bits bounded (+-1.5 a code): 0.25% of Gemma 3's columns stay on average.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conflayers.runtime import contract
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import KVCache, create_session


def head_inputs(bundle: str, positions: int):
    """The head's input rows over `positions` tokens of the README, and its codes and scales."""
    path = os.path.join(bundle, "full.onnx")
    m = onnx.load(path, load_external_data=False)
    head = next((n for n in m.graph.node if n.name == "lm_head"), None)
    if head is None or not head.op_type.startswith("QMatMul"):
        sys.exit(f"{bundle}: its head is not a QMatMul node ({head.op_type if head else 'none'})")
    norm = head.op_type.startswith("QMatMulNorm")       # the final norm in the head's prologue
    reads = list(head.input[:2]) if norm else [head.input[0]]
    w0 = 3 if norm else 1
    for name in reads:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    tmp = os.path.join(bundle, "_exp_head_inputs.onnx")
    onnx.save(m, tmp)
    try:
        spec = Bundle.open(bundle).spec
        from tokenizers import Tokenizer
        readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "README.md")
        ids = Tokenizer.from_file(os.path.join(bundle, "tokenizer.json")).encode(open(readme).read()).ids[:positions]
        cache = KVCache(spec, len(ids) + 8)
        feeds = {contract.INPUT_IDS: np.array([ids], np.int64), contract.SEQLENS: np.array([len(ids) - 1], np.int32),
                 contract.TOTAL: np.array(len(ids), np.int32), contract.LOGITS_FROM: np.array([0], np.int64)}
        for i in range(spec.num_layers):
            feeds[contract.past_key(i)], feeds[contract.past_value(i)] = cache.key_array(i), cache.value_array(i)
        got = create_session(tmp, ["CPUExecutionProvider"]).run(reads, feeds)
    finally:
        os.remove(tmp)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.name in head.input}
    if norm:        # the prologue's RMSNorm of x + delta (float32, as the kernel; not bit for bit)
        t = got[0][0] + got[1][0]
        eps = next(a.f for a in head.attribute if a.name == "epsilon")
        x = t / np.sqrt((t * t).mean(-1, keepdims=True) + np.float32(eps)) * inits[head.input[2]]
    else:
        x = got[0][0]
    return x, inits[head.input[w0]], inits[head.input[w0 + 1]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--positions", type=int, default=400)
    ap.add_argument("--rows", type=int, default=50, help="rows (positions, evenly spaced) to screen")
    args = ap.parse_args(argv)
    x, codes, scales = head_inputs(args.bundle, args.positions)
    if codes.ndim != 3 or codes.shape[2] not in (16, 32):
        sys.exit(f"expected 8-bit blocks [N, blocks, 16 | 32], got codes {codes.shape}")
    n, nb, blk = codes.shape
    w8 = (codes.astype(np.float32) - 128) * scales[:, :, None]
    lo, hi = w8.min(-1), w8.max(-1)
    s4 = np.where(hi > lo, (hi - lo) / 15, 1).astype(np.float32)
    w4 = np.clip(np.rint((w8 - lo[..., None]) / s4[..., None]), 0, 15) * s4[..., None] + lo[..., None]
    err = (w8 - w4).astype(np.float64)
    e2, einf = np.sqrt((err ** 2).sum(-1)), np.abs(err).max(-1)
    print(f"{args.bundle}: head {n} x {nb * blk}, 8-bit blocks of {blk}; asymmetric 4-bit copy, rows of "
          f"{len(x)} positions")
    counts = []
    for r in np.linspace(0, len(x) - 1, min(args.rows, len(x))).astype(int):
        xb = x[r].reshape(nb, blk)
        amax = np.abs(xb).max(-1)
        d = amax / 127
        q = np.clip(np.rint(xb * np.where(amax > 0, 127 / np.where(amax > 0, amax, 1), 0)[:, None]), -127, 127)
        l8 = np.einsum("nbk,bk,b->n", w8.astype(np.float64), q, d)
        l4 = np.einsum("nbk,bk,b->n", w4.astype(np.float64), q, d)
        cs = e2 @ (d * np.sqrt((q ** 2).sum(-1)))
        l1 = einf @ (d * np.abs(q).sum(-1))
        assert np.all(np.abs(l8 - l4) <= cs * (1 + 1e-9) + 1e-12), "the bound does not hold"
        kept = [int((l4 + b >= (l4 - b).max()).sum()) for b in (cs, l1)]
        counts.append(kept[0])
        top = np.sort(l8)[-2:]
        print(f"  position {r:4d}: top logit {top[1]:7.2f} (gap to 2nd {top[1] - top[0]:.3f}), bound median "
              f"{np.median(cs):.2f}: candidates {kept[0]:6d} (Cauchy-Schwarz), {kept[1]:6d} (L1) of {n}")
    print(f"candidates per row: median {int(np.median(counts))}, min {min(counts)}, max {max(counts)} of {n} "
          f"(screening pays only if this is a small share)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
