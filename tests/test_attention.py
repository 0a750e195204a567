"""SlotAttention, the kernel library's attention (kernels/attention.cc, attention.py): against a
float64 reference, the property the runtime relies on (a row's result and the KV it writes do not
depend on the pass it is in: alone, with more rows, or packed with other sequences' segments),
and the graph rewrite against ONNX Runtime's GroupQueryAttention."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conflayers.runtime import attention, kernels, ort_backend


@pytest.fixture(scope="module")
def library(kernel_library):
    if "attention:" not in kernels.cpu_path(kernel_library):
        pytest.skip("this build of the kernel library has no SlotAttention")
    return kernel_library


class Shape:
    def __init__(self, heads, kv_heads, h, half, window=-1, packed=True, slots=1, length=40):
        self.heads, self.kv_heads, self.h, self.half = heads, kv_heads, h, half
        self.window, self.packed, self.slots, self.length = window, packed, slots, length


SHAPES = {
    "smollm2": Shape(9, 3, 64, 32),
    "gemma-local": Shape(4, 1, 256, 128, window=5, packed=False),
    "partial-rotary": Shape(4, 2, 16, 4, slots=3),
    "no-rotary": Shape(2, 2, 8, 0, slots=2),
}


def _session(s: Shape, lib: str, segments: bool, half: bool = False):
    """A one-node session: SlotAttention, or SlotAttentionF16 over half caches (`half`)."""
    vi = helper.make_tensor_value_info
    kv = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    width = (s.heads + 2 * s.kv_heads) * s.h if s.packed else s.heads * s.h
    ins = [vi("q", TensorProto.FLOAT, [1, "T", width])]
    if not s.packed:
        ins += [vi("k", TensorProto.FLOAT, [1, "T", s.kv_heads * s.h]), vi("v", TensorProto.FLOAT, [1, "T", s.kv_heads * s.h])]
    cache = [s.slots, s.kv_heads, s.length, s.h]
    ins += [vi("past_key", kv, cache), vi("past_value", kv, cache),
            vi("seqlens", TensorProto.INT32, ["N"]), vi("cos", TensorProto.FLOAT, ["P", max(s.half, 1)]),
            vi("sin", TensorProto.FLOAT, ["P", max(s.half, 1)])]
    names = ["q", "" if s.packed else "k", "" if s.packed else "v", "past_key", "past_value", "seqlens", "cos", "sin"]
    if segments:
        ins += [vi("seg_lens", TensorProto.INT64, ["N"]), vi("slots", TensorProto.INT64, ["N"])]
        names += ["seg_lens", "slots"]
    node = helper.make_node(attention.OP_F16 if half else attention.OP, names, ["out", "present_key", "present_value"], domain=kernels.DOMAIN,
                            num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.h) ** -0.5,
                            local_window_size=s.window, do_rotary=int(s.half > 0))
    outs = [vi("out", TensorProto.FLOAT, [1, "T", s.heads * s.h]), vi("present_key", kv, cache),
            vi("present_value", kv, cache)]
    m = helper.make_model(helper.make_graph([node], "t", ins, outs),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    if ort_backend._global_pool:
        so.use_per_session_threads = False
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _tables(s: Shape):
    half = max(s.half, 1)
    angle = np.arange(s.length + 8)[:, None] * (10000.0 ** (-np.arange(half) / half))
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _rows(s: Shape, n: int, seed: int):
    r = np.random.default_rng(seed)
    q = r.standard_normal((n, s.heads, s.h)).astype(np.float32)
    k = r.standard_normal((n, s.kv_heads, s.h)).astype(np.float32)
    v = r.standard_normal((n, s.kv_heads, s.h)).astype(np.float32)
    return q, k, v


def _run(sess, s: Shape, cache, segs, with_segments=True):
    """segs: [(slot, past, (q, k, v) rows)]; runs one pass over all segments, the caches
    (k, v arrays [slots, ...]) updated in place through IOBinding. Returns the output rows."""
    q = np.concatenate([x[0] for _, _, x in segs]).reshape(1, -1, s.heads * s.h)
    k = np.concatenate([x[1] for _, _, x in segs]).reshape(1, -1, s.kv_heads * s.h)
    v = np.concatenate([x[2] for _, _, x in segs]).reshape(1, -1, s.kv_heads * s.h)
    b = sess.io_binding()
    if s.packed:
        b.bind_cpu_input("q", np.concatenate([q, k, v], axis=-1))
    else:
        for name, x in (("q", q), ("k", k), ("v", v)):
            b.bind_cpu_input(name, x)
    for name, arr in (("key", cache[0]), ("value", cache[1])):
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        b.bind_ortvalue_input(f"past_{name}", value)
        b.bind_ortvalue_output(f"present_{name}", value)
    b.bind_cpu_input("seqlens", np.array([past + len(x[0]) - 1 for _, past, x in segs], np.int32))
    cos, sin = _tables(s)
    b.bind_cpu_input("cos", cos)
    b.bind_cpu_input("sin", sin)
    if with_segments:
        b.bind_cpu_input("seg_lens", np.array([len(x[0]) for _, _, x in segs], np.int64))
        b.bind_cpu_input("slots", np.array([slot for slot, _, _ in segs], np.int64))
    b.bind_output("out", "cpu")
    sess.run_with_iobinding(b)
    return b.get_outputs()[-1].numpy()[0]      # "out": bound last


def _rotate(x, pos, s: Shape):
    if not s.half:
        return x.astype(np.float64)
    cos, sin = (t.astype(np.float64) for t in _tables(s))
    y = x.astype(np.float64).copy()
    a, b = x[..., :s.half].astype(np.float64), x[..., s.half:2 * s.half].astype(np.float64)
    c, d = cos[pos][:, None, :], sin[pos][:, None, :]
    y[..., :s.half], y[..., s.half:2 * s.half] = a * c - b * d, b * c + a * d
    return y


def _reference(s: Shape, cache, segs):
    """float64: each segment's rows written (rotated keys) into its slot, then causal attention
    (the last `window` positions where local, as ONNX Runtime's GroupQueryAttention and a
    Hugging Face sliding window) for every row and head."""
    k_all, v_all = cache[0].astype(np.float64), cache[1].astype(np.float64)
    outs = []
    for slot, past, (q, k, v) in segs:
        pos = np.arange(past, past + len(q))
        k_all[slot][:, pos] = _rotate(k, pos, s).transpose(1, 0, 2)
        v_all[slot][:, pos] = v.astype(np.float64).transpose(1, 0, 2)
        qr = _rotate(q, pos, s)
        out = np.zeros((len(q), s.heads, s.h))
        for r, p in enumerate(pos):
            lo = max(0, p - s.window + 1) if s.window > 0 else 0
            for hd in range(s.heads):
                j = hd // (s.heads // s.kv_heads)
                scores = k_all[slot, j, lo:p + 1] @ qr[r, hd] * float(s.h) ** -0.5
                w = np.exp(scores - scores.max())
                out[r, hd] = (w / w.sum()) @ v_all[slot, j, lo:p + 1]
        outs.append(out.reshape(len(q), -1))
    return np.concatenate(outs), k_all, v_all


def _cache(s: Shape, seed=7, half=False):
    r = np.random.default_rng(seed)
    shape = (s.slots, s.kv_heads, s.length, s.h)
    dtype = np.float16 if half else np.float32
    return [r.standard_normal(shape).astype(dtype), r.standard_normal(shape).astype(dtype)]


@pytest.mark.parametrize("name", SHAPES)
def test_slot_attention_matches_a_float64_reference(library, name):
    s = SHAPES[name]
    sess = _session(s, library, segments=True)
    cache = _cache(s)
    plan = [(s.slots - 1, 0, 6), (0, 9, 1), (s.slots - 1 if s.slots > 1 else 0, 20, 3)] if s.slots > 1 else [(0, 12, 7)]
    segs = [(slot, past, _rows(s, n, seed)) for seed, (slot, past, n) in enumerate(plan)]
    if s.slots == 1:
        segs = segs[:1]
    want, k_ref, v_ref = _reference(s, [c.copy() for c in cache], segs)
    got = _run(sess, s, cache, segs)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(cache[0], k_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[1], v_ref.astype(np.float32))


@pytest.mark.parametrize("half", [False, True], ids=["float", "half"])
@pytest.mark.parametrize("name", SHAPES)
def test_each_row_is_bit_identical_however_the_pass_is_made(library, name, half):
    """A prefill of 11 rows, the same rows fed one at a time, in chunks, and packed with another
    slot's segment: every output row and every KV row written are bit-identical (float and
    half caches)."""
    s = SHAPES[name]
    rows = _rows(s, 11, seed=3)
    cut = lambda a, b: tuple(x[a:b] for x in rows)          # noqa: E731
    alone = _session(s, library, segments=False, half=half)
    packed = _session(s, library, segments=True, half=half)
    base = _cache(s, half=half)

    whole_cache = [c.copy() for c in base]
    whole = _run(alone, s, whole_cache, [(0, 4, rows)], with_segments=False)
    one_cache = [c.copy() for c in base]
    ones = np.concatenate([_run(alone, s, one_cache, [(0, 4 + i, cut(i, i + 1))], with_segments=False)
                           for i in range(11)])
    chunk_cache = [c.copy() for c in base]
    chunks = np.concatenate([_run(packed, s, chunk_cache, [(0, 4 + a, cut(a, b))]) for a, b in ((0, 2), (2, 9), (9, 11))])
    mixed_cache = [c.copy() for c in base]
    other = s.slots - 1
    if other:
        first = _run(packed, s, mixed_cache, [(other, 1, _rows(s, 5, 9)), (0, 4, cut(0, 3))])[5:]
    else:
        first = _run(packed, s, mixed_cache, [(0, 4, cut(0, 3))])
    rest = _run(packed, s, mixed_cache, [(0, 7, cut(3, 11))] + ([(other, 6, _rows(s, 2, 10))] if other else []))[:8]
    mixed = np.concatenate([first, rest])
    for label, got, cache in (("one at a time", ones, one_cache), ("chunks", chunks, chunk_cache),
                              ("packed with another slot", mixed, mixed_cache)):
        assert np.array_equal(got, whole), f"{label}: rows differ from the 11-row pass"
        for c, w in zip(cache, whole_cache):
            assert np.array_equal(c[0, :, :15], w[0, :, :15]), f"{label}: the KV written differs"


def _has_avx512() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx512f", "avx512dq", "avx512vl"))


WIDE_SHAPES = {**SHAPES,
               "smollm2-long": Shape(9, 3, 64, 32, length=300, slots=2),        # several 64-position tiles
               "gemma-long-window": Shape(4, 1, 256, 128, window=37, packed=False, length=300),
               "odd-group": Shape(6, 2, 32, 16, window=9, length=120)}


@pytest.mark.parametrize("half", [False, True], ids=["float", "half"])
@pytest.mark.parametrize("name", WIDE_SHAPES)
def test_the_avx512_path_gives_the_avx2_paths_bits(library, name, half, monkeypatch):
    """CONFLAYERS_ATTENTION_ISA=avx2 against avx512 (two queries per instruction): every output
    and KV row bit-identical, over one-row steps, verifies, prompt chunks and packed segments,
    windows that give a pair of queries different positions, and pasts of several tiles."""
    if not _has_avx512():
        pytest.skip("this CPU has no AVX-512 F/DQ/VL: only the AVX2 path runs here")
    s = WIDE_SHAPES[name]
    last = s.length - 12
    plans = [[(0, last, 1)], [(0, last - 3, 9)], [(0, 2, 11)], [(0, last // 2, 4)]]
    if s.slots > 1:
        plans.append([(1, last - 20, 3), (0, 5, 1)])
    outs = {}
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv("CONFLAYERS_ATTENTION_ISA", isa)
        sess = _session(s, library, segments=True, half=half)
        cache = _cache(s, seed=11, half=half)
        got = [_run(sess, s, cache, [(slot, past, _rows(s, n, 100 * i + j)) for j, (slot, past, n) in enumerate(plan)])
               for i, plan in enumerate(plans)]
        outs[isa] = (got, cache)
    for i, (a, b) in enumerate(zip(outs["avx2"][0], outs["avx512"][0])):
        assert np.array_equal(a, b), f"pass {plans[i]}: outputs differ between the AVX2 and AVX-512 paths"
    for a, b in zip(outs["avx2"][1], outs["avx512"][1]):
        assert np.array_equal(a, b), "the KV written differs between the AVX2 and AVX-512 paths"
    monkeypatch.setenv("CONFLAYERS_ATTENTION_ISA", "avx-1024")
    with pytest.raises(Exception, match="CONFLAYERS_ATTENTION_ISA=avx-1024: expected avx512, avx2 or auto"):
        _session(s, library, segments=True)


@pytest.mark.parametrize("name", SHAPES)
def test_a_half_cache_is_the_float_computation_on_rounded_keys_and_values(library, name):
    """SlotAttentionF16 rounds each new key (after rotary) and value to half once, when it writes
    it, and computes as SlotAttention does on the rounded values: against a float64 reference on
    the rounded KV, and, with no rotary to round after, bit for bit against SlotAttention fed
    keys and values that are already halves."""
    s = SHAPES[name]
    plan = [(s.slots - 1, 0, 6), (0, 9, 1)] if s.slots > 1 else [(0, 12, 7)]
    segs = [(slot, past, _rows(s, n, seed)) for seed, (slot, past, n) in enumerate(plan)]
    cache = _cache(s, half=True)
    got = _run(_session(s, library, segments=True, half=True), s, cache, segs)
    # the reference's cache, as written: the rotated keys and the values rounded to half
    _, k_ref, v_ref = _reference(s, [c.astype(np.float32) for c in cache], segs)
    np.testing.assert_allclose(cache[0], k_ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(cache[1], v_ref.astype(np.float16))
    outs, at = [], 0
    for slot, past, (q, _, _) in segs:       # attention over the cache as written, in float64
        for r in range(len(q)):
            p = past + r
            lo = max(0, p - s.window + 1) if s.window > 0 else 0
            qr = _rotate(q[r:r + 1], np.array([p]), s)[0]
            for hd in range(s.heads):
                j = hd // (s.heads // s.kv_heads)
                sc = cache[0][slot, j, lo:p + 1].astype(np.float64) @ qr[hd] * float(s.h) ** -0.5
                w = np.exp(sc - sc.max())
                outs.append((w / w.sum()) @ cache[1][slot, j, lo:p + 1].astype(np.float64))
    np.testing.assert_allclose(got.reshape(-1, s.h), np.array(outs), rtol=2e-5, atol=2e-5)
    if s.half:
        return
    halves = [(slot, past, (q, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)))
              for slot, past, (q, k, v) in segs]
    floats = [c.astype(np.float32) for c in _cache(s, half=True)]
    want = _run(_session(s, library, segments=True), s, floats, halves)
    assert np.array_equal(got, want), "the half cache's outputs are not the float path's on halves"


def test_bad_segments_are_refused_with_a_clear_error(library):
    s = SHAPES["partial-rotary"]
    sess = _session(s, library, segments=True)
    with pytest.raises(Exception, match="does not fit the KV cache"):
        _run(sess, s, _cache(s), [(5, 0, _rows(s, 2, 0))])          # no slot 5
    with pytest.raises(Exception, match="does not fit the KV cache"):
        _run(sess, s, _cache(s), [(0, s.length - 1, _rows(s, 2, 0))])


def test_full_graph_rewrite_follows_group_query_attention(library, tiny_bundle, monkeypatch):
    """The tiny bundle's (padded) full graph and draft body with SlotAttention give
    GroupQueryAttention's logits and hidden states to rounding, prefill and decode steps."""
    from conflayers.runtime.bundle import Bundle
    from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
    b = Bundle.open(tiny_bundle, verify=False)
    model = onnx.load(b.full_graph, load_external_data=False)
    assert attention.rewrite(model, b.full_graph)
    ops = {n.op_type for n in model.graph.node}
    assert attention.OP in ops and "GroupQueryAttention" not in ops and "Pad" not in ops
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 20)]
    got = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("CONFLAYERS_ATTENTION", mode)
        run = GraphRunner(create_session(b.full_graph, ["CPUExecutionProvider"]), list(range(b.spec.num_layers)),
                          "logits").bind(KVCache(b.spec, 64))
        prefill = run.run(ids[:17], 0)
        steps = [run.run([t], 17 + i)[0] for i, t in enumerate(ids[17:])]
        got[mode] = np.concatenate([prefill, np.stack(steps)])
    np.testing.assert_allclose(got["on"], got["off"], rtol=1e-4, atol=1e-4)


