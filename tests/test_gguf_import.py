"""The native target's weights equal the GGUF file's own, type by type (the `gguf` package's
dequantization is the reference), and MatMulNBits computes with exactly those weights."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conflayers.compiler.export.gguf_import import GGUFImportError, from_blocks
from conflayers.compiler.export.quantize import QuantMatrix, quantize_rtn

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


@pytest.mark.parametrize("type_name", ("Q4_1", "Q4_K", "Q6_K", "Q8_0", "Q5_0"))
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
    onnx.save(g.model("test"), str(tmp_path / "m.onnx"))
    stores.close()
    x = np.random.default_rng(4).standard_normal((1, 7, K)).astype(np.float32)
    out = create_session(str(tmp_path / "m.onnx"), ["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expect = x @ w
    rel = np.abs(out - expect).max() / np.abs(expect).max()
    assert rel <= 2e-2, f"{type_name}: relative error {rel:.3g}"


def test_rtn_round_trip_within_half_a_step():
    w = _weights(5).T.copy()
    m = quantize_rtn(w, 4)
    per_elem = np.repeat(m.scales, 32, axis=1).T
    assert np.all(np.abs(m.dequantize() - w) <= per_elem / 2 + 1e-6)
