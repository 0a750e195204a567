"""Bundles whose target is the model file's own quantized weights (`--target native`), on a tiny
model quantized by the gguf package: speculative output equals the native target's plain output
(greedy identity, sampling distribution), the full graph computes with exactly the GGUF weights,
drafts of the target's precision share its weights file, and profiles of another target are
refused."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from conflayers.compiler.export import decoder_graph
from conflayers.runtime import Bundle, BundleError, Engine
from conflayers.runtime.decoding import DecodeStats, generate
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.sampling import Sampler

import tiny

N_NEW = 32
PROMPTS = ["Janet has 3 apples and buys 5 more.", "def add(a, b):", "7",
           [{"role": "user", "content": "What is 12 times 7?"}]]


PROFILES = [
    lambda ident: tiny.profile_json("native_skip", ident, "native", skip_layers=[1], k=4),
    lambda ident: tiny.profile_json("native_vocab", ident, "native", k=5, vocab_ids=list(range(3, 250))),
    lambda ident: tiny.profile_json("int4_all", ident, "int4", k=3, confidence_stop=0.2),
]


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0"])
def native_bundle(request, tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    from conflayers.compiler.export import weights
    out = str(tmp_path_factory.mktemp("native") / f"tiny-{request.param}")
    inline, weights.INLINE_BELOW = weights.INLINE_BELOW, 0    # every tensor in a weights file, as at real sizes
    try:
        return tiny.make_bundle(out, tiny_llama, tiny_tokenizer_dir, profiles=PROFILES, target="native",
                                gguf_type=request.param)
    finally:
        weights.INLINE_BELOW = inline


@pytest.fixture(scope="module")
def engine(native_bundle):
    return Engine.load(native_bundle, guard=False)


def _gguf_type(bundle: str) -> str:
    return os.path.basename(bundle).split("-")[1]


def _kw(prompt):
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}


@pytest.mark.parametrize("task", ["native_skip", "native_vocab", "int4_all"])
def test_speculative_greedy_equals_native_plain(engine, task):
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain = engine.generate(**_kw(prompt), max_new_tokens=N_NEW, speculate=False)
        spec = engine.generate(**_kw(prompt), task=task, max_new_tokens=N_NEW)
        assert spec.token_ids == plain.token_ids, f"{task}: speculative output differs on {prompt!r}"
        assert spec.metrics.profile == task and spec.metrics.draft_steps > 0
        drafted += spec.metrics.drafted_tokens
        accepted += spec.metrics.accepted_tokens
    assert 0 < accepted <= drafted


def test_full_graph_computes_with_the_gguf_weights(native_bundle, tiny_llama, tiny_tokenizer_dir, tmp_path):
    """The native full graph against an fp32 graph of the gguf package's dequantized weights:
    equal up to the int8 activation quantization of MatMulNBits (accuracy_level 4, as llama.cpp
    quantizes activations to 8 bits). Measured on this random tiny model: max |diff| 0.06-0.10 of
    the logit scale, argmax agreement 0.91-1.0 (SmolLM2's real weights: 0.06 and 0.97); the
    single-node tests in test_gguf_import.py pin the weights themselves. Wrong weights (packing,
    offsets, row order) give diffs of the logits' own size and chance-level agreement."""
    fp32_dir = str(tmp_path / "fp32")
    spec = Bundle.open(native_bundle).spec
    weights, _ = tiny.native_weights(spec, _canonical(tiny_llama), _gguf_type(native_bundle))
    _fp32_bundle_of(fp32_dir, tiny_llama, weights, tiny_tokenizer_dir)
    ids = list(range(5, 60))
    native = Engine.load(native_bundle, guard=False)
    ref = Engine.load(fp32_dir, guard=False)
    a = native.full.bind(KVCache(spec, 128)).run(ids, 0, full_logits=True)      # every logit (head.py)
    b = ref.full.bind(KVCache(spec, 128)).run(ids, 0)
    rel = np.abs(a - b).max() / np.abs(b).max()
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    assert rel <= 0.15 and agree >= 0.85, f"relative diff {rel:.3g}, argmax agreement {agree:.2f}"


def _canonical(model):
    from conflayers.compiler.arch import canonical_weights, model_spec
    return canonical_weights(model_spec(model.config), model.state_dict())


def _fp32_bundle_of(out, model, weights, tokenizer_dir):
    from conflayers.compiler.arch import model_spec
    from conflayers.compiler.export.bundle_writer import BundleWriter, fingerprint
    spec = model_spec(model.config)
    with BundleWriter(out, spec, weights, {"name": "tiny", "source": "dequantized", **fingerprint(spec, weights)},
                      512, force=True) as bw:
        bw.write_full()
        bw.write_tokenizer(tokenizer_dir, bos_token="<|im_start|>", eos_token="<|im_end|>", bos_token_id=0,
                           eos_token_ids=[1])
        bw.publish()


def test_target_precision_drafts_share_the_target_weights_file(native_bundle):
    m = json.load(open(os.path.join(native_bundle, "manifest.json")))
    assert m["model"]["target"] == "native"
    files = set(m["files"])
    assert "weights_native.bin" in files and "weights_int4.bin" in files
    # the native drafts add no weights file of their own, and the fp32 file holds no matrices
    assert not any(f.startswith("weights_") and f not in ("weights_native.bin", "weights_int4.bin") for f in files)
    # the fp32 file holds only small tables (rotary cos/sin, norms), no matrix: the native graphs
    # multiply by the GGUF blocks and gather the embedding from them
    import onnx
    fp32 = m["files"]["weights.bin"]["bytes"]
    assert 0 < fp32 < m["files"]["weights_native.bin"]["bytes"] / 4
    for rel in ["full.onnx"] + [b["file"] for b in m["graphs"]["bodies"].values() if "native" in b["file"]]:
        ops = [n.op_type for n in onnx.load(os.path.join(native_bundle, rel), load_external_data=False).graph.node]
        blocks = {"MatMulNBits", *decoder_graph.QMATMUL_OPS}     # block matrices
        assert blocks & set(ops) and "Gemm" not in ops, rel


def test_profile_of_another_target_is_refused(native_bundle, tiny_llama, tiny_tokenizer_dir, tmp_path):
    """A v1 profile (no target: fp32) cannot be added to a native bundle, and a native one is
    refused by a bundle whose manifest says fp32, each with the fix in the message."""
    from conflayers.runtime.profile import Profile
    raw = json.load(open(os.path.join(native_bundle, "profiles", "native_skip.json")))
    old = json.loads(json.dumps(raw))
    del old["model"]["target"]
    old["draft"]["precision"] = "int8"
    why = Profile.from_json(old).matches_model(Bundle.open(native_bundle).manifest["model"])
    assert why and "target precision 'fp32'" in why and "--target fp32" in why
    copy = str(tmp_path / "b")
    shutil.copytree(native_bundle, copy)
    mpath = os.path.join(copy, "manifest.json")
    manifest = json.load(open(mpath))
    manifest["model"]["target"] = "fp32"
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(BundleError, match="target precision 'native'"):
        Bundle.open(copy, verify=False)


def test_v1_bundle_without_target_still_loads(tiny_bundle):
    """Bundles written before targets existed have no model.target: they are fp32 bundles."""
    m = json.load(open(os.path.join(tiny_bundle, "manifest.json")))
    copy_model = dict(m["model"])
    copy_model.pop("target", None)
    for p in Bundle.open(tiny_bundle).profiles.values():
        raw = dict(p.raw, model={k: v for k, v in p.raw["model"].items() if k != "target"})
        from conflayers.runtime.profile import Profile
        assert Profile.from_json(raw).matches_model(copy_model) is None


def test_sampling_distribution_equals_the_native_target(engine):
    """Speculative sampling at native: the first tokens' joint distribution equals the target's
    own (computed exactly from the native full graph), chi-square over 1,500 seeds."""
    from test_sampling import _projections, hf_probs
    ids = engine.encode("Janet has 3 apples")
    depth, n, temperature = 3, 1500, 1.0
    levels, level = [], {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, p in level.items():
            cache = KVCache(engine.spec, len(ids) + depth + 2)
            logits = engine.full.bind(cache).run(ids + list(prefix), 0, full_logits=True)[-1:].astype(np.float64)
            row = hf_probs(logits, temperature, 0, 1.0)[0] * p
            for t in np.nonzero(row >= 1e-4)[0]:
                nxt[prefix + (int(t),)] = float(row[t])
        levels.append(nxt)
        level = nxt
    cache = KVCache(engine.spec, len(ids) + depth + 8)
    target = engine.full.bind(cache)
    bound = engine.drafters["native_skip"].bind(ids)
    counts = Counter()
    drafted = accepted = 0
    for seed in range(n):
        st = DecodeStats()
        out = [t for it in generate(target, ids, depth, Sampler(temperature, seed=seed), drafter=bound, stats=st)
               for t in it]
        counts[tuple(out)] += 1
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
    assert 0 < accepted < drafted
    ps, tvs = _projections(counts, levels, n)
    assert min(ps) > 1e-4, f"speculative sampling at native differs from the target: p={ps} tv={tvs}"


def test_verify_identity_check_passes_an_exact_target_and_refuses_one_that_is_not(engine):
    """The compile-time guard of a quantized target: the tiny native graph computes a verify pass
    bit for bit like single steps; a graph whose rows depend on the pass width is refused."""
    from conflayers.runtime.exactness import TargetNotExact, scan as check_verify_identity
    check_verify_identity(engine.full, engine.spec, [2, 3, 5], length=40)

    class WidthDependent:            # a graph whose result depends on how many rows a pass has
        def __init__(self, full):
            self.full, self.kv_dtype, self.screened = full, full.kv_dtype, full.screened

        def bind(self, cache):
            inner = self.full.bind(cache)

            class Bound:
                def run(self, tokens, start, logits_from=0, full_logits=False):
                    out = inner.run(tokens, start, logits_from, full_logits)
                    return out + (len(tokens) - 1) * 1e-6
            return Bound()
    with pytest.raises(TargetNotExact, match="2-token pass at position 0 computes its tokens differently"):
        check_verify_identity(WidthDependent(engine.full), engine.spec, [2], length=20)


class _Boundaries:
    """A full graph whose rows come out slightly different when their pass reaches past a length
    B in `bounds` that their own single step does not reach (row p's step reaches p + 2): the shape
    of ONNX Runtime's GroupQueryAttention on head_dim 256, whose lengths are 64, 192, 320, ...
    A pass reaches as the wrapped graph's padding makes it (contract.Padding.reach)."""

    def __init__(self, full, bounds, verify_boundaries=None):
        self.full, self.bounds, self.verify_boundaries = full, list(bounds), verify_boundaries
        self.padding = full.padding
        self.kv_dtype, self.screened = full.kv_dtype, full.screened
        self.passes = []              # (start, tokens) of every pass

    def verify_room(self, start):
        from conflayers.runtime.ort_backend import GraphRunner
        return GraphRunner.verify_room(self, start)

    def pass_room(self, start):
        from conflayers.runtime.ort_backend import GraphRunner
        return GraphRunner.pass_room(self, start)

    def bind(self, cache):
        inner, graph = self.full.bind(cache), self

        class Bound:
            def __init__(self):
                self.cache, self.graph = cache, graph

            def run(self, tokens, start, logits_from=0, full_logits=False):
                from conflayers.runtime.exactness import padding_of
                graph.passes.append((start, len(tokens)))
                out = inner.run(tokens, start, logits_from, full_logits)
                reach = padding_of(graph).reach(start, len(tokens))
                rows = start + logits_from + np.arange(out.shape[0])
                step = padding_of(graph).reach(0, 1)       # how far a one-token step at 0 reaches
                off = np.array([any(p + step <= b < reach for b in graph.bounds) for p in rows])
                return out + np.where(off, 1e-6, 0.0)[:, None].astype(out.dtype)
        return Bound()


def test_verify_identity_check_finds_the_boundaries_verify_passes_must_not_cross(engine):
    """Passes that reach past 12, 22, 32, ... from below compute those rows differently: the
    check finds (12, 10); boundaries with no regular spacing are refused."""
    from conflayers.runtime.exactness import TargetNotExact, scan as check_verify_identity
    assert check_verify_identity(engine.full, engine.spec, [2, 3, 5], length=40) is None
    every10 = _Boundaries(engine.full, range(12, 200, 10))
    assert check_verify_identity(every10, engine.spec, [3, 5], length=60) == (12, 10)
    with pytest.raises(TargetNotExact, match="no regular boundary"):
        check_verify_identity(_Boundaries(engine.full, [12, 30]), engine.spec, [3], length=60)


def test_verify_room_stops_a_pass_at_the_next_boundary():
    from conflayers.runtime import contract
    from conflayers.runtime.ort_backend import GraphRunner

    class G:
        verify_boundaries, padding = (64, 128), contract.SINGLE_ROW_OK
        verify_room, pass_room = GraphRunner.verify_room, GraphRunner.pass_room
    g = G()
    assert [g.verify_room(s) for s in (0, 55, 62, 63, 64, 190, 191, 300)] == [62, 7, 0, 127, 126, 0, 127, 18]
    # every pass one row longer (its step too): a boundary is one token nearer; and a pass of 128 rows
    # would run 129 + 1, so the longest verify stops at 127 rows
    g.padding = contract.PAD_EVERY
    assert [g.verify_room(s) for s in (0, 55, 61, 62, 63, 189, 190)] == [61, 6, 0, 126, 126, 0, 126]
    g.verify_boundaries = None
    assert g.verify_room(62) is None and g.pass_room(62) is None


def test_drafts_never_cross_a_verify_boundary_and_output_stays_plain(engine):
    """On a graph with boundaries every 8 tokens from 24, the loop shortens each draft so no
    verify pass crosses one, and output equals plain decoding; without the boundaries recorded,
    passes do cross them (the control)."""
    prompt = engine.encode(**_kw("Janet has 3 apples and buys 5 more."))
    bounds = range(24, 400, 8)
    assert len(prompt) + 2 < 24
    full = _Boundaries(engine.full, bounds)
    plain = [t for it in generate(full.bind(KVCache(engine.spec, 128)), prompt, 60, Sampler()) for t in it]
    name = next(iter(engine.drafters))
    for recorded in ((24, 8), None):
        full.verify_boundaries, full.passes = recorded, []
        cache = KVCache(engine.spec, 128)
        st = DecodeStats()
        out = [t for it in generate(full.bind(cache), prompt, 60, Sampler(),
                                    drafter=engine.drafters[name].bind(prompt), stats=st) for t in it]
        pad = full.padding
        crossing = [(s, n) for s, n in full.passes if any(pad.reach(s, 1) <= b < pad.reach(s, n) for b in bounds)]
        if recorded:
            assert out == plain
            assert st.draft_steps > 0 and not crossing
        else:
            assert crossing                 # the control: unconstrained drafts do cross them


def test_bundle_records_and_validates_verify_boundaries(native_bundle, tmp_path):
    """graphs.full.verify_boundaries reaches the engine's full graph; bad values are refused;
    bundles without it (formats 1 and 2, exact targets) have no limit."""
    copy = str(tmp_path / "b")
    shutil.copytree(native_bundle, copy)
    mpath = os.path.join(copy, "manifest.json")
    manifest = json.load(open(mpath))
    assert "verify_boundaries" not in manifest["graphs"]["full"]      # the tiny native graph is exact
    assert Bundle.open(copy, verify=False).verify_boundaries is None
    manifest["graphs"]["full"]["verify_boundaries"] = {"first": 64, "every": 128}
    json.dump(manifest, open(mpath, "w"))
    assert Bundle.open(copy, verify=False).verify_boundaries == (64, 128)
    # a verify pass may reach the boundary but not past it: at the start where the one-token step
    # attends over exactly 64 positions (the padding decides how many rows a step runs)
    full = Engine.load(copy, verify=False, guard=False, adapt=False).full
    pad = full.padding
    start = 64 - 1 - pad.rows(1)
    assert pad.reach(start, 1) == 64
    room = full.verify_room(start)
    assert pad.reach(start, room + 1) <= 64 < pad.reach(start, room + 2), (pad.name, room)
    for bad in ({"first": 1, "every": 128}, {"first": 64}, {"first": 64, "every": "x"}, [64, 128]):
        manifest["graphs"]["full"]["verify_boundaries"] = bad
        json.dump(manifest, open(mpath, "w"))
        with pytest.raises(BundleError, match="graphs.full.verify_boundaries"):
            Bundle.open(copy, verify=False)
