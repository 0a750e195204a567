"""Token choice and speculative verification (greedy and sampled).

Sampling verification is the standard speculative rejection scheme (Leviathan et al. 2023,
Chen et al. 2023): a drafted token d with draft probability q(d) is kept with probability
min(1, p(d) / q(d)); on rejection the next token is drawn from normalise(max(0, p - q)). The
output distribution then equals sampling from the full model's (processed) distribution p.
"""
from __future__ import annotations

import math
import numbers
import sys

import numpy as np


class SamplingError(ValueError):
    """An invalid sampling parameter; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


def _finite(name: str, v) -> float:
    try:    # float() of an int beyond 1e308 raises OverflowError: refused like inf
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))
    except OverflowError:
        ok = False
    if not ok:
        raise SamplingError(name, f"must be a finite number, got {_short(v)}")
    return float(v)


def _short(v) -> str:
    """repr(v), cut to 40 characters (a 4,000-digit integer must not fill the error message)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _integer(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise SamplingError(name, f"must be an integer, got {_short(v)}")
    return int(v)


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        temperature, top_p, top_k = _finite("temperature", temperature), _finite("top_p", top_p), _integer("top_k", top_k)
        if seed is not None:
            seed = _integer("seed", seed)
            if seed < 0:
                raise SamplingError("seed", f"must be >= 0, got {_short(seed)}")
        if temperature < 0:
            raise SamplingError("temperature", f"must be >= 0, got {temperature}")
        if 0 < temperature < sys.float_info.min:      # subnormal: 1/T overflows to inf
            raise SamplingError("temperature", f"must be 0 (greedy) or at least {sys.float_info.min:.4g}, "
                                               f"got {temperature!r}")
        if not (0.0 < top_p <= 1.0):
            raise SamplingError("top_p", f"must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise SamplingError("top_k", f"must be >= 0, got {top_k}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Processed distribution (temperature, top-k, top-p) over the last axis, float64."""
        # Shift by the maximum before dividing: the top logit becomes exactly 0, so however small
        # the temperature (1e-309: 1/T overflows), the rest only reach -inf, never inf - inf = NaN.
        z = logits.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        with np.errstate(over="ignore"):
            z = z / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[..., -self.top_k, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        if self.top_p < 1.0:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, axis=-1)
            cum = np.cumsum(sorted_p, axis=-1)
            keep_sorted = (cum - sorted_p) < self.top_p        # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(axis=-1, keepdims=True)
        return p

    def draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(p.shape[-1], p=p))

    def pick(self, logits: np.ndarray) -> int:
        """Next token from one row of full-model logits."""
        if self.greedy:
            return int(np.argmax(logits))
        return self.draw(self.probs(logits))

    def verify(self, drafted: list[int], draft_probs: list[np.ndarray] | None,
               target_logits: np.ndarray) -> tuple[int, int]:
        """target_logits: [len(drafted)+1, V], row j scores the token after drafted[:j].
        Returns (number of drafted tokens kept, the full model's next token after them)."""
        if self.greedy:
            targets = np.argmax(target_logits, axis=-1)
            n = 0
            while n < len(drafted) and drafted[n] == targets[n]:
                n += 1
            return n, int(targets[n])
        return self.verify_probs(drafted, draft_probs, self.probs(target_logits))

    def verify_probs(self, drafted: list[int], draft_probs: list[np.ndarray], p: np.ndarray) -> tuple[int, int]:
        """verify's sampling rule over processed target distributions p [len(drafted)+1, V] (a
        draft cascade checks with its top stage's distributions, which it also passes on)."""
        for j, d in enumerate(drafted):
            q = draft_probs[j]
            if self.rng.random() * q[d] <= p[j, d]:     # accept with prob min(1, p/q)
                continue
            residual = np.maximum(p[j] - q, 0.0)
            total = residual.sum()
            nxt = self.draw(residual / total) if total > 0 else self.draw(p[j])
            return j, nxt
        return len(drafted), self.draw(p[len(drafted)])


def softmax_max(logits: np.ndarray) -> tuple[int, float]:
    """(argmax, its softmax probability) of one logits row: the draft's confidence."""
    i = int(np.argmax(logits))
    z = logits - logits[i]
    return i, float(1.0 / np.exp(z).sum())
