"""The CPU kernel library (runtime/conflayers/runtime/kernels): AddBlockOffsets against its ONNX
function and a float64 reference, and the property the runtime relies on: a row's result does
not depend on how many rows share the pass (a one-token step equals that row of a verify)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conflayers.compiler.export import decoder_graph
from conflayers.runtime import kernels, ort_backend
from conflayers.runtime.ort_backend import create_session



@pytest.fixture(scope="module")
def library(kernel_library):
    return kernel_library


def _graph(op: str, k: int, n: int, offsets: np.ndarray | None = None) -> onnx.ModelProto:
    """z = y + blocksums(x) @ offsets: `op` (AddBlockOffsets, AddBlockOffsets16) with the
    compiler's function, or "plain": the function's body as graph nodes. Offsets are an input,
    or a constant when given."""
    half = op == "AddBlockOffsets16"
    ins = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", n]),
           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])]
    inits = []
    if offsets is None:
        ins.append(helper.make_tensor_value_info("offsets", TensorProto.FLOAT16 if half else TensorProto.FLOAT, ["NB", "N"]))
    else:
        inits.append(onnx.numpy_helper.from_array(offsets, "offsets"))
    out = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, "S", n])]
    fn = decoder_graph.add_block_offsets_function()
    if op == "plain":
        nodes, opsets, functions = list(fn.node), list(decoder_graph.OPSET), []
    else:
        nodes = [helper.make_node(op, ["y", "x", "offsets"], ["z"], domain=kernels.DOMAIN)]
        opsets = list(decoder_graph.OPSET) + [helper.make_opsetid(kernels.DOMAIN, 1)]
        functions = [fn] if not half else []
    g = helper.make_graph(nodes, "t", ins, out, inits)
    m = helper.make_model(g, opset_imports=opsets, functions=functions)
    m.ir_version = 10
    return m


def _session(model, lib: str | None):
    so = ort.SessionOptions()
    if ort_backend._global_pool:       # the runtime's sessions made ORT's global pool: then required
        so.use_per_session_threads = False
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(rows, k, n, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return {"y": r.standard_normal((1, rows, n)).astype(np.float32),
            "x": r.standard_normal((1, rows, k)).astype(np.float32),
            "offsets": (r.standard_normal((k // 32, n)) * 0.05).astype(dtype)}


def _reference(feed):
    rows, k = feed["x"].shape[1:]
    sums = feed["x"].astype(np.float64).reshape(1, rows, k // 32, 32).sum(-1)
    return feed["y"] + sums @ feed["offsets"].astype(np.float64)


@pytest.mark.parametrize("op,dtype", [("AddBlockOffsets", np.float32), ("AddBlockOffsets16", np.float16)])
@pytest.mark.parametrize("k,n", [(64, 8), (576, 960), (1536, 576), (96, 77)])
def test_kernel_matches_reference_and_rows_are_independent(library, op, dtype, k, n):
    sess = _session(_graph(op, k, n), library)
    for rows in (1, 2, 3, 5, 9, 16, 33):     # row tiles of 4, column tiles and tails
        feed = _inputs(rows, k, n, seed=rows, dtype=dtype)
        z = sess.run(None, feed)[0]
        ref = _reference(feed)
        assert np.max(np.abs(z - ref)) <= 1e-5 * np.max(np.abs(ref)), f"{op} k={k} n={n} rows={rows}"
        for i in range(rows):    # the same row alone: bit for bit
            alone = sess.run(None, {"y": feed["y"][:, i:i + 1], "x": feed["x"][:, i:i + 1], "offsets": feed["offsets"]})[0]
            assert np.array_equal(alone[0, 0], z[0, i]), f"{op} k={k} n={n}: row {i} of {rows} differs from the row alone"
        # constant offsets (the fp16 op reads them from its own tiled copy): the same bits
        const = _session(_graph(op, k, n, offsets=feed["offsets"]), library).run(None, {"y": feed["y"], "x": feed["x"]})[0]
        assert np.array_equal(const, z), f"{op} k={k} n={n} rows={rows}: constant offsets give other bits"


def test_function_fallback_is_the_plain_graph_bit_for_bit():
    """Without the library the node runs its ONNX function: the graph the compiler wrote before."""
    k, n = 576, 960
    fallback, plain = _session(_graph("AddBlockOffsets", k, n), None), _session(_graph("plain", k, n), None)
    for rows in (1, 2, 9):
        feed = _inputs(rows, k, n, seed=rows)
        assert np.array_equal(fallback.run(None, feed)[0], plain.run(None, feed)[0])


def test_kernel_rejects_mismatched_offsets(library):
    sess = _session(_graph("AddBlockOffsets", 64, 8), library)
    feed = _inputs(2, 64, 8)
    feed["offsets"] = np.zeros((3, 8), np.float32)
    with pytest.raises(Exception, match=r"offsets must be \[K/32, N\] = \[2, 8\]"):
        sess.run(None, feed)


def test_runtime_registers_the_library_unless_switched_off(library, tmp_path, monkeypatch):
    """create_session (every runtime session) registers it; CONFLAYERS_KERNELS=off runs the function."""
    path = str(tmp_path / "m.onnx")
    onnx.save(_graph("AddBlockOffsets", 576, 960), path)
    feed = _inputs(3, 576, 960)
    ref = _reference(feed)
    runs = {}
    try:
        for choice in ("", "off"):
            monkeypatch.setenv("CONFLAYERS_KERNELS", choice)
            kernels.library.cache_clear()
            assert (kernels.library() is None) == (choice == "off")
            assert kernels.describe().startswith(kernels.LIBRARY_NAME if not choice else "ONNX functions")
            runs[choice] = create_session(path, ["CPUExecutionProvider"]).run(None, feed)[0]
            assert np.max(np.abs(runs[choice] - ref)) <= 1e-5 * np.max(np.abs(ref))
        # the two paths sum in different orders: equal to rounding, not bit for bit
        assert not np.array_equal(runs[""], runs["off"])
        monkeypatch.setenv("CONFLAYERS_KERNELS", str(tmp_path / "missing.so"))
        kernels.library.cache_clear()
        with pytest.raises(FileNotFoundError, match="CONFLAYERS_KERNELS"):
            kernels.library()
    finally:
        monkeypatch.delenv("CONFLAYERS_KERNELS", raising=False)
        kernels.library.cache_clear()


# -- QMatMul: the 4/8-bit matrix product (qmatmul*.cc) -----------------------------------------------

QMATMUL_OPS = {None: "QMatMul", np.float32: "QMatMulOffsets", np.float16: "QMatMulOffsets16"}


def _qmatmul_graph(k: int, n: int, bits: int, offsets_dtype, weights: dict | None = None, node: bool = True,
                   block: int = 32, gate: str | None = None, norm: bool = False):
    """y = QMatMul*(x, codes, scales[, offsets]) with the compiler's functions, or (node=False) the
    nodes the compiler writes without the op: MatMulNBits [+ AddBlockOffsets(16)]. The weights are
    constants when given, else inputs. block 16: QMatMul16 (8-bit, no offsets). gate (an
    activation): its QMatMulGLU twin, y [.., n / 2]. norm: its QMatMulNorm twin, inputs x, delta,
    norm_weight [k] and a second output, total."""
    op = decoder_graph.QMATMUL16 if block == 16 else QMATMUL_OPS[offsets_dtype]
    extra = {}
    if gate:
        op = decoder_graph.QMATMUL_GLU[op]
        extra = dict(zip(("alpha", "beta"), decoder_graph.GATE_ACTIVATIONS[gate]))
    if norm:
        op = decoder_graph.qmatmul_variant(op, glu=bool(gate), norm=True)
        extra["epsilon"] = 1e-5
    nb, blob = k // block, block * bits // 8
    names = ["x", "codes", "scales"] + ([] if offsets_dtype is None else ["offsets"])
    types = {"codes": (TensorProto.UINT8, [n, nb, blob]), "scales": (TensorProto.FLOAT, ["N", "NB"]),   # (checked by the kernel)
             "offsets": (TensorProto.FLOAT16 if offsets_dtype is np.float16 else TensorProto.FLOAT, [nb, n])}
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])]
    inits = []
    for name in names[1:]:
        if weights is None:
            ins.append(helper.make_tensor_value_info(name, *types[name]))
        else:
            inits.append(onnx.numpy_helper.from_array(weights[name], name))
    attrs = dict(K=k, N=n, bits=bits, block_size=block)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", n // 2 if gate else n])]
    if norm:
        names = ["x", "delta", "norm_weight"] + names[1:]
        ins += [helper.make_tensor_value_info("delta", TensorProto.FLOAT, [1, "S", k]),
                helper.make_tensor_value_info("norm_weight", TensorProto.FLOAT, [k])]
        outs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, "S", k]))
    if node:
        nodes = [helper.make_node(op, names, [o.name for o in outs], domain=kernels.DOMAIN, **attrs, **extra)]
    else:
        mm = "y" if offsets_dtype is None else "y0"
        nodes = [helper.make_node("MatMulNBits", names[:3], [mm], domain="com.microsoft", accuracy_level=4, **attrs)]
        if offsets_dtype is not None:
            nodes.append(helper.make_node(decoder_graph.QMATMUL_CALLS[op], ["y0", "x", "offsets"], ["y"], domain=kernels.DOMAIN))
    custom = sorted({nd.op_type for nd in nodes if nd.domain == kernels.DOMAIN})
    g = helper.make_graph(nodes, "t", ins, outs, inits)
    m = helper.make_model(g, opset_imports=list(decoder_graph.OPSET) + [helper.make_opsetid(kernels.DOMAIN, 1)],
                          functions=decoder_graph.kernel_functions(custom))
    m.ir_version = 10
    return m


def _qweights(k, n, bits, offsets_dtype, seed=0, fp16_values=False, block=32):
    """Random codes, scales and offsets; fp16_values: every scale and offset exact in fp16 (as
    GGUF's d and minimums: the kernel then keeps them in fp16)."""
    r = np.random.default_rng(seed)
    nb = k // block
    w = {"codes": r.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8),
         "scales": (r.random((n, nb)) * 0.02 + 1e-3).astype(np.float32)}
    if offsets_dtype is not None:
        w["offsets"] = (r.standard_normal((nb, n)) * 0.05).astype(offsets_dtype)
    if fp16_values:
        w = {name: v if name == "codes" else v.astype(np.float16).astype(v.dtype) for name, v in w.items()}
    return w


