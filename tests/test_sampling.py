"""Sampling: the processed distribution matches HF transformers' warpers, greedy verification keeps
exactly the agreed prefix, and speculative sampling's output distribution is the target's
(statistically, on synthetic p/q tables and end to end on the tiny model), while sampling from
the draft itself is rejected by the same test (negative control)."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from conflayers.runtime import Engine
from conflayers.runtime.decoding import DecodeStats, generate
from conflayers.runtime.drafter import DraftPolicy, LayerSkipDrafter, propose
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.sampling import Sampler, softmax_max

SETTINGS = [  # temperature, top_k, top_p
    (0.7, 0, 1.0),
    (1.0, 3, 1.0),
    (0.9, 0, 0.7),
    (0.8, 4, 0.8),
]


# -- reference processing and statistics ---------------------------------------------------------
def hf_probs(logits, temperature, top_k, top_p):
    """Target distribution as HF transformers samples it: temperature, top-k, top-p warpers."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = torch.as_tensor(np.atleast_2d(np.asarray(logits, np.float64)))
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    p = torch.softmax(scores, dim=-1).numpy()
    return p if np.ndim(logits) == 2 else p[0]


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty; no scipy needed)."""
    if dof <= 0:
        return 1.0
    z = ((x / dof) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * dof))) / math.sqrt(2.0 / (9.0 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def chi2_test(counts: Counter, exact: dict, n: int):
    """Pearson chi-square of observed counts against exact cell probabilities. Cells with small
    expected counts (and any mass not enumerated in `exact`) are pooled into one bin.
    Returns (p-value, total variation distance, number of bins)."""
    cells = sorted(exact, key=lambda c: exact[c])
    expected = {c: n * exact[c] for c in cells}
    pooled_exp = n * max(0.0, 1.0 - sum(exact.values()))
    pooled = []
    while cells and (pooled_exp < 5.0 or expected[cells[0]] < 5.0):
        c = cells.pop(0)
        pooled.append(c)
        pooled_exp += expected[c]
    observed_in = sum(counts.get(c, 0) for c in cells)
    stat = sum((counts.get(c, 0) - expected[c]) ** 2 / expected[c] for c in cells)
    bins = len(cells)
    if pooled_exp > 0:
        stat += ((n - observed_in) - pooled_exp) ** 2 / pooled_exp
        bins += 1
    keys = set(counts) | set(exact)
    tv = 0.5 * sum(abs(counts.get(c, 0) / n - exact.get(c, 0.0)) for c in keys)
    return chi2_sf(stat, bins - 1), tv, bins


def test_chi2_helper_sanity():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(20))
    exact = {(i,): float(p[i]) for i in range(20)}
    good = Counter((int(x),) for x in rng.choice(20, size=5000, p=p))
    q = 0.8 * p + 0.2 * rng.dirichlet(np.ones(20))
    bad = Counter((int(x),) for x in rng.choice(20, size=5000, p=q))
    assert chi2_test(good, exact, 5000)[0] > 1e-3
    assert chi2_test(bad, exact, 5000)[0] < 1e-6
    assert abs(chi2_sf(10.0, 10) - 0.4405) < 0.01 and abs(chi2_sf(30.0, 10) - 0.00086) < 0.0003


# -- the processed distribution -------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS + [(1.3, 10, 0.9), (0.5, 1, 1.0), (1.0, 0, 0.05),
                                                               (1.0, 500, 1.0)])
def test_probs_match_hf_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    s = Sampler(temperature, top_p, top_k, seed=0)
    ours = s.probs(logits)
    ref = hf_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert np.allclose(ours.sum(-1), 1.0)
    for row in range(6):
        np.testing.assert_allclose(s.probs(logits[row]), ref[row], atol=1e-9)
    if top_k and top_p == 1.0:
        assert ((ours > 0).sum(-1) == min(top_k, 300)).all()


def test_sampler_rejects_bad_parameters():
    for kw in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError):
            Sampler(**kw)


def test_greedy_pick_and_softmax_max():
    s = Sampler()
    row = np.array([0.1, 2.0, -1.0, 1.5], np.float32)
    assert s.greedy and s.pick(row) == 1
    i, conf = softmax_max(row)
    p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    assert i == 1 and abs(conf - p[1]) < 1e-6


def test_greedy_verify_keeps_the_agreed_prefix():
    s = Sampler()
    targets = [4, 2, 7, 1, 3]
    logits = np.full((5, 8), -5.0, np.float32)
    logits[np.arange(5), targets] = 5.0
    assert s.verify([4, 2, 7, 1], None, logits) == (4, 3)      # all kept, bonus token
    assert s.verify([4, 2, 0, 1], None, logits) == (2, 7)      # first mismatch at 2
    assert s.verify([5, 2, 7, 1], None, logits) == (0, 4)      # none kept
    assert s.verify([], None, logits[:1]) == (0, 4)


def test_sampled_verify_edge_cases():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 10)) * 2
    s = Sampler(1.0, 1.0, 3, seed=11)
    p = s.probs(logits)
    # q == p: every draft is kept
    for _ in range(200):
        d1 = s.draw(p[0])
        n, nxt = s.verify([d1, int(np.argmax(p[1]))], [p[0], p[1]], logits)
        assert n >= 1
    # drafts outside p's support (top-k) are always rejected and replaced by a token inside it
    outside = [t for t in range(10) if p[0, t] == 0.0]
    q = np.zeros(10)
    q[outside] = 1.0 / len(outside)
    for _ in range(200):
        d = s.draw(q)
        n, nxt = s.verify([d], [q], logits[:2])
        assert n == 0 and p[0, nxt] > 0


# -- speculative sampling on synthetic tables ------------------------------------------------------
V = 6
DEPTH = 3


def _tables(seed):
    rng = np.random.default_rng(seed)
    prefixes = [pr for d in range(DEPTH) for pr in itertools.product(range(V), repeat=d)]
    P = {pr: rng.standard_normal(V) * 1.5 for pr in prefixes}
    Q = {pr: 0.4 * P[pr] + rng.standard_normal(V) * 1.5 for pr in prefixes}
    return P, Q


def _exact_joint_tables(P, sampler_kw):
    out = {}
    for seq in itertools.product(range(V), repeat=DEPTH):
        pr = 1.0
        for d in range(DEPTH):
            pr *= hf_probs(P[seq[:d]], *sampler_kw)[seq[d]]
        if pr > 0:
            out[seq] = pr
    return out


def _speculative_synthetic(P, Q, s: Sampler, max_draft=2):
    """The decoding loop's shape on lookup tables: draft from q, verify against p."""
    out: list[int] = []
    while len(out) < DEPTH:
        k = min(max_draft, DEPTH - len(out) - 1)
        if k < 1:
            out.append(s.pick(P[tuple(out)]))
            continue
        drafted, qs = [], []
        for _ in range(k):
            q = s.probs(Q[tuple(out + drafted)])
            qs.append(q)
            drafted.append(s.draw(q))
        rows = np.stack([P[tuple(out + drafted[:j])] for j in range(k + 1)])
        n, nxt = s.verify(drafted, qs, rows)
        out += drafted[:n] + [nxt]
    return tuple(out[:DEPTH])


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_speculative_sampling_distribution_synthetic(temperature, top_k, top_p):
    P, Q = _tables(seed=int(temperature * 10) + top_k + int(top_p * 100))
    exact = _exact_joint_tables(P, (temperature, top_k, top_p))
    n = 5000
    s = Sampler(temperature, top_p, top_k, seed=1234)
    spec = Counter(_speculative_synthetic(P, Q, s) for _ in range(n))
    assert set(spec) <= set(exact), "tokens outside the target's support"
    pval, tv, bins = chi2_test(spec, exact, n)
    assert pval > 1e-3, f"speculative sampling differs from the target: p={pval:.2e} tv={tv:.3f} bins={bins}"

    # negative control: sampling from the draft distribution itself is told apart
    s = Sampler(temperature, top_p, top_k, seed=99)
    draft = Counter()
    for _ in range(n):
        seq: list[int] = []
        for _ in range(DEPTH):
            seq.append(s.draw(s.probs(Q[tuple(seq)])))
        draft[tuple(seq)] += 1
    pval_q, tv_q, _ = chi2_test(draft, exact, n)
    assert pval_q < 1e-6, f"the test cannot tell the draft from the target: p={pval_q:.2e} tv={tv_q:.3f}"
    print(f"synthetic T={temperature} top_k={top_k} top_p={top_p}: speculative p={pval:.3f} tv={tv:.3f}, "
          f"draft p={pval_q:.1e} tv={tv_q:.3f}")


