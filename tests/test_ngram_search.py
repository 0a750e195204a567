"""The compiler's choice of drafter kind (compiler/ngram_search.py): n-gram and hybrid replays on
hand-made references with known answers, the model-only replay equal to evaluate.py's, and the
choice (n-gram only where predicted faster than the model draft)."""
from __future__ import annotations

import numpy as np
import pytest

from conflayers.compiler import ngram_search as ns
from conflayers.compiler.costmodel import CostModel
from conflayers.compiler.evaluate import BlockRecord, DraftRecord, Reference, replay
from conflayers.compiler.search import Choice
from conflayers.runtime.ngram import NGramPolicy
from conflayers.runtime.profile import Profile

COST = CostModel(context=64, full_ms=[10.0 + i for i in range(9)])      # verify_ms(n) = 9 + n


def _model(refs, blocks, k=4, stop=None, draft_ms=2.0):
    positions = ns.model_block_positions(refs, blocks, 8, 1000)
    mean = replay(blocks, k, stop)
    return (blocks, blocks, positions, k, stop, draft_ms, mean.drafted_tokens / mean.draft_steps,
            mean.accepted_tokens / mean.draft_steps)


def test_ngram_walk_on_a_copied_prompt():
    """The output repeats the prompt: two steps of 4 kept tokens, each verifying 5 tokens."""
    ref = Reference(prompt=list(range(1, 11)), output=list(range(1, 11)))
    tables = [ns.follower_table(ref.sequence)[0]]
    w = ns.walk([ref], tables, 1000, COST, NGramPolicy(1, 3, 4), None)
    assert (w.steps, w.drafted, w.accepted, w.tokens) == (2, 8, 8, 10)
    assert w.ms == pytest.approx(2 * COST.verify_ms(5))
    assert w.speedup(COST.full_ms[0]) == pytest.approx(10 * 10.0 / 28.0)
    # nothing repeats: every step proposes nothing and yields one token at a 1-token verify's cost
    fresh = Reference(prompt=[1, 2, 3], output=[4, 5, 6, 7])
    w = ns.walk([fresh], [ns.follower_table(fresh.sequence)[0]], 1000, COST, NGramPolicy(1, 3, 4), None)
    assert (w.drafted, w.accepted, w.tokens) == (0, 0, w.steps) and w.speedup(10.0) == pytest.approx(1.0)


def test_follower_table_matches_the_runtime_index():
    seq = [5, 1, 2, 3, 6, 1, 2, 3]
    table, ms = ns.follower_table(seq)
    assert table[7, 3] == 4 and table[7, 2] == 4 and table[7, 1] == 4    # "1 2 3" was followed by 6
    assert table[2, 1] == -1 and table[5, 1] == 2 and ms >= 0.0


def test_model_only_walk_equals_evaluate_replay():
    """Model blocks at the positions evaluate.py's walk records them: the model-only walk keeps
    exactly replay()'s drafted and accepted counts."""
    rng = np.random.default_rng(0)
    ref = Reference(prompt=[0] * 5, output=list(range(100, 160)))
    blocks, pos, t = [], 5, len(ref.sequence) - 1
    while min(8, t - pos, 1000 - (pos - 5 + 1) - 1) >= 1:
        n = min(8, t - pos)
        m = np.arange(n) < rng.integers(0, n + 1)
        blocks.append(BlockRecord(m, rng.random(n).astype(np.float32), n))
        pos += blocks[-1].accepted_full + 1
    for k, stop in ((4, None), (8, 0.5), (2, 0.9)):
        model = _model([ref], blocks, k, stop)
        w = ns.walk([ref], [ns.follower_table(ref.sequence)[0]], 1000, COST, None, None, model)
        r = replay(blocks, k, stop)
        if k == 8 and stop is None:
            assert (w.steps, w.drafted, w.accepted) == (r.draft_steps, r.drafted_tokens, r.accepted_tokens)
        assert w.steps > 0 and w.tokens == pytest.approx(w.accepted + w.steps)