def _qmatmul_reference(x, w, k, n, bits, block=32):
    """The kernel's arithmetic in float64 from the same int8 activations (per row and block of 32
    or 16: scale max|x|/127, round half to even) and the same integer block dot products."""
    rows, nb = x.shape[1], k // block
    xb = x[0].reshape(rows, nb, block)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    qa = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int64)          # [rows, nb, 32]
    d = (amax / np.float32(127)).astype(np.float32)
    c = w["codes"].astype(np.int64)
    codes = np.stack([c & 15, c >> 4], -1).reshape(n, nb, 32) - 8 if bits == 4 else c - 128   # [n, nb, block]
    isum = np.einsum("rbj,nbj->rnb", qa, codes).astype(np.float64)
    y = np.einsum("rnb,nb,rb->rn", isum, w["scales"].astype(np.float64), d.astype(np.float64))
    if "offsets" in w:
        y += xb.astype(np.float64).sum(-1) @ w["offsets"].astype(np.float64)
    return y


@pytest.mark.parametrize("offsets_dtype,block", [(None, 32), (np.float32, 32), (np.float16, 32), (None, 16)])
def test_qmatmul_function_fallback_is_the_matmulnbits_graph_bit_for_bit(offsets_dtype, block, monkeypatch):
    """Where QMatMul is not registered (no library, a CPU without AVX2, or CONFLAYERS_QMATMUL=off)
    its node runs its ONNX function: bit for bit the MatMulNBits (+ AddBlockOffsets) nodes the
    compiler wrote before the op."""
    k, n, bits = 576, 200, 4 if block == 32 else 8
    w = _qweights(k, n, bits, offsets_dtype, block=block)
    monkeypatch.setenv("CONFLAYERS_QMATMUL", "off")      # the library, without its QMatMul
    libs = [None] + ([kernels.BUILT] if os.path.isfile(kernels.BUILT) and kernels.cpu_path(kernels.BUILT) != "none" else [])
    for lib in libs:
        fn = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block), lib)
        plain = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, node=False, block=block), lib)
        for rows in (1, 2, 9):
            x = np.random.default_rng(rows).standard_normal((1, rows, k)).astype(np.float32)
            assert np.array_equal(fn.run(None, {"x": x})[0], plain.run(None, {"x": x})[0]), (lib, rows)


