"""The ConfLayers selection rule on hand-made confidence curves with known answers."""
import numpy as np
import pytest

from conflayers.compiler.skiprule import (AdaptiveLambda, RuleSettings, confidence_ranking, curvature_weights,
                                          select)


def test_single_dip_is_skipped_at_any_lambda():
    c = [1.0] * 10
    c[4] = 0.2
    for lam in (0.0, 0.5, 1.0, 3.0):
        assert select(c, lam).skip == (4,)


def test_flat_curve_skips_nothing():
    assert select([0.7] * 12, 0.0).skip == ()


def test_first_and_last_layers_are_protected_unless_allowed():
    c = [0.1, 1, 1, 1, 1, 1, 1, 0.1]
    assert select(c, 0.0).skip == ()
    assert select(c, 0.0, RuleSettings(protect_first=False)).skip == (0,)
    assert select(c, 0.0, RuleSettings(protect_first=False, protect_last=False)).skip == (0, 7)
    sel = select(c, 0.0)
    assert np.isnan(sel.thresholds[0]) and np.isnan(sel.thresholds[7]) and sel.windows[0] == 0


def test_lambda_trades_skip_count():
    """A noisy curve with a shallow and a deep dip: lambda=0 takes both dips and the noise below
    the local means; a large lambda keeps only the deep dip."""
    rng = np.random.default_rng(0)
    c = 1.0 + 0.02 * rng.standard_normal(20)
    c[6] -= 0.035     # shallow dip
    c[13] -= 0.5      # deep dip
    low = select(c, 0.0).skip
    high = select(c, 2.5).skip
    assert 6 in low and 13 in low
    assert high == (13,)
    counts = [len(select(c, lam).skip) for lam in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)]
    assert counts == sorted(counts, reverse=True)        # monotone in lambda


def test_threshold_is_window_mean_minus_lambda_std_excluding_self():
    c = np.array([1.0, 0.9, 0.8, 0.3, 0.8, 0.9, 1.0, 1.1, 1.0])
    lam = 0.7
    sel = select(c, lam)
    for i in range(1, len(c) - 1):
        w = sel.windows[i]
        cand = list(range(1, len(c) - 1))
        j = cand.index(i)
        neigh = [c[cand[k]] for k in range(max(0, j - w), min(len(cand), j + w + 1)) if k != j]
        assert sel.thresholds[i] == pytest.approx(np.mean(neigh) - lam * np.std(neigh))
        assert (i in sel.skip) == (c[i] < sel.thresholds[i])


def test_windows_grow_with_curvature_and_depth():
    c = np.ones(24)
    c[5] = 0.5            # strong curvature around layer 5
    sel = select(c, 0.0)
    r = curvature_weights((c[1:-1] - c[1:-1].mean()) / c[1:-1].std())
    assert r.min() >= 0 and r.max() <= 1 and abs(r.mean() - 0.5) < 0.05
    for i in range(1, 23):    # the documented formula, layer by layer
        assert sel.windows[i] == round(2 * (1 + r[i - 1]) * (1 + i / 24))
    assert sel.windows[5] > sel.windows[9]                # curvature widens the window ...
    assert sel.windows[20] > sel.windows[10]              # ... and so does depth
    assert min(w for w in sel.windows if w) >= RuleSettings().base_window


def test_ranking_orders_by_margin():
    c = [1, 1, 0.4, 1, 0.7, 1, 1, 0.9, 1, 1]
    sel = select(c, 0.0)
    ranking = confidence_ranking(sel.margin)
    assert ranking[:3] == [2, 4, 7]
    assert 0 not in ranking and 9 not in ranking


@pytest.mark.parametrize("frac,expected", [(0.70, 0.05), (0.66, 0.05), (0.50, 0.0), (0.40, 0.0), (0.30, -0.05)])
def test_adaptive_lambda_rule(frac, expected):
    lam = AdaptiveLambda(target=0.4, step=0.05)
    assert lam.update(frac) == pytest.approx(expected)


def test_adaptive_lambda_converges_into_the_band():
    """Driving the rule with the skipped fraction it produces ends inside [target, target+0.25]."""
    rng = np.random.default_rng(1)
    c = 1.0 + 0.05 * rng.standard_normal(30)
    lam = AdaptiveLambda(target=0.1, step=0.05)
    n_cand = 28
    assert len(select(c, 0.0).skip) / n_cand > 0.1 + 0.25     # lambda=0 skips too many
    for _ in range(60):
        frac = len(select(c, lam.value).skip) / n_cand
        lam.update(frac)
    frac = len(select(c, lam.value).skip) / n_cand
    assert 0.1 - 0.05 <= frac <= 0.1 + 0.25 + 0.05
    assert lam.value > 0


def test_selection_is_deterministic():
    rng = np.random.default_rng(3)
    c = rng.random(30)
    a, b = select(c, 0.3), select(c.copy(), 0.3)
    assert a.skip == b.skip and a.windows == b.windows
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
