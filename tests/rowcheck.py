"""Rows of a full graph computed by passes of different widths (shared by test_exactness.py and the
script it runs under an emulated CPU: numpy and the runtime only, so it starts fast there)."""
from __future__ import annotations

import numpy as np

from conflayers.runtime.ort_backend import KVCache

ROWS = (1, 2, 3, 9)


def rows_by_pass_width(full, spec, ids, widths=ROWS, start=20, count=9) -> dict:
    """{n: logits of positions start..start+count-1 computed by passes of n tokens}, each run after
    the same one-token steps over ids[:start]."""
    out = {}
    for n in widths:
        g = full.bind(KVCache(spec, 128))
        for j, t in enumerate(ids[:start]):
            g.run([t], j)
        got = [g.run(ids[st:min(st + n, start + count)], st) for st in range(start, start + count, n)]
        out[n] = np.concatenate(got)
    return out