# -- speculative sampling end to end on the tiny model ----------------------------------------------
PROMPT = "Janet has 3 apples and buys"
E2E = [  # temperature, top_k, top_p, drafter, tokens sampled, tokens compared exactly, samples
    (0.7, 0, 1.0, "int8skip", 3, 2, 1000),
    (1.0, 3, 1.0, "fp32sub", 4, 4, 700),
    (0.7, 0, 0.5, "int8skip", 3, 3, 1000),
]


def exact_joint_model(model, ids, depth, temperature, top_k, top_p, eps):
    """Exact probabilities of the first 1..depth sampled tokens under the full torch model:
    levels[d] maps each sequence of d+1 tokens with probability >= eps to its probability (the rest
    is left out: its mass is pooled by chi2_test)."""
    import torch
    levels, level = [], {(): 1.0}
    for _ in range(depth):
        prefixes = list(level)
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(pr) for pr in prefixes])).logits[:, -1, :].double().numpy()
        probs = hf_probs(logits, temperature, top_k, top_p)
        nxt = {}
        for pr, row in zip(prefixes, probs):
            w = level[pr] * row
            for t in np.nonzero((w >= eps) & (w > 0))[0]:
                nxt[pr + (int(t),)] = float(w[t])
        levels.append(nxt)
        level = nxt
    return levels


