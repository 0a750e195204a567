"""The screened head: the kernel library's QMatMulScreened in place of a full graph's 8-bit head.

Greedy decoding needs the head's argmax, not its logits. QMatMul(Norm)Screened (kernels/qmatmul.h)
holds the 8-bit head split into its codes' top 6 bits and their low 2 bits. It reads the top bits
of every column (6/8 of the head's bytes), bounds each column's exact logit rigorously, and
computes exact products (bit for bit the plain op's) only for the groups of 16 columns whose
bound reaches the row's best lower bound. Every other logit is -inf. The largest exact logit
keeps its index, so greedy output is the plain head's token for token, on any pass. On Gemma 3
270M's 262k-row Q8_0 head, 0.1% of the groups were left on average (2% at most) over 160 real
positions.

A pass with a sampled row needs true logits: the graph's int64 input `full_logits` [1], which
every pass binds (ort_backend.BoundGraph, packing.PackedGraph), set to 1 makes the op compute
every column exactly. The scheduler sets it for passes that hold a sampled sequence.

rewrite() replaces the head of a full graph (node lm_head: QMatMul or QMatMulNorm, 8-bit blocks
of 32, no offsets). create_session does it for the engine's full graph when the library's QMatMul
runs on the AVX-512 engine, the one that screens (other engines compute every column, so there
the rewrite would buy nothing). CONFLAYERS_HEAD_SCREEN=off keeps the plain head.
"""
from __future__ import annotations

import os

from . import contract, kernels

OPS = {"QMatMul": "QMatMulScreened", "QMatMulNorm": "QMatMulNormScreened"}
FULL_LOGITS = contract.FULL_LOGITS
HEAD_NODE = "lm_head"


def available() -> bool:
    """Whether full graphs get the screened head here: the library's QMatMul on its AVX-512
    engine, the onnx package, and CONFLAYERS_HEAD_SCREEN not off."""
    if os.environ.get("CONFLAYERS_HEAD_SCREEN", "").strip().lower() in ("off", "0", "no", "none"):
        return False
    path = kernels.library()
    if path is None or "qmatmul:avx512" not in kernels.cpu_path(path).split():
        return False
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def rewrite(model) -> bool:
    """Replace the head of `model` (an onnx ModelProto, changed in place) by its screened twin and
    add the graph input `full_logits`; False (unchanged) where the graph has no such head."""
    from onnx import TensorProto, helper
    g = model.graph
    node = next((n for n in g.node if n.name == HEAD_NODE and n.domain == kernels.DOMAIN and n.op_type in OPS), None)
    if node is None or any(x.name == FULL_LOGITS for x in g.input):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 8 or attrs.get("block_size") != 32:
        return False
    node.op_type = OPS[node.op_type]
    node.input.append(FULL_LOGITS)
    g.input.append(helper.make_tensor_value_info(FULL_LOGITS, TensorProto.INT64, [1]))
    return True
