"""The ConfLayers selection rule and its adaptive threshold (arXiv 2604.14612, our words).

Given per-layer confidences c_i (attention + MLP confidence of layer i):
  1. z-normalise c over the candidate layers;
  2. take the second derivative of z along the layer axis (curvature), use its magnitude, rescale
     it to [0, 1] and shift it to mean 0.5;
  3. give layer i a local window of half-width w_i = round(base * (1 + r_i) * (1 + i / L)): larger
     where the curve bends and deeper in the stack;
  4. skip layer i when c_i < mean(window) - lambda * std(window), the window excluding i itself.
lambda starts at 0 and adapts after each iteration: +step when the skipped fraction is above
target + 0.25, -step when below target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RuleSettings:
    base_window: int = 2
    protect_first: bool = True      # never skip layer 0 ...
    protect_last: bool = True       # ... or the last layer, unless told to

    def candidates(self, num_layers: int) -> list[int]:
        lo = 1 if self.protect_first else 0
        hi = num_layers - 1 if self.protect_last else num_layers
        return list(range(lo, hi))


@dataclass(frozen=True)
class Selection:
    skip: tuple[int, ...]
    thresholds: tuple[float, ...]   # per layer (nan for protected layers)
    windows: tuple[int, ...]        # half-widths per layer (0 for protected layers)
    margin: tuple[float, ...]       # c_i - threshold_i: how far below (negative) its window a layer is


def curvature_weights(z: np.ndarray) -> np.ndarray:
    """|second derivative| of z rescaled to [0, 1] with mean 0.5."""
    if len(z) < 3:
        return np.full(len(z), 0.5)
    d2 = np.abs(np.gradient(np.gradient(z)))
    span = d2.max() - d2.min()
    r = (d2 - d2.min()) / span if span > 0 else np.zeros_like(d2)
    r = r - r.mean() + 0.5
    return np.clip(r, 0.0, 1.0)


def select(confidence, lam: float, settings: RuleSettings = RuleSettings()) -> Selection:
    c_all = np.asarray(confidence, np.float64)
    n = len(c_all)
    cand = settings.candidates(n)
    thresholds = [float("nan")] * n
    windows = [0] * n
    margin = [float("nan")] * n
    if len(cand) < 2:
        return Selection((), tuple(thresholds), tuple(windows), tuple(margin))
    c = c_all[cand]
    std = c.std()
    z = (c - c.mean()) / std if std > 0 else np.zeros_like(c)
    r = curvature_weights(z)
    skip = []
    for j, layer in enumerate(cand):
        w = int(round(settings.base_window * (1.0 + r[j]) * (1.0 + layer / n)))
        lo, hi = max(0, j - w), min(len(cand), j + w + 1)
        neighbours = np.concatenate([c[lo:j], c[j + 1:hi]])
        thr = neighbours.mean() - lam * neighbours.std()
        thresholds[layer], windows[layer], margin[layer] = float(thr), w, float(c[j] - thr)
        if c[j] < thr - 1e-9 * (abs(thr) + 1.0):      # strictly below, not by rounding noise
            skip.append(layer)
    return Selection(tuple(skip), tuple(thresholds), tuple(windows), tuple(margin))


@dataclass
class AdaptiveLambda:
    """lambda's update rule, keyed on the fraction of candidate layers skipped."""
    target: float = 0.4
    step: float = 0.05
    value: float = 0.0
    band: float = 0.25

    def update(self, skipped_fraction: float) -> float:
        if skipped_fraction > self.target + self.band:
            self.value += self.step
        elif skipped_fraction < self.target:
            self.value -= self.step
        self.value = round(self.value, 6)
        return self.value


def confidence_ranking(margins) -> list[int]:
    """Layers ordered from most to least skippable (most negative margin first)."""
    m = np.asarray(margins, np.float64)
    order = [int(i) for i in np.argsort(m) if not np.isnan(m[i])]
    return order
