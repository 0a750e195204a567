"""Build decoder graphs for ONNX Runtime directly from canonical weights.

One builder makes the full graph and every draft: the full graph at the target's precision
(fp32, int8/int4 blocks, or the GGUF file's own blocks: `native`), a draft the same graph with
fewer layers (or half-layers), at its own precision, split into a body (kept layers -> final norm)
and a head (norm output -> logits over the full or a subset vocabulary), so several task profiles
can share one body session.

Graph interface: conflayers.runtime.contract (names, and why the runtime pads single rows).
The KV buffers are bound as both past and present (GroupQueryAttention's shared buffer), so the
cache is updated in place and rolling back is only a shorter seqlens_k.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from conflayers.runtime import contract
from conflayers.runtime.draftplan import DraftPlan, weights_file_name
from conflayers.runtime.kernels import DOMAIN as KERNELS_DOMAIN   # ops of the runtime's kernel library
from conflayers.runtime.modelspec import ModelSpec

from .quantize import QuantMatrix, quantize_rtn
from .weights import WeightFile

MS = "com.microsoft"
# Matrices that read the same input, multiplied as one where their blocks share a layout (one
# MatMulNBits, one activation quantization, one offset correction instead of several).
PACKED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
OPSET = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
INT64_MAX = np.iinfo(np.int64).max
OFFSET_BLOCK = 32                  # GGUF's block and K-quant sub-block: the offsets' granularity
QMATMUL_FORMS = {(32, 4), (32, 8), (16, 8)}   # (block, bits) the kernel library's QMatMul ops take
QMATMUL16 = "QMatMul16"            # Q6_K's 8-bit blocks of 16 (without offsets)
QMATMUL_WITH = {False: "QMatMulOffsets", True: "QMatMulOffsets16"}      # by fp16 offsets
QMATMUL_BASE = ("QMatMul", QMATMUL16, *QMATMUL_WITH.values())


def qmatmul_variant(op: str, glu: bool = False, norm: bool = False) -> str:
    """The op computing `op`'s product with an MLP's gate after it ([gate | up] -> gate
    sigmoid(gate (alpha + beta gate^2)) up) and/or a residual add + RMSNorm before it."""
    kind = op[len("QMatMul"):].removeprefix("Norm").removeprefix("GLU")
    return "QMatMul" + ("Norm" if norm else "") + ("GLU" if glu else "") + kind


QMATMUL_GLU = {op: qmatmul_variant(op, glu=True) for op in QMATMUL_BASE}
QMATMUL_OPS = tuple(qmatmul_variant(op, glu, norm) for norm in (False, True) for glu in (False, True)
                    for op in QMATMUL_BASE)
QMATMUL_CALLS = {op: "AddBlockOffsets16" if op.endswith("Offsets16") else "AddBlockOffsets"
                 for op in QMATMUL_OPS if "Offsets" in op}
# g sigmoid(g (alpha + beta g^2)): SiLU, and GELU-tanh (0.5 g (1 + tanh(y)) = g sigmoid(2y))
_GELU_ALPHA = 2.0 * math.sqrt(2.0 / math.pi)
GATE_ACTIVATIONS = {"silu": (1.0, 0.0), "gelu_tanh": (_GELU_ALPHA, _GELU_ALPHA * 0.044715)}


class WeightStores:
    """The weights files of one bundle: fp32 (weights.bin) and one per other precision.

    `target` is the full graph's precision: fp32, int8/int4 (our round-to-nearest blocks) or
    native (the GGUF file's own blocks, `native`). Drafts of the target's precision read the
    target's file. Quantized tensors are computed once per canonical name and cached, so every
    graph of a given precision refers to the same bytes."""

    def __init__(self, directory: str, weights: dict[str, np.ndarray], target: str = "fp32",
                 native: dict[str, QuantMatrix] | None = None):
        if target == "native" and not native:
            raise ValueError("the native target needs the GGUF file's own weights")
        self.dir = directory
        self.w = weights
        self.target = target
        self.native = native or {}
        self.files: dict[str, WeightFile] = {}
        self._derived: dict[str, np.ndarray] = {}
        self._quant: dict[tuple, QuantMatrix | None] = {}

    def file(self, precision: str) -> WeightFile:
        if precision not in self.files:
            name = weights_file_name(precision)
            self.files[precision] = WeightFile(os.path.join(self.dir, name))
        return self.files[precision]

    def array(self, name: str) -> np.ndarray:
        """Canonical weights plus derived ones (packed qkv, gate_up) built once."""
        if name in self.w:
            return self.w[name]
        if name not in self._derived:
            packed = _packed_parts(name)
            if packed:
                self._derived[name] = np.concatenate([self.w[p] for p in packed], 1)
            elif name.endswith(".qkv_bias"):
                p = name[: -len("qkv_bias")]
                self._derived[name] = np.concatenate(
                    [self.w[p + "q_bias"], self.w[p + "k_bias"], self.w[p + "v_bias"]])
            else:
                raise KeyError(name)
        return self._derived[name]

    def quantized(self, name: str, precision: str, rows: np.ndarray | None = None) -> QuantMatrix | None:
        """`name` as MatMulNBits blocks in `precision`, or None where it stays an fp32 MatMul
        (fp32, or a native tensor the GGUF file stores unquantized). A packed qkv whose native
        parts differ in layout is None too: the graph then multiplies q, k and v separately."""
        key = (name, precision, None if rows is None else _rows_key(rows))
        if key not in self._quant:
            self._quant[key] = self._make_quantized(name, precision, rows)
        return self._quant[key]

    def _make_quantized(self, name, precision, rows):
        if precision == "fp32":
            return None
        if precision == "native":
            packed = _packed_parts(name)
            if packed:
                parts = [self.native.get(p) for p in packed]
                if any(p is None for p in parts) or len({p.layout for p in parts}) != 1:
                    return None
                m = QuantMatrix.concat(parts)
            else:
                m = self.native.get(name)
                if m is None:
                    return None
            return m if rows is None else m.take_rows(rows)
        w = self.array(name)
        if name == "lm_head":        # stored [V, H]; MatMulNBits wants W as [K=H, N=V]
            w = (w if rows is None else w[rows]).T
        return quantize_rtn(w, {"int8": 8, "int4": 4}[precision])

    @property
    def quantized_embedding(self) -> QuantMatrix | None:
        """The embedding as blocks when the target's file has it so (native): every graph then
        gathers rows from those bytes instead of an fp32 copy of the table."""
        return self.native.get("embed")

    def close(self):
        for f in self.files.values():
            f.close()


def _packed_parts(name: str) -> list[str] | None:
    """"layers.3.gate_up" -> ["layers.3.gate", "layers.3.up"]; None for a plain name."""
    prefix, _, last = name.rpartition(".")
    return [f"{prefix}.{p}" for p in PACKED[last]] if last in PACKED else None


def _rows_key(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:12]


@dataclass(eq=False)
class _Normed:
    """rmsnorm(x + delta) * weight, not yet computed: the QMatMul that reads it computes it in its
    prologue (QMatMulNorm*, which also writes `total` = x + delta, the residual stream), else
    _Graph.tensor writes it as a SkipSimplifiedLayerNormalization. `total` is named up front, so
    later nodes can read it whichever node writes it."""
    x: str
    delta: str
    weight: str
    eps: float
    total: str
    h: str | None = None           # the tensor, once written as its own node
    fused: bool = False            # computed inside its consumer: no tensor exists


class _Graph:
    def __init__(self, stores: WeightStores, precision: str):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.stores = stores
        self.precision = precision
        self._n = 0
        self._init_names = set()
        self._half_offsets: set[str] = set()    # offsets initializers stored in fp16

    def op(self, op_type, inputs, n_out=1, domain="", name=None, outputs=None, **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = [f"{base}/out{j}" for j in range(n_out)]
        for j, given in enumerate(outputs or []):
            outs[j] = given or outs[j]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def tensor(self, x) -> str:
        """x's tensor name; a pending norm (_Normed) written first as its own node."""
        if not isinstance(x, _Normed):
            return x
        if x.fused:
            raise ValueError("a norm already computed inside its QMatMul has no tensor of its own")
        if x.h is None:
            x.h = self.op("SkipSimplifiedLayerNormalization", [x.x, x.delta, x.weight], n_out=4, domain=MS,
                          outputs=[None, None, None, x.total], epsilon=x.eps)[0]
        return x.h

    def _qmatmul_node(self, op, x, q: QuantMatrix, weights: list[str], label, **attrs):
        """One kernel-library QMatMul* node reading x; a pending norm is fused into it
        (QMatMulNorm*: measured on SmolLM2's native target, ~0.3 ms of a ~6 ms step)."""
        if not isinstance(x, _Normed) or x.h is not None:
            return self.op(op, [self.tensor(x)] + weights, domain=KERNELS_DOMAIN, name=label,
                           K=q.k, N=q.n, bits=q.bits, block_size=q.block, **attrs)
        x.fused = True
        y, _ = self.op(qmatmul_variant(op, glu="GLU" in op, norm=True), [x.x, x.delta, x.weight] + weights, n_out=2,
                       domain=KERNELS_DOMAIN, name=label, outputs=[None, x.total], K=q.k, N=q.n, bits=q.bits,
                       block_size=q.block, epsilon=x.eps, **attrs)
        return y

    def const(self, name, array):
        if name not in self._init_names:
            self._init_names.add(name)
            self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, array=None, precision="fp32"):
        """fp32 tensor stored in the fp32 weights file (shared with the full graph)."""
        if name not in self._init_names:
            self._init_names.add(name)
            arr = self.stores.array(name) if array is None else array
            self.inits.append(self.stores.file(precision).tensor(name, arr.astype(np.float32)))
        return name

    def matmul(self, x, wname, label, rows=None):
        """x @ W in this graph's precision. `rows` selects lm_head rows (vocabulary subset)."""
        q = self.stores.quantized(wname, self.precision, rows)
        if q is not None:
            return self.matmul_blocks(x, q, wname if rows is None else f"{wname}.rows{_rows_key(rows)}", label)
        x = self.tensor(x)
        if self.precision == "native" and wname.endswith(".qkv"):   # q, k, v of different GGUF types
            p = wname[: -len("qkv")]
            parts = [self.matmul(x, p + part, f"{label}_{part}") for part in "qkv"]
            return self.op("Concat", parts, name=label, axis=-1)
        if wname == "lm_head":
            w = self.stores.array("lm_head")
            tname = "lm_head" if rows is None else f"lm_head.rows{_rows_key(rows)}"
            arr = w if rows is None else w[rows]
            self.weight(tname, arr, precision="fp32")
            # Gemm with transB reads the [V,H] embedding layout: no transposed second copy.
            flat = self.op("Reshape", [x, self.const("shape_flat_h", np.array([-1, arr.shape[1]], np.int64))])
            y = self.op("Gemm", [flat, tname], name=label, transB=1)
            return self.op("Reshape", [y, self.const("shape_b1", np.array([1, -1, arr.shape[0]], np.int64))])
        return self.op("MatMul", [x, self.weight(wname)], name=label)

    def matmul_parts(self, x, wname, label) -> list[str]:
        """x times each part of the packed `wname`: one MatMulNBits, split after, where the parts'
        blocks share a layout (measured on SmolLM2's Q4_1 target: 0.5 ms of a 9 ms step, output
        bit-identical); separate matmuls otherwise, and at fp32, whose weights file stays as it was."""
        parts = _packed_parts(wname)
        q = None if self.precision == "fp32" else self.stores.quantized(wname, self.precision)
        if q is None:
            x = self.tensor(x)
            return [self.matmul(x, p, f"{label}_{p.rpartition('.')[2]}") for p in parts]
        y = self.matmul_blocks(x, q, wname, label)
        sizes = [self.stores.array(p).shape[1] for p in parts]
        return self.op("Split", [y, self.const(f"split_{'_'.join(map(str, sizes))}", np.array(sizes, np.int64))],
                       n_out=len(parts), axis=-1)

    def gated_mlp(self, x, wname, label, activation: str):
        """act(gate) * up of the packed `wname`: one QMatMulGLU node where its weights take the
        kernel library's QMatMul and the gate's width is a multiple of 16 (it replaced a Split, a
        QuickGelu and a Mul a layer: SmolLM2's native step 6.17 -> 5.73 ms on an AVX2 EPYC); else
        the product(s) and the activation as nodes."""
        q = None if self.precision == "fp32" else self.stores.quantized(wname, self.precision)
        if q is not None and (q.block, q.bits) in QMATMUL_FORMS and q.n % 32 == 0:
            codes, scales, offsets = self.blocks(q, wname)
            if offsets is not None and q.block != OFFSET_BLOCK:
                raise ValueError(f"{wname}: offsets per block of {q.block}; the graph's correction needs {OFFSET_BLOCK}")
            alpha, beta = GATE_ACTIVATIONS[activation]
            return self._qmatmul_node(QMATMUL_GLU[self._qmatmul_op(q, offsets)], x, q,
                                      [codes, scales] + ([offsets] if offsets else []), label,
                                      alpha=float(alpha), beta=float(beta))
        gate, up = self.matmul_parts(x, wname, label)
        if activation == "silu":
            act = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
        else:
            act = self.op("FastGelu", [gate], domain=MS)
        return self.op("Mul", [act, up])

    def _qmatmul_op(self, q: QuantMatrix, offsets: str | None) -> str:
        return QMATMUL16 if q.block == 16 else "QMatMul" if offsets is None else QMATMUL_WITH[offsets in self._half_offsets]

    def blocks(self, q: QuantMatrix, tag: str) -> tuple[str, str, str | None]:
        """Initializer names of a QuantMatrix's codes, scales and offsets (written once). Offsets
        are stored in fp16 where that is lossless (Q5_1's minimums: half the bytes a pass reads),
        else fp32."""
        names = (f"{tag}.q{q.bits}", f"{tag}.scales{q.bits}", None if q.offsets is None else f"{tag}.offsets{q.bits}")
        if names[0] not in self._init_names:
            f = self.stores.file(self.precision)
            self._init_names.update(n for n in names if n)
            self.inits += [f.tensor(names[0], q.codes), f.tensor(names[1], q.scales)]
            if q.offsets is not None:      # [n_blocks, N]: the layout the correction reads
                offsets = _fp16_if_exact(q.offsets)
                if offsets.dtype == np.float16:
                    self._half_offsets.add(names[2])
                self.inits.append(f.tensor(names[2], np.ascontiguousarray(offsets.T)))
        return names

    def matmul_blocks(self, x, q: QuantMatrix, tag: str, label: str):
        codes, scales, offsets = self.blocks(q, tag)
        if offsets is not None and q.block != OFFSET_BLOCK:
            raise ValueError(f"{tag}: offsets per block of {q.block}; the graph's correction needs {OFFSET_BLOCK}")
        if (q.block, q.bits) in QMATMUL_FORMS:
            # one node, run by the kernel library's QMatMul (AMX or AVX2 engine) where it is
            # loaded, else by its ONNX function: MatMulNBits (+ AddBlockOffsets), the nodes below
            return self._qmatmul_node(self._qmatmul_op(q, offsets), x, q, [codes, scales] + ([offsets] if offsets else []),
                                      label)
        x = self.tensor(x)
        y = self.op("MatMulNBits", [x, codes, scales], domain=MS, name=label, K=q.k, N=q.n, bits=q.bits,
                    block_size=q.block, accuracy_level=4)
        if offsets is None:
            return y
        # + sum over blocks b of (sum of x over block b) * offsets[b, n]: one node, run by the
        # runtime's kernel library where registered, else by its ONNX function (four nodes)
        op = "AddBlockOffsets16" if offsets in self._half_offsets else "AddBlockOffsets"
        return self.op(op, [y, x, offsets], domain=KERNELS_DOMAIN, name=f"{label}/offsets")

    def embedding(self, ids):
        """Token embeddings: a Gather from the fp32 table, or from the target's blocks (native)
        dequantized in the graph for the few rows looked up (exact: codes, scale and offset)."""
        q = self.stores.quantized_embedding
        if q is None:
            return self.op("Gather", [self.weight("embed"), ids], name="embed")
        keep, self.precision = self.precision, "native"       # the bytes live in the native file
        codes, scales, offsets = self.blocks(q, "embed")
        self.precision = keep
        c = self.op("Gather", [codes, ids], name="embed/codes")          # [1, S, nb, blob]
        if q.bits == 4:
            last = self.const("axis_last", np.array([-1], np.int64))
            lo = self.op("BitwiseAnd", [c, self.const("nibble_mask", np.array(15, np.uint8))])
            hi = self.op("BitShift", [c, self.const("nibble_shift", np.array(4, np.uint8))], direction="RIGHT")
            c = self.op("Concat", [self.op("Unsqueeze", [lo, last]), self.op("Unsqueeze", [hi, last])], axis=-1)
        nb = q.codes.shape[1]
        c = self.op("Reshape", [c, self.const(f"shape_blocks{nb}x{q.block}", np.array([0, 0, nb, q.block], np.int64))])
        mid = self.const(f"mid{q.bits}", np.array(1 << (q.bits - 1), np.float32))
        w = self.op("Sub", [self.op("Cast", [c], to=TensorProto.FLOAT), mid])
        last = self.const("axis_last", np.array([-1], np.int64))
        w = self.op("Mul", [w, self.op("Unsqueeze", [self.op("Gather", [scales, ids]), last])])
        if offsets is not None:        # offsets are stored [n_blocks, V]: gather columns
            per_row = self.op("Gather", [offsets, ids], axis=1)                    # [nb, 1, S]
            if offsets in self._half_offsets:
                per_row = self.op("Cast", [per_row], to=TensorProto.FLOAT)
            per_row = self.op("Transpose", [per_row], perm=[1, 2, 0])             # [1, S, nb]
            w = self.op("Add", [w, self.op("Unsqueeze", [per_row, last])])
        return self.op("Reshape", [w, self.const("shape_flat_k", np.array([0, 0, q.k], np.int64))], name="embed")

    def model(self, doc: str, meta: dict | None = None) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "decoder", self.inputs, self.outputs, self.inits)
        custom = sorted({n.op_type for n in self.nodes if n.domain == KERNELS_DOMAIN})
        m = helper.make_model(g, opset_imports=OPSET + ([helper.make_opsetid(KERNELS_DOMAIN, 1)] if custom else []),
                              producer_name="conflayers", doc_string=doc, functions=kernel_functions(custom))
        m.ir_version = 10
        if meta:
            helper.set_model_props(m, meta)
        return m