ENGINES = ("amx", "avx512", "avx2", "scalar")


def _engines_here(library) -> list[str]:
    """The QMatMul engines this CPU runs (the scalar reference runs wherever the library does)."""
    here = []
    for engine in ENGINES:
        os.environ["CONFLAYERS_QMATMUL"] = engine
        try:
            if "qmatmul:" + engine in kernels.cpu_path(library).split():
                here.append(engine)
        finally:
            del os.environ["CONFLAYERS_QMATMUL"]
    return here


@pytest.fixture(scope="module")
def engines(library):
    return _engines_here(library)


@pytest.fixture(params=ENGINES)
def engine(request, engines, monkeypatch):
    """Each QMatMul engine in turn, where this CPU has it (AMX: Xeons of 2023 on; AVX-512 VNNI: Zen 4/5,
    Ice Lake on; AVX2: the rest)."""
    if request.param not in engines:
        pytest.skip(f"this CPU (or its OS) does not run the {request.param} engine (it runs {', '.join(engines)})")
    monkeypatch.setenv("CONFLAYERS_QMATMUL", request.param)
    return request.param


def test_the_fastest_engine_is_the_default(library, engines, monkeypatch):
    monkeypatch.delenv("CONFLAYERS_QMATMUL", raising=False)
    monkeypatch.delenv("CONFLAYERS_ATTENTION_ISA", raising=False)
    attention = "avx512" if "avx512" in engines or "amx" in engines else "avx2"   # AVX-512 F/DQ/VL come with VNNI
    assert kernels.cpu_path(library) == f"offsets:avx2 qmatmul:{engines[0]} attention:{attention}"
    monkeypatch.setenv("CONFLAYERS_ATTENTION_ISA", "avx2")
    assert kernels.cpu_path(library).endswith(" attention:avx2")
    assert engines[-1] == "scalar" and len(engines) >= 2       # the library needs AVX2: that engine is always here


