"""The screened head (runtime/conflayers/runtime/head.py) against the plain 8-bit head: one
bundle's full graph in two sessions, teacher-forced over real text, timed side by side.

    python tools/experiments/head_screening/screened.py bundles/gemma3-native [--positions 256] [--rounds 15]

Feeds the README's first `positions` tokens one pass of 8 at a time to both sessions and checks,
row by row, that the screened head's argmax is the plain head's and that its finite logits are
the plain head's bit for bit; counts the columns left exact. Then times one-row steps and 9-row
passes at that context (IOBinding, interleaved rounds, minimum), and the screened head with
full_logits set (every column exact: what a sampled row costs). Exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from conflayers.runtime import contract, head, kernels
from conflayers.runtime.bundle import Bundle
from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session
from conflayers.runtime.timing import time_jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    if not head.available():
        sys.exit(f"the screened head does not run here ({kernels.describe()})")
    bundle = Bundle.open(args.bundle)
    spec = bundle.spec
    runners = {name: GraphRunner(create_session(bundle.full_graph, ["CPUExecutionProvider"], screen_head=screen),
                                 list(range(spec.num_layers)), contract.LOGITS)
               for name, screen in (("plain", False), ("screened", True))}
    assert runners["screened"].screened and not runners["plain"].screened
    bound = {k: r.bind(KVCache(spec, args.positions + 64)) for k, r in runners.items()}
    from tokenizers import Tokenizer
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "README.md")
    ids = Tokenizer.from_file(os.path.join(args.bundle, "tokenizer.json")).encode(open(readme).read()).ids[:args.positions]
    same, kept = True, []
    for st in range(0, len(ids) - 8 + 1, 8):
        a = bound["plain"].run(ids[st:st + 8], st)
        b = bound["screened"].run(ids[st:st + 8], st)
        fin = np.isfinite(b)
        same &= bool(np.array_equal(a.argmax(-1), b.argmax(-1)) and np.array_equal(a[fin], b[fin]))
        kept += fin.sum(-1).tolist()
    n = b.shape[-1]
    print(f"{len(kept)} rows: screened argmax == plain argmax and exact logits bit for bit: {same}")
    print(f"columns computed exactly per row: median {int(np.median(kept))}, max {max(kept)} of {n} "
          f"({100 * np.mean(kept) / n:.2f}% on average)")
    ctx, tok = len(kept), ids[:9]
    jobs = {}
    for w in (1, 9):
        jobs[(w, "plain")] = lambda w=w: bound["plain"].run(tok[:w], ctx)
        jobs[(w, "screened")] = lambda w=w: bound["screened"].run(tok[:w], ctx)
        jobs[(w, "full_logits")] = lambda w=w: bound["screened"].run(tok[:w], ctx, full_logits=True)
    ms = time_jobs(jobs, args.rounds, "min")
    print(f"\nms per pass at context {ctx}, min of {args.rounds} interleaved rounds ({kernels.describe()})")
    for w in (1, 9):
        print(f"  {w} row(s): plain {ms[(w, 'plain')]:.2f}  screened {ms[(w, 'screened')]:.2f} "
              f"({ms[(w, 'plain')] / ms[(w, 'screened')]:.2f}x)  screened, full_logits {ms[(w, 'full_logits')]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