def test_hybrid_takes_ngram_on_long_matches_only():
    ref = Reference(prompt=[7, 8, 9, 1, 2, 3, 4, 5, 6], output=[7, 8, 9, 1, 2, 3, 11, 12, 13, 14, 15, 16])
    blocks = [BlockRecord(np.ones(8, bool), np.ones(8, np.float32), 8)] * 20
    model = _model([ref], blocks)
    tables = [ns.follower_table(ref.sequence)[0]]
    hyb = ns.walk([ref], tables, 1000, COST, NGramPolicy(1, 3, 8, min_match=2), 2, model)
    assert 0 < hyb.ngram_steps < hyb.steps        # both kinds of step were taken
    only = ns.walk([ref], tables, 1000, COST, NGramPolicy(1, 3, 8, min_match=9), 9, model)
    assert only.ngram_steps == 0


def _choice(k=4):
    return Choice(k=k, confidence_stop=None, vocab=None, speedup=1.0, acceptance=0.5, mean_accepted=1.0,
                  draft_ms=4.0)


def _refs_and_record(copying: bool, accept: int):
    refs, blocks = [], []
    rng = np.random.default_rng(1)
    for r in range(3):
        prompt = rng.integers(10, 1000, 60).tolist()
        output = (prompt[5:50] if copying else rng.integers(1000, 5000, 45).tolist())
        ref = Reference(prompt=prompt, output=output)
        refs.append(ref)
        pos, t = len(prompt), len(ref.sequence) - 1
        while min(8, t - pos, 1000 - (pos - len(prompt) + 1) - 1) >= 1:
            n = min(8, t - pos)
            blocks.append(BlockRecord(np.arange(n) < accept, np.ones(n, np.float32), n))
            pos += blocks[-1].accepted_full + 1
    return refs, DraftRecord(8, {None: blocks})


def test_search_picks_ngram_only_where_predicted_faster():
    refs, record = _refs_and_record(copying=True, accept=1)
    section = ns.search(refs, 1000, COST, record, _choice(), 8)
    assert section["kind"] in ("ngram", "hybrid")
    assert section["predicted_speedup"] > section["model_predicted_speedup"] * ns.MARGIN
    assert "beats the model draft" in section["why"]
    # never picked when not predicted faster than plain decoding either
    refs, record = _refs_and_record(copying=False, accept=0)
    assert ns.search(refs, 1000, COST, record, _choice(), 8)["kind"] == "model"

    refs, record = _refs_and_record(copying=False, accept=6)
    section = ns.search(refs, 1000, COST, record, _choice(8), 8)
    assert section["kind"] == "model" and section["ngram"] is None
    assert section["candidates"] and all(c["predicted_speedup"] <= section["model_predicted_speedup"] * ns.MARGIN
                                         for c in section["candidates"])


def test_apply_writes_a_loadable_profile():
    import tiny  # noqa: F401 - the tests directory is on the path
    ident = {"architecture": "llama", "num_layers": 4, "config_sha256": "a", "weights_sha256": "b"}
    base = {"schema": "conflayers.profile", "schema_version": 2, "task": "t", "model": ident,
            "draft": {"skip_layers": [1], "skip_attention": [], "skip_mlp": [], "precision": "int8",
                      "max_draft_tokens": 4, "confidence_stop": None},
            "search": {}, "figures": {"predicted_speedup": 1.2}}
    for kind in ("ngram", "hybrid", "model"):
        p = {**base, "draft": dict(base["draft"]), "search": {}, "figures": dict(base["figures"])}
        ng = None if kind == "model" else NGramPolicy(1, 3, 5, 2).to_json()
        ns.apply(p, {"kind": kind, "ngram": ng, "predicted_speedup": 2.5})
        prof = Profile.from_json(p)
        assert prof.kind == kind and p["search"]["drafter"]["kind"] == kind
        assert (prof.plan is None) == (kind == "ngram")
        assert p["figures"]["predicted_speedup"] == (1.2 if kind == "model" else 2.5)