def test_a_bad_engine_name_is_refused_with_the_choices(library, monkeypatch):
    monkeypatch.setenv("CONFLAYERS_QMATMUL", "avx9")
    assert kernels.cpu_path(library).startswith("error: CONFLAYERS_QMATMUL=avx9: expected amx, avx512, avx2, scalar, off")
    monkeypatch.setenv("CONFLAYERS_KERNELS", library)
    kernels.library.cache_clear()
    try:
        with pytest.raises(ValueError, match="CONFLAYERS_QMATMUL=avx9"):
            kernels.library()
    finally:
        kernels.library.cache_clear()


FORMS = [(4, 32, None), (4, 32, np.float32), (4, 32, np.float16), (8, 32, None), (8, 32, np.float32),
         (8, 32, np.float16), (8, 16, None)]       # bits, block, offsets: the compiler's QMatMul nodes


@pytest.mark.parametrize("bits,block,offsets_dtype", FORMS)
@pytest.mark.parametrize("k,n", [(64, 8), (576, 200), (96, 77), (1536, 40)])
@pytest.mark.parametrize("fp16_values", [False, True])
def test_qmatmul_matches_its_arithmetic_and_rows_are_independent(library, engine, bits, block, offsets_dtype, k, n,
                                                                 fp16_values):
    """Against a float64 emulation (same int8 activations, exact integer dot products), and every
    row of passes of 1-33 rows (one-row paths, AMX tiles of 16 rows and their tails, AVX2 chunks of
    4) equal to the row alone, bit for bit; weights fed as inputs (repacked per call) give the same
    bits."""
    w = _qweights(k, n, bits, offsets_dtype, seed=k + n + bits, fp16_values=fp16_values, block=block)
    const = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block), library)
    fed = _session(_qmatmul_graph(k, n, bits, offsets_dtype, block=block), library)
    for rows in (1, 2, 3, 9, 16, 17, 33):
        x = np.random.default_rng(rows).standard_normal((1, rows, k)).astype(np.float32)
        x[0, 0, :32] = 0.0                    # an all-zero block (scale 0)
        y = const.run(None, {"x": x})[0]
        ref = _qmatmul_reference(x, w, k, n, bits, block)
        assert np.max(np.abs(y[0] - ref)) <= 2e-6 * np.max(np.abs(ref)), f"{engine} bits={bits}/{block} k={k} n={n} rows={rows}"
        for i in range(rows):
            alone = const.run(None, {"x": x[:, i:i + 1]})[0]
            assert np.array_equal(alone[0, 0], y[0, i]), f"{engine}: row {i} of {rows} differs from the row alone"
        assert np.array_equal(fed.run(None, {"x": x, **w})[0], y)


