"""The screened head in the engine (head.py, kernels/qmatmul.h): a native bundle whose embedding
is Q8_0 and whose layers are Q5_0, as real GGUF files hold them. Greedy output, speculative or
plain, alone or batched, equals the plain head's; sampled requests get every logit exact (the
same draws as without screening); the narrow Q5_0 codes sit in 5-bit planes on the AVX-512 engine."""
from __future__ import annotations

import threading

import pytest

from conflayers.runtime import Engine, head, kernels

import tiny

N_NEW = 24
PROMPTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):", "7",
           [{"role": "user", "content": "What is 12 times 7?"}]]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


@pytest.fixture(scope="module")
def bundle(kernel_library, tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    pytest.importorskip("onnx")
    out = str(tmp_path_factory.mktemp("screen") / "tiny-Q5_0")
    profiles = [lambda ident: tiny.profile_json("native_skip", ident, "native", skip_layers=[1], k=4),
                lambda ident: tiny.profile_json("int4_all", ident, "int4", k=3, confidence_stop=0.2)]
    return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=profiles, target="native",
                            gguf_type="Q5_0", embed_type="Q8_0")


@pytest.fixture(scope="module")
def engines(bundle):
    """The engine as it loads here, and one with the plain head and byte codes (the reference)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CONFLAYERS_HEAD_SCREEN", "off")
    mp.setenv("CONFLAYERS_QMATMUL_PLANES", "off")
    reference = Engine.load(bundle, guard=False, prompt_cache=False, max_batch=4)
    mp.undo()
    here = Engine.load(bundle, guard=False, prompt_cache=False, max_batch=4)
    yield here, reference
    here.close()
    reference.close()


def test_the_full_graph_is_screened_where_the_library_screens(engines, kernel_library):
    here, reference = engines
    assert not reference.full.screened
    assert here.full.screened == head.available()
    if "qmatmul:avx512" in kernels.cpu_path(kernel_library):
        assert here.full.screened
        assert "5-bit:" in kernels.qmatmul_layouts(kernel_library)     # the Q5_0 layers in planes


@pytest.mark.parametrize("task", ["native_skip", "int4_all"])
def test_greedy_output_equals_the_plain_heads(engines, task):
    here, reference = engines
    drafted = 0
    for prompt in PROMPTS:
        want = reference.generate(**_kw(prompt), max_new_tokens=N_NEW, speculate=False).token_ids
        plain = here.generate(**_kw(prompt), max_new_tokens=N_NEW, speculate=False)
        spec = here.generate(**_kw(prompt), task=task, max_new_tokens=N_NEW)
        assert plain.token_ids == want, f"plain decoding with the screened head differs on {prompt!r}"
        assert spec.token_ids == want, f"{task}: speculative output differs on {prompt!r}"
        drafted += spec.metrics.drafted_tokens
    assert drafted > 0


def test_sampled_requests_see_every_logit(engines):
    """With a seed, a sampled request draws the same tokens as with the plain head: its passes
    ask for full logits (a screened row's -inf would change the distribution)."""
    here, reference = engines
    for prompt in PROMPTS[:3]:
        kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=0.95, seed=3)
        want = reference.generate(**_kw(prompt), **kw).token_ids
        assert here.generate(**_kw(prompt), **kw).token_ids == want
        assert here.generate(**_kw(prompt), task="native_skip", **kw).token_ids == \
            reference.generate(**_kw(prompt), task="native_skip", **kw).token_ids


def test_batched_greedy_and_sampled_requests_equal_their_solo_runs(engines):
    here, reference = engines
    jobs = [(p, dict(max_new_tokens=N_NEW, temperature=t, seed=5, task="native_skip"))
            for p, t in zip(PROMPTS, (0.0, 0.8, 0.0, 1.0))]
    want = [reference.generate(**_kw(p), **kw).token_ids for p, kw in jobs]
    got = [None] * len(jobs)

    def run(i):
        p, kw = jobs[i]
        got[i] = here.generate(**_kw(p), **kw).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_the_bench_counts_the_bytes_the_kernels_read(bundle, kernel_library, monkeypatch):
    """conflayers-bench's weights read per pass: the codes at their held width. On the AVX-512
    engine the Q5_0 layers count 5 bits a code and the screened Q8_0 head 6; with the planes off,
    every code its 8 bits."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from conflayers.tools.bench_systems import kernel_read_bytes
    path = f"{bundle}/full.onnx"
    here = kernel_read_bytes(path)
    monkeypatch.setenv("CONFLAYERS_QMATMUL_PLANES", "off")
    monkeypatch.setenv("CONFLAYERS_HEAD_SCREEN", "off")
    full = kernel_read_bytes(path)
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == kernels.DOMAIN and n.op_type.startswith("QMatMul")]
    codes = {n.name: numpy_helper.to_array(inits[n.input[3 if "Norm" in n.op_type else 1]]).size for n in nodes}
    if "qmatmul:avx512" in kernels.cpu_path(kernel_library):
        narrow = sum(c for name, c in codes.items() if name != head.HEAD_NODE)
        assert full - here == narrow * 3 // 8 + codes[head.HEAD_NODE] * 2 // 8      # 8 -> 5 and 8 -> 6 bits
    else:
        assert here == full
    assert full > sum(codes.values()) and np.isfinite(full)