def kernel_functions(ops: list[str]) -> list[onnx.FunctionProto]:
    """The ONNX functions of the kernel library's ops in `ops`, and of the ops their bodies call."""
    needed = set(ops) | {QMATMUL_CALLS[op] for op in ops if op in QMATMUL_CALLS}
    order = ["AddBlockOffsets", "AddBlockOffsets16", *QMATMUL_OPS]
    return [add_block_offsets_function(op == "AddBlockOffsets16") if op.startswith("Add") else qmatmul_function(op)
            for op in order if op in needed]


def _attribute_refs(node, refs: dict[str, str], kind):
    """node with attributes (name -> the function's attribute it reads)."""
    for name, of in refs.items():
        ref = onnx.AttributeProto()
        ref.name, ref.ref_attr_name, ref.type = name, of, kind
        node.attribute.append(ref)
    return node


def qmatmul_function(op: str) -> onnx.FunctionProto:
    """QMatMul(16)(x, codes, scales[, offsets]) as MatMulNBits (accuracy level 4) [+ AddBlockOffsets(16)]:
    what a session runs where the kernel library's QMatMul is not registered
    (runtime/kernels/qmatmul.cc); the same nodes as a graph written without the op. QMatMulNorm*:
    a SkipSimplifiedLayerNormalization before (x, delta, norm_weight -> the product's input and
    the output total); *GLU*: after, a Split into gate and up and gate * Sigmoid(gate * (alpha +
    beta * gate^2)) * up."""
    attrs = ["K", "N", "bits", "block_size"]
    glu, norm, offsets = "GLU" in op, op.startswith("QMatMulNorm"), op in QMATMUL_CALLS
    product = "product" if glu else "y"
    nodes, inputs, outputs = [], ["x", "codes", "scales"], ["y"]
    if norm:
        ssln = helper.make_node("SkipSimplifiedLayerNormalization", ["x_in", "delta", "norm_weight"],
                                ["x", "", "", "total"], domain=MS)
        nodes.append(_attribute_refs(ssln, {"epsilon": "epsilon"}, onnx.AttributeProto.FLOAT))
        inputs, outputs, attrs = ["x_in", "delta", "norm_weight", "codes", "scales"], ["y", "total"], attrs + ["epsilon"]
    mm = helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y0" if offsets else product], domain=MS,
                          accuracy_level=4)
    nodes.append(_attribute_refs(mm, {a: a for a in ["K", "N", "bits", "block_size"]}, onnx.AttributeProto.INT))
    if offsets:
        nodes.append(helper.make_node(QMATMUL_CALLS[op], ["y0", "x", "offsets"], [product], domain=KERNELS_DOMAIN))
        inputs.append("offsets")
    if glu:
        constant = lambda out, of: _attribute_refs(helper.make_node("Constant", [], [out]), {"value_float": of},
                                                   onnx.AttributeProto.FLOAT)
        nodes += [helper.make_node("Split", [product], ["gate", "up"], axis=-1, num_outputs=2),
                  constant("alpha", "alpha"), constant("beta", "beta"),
                  helper.make_node("Mul", ["gate", "gate"], ["g2"]), helper.make_node("Mul", ["beta", "g2"], ["bg2"]),
                  helper.make_node("Add", ["alpha", "bg2"], ["slope"]), helper.make_node("Mul", ["gate", "slope"], ["z"]),
                  helper.make_node("Sigmoid", ["z"], ["sz"]), helper.make_node("Mul", ["gate", "sz"], ["act"]),
                  helper.make_node("Mul", ["act", "up"], ["y"])]
        attrs = attrs + ["alpha", "beta"]
    return helper.make_function(KERNELS_DOMAIN, op, inputs, outputs, nodes,
                                OPSET + [helper.make_opsetid(KERNELS_DOMAIN, 1)], attributes=attrs)


