"""Every pass shape computes each row of the full graph bit for bit alike, on every CPU kernel path,
and the runtime checks it where a bundle is served (runtime/contract.py, runtime/exactness.py).

The AVX2 kernel path is exercised on any x86-64 machine by running the check under QEMU's user
mode emulating a Haswell CPU (AVX2 + FMA, no AVX-512): the kernel library's QMatMul runs its AVX2
engine there (exact unpadded), and without the library ONNX Runtime's MLAS dispatches to its AVX2
kernels, whose one-row MatMulNBits differs from the multi-row one (exact padded). tools/test.sh installs
qemu-user where it can (CI does)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conflayers.runtime import Engine, contract, exactness
from conflayers.runtime.bundle import sha256_file

import tiny
from rowcheck import ROWS, rows_by_pass_width

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def native_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    from conflayers.compiler.export import weights
    out = str(tmp_path_factory.mktemp("exact") / "tiny-Q4_1")
    inline, weights.INLINE_BELOW = weights.INLINE_BELOW, 0
    try:
        return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, target="native", gguf_type="Q4_1",
                                profiles=[lambda ident: tiny.profile_json("native_all", ident, "native", k=8)])
    finally:
        weights.INLINE_BELOW = inline


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFLAYERS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_padding_never_sends_a_row_through_a_one_row_product():
    for n in range(1, 400):
        for pad in (contract.PAD_SINGLE, contract.PAD_EVERY):
            r = pad.rows(n)
            base = n + 1 if pad.every or n == 1 else n        # the padding row, then the 128 j + 1 rule
            assert r == base + contract.single_row(base) and r >= 2 and not contract.single_row(r)
            head = pad.head_from(n - 1, r)                    # a prefill's last row
            assert head <= n - 1 and r - head >= 2 and not contract.single_row(r - head)
        assert contract.SINGLE_ROW_OK.rows(n) == n + (n > 1 and contract.single_row(n))
    assert [contract.PAD_SINGLE.rows(n) for n in (1, 2, 9, 128, 129, 257)] == [2, 2, 9, 128, 130, 258]
    assert [contract.PAD_EVERY.rows(n) for n in (1, 2, 9, 127, 128)] == [2, 3, 10, 128, 130]


def test_packed_passes_are_padded_as_solo_passes():
    from conflayers.runtime.packing import _pad_segments
    segs = [([5], 10), ([7, 8, 9], 4), ([4], 0)]
    out, rows = _pad_segments(segs, [0, 1, 2, 3, 4], contract.PAD_SINGLE)
    assert [t for t, _ in out] == [[5, 5], [7, 8, 9], [4, 4]] and [s for _, s in out] == [10, 4, 0]
    flat = [t for t, _ in out for t in t]
    assert [flat[r] for r in rows] == [5, 7, 8, 9, 4]
    out, rows = _pad_segments(segs, [0, 1, 2, 3, 4], contract.PAD_EVERY)
    assert [len(t) for t, _ in out] == [2, 4, 2] and rows == [0, 2, 3, 4, 6]
    # 128 j + 1 rows in all: the longest segment gets one more row
    segs = [(list(range(127)), 0), ([1, 2], 5)]
    out, rows = _pad_segments(segs, [0, 127, 128], contract.SINGLE_ROW_OK)
    assert [len(t) for t, _ in out] == [128, 2] and rows == [0, 128, 129]
    assert out[0][0][-2:] == [126, 126]
    out, rows = _pad_segments([([1, 2], 5), ([3], 0)], [0, 1, 2], contract.SINGLE_ROW_OK)
    assert [t for t, _ in out] == [[1, 2], [3]] and rows == [0, 1, 2]


def test_native_rows_are_bit_identical_at_1_2_3_and_9_rows(native_bundle, own_cache):
    engine = Engine.load(native_bundle, guard=False, adapt=False)
    assert engine.exactness.exact
    ids = list(range(5, 60))
    got = rows_by_pass_width(engine.full, engine.spec, ids)
    for n in ROWS[1:]:
        assert np.array_equal(got[n], got[1]), f"a {n}-row pass differs from 1-row steps"
    # and so under each padding that is exact by construction
    for pad in (contract.PAD_SINGLE, contract.PAD_EVERY):
        engine.full.padding = pad
        got = rows_by_pass_width(engine.full, engine.spec, ids)
        assert all(np.array_equal(got[n], got[1]) for n in ROWS)


AVX2_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, {here!r})
from rowcheck import rows_by_pass_width, ROWS
from conflayers.runtime import contract, exactness
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, create_session
b = Bundle.open({bundle!r}, verify=False)
full = GraphRunner(create_session(b.full_graph, ["CPUExecutionProvider"]), list(range(b.spec.num_layers)), "logits")
from conflayers.runtime import kernels
out = {{"kernels": exactness.kernel_path(), "conflayers_kernels": kernels.describe()}}
ids = list(range(5, 60))
for pad in (contract.SINGLE_ROW_OK, contract.PAD_SINGLE):
    full.padding = pad
    got = rows_by_pass_width(full, b.spec, ids)
    out[pad.name] = {{n: float(np.abs(got[n] - got[1]).max()) for n in ROWS}}
out["choose"] = exactness.choose(full, b.spec, [2, 3, 9], None, 40).to_json()
print("RESULT " + json.dumps(out))
"""