def _projections(counts: Counter, levels, n):
    """chi2_test on the first 1, 2, .. tokens: (min p-value, max tv)."""
    ps, tvs = [], []
    for d, exact in enumerate(levels):
        proj = Counter()
        for seq, c in counts.items():
            proj[seq[:d + 1]] += c
        p, tv, _ = chi2_test(proj, exact, n)
        ps.append(p)
        tvs.append(tv)
    return ps, tvs


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.load(tiny_bundle, guard=False)


@pytest.mark.parametrize("temperature,top_k,top_p,which,depth,exact_depth,n", E2E)
def test_speculative_sampling_distribution_end_to_end(engine, tiny_llama, temperature, top_k, top_p, which,
                                                      depth, exact_depth, n):
    """The first `depth` tokens of speculative sampling (the first from the prefill, the others
    from draft + verify, including the bonus token) against the exact joint distribution."""
    ids = engine.encode(PROMPT)
    truncated = top_k or top_p < 1.0
    levels = exact_joint_model(tiny_llama, ids, exact_depth, temperature, top_k, top_p,
                               eps=0.0 if truncated else 1e-4)
    cache = KVCache(engine.spec, len(ids) + depth + 8)
    target = engine.full.bind(cache)
    d = engine.drafters[which]
    bound = d.bind(ids)
    drafted = accepted = 0
    spec = Counter()
    for seed in range(n):
        st = DecodeStats()
        out = [t for it in generate(target, ids, depth, Sampler(temperature, top_p, top_k, seed=seed),
                                    drafter=bound, stats=st) for t in it]
        assert len(out) == depth
        spec[tuple(out)] += 1
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
    # both verification paths ran: kept drafts and rejections (residual draws)
    assert 0 < accepted < drafted
    if truncated and exact_depth == depth:
        assert set(spec) <= set(levels[-1]), "tokens outside the target's top-k/top-p support"
    ps, tvs = _projections(spec, levels, n)
    assert min(ps) > 1e-4, f"speculative sampling differs from the target: p={ps} tv={tvs}"

    # negative control: the target's first token, then the draft's own samples (depth - 1 of them)
    long = LayerSkipDrafter(d.body, d.head, d.vocab_ids, d.vocab_size,
                            DraftPolicy(depth - 1, d.policy.confidence_stop)).bind(ids)
    draft = Counter()
    for seed in range(n):
        s = Sampler(temperature, top_p, top_k, seed=10_000 + seed)
        logits = target.run(ids, 0, logits_from=len(ids) - 1)
        cache.length = len(ids)
        first = s.pick(logits[-1])
        rest, _ = propose(long, first, len(ids), s, depth - 1, cache)
        draft[tuple([first] + rest)] += 1
    ps_q, tvs_q = _projections(draft, levels, n)
    assert min(ps_q) < 1e-6, f"the test cannot tell the draft from the target: p={ps_q} tv={tvs_q}"
    print(f"end to end T={temperature} top_k={top_k} top_p={top_p} {which}: speculative p={ps} tv={tvs}, "
          f"draft p={ps_q} tv={tvs_q}")


def test_engine_sampling_is_seeded(engine):
    for speculate in (True, False):
        a = engine.generate(PROMPT, task="fp32sub", temperature=0.8, top_p=0.95, seed=5, max_new_tokens=24,
                            speculate=speculate)
        b = engine.generate(PROMPT, task="fp32sub", temperature=0.8, top_p=0.95, seed=5, max_new_tokens=24,
                            speculate=speculate)
        c = engine.generate(PROMPT, task="fp32sub", temperature=0.8, top_p=0.95, seed=6, max_new_tokens=24,
                            speculate=speculate)
        assert a.token_ids == b.token_ids
        assert a.token_ids != c.token_ids
        assert a.metrics.speculative == speculate


def test_seeded_sampling_is_reproducible_with_the_guard_on(tiny_engine):
    """The guard turns drafting off from timings; a seeded sampled request must not depend on when
    (or whether) that happens."""
    for task in ("int8skip", "fp32sub"):
        outs = {tuple(tiny_engine.generate(PROMPT, task=task, temperature=0.9, top_k=20, seed=3,
                                           max_new_tokens=30).token_ids) for _ in range(4)}
        assert len(outs) == 1, f"{task}: one seed, {len(outs)} different outputs"