@pytest.mark.parametrize("bits,block,offsets_dtype", FORMS)
def test_every_engine_gives_the_scalar_reference_bit_for_bit(library, engines, bits, block, offsets_dtype, monkeypatch):
    """The engines follow one arithmetic (qmatmul.h), so a bundle decodes to the same bits on an
    AMX Xeon and an AVX2-only CPU: each engine here equals the scalar one, value for value, on
    inputs with ties, zeros, large and tiny values and fp16-exact and inexact scales."""
    k, n = 1536, 72
    r = np.random.default_rng(bits)
    w = _qweights(k, n, bits, offsets_dtype, seed=7 + bits, block=block)
    w["scales"][: n // 2] = w["scales"][: n // 2].astype(np.float16).astype(np.float32)    # half fp16-exact
    x = r.standard_normal((1, 11, k)).astype(np.float32) * np.float32(3.0)
    x[0, 1] *= np.float32(1e-30)                                  # tiny values
    x[0, 2, :64] = 0.0                                            # zero blocks
    x[0, 3, :32] = np.arange(32) - np.float32(15.5)               # a block of ties: scale 127 / 127 = 1,
    x[0, 3, [0, 16]] = 127.0                                      #   every other value on .5
    x[0, 4, ::16] = np.float32(1e4)                               # one large value per block
    outs = {}
    for engine in engines:
        monkeypatch.setenv("CONFLAYERS_QMATMUL", engine)
        sess = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block), library)
        outs[engine] = [sess.run(None, {"x": x[:, :rows]})[0] for rows in (1, 2, 5, 11)]
    for engine in engines:
        for a, b in zip(outs[engine], outs["scalar"]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{engine} differs from the scalar engine"


def _layouts(library) -> dict[int, int]:
    """Stored code width -> matrices QMatMul holds repacked now (the library's own count)."""
    said = kernels.qmatmul_layouts(library)
    return {int(part.split("-bit:")[0]): int(part.split(":")[1].split("/")[0]) for part in said.split()}


@pytest.mark.parametrize("lo,span,planes", [(112, 32, 5), (128, 32, 5), (0, 32, 5), (96, 64, 6), (192, 64, 6),
                                            (100, 33, 6), (100, 65, 8)])
@pytest.mark.parametrize("offsets_dtype,gate", [(None, None), (np.float16, None), (np.float32, None), (None, "silu")])
def test_narrow_8bit_codes_in_planes_give_the_bytes_bits(library, engines, lo, span, planes, offsets_dtype, gate,
                                                         monkeypatch):
    """8-bit codes within 32 (64) values (GGUF's Q5_0 / Q5_1 / Q5_K; 64 values: a Q6_K-like span) are held in 5 (6) bits
    on the AVX-512 engine (qmatmul.h's planes): every pass of 1-17 rows then equals the codes held
    in bytes (CONFLAYERS_QMATMUL_PLANES=off) and the scalar engine bit for bit, and equals the
    float64 reference; 33 values need 6 bits and 65 all 8; padding columns (N = 72) stay out."""
    k, n = 640, 72 if gate is None else 96
    r = np.random.default_rng(lo + span)
    w = _qweights(k, n, 8, offsets_dtype, seed=lo + span, fp16_values=True)
    w["codes"] = (lo + r.integers(0, span, w["codes"].shape)).astype(np.uint8)
    w["codes"][0, 0, 0], w["codes"][-1, -1, -1] = lo, lo + span - 1       # both ends of the span
    x = r.standard_normal((1, 17, k)).astype(np.float32)
    x[0, 2, :32] = 0.0
    outs = {}
    for variant in ("planes", "bytes", "scalar"):
        monkeypatch.setenv("CONFLAYERS_QMATMUL", "scalar" if variant == "scalar" else engines[0])
        monkeypatch.setenv("CONFLAYERS_QMATMUL_PLANES", "off" if variant == "bytes" else "on")
        before = _layouts(library)
        sess = _session(_qmatmul_graph(k, n, 8, offsets_dtype, w, gate=gate), library)
        made = {bits: c - before.get(bits, 0) for bits, c in _layouts(library).items() if c != before.get(bits, 0)}
        if variant == "planes":
            assert made == {planes if engines[0] == "avx512" else 8: 1}, made     # only that engine reads planes
        outs[variant] = [sess.run(None, {"x": x[:, :rows]})[0] for rows in (1, 2, 3, 9, 17)]
        del sess
    ref = _qmatmul_reference(x, w, k, n, 8)
    if gate:
        ref = _gate_reference(ref, gate)
    assert np.max(np.abs(outs["planes"][-1][0] - ref)) <= 1e-5 * np.max(np.abs(ref))
    for a, b, c in zip(outs["planes"], outs["bytes"], outs["scalar"]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert np.array_equal(a.view(np.uint32), c.view(np.uint32))
    for rows, y in zip((1, 2, 3, 9, 17), outs["planes"]):
        assert np.array_equal(y[0], outs["planes"][-1][0, :rows]), f"rows of a {rows}-row pass differ from the 17-row pass"


def test_qmatmul_rejects_weights_that_do_not_match_its_shape(library, engines):
    k, n = 64, 8
    sess = _session(_qmatmul_graph(k, n, 4, None), library)
    w = _qweights(k, n, 4, None)
    w["scales"] = w["scales"][:4]
    with pytest.raises(Exception, match="codes or scales do not match K=64 and N=8"):
        sess.run(None, {"x": np.ones((1, 2, k), np.float32), **w})


# -- QMatMulGLU: the product and an MLP's gate in one node -------------------------------------------

def _gate_reference(y, gate):
    """act(gate) * up in float64 from the product y [.., 2F]."""
    alpha, beta = decoder_graph.GATE_ACTIVATIONS[gate]
    f = y.shape[-1] // 2
    g, u = y[..., :f], y[..., f:]
    with np.errstate(over="ignore"):          # exp of a far tail: inf, the gate 0
        return g / (1 + np.exp(-g * (alpha + beta * g * g))) * u


@pytest.mark.parametrize("bits,block,offsets_dtype", [(4, 32, np.float16), (4, 32, None), (8, 32, None), (8, 16, None)])
@pytest.mark.parametrize("gate", ["silu", "gelu_tanh"])
def test_qmatmul_glu_is_the_gated_product_and_rows_are_independent(library, engine, bits, block, offsets_dtype, gate):
    """QMatMulGLU = act(gate) * up of QMatMul's product (float64 reference), every row of a pass
    equal to the row alone bit for bit, and its ONNX function (where QMatMul is not registered)
    equal to rounding."""
    k, n = 576, 96
    w = _qweights(k, n, bits, offsets_dtype, seed=11 + bits, fp16_values=True, block=block)
    w["scales"] *= np.float32(8.0)                       # gates of a few units: the sigmoid's curve, both tails
    sess = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block, gate=gate), library)
    for rows in (1, 2, 3, 5, 9, 17):
        x = np.random.default_rng(rows).standard_normal((1, rows, k)).astype(np.float32)
        y = sess.run(None, {"x": x})[0]
        assert y.shape == (1, rows, n // 2)
        ref = _gate_reference(_qmatmul_reference(x, w, k, n, bits, block), gate)
        assert np.max(np.abs(y[0] - ref)) <= 1e-5 * np.max(np.abs(ref)), f"{engine} {gate} rows={rows}"
        for i in range(rows):
            assert np.array_equal(sess.run(None, {"x": x[:, i:i + 1]})[0][0, 0], y[0, i]), f"{engine}: row {i} of {rows}"
    os.environ["CONFLAYERS_QMATMUL"] = "off"             # (the engine fixture restores it)
    fn = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block, gate=gate), library)
    got = fn.run(None, {"x": x})[0]
    assert np.max(np.abs(got - y)) <= 1e-4 * np.max(np.abs(y))