def add_block_offsets_function(half: bool = False) -> onnx.FunctionProto:
    """AddBlockOffsets(y, x, offsets) = y + (sums of x over blocks of 32) @ offsets as plain ONNX
    (AddBlockOffsets16: fp16 offsets, cast first): what a session without the runtime's kernel
    library runs (runtime/kernels/block_offsets.cc). AddBlockOffsets' body is the four nodes this
    builder wrote before the op existed (bit for bit the same output)."""
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(
            np.array([0, 0, -1, OFFSET_BLOCK], np.int64))),
        helper.make_node("Reshape", ["x", "shape"], ["blocks"]),
        helper.make_node("Constant", [], ["axis"], value=onnx.numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("ReduceSum", ["blocks", "axis"], ["sums"], keepdims=0),
    ]
    offsets = "offsets"
    if half:       # a constant initializer: ORT folds the Cast at load
        nodes.append(helper.make_node("Cast", ["offsets"], ["offsets32"], to=TensorProto.FLOAT))
        offsets = "offsets32"
    nodes += [helper.make_node("MatMul", ["sums", offsets], ["correction"]),
              helper.make_node("Add", ["y", "correction"], ["z"])]
    name = "AddBlockOffsets16" if half else "AddBlockOffsets"
    return helper.make_function(KERNELS_DOMAIN, name, ["y", "x", "offsets"], ["z"], nodes, OPSET[:1])


