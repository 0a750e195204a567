"""Build decoder graphs for ONNX Runtime directly from canonical weights.

One builder makes the full graph and every draft: a draft is the same graph with fewer layers
(or half-layers), optionally with quantized matmuls, split into a body (kept layers -> final norm)
and a head (norm output -> logits over the full or a subset vocabulary), so several task profiles
can share one body session.

Graph interface (batch 1):
  inputs   input_ids [1,S] int64, seqlens_k [1] int32 (= total - 1), total_seq_len [] int32,
           logits_from [1] int64 (first position whose logits/hidden are returned),
           past_key.{i} / past_value.{i} [1, kv_heads, max_len, head_dim] for each layer i with KV
  outputs  logits [1,S',V] (full, head) or hidden [1,S',H] (body), present_key.{i}/present_value.{i}
The KV buffers are bound as both past and present (GroupQueryAttention's shared buffer), so the
cache is updated in place and rolling back is only a shorter seqlens_k.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conflayers.runtime.draftplan import DraftPlan, weights_file_name
from conflayers.runtime.modelspec import ModelSpec

from .quantize import BLOCK_SIZE, quantize_matmul_weight
from .weights import WeightFile

MS = "com.microsoft"
OPSET = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
INT64_MAX = np.iinfo(np.int64).max


class WeightStores:
    """The weights files of one bundle: fp32 (shared with the full graph) and one per precision.

    Quantized tensors are computed once per canonical name and cached, so every draft of a given
    precision refers to the same bytes."""

    def __init__(self, directory: str, weights: dict[str, np.ndarray]):
        import os
        self.dir = directory
        self.w = weights
        self.files: dict[str, WeightFile] = {}
        self._derived: dict[str, np.ndarray] = {}
        self._quant: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._os = os

    def file(self, precision: str) -> WeightFile:
        if precision not in self.files:
            name = weights_file_name(precision)
            self.files[precision] = WeightFile(self._os.path.join(self.dir, name))
        return self.files[precision]

    def array(self, name: str) -> np.ndarray:
        """Canonical weights plus derived ones (packed qkv) built once."""
        if name in self.w:
            return self.w[name]
        if name not in self._derived:
            if name.endswith(".qkv"):
                p = name[: -len("qkv")]
                self._derived[name] = np.concatenate([self.w[p + "q"], self.w[p + "k"], self.w[p + "v"]], 1)
            elif name.endswith(".qkv_bias"):
                p = name[: -len("qkv_bias")]
                self._derived[name] = np.concatenate(
                    [self.w[p + "q_bias"], self.w[p + "k_bias"], self.w[p + "v_bias"]])
            else:
                raise KeyError(name)
        return self._derived[name]

    def quantized(self, name: str, bits: int, rows: np.ndarray | None = None):
        key = (name if rows is None else f"{name}@{_rows_key(rows)}", bits)
        if key not in self._quant:
            w = self.array(name)
            if name == "lm_head":        # stored [V, H]; MatMulNBits wants W as [K=H, N=V]
                w = (w if rows is None else w[rows]).T
            self._quant[key] = quantize_matmul_weight(w, bits)
        return self._quant[key]

    def close(self):
        for f in self.files.values():
            f.close()


def _rows_key(rows: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:12]


class _Graph:
    def __init__(self, stores: WeightStores, precision: str):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.stores = stores
        self.precision = precision
        self._n = 0
        self._init_names = set()

    def op(self, op_type, inputs, n_out=1, domain="", name=None, **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = [f"{base}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

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
        if self.precision == "fp32":
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
        bits = {"int8": 8, "int4": 4}[self.precision]
        packed, scales = self.stores.quantized(wname, bits, rows)
        tag = wname if rows is None else f"{wname}.rows{_rows_key(rows)}"
        qn, sn = f"{tag}.q{bits}", f"{tag}.scales{bits}"
        if qn not in self._init_names:
            self._init_names.update((qn, sn))
            f = self.stores.file(self.precision)
            self.inits += [f.tensor(qn, packed), f.tensor(sn, scales)]
        k = self.stores.array(wname).shape[1 if wname == "lm_head" else 0]
        n = packed.shape[0]
        return self.op("MatMulNBits", [x, qn, sn], domain=MS, name=label, K=k, N=n, bits=bits,
                       block_size=BLOCK_SIZE, accuracy_level=4)

    def model(self, doc: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "decoder", self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=OPSET, producer_name="conflayers", doc_string=doc)
        m.ir_version = 10
        return m


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
    precision = "fp32" if plan is None else plan.precision
    if part == "full" and plan is not None and plan.precision != "fp32":
        raise ValueError("the full graph is fp32")
    g = _Graph(stores, precision)
    H = spec.hidden_size
    if part == "head":
        g.inputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", H]))
        logits = _head(g, spec, "hidden", head_rows)
        g.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", "V"]))
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        return g.model("conflayers head")

    plan = plan or DraftPlan(spec.num_layers)
    g.inputs += [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]),
    ]
    x = g.op("Gather", [g.weight("embed"), "input_ids"], name="embed")
    if spec.embed_scale != 1.0:
        x = g.op("Mul", [x, g.const("embed_scale", np.array(spec.embed_scale, np.float32))])

    caches = {}
    max_len = min(max_context or spec.max_position_embeddings, spec.max_position_embeddings)
    pending = None   # sub-layer output not yet added to the residual stream x (fused into the next norm)
    for i in range(spec.num_layers):
        pre = f"layers.{i}."
        if plan.keeps_attention(i):
            theta = spec.rope_theta[i]
            if theta not in caches:
                cos, sin = _rope_caches(spec, theta, max_len)
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
            past_k, past_v = f"past_key.{i}", f"past_value.{i}"
            kv_shape = [1, spec.num_kv_heads, "max_len", spec.head_dim]
            g.inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in (past_k, past_v)]
            attn, pk, pv = g.op(
                "GroupQueryAttention", qkv_in + [past_k, past_v, "seqlens_k", "total_seq_len", cos_n, sin_n],
                n_out=3, domain=MS, name=f"L{i}/attn", num_heads=spec.num_heads,
                kv_num_heads=spec.num_kv_heads, scale=spec.attn_scale,
                local_window_size=spec.sliding_window[i], do_rotary=1, rotary_interleaved=0)
            for src, dst in ((pk, f"present_key.{i}"), (pv, f"present_value.{i}")):
                g.nodes.append(helper.make_node("Identity", [src], [dst], name=dst))
                g.outputs.append(helper.make_tensor_value_info(dst, TensorProto.FLOAT, kv_shape))
            pending = g.matmul(attn, pre + "o", f"L{i}/o_proj")
            if spec.sandwich_norm:
                pending = _norm(g, pending, pre + "post_attn_norm", spec)
        if plan.keeps_mlp(i):
            x, h = _add_norm(g, x, pending, pre + "mlp_norm", spec)
            gate = g.matmul(h, pre + "gate", f"L{i}/gate")
            up = g.matmul(h, pre + "up", f"L{i}/up")
            if spec.activation == "silu":
                act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
            else:
                act = g.op("FastGelu", [gate], domain=MS)
            pending = g.matmul(g.op("Mul", [act, up]), pre + "down", f"L{i}/down")
            if spec.sandwich_norm:
                pending = _norm(g, pending, pre + "post_mlp_norm", spec)

    # Only positions >= logits_from reach the final norm and head (prefill needs one row).
    ends, axis = g.const("int64_max", np.array([INT64_MAX], np.int64)), g.const("axis1", np.array([1], np.int64))
    x = g.op("Slice", [x, "logits_from", ends, axis], name="keep_positions")
    if pending is not None:
        pending = g.op("Slice", [pending, "logits_from", ends, axis], name="keep_positions_delta")
    _, x = _add_norm(g, x, pending, "final_norm", spec)
    if part == "body":
        g.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden_out"))
        g.outputs.insert(0, helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", H]))
        return g.model("conflayers draft body")
    logits = _head(g, spec, x, None)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
    g.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", spec.vocab_size]))
    return g.model("conflayers full")


def _norm(g: _Graph, x, wname, spec):
    return g.op("SimplifiedLayerNormalization", [x, g.weight(wname)], axis=-1,
                epsilon=spec.rms_norm_eps, stash_type=1)


def _add_norm(g: _Graph, x, delta, wname, spec):
    """(x + delta, rmsnorm(x + delta)) in one fused op; plain norm when nothing is pending."""
    if delta is None:
        return x, _norm(g, x, wname, spec)
    h, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, delta, g.weight(wname)], n_out=4,
                          domain=MS, epsilon=spec.rms_norm_eps)
    return total, h


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