@pytest.mark.parametrize("gate", ["silu", "gelu_tanh"])
def test_every_engine_gives_the_scalar_gate_bit_for_bit(library, engines, gate, monkeypatch):
    """The activation follows one float sequence in every engine (qmatmul.h's exp_fixed): gates
    from tiny to past the exponent's clamp (|z| > 88), both signs."""
    k, n = 64, 64
    w = _qweights(k, n, 8, None, seed=3)
    w["scales"][:] = np.geomspace(1e-6, 40.0, n).astype(np.float32)[:, None]     # column scales: tiny to huge
    x = np.random.default_rng(5).standard_normal((1, 7, k)).astype(np.float32)
    outs = {}
    for engine in engines:
        monkeypatch.setenv("CONFLAYERS_QMATMUL", engine)
        sess = _session(_qmatmul_graph(k, n, 8, None, w, gate=gate), library)
        outs[engine] = [sess.run(None, {"x": x[:, :rows]})[0] for rows in (1, 2, 7)]
    assert np.isfinite(outs["scalar"][-1]).all()
    for engine in engines:
        for a, b in zip(outs[engine], outs["scalar"]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{engine} differs from the scalar engine"


def test_qmatmul_glu_refuses_a_gate_width_off_its_groups(library, engines):
    w = _qweights(64, 48, 8, None)
    with pytest.raises(Exception, match="N .gate and up, packed. must be a multiple of 32"):
        _session(_qmatmul_graph(64, 48, 8, None, w, gate="silu"), library)


# -- QMatMulNorm: a layer's residual add and RMSNorm in the node that reads the norm ------------------

@pytest.mark.parametrize("bits,block,offsets_dtype", [(4, 32, np.float16), (8, 32, None), (8, 16, None)])
@pytest.mark.parametrize("gate", [None, "silu"])
def test_qmatmul_norm_is_the_product_of_the_normed_sum_and_rows_are_independent(library, engine, bits, block,
                                                                                  offsets_dtype, gate):
    """QMatMulNorm*(x, delta, w, ...) = (QMatMul*(rmsnorm(x + delta) * w), x + delta): the total
    exactly x + delta, the product against a float64 reference, every row of a pass equal to the
    row alone bit for bit, and the ONNX function (SkipSimplifiedLayerNormalization first) equal to
    rounding."""
    k, n = 576, 96
    w = _qweights(k, n, bits, offsets_dtype, seed=5 + bits, fp16_values=True, block=block)
    sess = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block, gate=gate, norm=True), library)
    r = np.random.default_rng(2)
    nw = (1 + 0.1 * r.standard_normal(k)).astype(np.float32)
    for rows in (1, 2, 5, 9):
        x = r.standard_normal((1, rows, k)).astype(np.float32) * np.float32(4)
        delta = r.standard_normal((1, rows, k)).astype(np.float32)
        y, total = sess.run(None, {"x": x, "delta": delta, "norm_weight": nw})
        assert np.array_equal(total, x + delta)
        t = total.astype(np.float64)
        h = (t / np.sqrt((t ** 2).mean(-1, keepdims=True) + 1e-5) * nw).astype(np.float32)
        ref = _qmatmul_reference(h, w, k, n, bits, block)
        ref = _gate_reference(ref, gate) if gate else ref
        # h's last bits may round the other way than float64's and move an int8 code by one
        assert np.max(np.abs(y[0] - ref)) <= 2e-2 * np.max(np.abs(ref)), f"{engine} rows={rows}"
        for i in range(rows):
            alone = sess.run(None, {"x": x[:, i:i + 1], "delta": delta[:, i:i + 1], "norm_weight": nw})
            assert np.array_equal(alone[0][0, 0], y[0, i]) and np.array_equal(alone[1][0, 0], total[0, i])
    os.environ["CONFLAYERS_QMATMUL"] = "off"             # (the engine fixture restores it)
    fn = _session(_qmatmul_graph(k, n, bits, offsets_dtype, w, block=block, gate=gate, norm=True), library)
    got, got_total = fn.run(None, {"x": x, "delta": delta, "norm_weight": nw})
    assert np.array_equal(got_total, total)
    assert np.max(np.abs(got - y)) <= 2e-2 * np.max(np.abs(y))