def _fp16_if_exact(offsets: np.ndarray) -> np.ndarray:
    """The offsets in fp16 where every value survives the round trip, else as they are (fp32)."""
    half = offsets.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), offsets) else offsets


def _rope_caches(spec: ModelSpec, theta: float, max_len: int):
    """cos/sin tables computed as transformers does, with torch (fp32 inv_freq, fp32 products).
    numpy's float32 pow differs from torch's in the last bit of ~15% of the inv_freq entries; the
    angle error grows with the position (2e-4 rad at 1400) and moved Gemma 3 270M's logits by up
    to 6e-3 on a 1362-token prompt (1e-3 with torch's tables, HF fp32's own error level)."""
    import torch
    d = spec.head_dim
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().numpy().astype(np.float32), freqs.sin().numpy().astype(np.float32)


def build(spec: ModelSpec, stores: WeightStores, plan: DraftPlan | None = None, part: str = "full",
          head_rows: np.ndarray | None = None, max_context: int | None = None) -> onnx.ModelProto:
    """part: "full" (fp32, all layers, logits), "body" (plan's layers -> final-normed hidden),
    or "head" (hidden -> logits over head_rows, or the whole vocabulary)."""
    precision = stores.target if plan is None else plan.precision
    if part == "full" and plan is not None and plan.precision != stores.target:
        raise ValueError(f"the full graph is at the target's precision ({stores.target})")
    g = _Graph(stores, precision)
    H = spec.hidden_size
    if part == "head":
        g.inputs.append(helper.make_tensor_value_info(contract.HIDDEN, TensorProto.FLOAT, [1, "S", H]))
        logits = _head(g, spec, contract.HIDDEN, head_rows)
        g.outputs.append(helper.make_tensor_value_info(contract.LOGITS, TensorProto.FLOAT, [1, "S", "V"]))
        g.nodes.append(helper.make_node("Identity", [logits], [contract.LOGITS], name="logits_out"))
        return g.model("conflayers head")

    plan = plan or DraftPlan(spec.num_layers, precision=precision)
    g.inputs += [
        helper.make_tensor_value_info(contract.INPUT_IDS, TensorProto.INT64, [1, "S"]),
        helper.make_tensor_value_info(contract.SEQLENS, TensorProto.INT32, [1]),
        helper.make_tensor_value_info(contract.TOTAL, TensorProto.INT32, []),
        helper.make_tensor_value_info(contract.LOGITS_FROM, TensorProto.INT64, [1]),
    ]
    x = g.embedding(contract.INPUT_IDS)
    if spec.embed_scale != 1.0:
        x = g.op("Mul", [x, g.const("embed_scale", np.array(spec.embed_scale, np.float32))])

    caches = {}
    max_len = min(max_context or spec.max_position_embeddings, spec.max_position_embeddings)
    # The full graph gives attention one extra row (a copy of the last): ONNX Runtime's CPU
    # GroupQueryAttention takes another code path for a single row, which rounds differently, and
    # int8 activation quantization (MatMulNBits) amplifies that into different tokens. The matrix
    # products' rows are the runtime's to pad where this machine needs it (contract.py); with both,
    # a step, a verify pass, a prefill chunk and a batched pass compute each position alike.
    # The extra rows write spare KV slots past the sequence (the runtime allocates them).
    pad = part == "full"
    if pad:
        one = g.const("one_i32", np.array(1, np.int32))
        seqlens = g.op("Add", [contract.SEQLENS, one], name=contract.ATTENTION_PAD[0])
        total = g.op("Add", [contract.TOTAL, one], name=contract.ATTENTION_PAD[1])
    else:
        seqlens, total = contract.SEQLENS, contract.TOTAL
    pending = None   # sub-layer output not yet added to the residual stream x (fused into the next norm)
    for i in range(spec.num_layers):
        pre = f"layers.{i}."
        if plan.keeps_attention(i):
            theta = spec.rope_theta[i]
            if theta not in caches:
                cos, sin = _rope_caches(spec, theta, max_len + contract.KV_SPARE)   # + the spare slot
                tag = f"rope{len(caches)}"
                caches[theta] = (g.weight(f"{tag}.cos", cos), g.weight(f"{tag}.sin", sin))
            cos_n, sin_n = caches[theta]
            x, h = _add_norm(g, x, pending, pre + "attn_norm", spec)
            qkv = g.matmul(h, pre + "qkv", f"L{i}/qkv")
            if spec.attention_bias:
                qkv = g.op("Add", [qkv, g.weight(pre + "qkv_bias")])
            q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            if spec.qk_norm:
                q, k, v = g.op("Split", [qkv, g.const("split_qkv", np.array([q_dim, kv_dim, kv_dim], np.int64))],
                               n_out=3, axis=-1)
                q = _head_norm(g, q, pre + "q_norm", spec, spec.num_heads)
                k = _head_norm(g, k, pre + "k_norm", spec, spec.num_kv_heads)
                qkv_in = [q, k, v]
            else:
                qkv_in = [qkv, "", ""]
            past_k, past_v = contract.past_key(i), contract.past_value(i)
            kv_shape = [1, spec.num_kv_heads, "max_len", spec.head_dim]
            g.inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in (past_k, past_v)]
            if pad:
                qkv_in = [_pad_last_row(g, t) if t else t for t in qkv_in]
            # the present outputs are the graph's own (bound to the past buffers: updated in place)
            present = [contract.present_key(i), contract.present_value(i)]
            attn = f"L{i}/attn/out0"
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", qkv_in + [past_k, past_v, seqlens, total, cos_n, sin_n], [attn] + present,
                name=f"L{i}/attn", domain=MS, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
                scale=spec.attn_scale, local_window_size=spec.sliding_window[i], do_rotary=1, rotary_interleaved=0))
            if pad:     # drop the extra row
                attn = g.op("Slice", [attn, g.const("zero_i64", np.array([0], np.int64)),
                                      g.const("minus_one_i64", np.array([-1], np.int64)), g.const("axis1", np.array([1], np.int64))])
            g.outputs += [helper.make_tensor_value_info(dst, TensorProto.FLOAT, kv_shape) for dst in present]
            pending = g.matmul(attn, pre + "o", f"L{i}/o_proj")
            if spec.sandwich_norm:
                pending = _norm(g, pending, pre + "post_attn_norm", spec)
        if plan.keeps_mlp(i):
            x, h = _add_norm(g, x, pending, pre + "mlp_norm", spec)
            act = g.gated_mlp(h, pre + "gate_up", f"L{i}/gate_up", spec.activation)
            pending = g.matmul(act, pre + "down", f"L{i}/down")
            if spec.sandwich_norm:
                pending = _norm(g, pending, pre + "post_mlp_norm", spec)

    # Only positions >= logits_from reach the final norm and head (prefill needs one row).
    ends, axis = g.const("int64_max", np.array([INT64_MAX], np.int64)), g.const("axis1", np.array([1], np.int64))
    x = g.op("Slice", [x, contract.LOGITS_FROM, ends, axis], name=contract.KEEP_POSITIONS)
    if pending is not None:
        pending = g.op("Slice", [pending, contract.LOGITS_FROM, ends, axis], name=f"{contract.KEEP_POSITIONS}_delta")
    _, x = _add_norm(g, x, pending, "final_norm", spec)
    if part == "body":
        g.nodes.append(helper.make_node("Identity", [g.tensor(x)], [contract.HIDDEN], name="hidden_out"))
        g.outputs.insert(0, helper.make_tensor_value_info(contract.HIDDEN, TensorProto.FLOAT, [1, "S", H]))
        return g.model("conflayers draft body")
    logits = _head(g, spec, x, None)
    g.nodes.append(helper.make_node("Identity", [logits], [contract.LOGITS], name="logits_out"))
    g.outputs.insert(0, helper.make_tensor_value_info(contract.LOGITS, TensorProto.FLOAT, [1, "S", spec.vocab_size]))
    return g.model("conflayers full", {contract.META_SPARE_POSITIONS: str(contract.KV_SPARE)})