def _as_haswell(bundle: str, **env) -> dict:
    """AVX2_SCRIPT's result under QEMU emulating a Haswell CPU (AVX2 + FMA + F16C, no AVX-512)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or os.uname().machine != "x86_64":
        pytest.skip("qemu-x86_64 (Debian qemu-user) is needed to emulate an AVX2-only CPU; tools/test.sh installs it")
    script = AVX2_SCRIPT.format(here=HERE, bundle=bundle)
    proc = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "CONFLAYERS_THREADS": "1", **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["kernels"] == "x86_64 avx2"
    return out


def test_avx2_cpu_is_exact_unpadded_with_the_kernel_library(native_bundle):
    """Under an emulated AVX2-only CPU the kernel library's QMatMul (its AVX2 engine) computes every
    4-bit product: one-token passes as they come equal every row of 2-9-row passes, and the load
    check picks no padding (exact by construction, not by the CPU's luck)."""
    from conflayers.runtime import kernels
    if kernels.library() is None:
        pytest.skip("the kernel library is not built here (tools/build_kernels.sh)")
    out = _as_haswell(native_bundle)
    assert "qmatmul:avx2" in out["conflayers_kernels"].strip("()").split(), out["conflayers_kernels"]
    assert "attention:avx2" in out["conflayers_kernels"].strip("()").split(), out["conflayers_kernels"]
    unpadded = out[contract.SINGLE_ROW_OK.name]
    assert all(v == 0.0 for v in unpadded.values()), f"QMatMul's rows differ under AVX2: {unpadded}"
    assert out["choose"]["exact"] and out["choose"]["padding"] == contract.SINGLE_ROW_OK.name


def test_avx2_matmulnbits_needs_the_padding_and_is_exact_with_it(native_bundle):
    """Without the library (QMatMul's ONNX function, MatMulNBits) a one-row pass takes ONNX
    Runtime's AVX2 GEMV kernel: rows as they come differ from 2+-row passes (the test would fail
    on the old graphs), padded one-token passes are bit-identical, and the load check picks that
    padding."""
    out = _as_haswell(native_bundle, CONFLAYERS_KERNELS="off")
    assert out["conflayers_kernels"].startswith("ONNX functions")
    unpadded, padded = out[contract.SINGLE_ROW_OK.name], out[contract.PAD_SINGLE.name]
    assert any(unpadded[str(n)] > 0 for n in ROWS[1:]), f"one-row passes were exact under AVX2: {unpadded}"
    assert all(v == 0.0 for v in padded.values()), f"padded passes differ under AVX2: {padded}"
    assert out["choose"]["exact"] and out["choose"]["padding"] == contract.PAD_SINGLE.name


def _make_inexact(bundle: str):
    """Rewrite the bundle's full graph so each row's logits depend on the other rows of its pass
    (a mean over the pass's rows, tiny but not zero), then re-hash it in the manifest."""
    path = os.path.join(bundle, "full.onnx")
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    (last,) = [n for n in g.node if n.output and n.output[0] == "logits"]
    last.output[0] = "logits_exact"
    g.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "mix_axis"))
    g.initializer.append(onnx.numpy_helper.from_array(np.array(1e-3, np.float32), "mix_scale"))
    g.node.extend([
        helper.make_node("ReduceMean", ["logits_exact", "mix_axis"], ["mix_mean"], keepdims=1),
        helper.make_node("Mul", ["mix_mean", "mix_scale"], ["mix_small"]),
        helper.make_node("Add", ["logits_exact", "mix_small"], ["logits"]),
    ])
    onnx.save(m, path)
    mpath = os.path.join(bundle, "manifest.json")
    manifest = json.load(open(mpath))
    manifest["files"]["full.onnx"] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    json.dump(manifest, open(mpath, "w"))


def test_the_load_check_refuses_an_inexact_target(native_bundle, tmp_path, own_cache):
    copy = str(tmp_path / "inexact")
    shutil.copytree(native_bundle, copy)
    _make_inexact(copy)
    with pytest.raises(exactness.TargetNotExact) as err:
        Engine.load(copy, guard=False)
    msg = str(err.value)
    here = exactness.machine()
    assert "not exact on this machine" in msg and here["kernels"] in msg and here["onnxruntime"] in msg
    assert "computes its tokens differently from one-token steps" in msg and "Fix:" in msg
    # the refusal is remembered for this machine; an explicit opt-out still loads
    with pytest.raises(exactness.TargetNotExact):
        Engine.load(copy, guard=False)
    engine = Engine.load(copy, guard=False, check_exactness=False)
    assert engine.exactness is None
    # the exact original is served
    assert Engine.load(native_bundle, guard=False).exactness.exact


def test_the_load_check_runs_once_per_machine(native_bundle, own_cache, monkeypatch):
    calls = []
    real = exactness.choose

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(exactness, "choose", counting)
    first = Engine.load(native_bundle, guard=False)
    again = Engine.load(native_bundle, guard=False)
    assert len(calls) == 1 and again.exactness == first.exactness
    assert again.full.padding.name == first.exactness.padding
    cached = list((own_cache / "exactness").glob("*.json"))
    assert len(cached) == 1 and json.load(open(cached[0]))["key"]["kernels"] == exactness.kernel_path()
    # another machine (kernels, ONNX Runtime version) checks again
    here = exactness.machine()
    other = {**here, "kernels": "x86_64 avx2" if here["kernels"] != "x86_64 avx2" else "x86_64 avx512vnni"}
    monkeypatch.setattr(exactness, "machine", lambda num_threads=None: other)
    Engine.load(native_bundle, guard=False)
    assert len(calls) == 2


def test_kernel_path_names_this_cpu():
    path = exactness.kernel_path()
    assert path.split()[0] in ("x86_64", "aarch64") or path.endswith("unknown")
    if path.startswith("x86_64"):
        assert path.split()[1] in ("avx512vnni", "avx512", "avx2vnni", "avx2", "sse")