def test_uncovered_attention_keeps_group_query_attention(tiny_bundle):
    from conflayers.runtime.bundle import Bundle
    b = Bundle.open(tiny_bundle, verify=False)
    model = onnx.load(b.full_graph, load_external_data=False)
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    next(a for a in gqa.attribute if a.name == "rotary_interleaved").i = 1
    before = model.SerializeToString()
    assert not attention.rewrite(model, b.full_graph)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("rows, past", [(1, 9), (6, 2), (5, 0)])
def test_slot_attention_follows_group_query_attention(library, window, rows, past):
    """One node each, the same inputs: ONNX Runtime's GroupQueryAttention (its local window
    included) and SlotAttention agree to rounding, outputs and the KV they write."""
    s = Shape(4, 2, 16, 8, window=window, length=24)
    vi = helper.make_tensor_value_info
    width = (s.heads + 2 * s.kv_heads) * s.h
    cache = [1, s.kv_heads, s.length, s.h]
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "past_key", "past_value", "seqlens", "total", "cos", "sin"],
                            ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=s.heads,
                            kv_num_heads=s.kv_heads, scale=float(s.h) ** -0.5, local_window_size=window, do_rotary=1)
    ins = [vi("q", TensorProto.FLOAT, [1, "T", width]), vi("past_key", TensorProto.FLOAT, cache),
           vi("past_value", TensorProto.FLOAT, cache), vi("seqlens", TensorProto.INT32, [1]),
           vi("total", TensorProto.INT32, []), vi("cos", TensorProto.FLOAT, ["P", s.half]), vi("sin", TensorProto.FLOAT, ["P", s.half])]
    outs = [vi("out", TensorProto.FLOAT, [1, "T", s.heads * s.h]), vi("present_key", TensorProto.FLOAT, cache),
            vi("present_value", TensorProto.FLOAT, cache)]
    m = helper.make_model(helper.make_graph([node], "t", ins, outs),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    if ort_backend._global_pool:
        so.use_per_session_threads = False
    gqa = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    q, k, v = _rows(s, rows, seed=5)
    base = _cache(s)
    cos, sin = _tables(s)
    qkv = np.concatenate([q.reshape(1, rows, -1), k.reshape(1, rows, -1), v.reshape(1, rows, -1)], axis=-1)
    want = gqa.run(None, {"q": qkv, "past_key": base[0].copy(), "past_value": base[1].copy(),
                          "seqlens": np.array([past + rows - 1], np.int32), "total": np.array(past + rows, np.int32),
                          "cos": cos, "sin": sin})
    mine = [c.copy() for c in base]
    got = _run(_session(s, library, segments=False), s, mine, [(0, past, (q, k, v))], with_segments=False)
    np.testing.assert_allclose(got, want[0][0], rtol=1e-5, atol=1e-5)
    end = past + rows
    np.testing.assert_allclose(mine[0][:, :, :end], want[1][:, :, :end], rtol=1e-6, atol=1e-6)
