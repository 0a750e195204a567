"""The native target's weights equal the GGUF file's own, type by type (the `gguf` package's
dequantization is the reference), and MatMulNBits computes with exactly those weights."""
from __future__ import annotations

import os
from unittest import mock

import numpy as np
import onnx
import pytest

from conflayers.compiler.export.gguf_import import GGUFImportError, from_blocks
from conflayers.compiler.export.quantize import QuantMatrix, quantize_rtn
from conflayers.runtime import kernels

gq = pytest.importorskip("gguf.quants")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

N, K = 48, 512
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")      # the gguf package quantizes these
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")                          # only dequantizes: random blocks


def _weights(seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, K)) * rng.uniform(0.01, 0.2, (N, 1))).astype(np.float32)


def _random_k_blocks(type_name: str, seed: int) -> np.ndarray:
    """Valid K-quant rows of random bytes: random codes and sub-block scales, finite fp16 d/dmin."""
    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (N, K // block, size), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, (N, K // block)).astype(np.float16).view(np.uint8).reshape(N, K // block, 2)
    if type_name == "Q6_K":
        raw[..., 208:210] = d
    else:
        raw[..., 0:2] = d
        raw[..., 2:4] = (rng.uniform(1e-3, 2e-2, (N, K // block)).astype(np.float16)
                         .view(np.uint8).reshape(N, K // block, 2))
    return raw.reshape(N, -1)


def _raw(type_name: str, seed: int) -> np.ndarray:
    if type_name in K_QUANTS:
        return _random_k_blocks(type_name, seed)
    return gq.quantize(_weights(seed), GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
def test_native_weights_equal_gguf_dequantization(type_name):
    raw = _raw(type_name, 1)
    ref = gq.dequantize(raw, GGMLQuantizationType[type_name])          # [N, K], the gguf package's
    m = from_blocks(raw, type_name, K)
    assert isinstance(m, QuantMatrix) and m.source == type_name and m.bits in (4, 8)
    got = m.dequantize().T                                              # [N, K]
    # 8-bit forms are gguf's own arithmetic; 4-bit forms with an offset fold 8*scale into the
    # offset (one more fp32 rounding): within a few ulps of the block's magnitude
    magnitude = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 4e-7 * magnitude, type_name
    if m.bits == 8 or m.offsets is None:
        assert np.array_equal(got, ref), f"{type_name}: expected bit-exact weights"


@pytest.mark.parametrize("type_name", ("F32", "F16", "BF16"))
def test_plain_types_convert_exactly(type_name):
    w = _weights(2)
    raw = gq.quantize(w, GGMLQuantizationType[type_name]) if type_name != "F32" else w
    got = from_blocks(raw, type_name, K)
    assert got.dtype == np.float32 and np.array_equal(got, gq.dequantize(raw, GGMLQuantizationType[type_name]))


def test_unsupported_type_is_named_with_the_fix():
    class FakeTensor:
        name, tensor_type, shape = "blk.3.ffn_up.weight", GGMLQuantizationType.IQ2_XXS, [K, N]
        data = np.zeros((N, 10), np.uint8)
    from conflayers.compiler.export.gguf_import import quant_matrix
    with pytest.raises(GGUFImportError, match=r"blk\.3\.ffn_up\.weight.*IQ2_XXS.*--target int8"):
        quant_matrix(FakeTensor())


@pytest.mark.parametrize("type_name", ("Q4_1", "Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q5_1"))
def test_matmulnbits_graph_multiplies_by_the_native_weights(tmp_path, type_name):
    """One matmul node built the way the decoder builder builds it (MatMulNBits + the offset
    correction) against x @ W with the gguf package's W. accuracy_level 4 quantizes activations to
    int8 per block (as llama.cpp does): relative error ~1e-2 (level 0 would be ~1e-6)."""
    from conflayers.compiler.export.decoder_graph import WeightStores, _Graph
    from conflayers.runtime.ort_backend import create_session
    from onnx import TensorProto, helper
    raw = _raw(type_name, 3)
    w = gq.dequantize(raw, GGMLQuantizationType[type_name]).T          # [K, N]
    m = from_blocks(raw, type_name, K)
    stores = WeightStores(str(tmp_path), {"x.w": w}, target="native", native={"x.w": m})
    g = _Graph(stores, "native")
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K]))
    y = g.matmul("x", "x.w", "mm")
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", N]))
    # blocks of 32: one QMatMul node (the offset term inside: fp16 offsets where every one is
    # exact in fp16, always Q5_1's minimums, else fp32); Q6_K's 8-bit blocks of 16: QMatMul16
    custom = [n.op_type for n in g.nodes if n.domain == "conflayers"]
    if m.block != 32:
        assert custom == ["QMatMul16"] and m.offsets is None and m.bits == 8, custom
    elif m.offsets is None:
        assert custom == ["QMatMul"], custom
    else:
        half = np.array_equal(m.offsets.astype(np.float16).astype(np.float32), m.offsets)
        assert custom == ["QMatMulOffsets16" if half else "QMatMulOffsets"], custom
        assert half or type_name != "Q5_1"
    onnx.save(g.model("test"), str(tmp_path / "m.onnx"))
    stores.close()
    x = np.random.default_rng(4).standard_normal((1, 7, K)).astype(np.float32)
    expect = x @ w
    # with the kernel library (its QMatMul: AMX or AVX2) and with the ONNX functions
    for env in ({}, {"CONFLAYERS_KERNELS": "off"}):
        kernels.library.cache_clear()
        with mock.patch.dict(os.environ, env):
            out = create_session(str(tmp_path / "m.onnx"), ["CPUExecutionProvider"]).run(None, {"x": x})[0]
        kernels.library.cache_clear()
        rel = np.abs(out - expect).max() / np.abs(expect).max()
        assert rel <= 2e-2, f"{type_name} {env or kernels.describe()}: relative error {rel:.3g}"


def test_rtn_round_trip_within_half_a_step():
    w = _weights(5).T.copy()
    m = quantize_rtn(w, 4)
    per_elem = np.repeat(m.scales, 32, axis=1).T
    assert np.all(np.abs(m.dequantize() - w) <= per_elem / 2 + 1e-6)


# ----------------------------------------------------------------------------- the alias files

def _alias_native(alias):
    from conflayers.compiler.arch import canonical_weights, model_spec
    from conflayers.compiler.models import load_model, resolve_model
    from conflayers.compiler.target import resolve_target
    resolved = resolve_model(alias, progress=False)
    model, tokenizer = load_model(resolved)
    spec = model_spec(model.config)
    weights = canonical_weights(spec, model.state_dict())
    _alias_native.tokenizer = tokenizer
    return spec, weights, resolve_target("native", resolved, spec, weights)


@pytest.mark.real_model
def test_every_tensor_of_the_smollm2_file_is_exact():
    """read_native matches every quantized matrix of the alias's Q4_1 file to transformers'
    dequantization of it (it raises otherwise), in canonical row order (q/k un-permuted)."""
    spec, weights, target = _alias_native("smollm2-135m-instruct")
    assert target.precision == "native" and target.types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert len(target.native) == 2 + 7 * spec.num_layers
    assert {m.source for m in target.native.values()} == {"Q4_1", "Q8_0"}
    assert target.native["lm_head"] is target.native["embed"]          # tied: one copy of the bytes


@pytest.mark.gemma
def test_every_tensor_of_the_gemma3_file_is_exact():
    spec, weights, target = _alias_native("gemma3-270m")
    assert {m.source for m in target.native.values()} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert len(target.native) == 2 + 7 * spec.num_layers
    q6 = next(m for m in target.native.values() if m.source == "Q6_K")
    assert (q6.bits, q6.block) == (8, 16)


@pytest.mark.real_model
def test_smollm2_native_graph_parity_and_exact_step_verify_identity(tmp_path):
    """The native full graph against the fp32 graph of the same (dequantized) weights, within the
    int8 activation quantization of MatMulNBits (accuracy_level 4, as llama.cpp's Q8 activations):
    measured max |logit diff| 0.06 of the logit scale, argmax agreement 0.97. And the property
    the lossless loop needs: a verify pass over 9 tokens gives, bit for bit, the logits of 9 single
    steps (every pass runs attention over >= 2 rows)."""
    from conflayers.compiler.drafts import DraftFactory
    from conflayers.runtime.ort_backend import KVCache
    spec, weights, target = _alias_native("smollm2-135m-instruct")
    ids = _alias_native.tokenizer(
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Natalia sold 48 clips in April")["input_ids"]
    assert len(ids) >= 40
    logits = {}
    for prec, native in (("fp32", None), ("native", target.native)):
        (tmp_path / prec).mkdir()
        f = DraftFactory(str(tmp_path / prec), spec, weights, 256, ["CPUExecutionProvider"], target=prec, native=native)
        logits[prec] = f.full().bind(KVCache(spec, 128)).run(ids, 0)
        if prec == "native":
            g = f.full()
            prefix = g.bind(KVCache(spec, 128))
            prefix.run(ids[:30], 0)
            steps = np.stack([prefix.run([t], 30 + i)[-1] for i, t in enumerate(ids[30:39])])
            verify = g.bind(KVCache(spec, 128))
            verify.run(ids[:30], 0)
            assert np.array_equal(verify.run(ids[30:39], 30), steps)
        f.close()
    a, b = logits["native"], logits["fp32"]
    rel = np.abs(a - b).max() / np.abs(b).max()
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    assert rel <= 0.12 and agree >= 0.9, f"relative diff {rel:.3f}, agreement {agree:.2f}"