def _pad_last_row(g: _Graph, x):
    """[1, S, D] -> [1, S + 1, D], the last row repeated (one Pad node: measured 0.15 ms a step
    cheaper on SmolLM2 than a Slice and a Concat)."""
    pads = g.const("pad_last_row", np.array([0, 0, 0, 0, 1, 0], np.int64))
    return g.op("Pad", [x, pads], mode="edge")


def _norm(g: _Graph, x, wname, spec):
    return g.op("SimplifiedLayerNormalization", [x, g.weight(wname)], axis=-1,
                epsilon=spec.rms_norm_eps, stash_type=1)


def _add_norm(g: _Graph, x, delta, wname, spec):
    """(x + delta, rmsnorm(x + delta)): the norm pending (_Normed) for the node that reads it to
    compute; plain norm when nothing is pending."""
    if delta is None:
        return x, _norm(g, x, wname, spec)
    g._n += 1
    normed = _Normed(x, delta, g.weight(wname), float(spec.rms_norm_eps), total=f"{wname}/total_{g._n}")
    return normed.total, normed


def _head_norm(g: _Graph, x, wname, spec, heads):
    """RMSNorm over each head's vector (Gemma 3's q_norm / k_norm)."""
    shaped = g.op("Reshape", [x, g.const(f"shape_heads{heads}", np.array([1, -1, heads, spec.head_dim], np.int64))])
    normed = _norm(g, shaped, wname, spec)
    return g.op("Reshape", [normed, g.const(f"shape_flat{heads}", np.array([1, -1, heads * spec.head_dim], np.int64))])


def _head(g: _Graph, spec, x, rows):
    logits = g.matmul(x, "lm_head", "lm_head", rows=rows)
    if spec.final_logit_softcap:
        cap = g.const("softcap", np.array(spec.final_logit_softcap, np.float32))
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
    return logits