def test_qmatmul_norm_refuses_a_delta_of_another_shape(library, engines):
    w = _qweights(64, 32, 8, None)
    sess = _session(_qmatmul_graph(64, 32, 8, None, w, norm=True), library)
    x = np.ones((1, 2, 64), np.float32)
    with pytest.raises(Exception, match="delta must have x's shape"):
        sess.run(None, {"x": x, "delta": x[:, :1], "norm_weight": np.ones(64, np.float32)})


# -- QMatMulScreened: the head's greedy token from its top 6 bits (qmatmul.h, head.py) ----------------

def _screened_graph(k: int, n: int, w: dict, norm: bool, screened: bool):
    """logits = QMatMul[Norm][Screened](x[, delta, norm_weight], codes, scales[, full_logits])."""
    op = ("QMatMulNorm" if norm else "QMatMul") + ("Screened" if screened else "")
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])]
    names = ["x"]
    if norm:
        ins += [helper.make_tensor_value_info("delta", TensorProto.FLOAT, [1, "S", k])]
        names += ["delta", "norm_weight"]
    names += ["codes", "scales"]
    if screened:
        ins.append(helper.make_tensor_value_info("full_logits", TensorProto.INT64, [1]))
        names.append("full_logits")
    inits = [onnx.numpy_helper.from_array(w["codes"], "codes"), onnx.numpy_helper.from_array(w["scales"], "scales")]
    if norm:
        inits.append(onnx.numpy_helper.from_array(w["norm_weight"], "norm_weight"))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", n])]
    if norm:
        outs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, "S", k]))
    extra = {"epsilon": 1e-5} if norm else {}
    node = helper.make_node(op, names, [o.name for o in outs], domain=kernels.DOMAIN, K=k, N=n, bits=8, block_size=32, **extra)
    g = helper.make_graph([node], "t", ins, outs, inits)
    m = helper.make_model(g, opset_imports=list(decoder_graph.OPSET) + [helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 10
    return m


def _head_weights(k: int, n: int, seed: int):
    """An 8-bit head like a GGUF Q8_0 one (codes roughly normal around 128, fp16 scales) with traps
    for the screening: column groups that differ from column 0 only in their codes' low 2 bits (the
    part screening does not read), a column repeated (a tie: the first must win), a zero column."""
    r = np.random.default_rng(seed)
    nb = k // 32
    codes = np.clip(np.rint(r.standard_normal((n, nb, 32)) * 40 + 128), 0, 255).astype(np.uint8)
    scales = (r.random((n, nb)) * 0.004 + 5e-4).astype(np.float16).astype(np.float32)
    for c in range(40, 40 + 48):                  # 3 groups of near-twins of column 0
        codes[c] = (codes[0] & 0xFC) | r.integers(0, 4, codes[0].shape, dtype=np.uint8)
        scales[c] = scales[0]
    codes[200], scales[200] = codes[7], scales[7]      # column 200 == column 7
    codes[300], scales[300] = 128, scales[300]          # all-zero weights
    if n > 600:     # column 600 leads 520 in its top bits but trails it exactly (bound too small: 600 wins)
        codes[520, 0, :2] = (codes[520, 0, :2] & 0xF8) | 3          # low bits 3 (top bits < 63)
        codes[600], scales[600] = codes[520], scales[520]
        codes[600, 0, 0] += 1                                        # top bits + 1, low bits 0: +1
        codes[600, 0, 1] -= 3                                        # low bits 0: -3
    return {"codes": codes, "scales": scales, "norm_weight": (1 + 0.1 * r.standard_normal(k)).astype(np.float32)}


@pytest.mark.parametrize("norm", [False, True])
def test_screened_head_gives_the_plain_heads_argmax_and_its_exact_logits(library, engines, norm, monkeypatch):
    """On every pass of 1-17 rows: each row's argmax is the plain op's (first index on ties), its
    finite logits are the plain op's bit for bit, and the row does not depend on the pass; with
    full_logits 1 the output is the plain op's whole. On the AVX-512 engine the screening leaves
    most columns -inf; elsewhere every column is computed. Rows include zeros (every logit ties),
    tiny and huge values, and hidden states aimed at the near-twin columns."""
    k, n = 576, 1000                                # 62.5 groups of 16: a partial last group
    w = _head_weights(k, n, seed=5)
    monkeypatch.setenv("CONFLAYERS_QMATMUL", engines[0])
    plain = _session(_screened_graph(k, n, w, norm, False), library)
    screened = _session(_screened_graph(k, n, w, norm, True), library)
    r = np.random.default_rng(9)
    x = r.standard_normal((1, 17, k)).astype(np.float32)
    w0 = ((w["codes"][0].astype(np.float32) - 128) * w["scales"][0][:, None]).reshape(-1)
    x[0, 1] = w0 / np.linalg.norm(w0) * 30          # points at column 0 and its near-twins
    x[0, 2] = 0.0                                   # every logit 0: all tie, column 0 wins
    x[0, 3] *= np.float32(1e-30)
    x[0, 4] *= np.float32(1e4)
    w7 = ((w["codes"][7].astype(np.float32) - 128) * w["scales"][7][:, None]).reshape(-1)
    x[0, 5] = w7                                    # column 7 and its twin 200: 7 must win
    w520 = ((w["codes"][520].astype(np.float32) - 128) * w["scales"][520][:, None]).reshape(-1)
    x[0, 6] = w520 / np.linalg.norm(w520) * 30
    x[0, 6, :2] = np.abs(x[0, 6, :32]).max() * 1.01      # both at 127 once quantized
    delta = r.standard_normal((1, 17, k)).astype(np.float32) * 0.1
    if norm:
        x[0, 2] = -delta[0, 2]                      # the sum is zero: the norm of zeros
        delta[0, 6] = 0.0

    def feed(rows, full=None):
        f = {"x": x[:, :rows]}
        if norm:
            f["delta"] = delta[:, :rows]
        if full is not None:
            f["full_logits"] = np.array([full], np.int64)
        return f

    kept = []
    whole = screened.run(None, feed(17, 0))[0][0]
    for rows in (1, 2, 3, 5, 9, 16, 17):
        ref = plain.run(None, feed(rows))[0][0]
        got = screened.run(None, feed(rows, 0))[0][0]
        assert np.array_equal(got.argmax(-1), ref.argmax(-1)), f"rows={rows}"
        fin = np.isfinite(got)
        assert np.array_equal(got[fin].view(np.uint32), ref[fin].view(np.uint32))
        assert np.array_equal(got.view(np.uint32), whole[:rows].view(np.uint32)), f"rows={rows}: a row depends on the pass"
        assert np.array_equal(screened.run(None, feed(rows, 1))[0][0].view(np.uint32), ref.view(np.uint32))
        if norm:
            assert np.array_equal(screened.run(None, feed(rows, 0))[1], plain.run(None, feed(rows))[1])
        kept.append(fin.sum(-1))
    assert whole[2].argmax() == 0 and whole[5].argmax() == 7
    if not norm:
        assert whole[6].argmax() == 520 and plain.run(None, feed(17))[0][0][6].argsort()[-2] == 600
    ref1 = plain.run(None, feed(17))[0][0][1]
    assert ref1.argmax() in range(40, 88) or ref1.argmax() == 0          # the trap did aim there
    kept = np.concatenate(kept)
    if engines[0] == "avx512":
        assert np.isinf(whole[0]).any() and np.median(kept) < n / 2, kept        # it did screen
        assert kept.max() == n                                                   # the tie row kept all
    else:
        assert (kept == n).all()


def test_screened_head_needs_its_full_logits_input_and_8_bits(library, engines):
    k, n = 64, 320
    w = _head_weights(k, n, seed=1)
    sess = _session(_screened_graph(k, n, w, False, True), library)
    with pytest.raises(Exception, match="full_logits"):      # (ONNX Runtime checks its shape [1] first)
        sess.run(None, {"x": np.ones((1, 2, k), np.float32), "full_logits": np.zeros(2, np.int64)})
    four = _screened_graph(k, n, {**w, "codes": w["codes"][..., :16]}, False, True)
    next(a for a in four.graph.node[0].attribute if a.name == "bits").i = 4
    with pytest.raises(Exception, match="QMatMulScreened: needs an 8-bit head"):
        _session(four, library)
