"""Per-request profile choice for task="auto".

The signal is cheap and needs no model: each profile stores the token-frequency signature of its
calibration prompts (raw text, no chat template). A request's prompt tokens are compared with each
signature by cosine similarity, with tokens common to every profile of the bundle down-weighted
(idf over the bundle's profiles). Below `min_score` no profile is close enough and the bundle's
default profile is used.
"""
from __future__ import annotations

import math
from collections import Counter

from .profile import Profile

MIN_SCORE = 0.05


class ProfileSelector:
    def __init__(self, profiles: dict[str, Profile], default: str | None, min_score: float = MIN_SCORE):
        self.default = default
        self.min_score = min_score
        sigs = {name: p.signature for name, p in profiles.items() if p.signature}
        n = max(len(profiles), 1)
        df = Counter(t for sig in sigs.values() for t in sig)
        self.idf = {t: math.log(1.0 + n / c) for t, c in df.items()}
        self.vectors = {}
        for name, sig in sigs.items():
            vec = {t: w * self.idf[t] for t, w in sig.items()}
            norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
            self.vectors[name] = {t: v / norm for t, v in vec.items()}

    def scores(self, token_ids: list[int]) -> dict[str, float]:
        tf = Counter(token_ids)
        q = {t: c * self.idf.get(t, 0.0) for t, c in tf.items()}
        qn = math.sqrt(sum(v * v for v in q.values())) or 1.0
        return {name: sum(q.get(t, 0.0) * w for t, w in vec.items()) / qn
                for name, vec in self.vectors.items()}

    def choose(self, token_ids: list[int]) -> tuple[str | None, float]:
        scores = self.scores(token_ids)
        if scores:
            name = max(scores, key=scores.get)
            if scores[name] >= self.min_score:
                return name, scores[name]
        return self.default, 0.0
