"""Draft vocabulary subsets (FR-Spec style): the draft scores only the N tokens most frequent in
calibration text and outputs; verification keeps the full vocabulary, so output is unchanged.

Ranking: frequency (descending), then token id (ascending: BPE ids roughly follow merge order,
i.e. corpus frequency). End tokens are always kept. The search measures each subset on every
reference with counts that leave that reference out, so the estimate is what a new prompt sees.
"""
from __future__ import annotations

import numpy as np


def counts(token_lists, vocab_size: int) -> np.ndarray:
    c = np.zeros(vocab_size, np.int64)
    for ids in token_lists:
        np.add.at(c, np.asarray(ids, np.int64), 1)
    return c


def top_ids(freq: np.ndarray, n: int, always=()) -> np.ndarray:
    """The n highest-ranked token ids, sorted ascending (the head's row order)."""
    order = np.lexsort((np.arange(len(freq)), -freq))     # by count desc, then id asc
    chosen = list(dict.fromkeys([int(t) for t in always] + order[:n].tolist()))[:max(n, len(always))]
    return np.array(sorted(chosen), np.int64)


def leave_one_out_options(ref_tokens: list[list[int]], pool: np.ndarray, sizes, vocab_size: int,
                          always=()) -> list[dict]:
    """Per reference: {None: None (full vocabulary), size: ids...} with that reference left out."""
    own = [counts([t], vocab_size) for t in ref_tokens]
    total = pool + sum(own, np.zeros(vocab_size, np.int64))
    sizes = [s for s in sizes if s < vocab_size]
    return [{None: None, **{s: top_ids(total - mine, s, always) for s in sizes}} for mine in own]
