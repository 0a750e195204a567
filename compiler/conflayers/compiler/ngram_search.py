"""Choosing between the model draft, n-gram lookup and the hybrid of both, by replay.

An n-gram proposal at a position is a pure function of the text so far, so on the recorded
references (prompt + the full model's greedy output) its accepted length is computed directly, no
graph runs: walk each reference as the runtime would (feed seq[pos], propose, keep the agreed
prefix + 1, advance). The hybrid walk takes the n-gram proposal when its match is at least
min_match tokens long, else the model draft: at a position where the search recorded a model
draft block (the model-only walk passes there) its recorded matches under the chosen policy
(k, confidence stop) are exact; elsewhere the model's mean drafted / accepted tokens per step
stand in (an estimate; the runtime validation measures the real thing).

Costs come from the cost model: a verify of n tokens costs verify_ms(n) (per step, its own
width), a model draft step draft_ms per token, an n-gram proposal NGRAM_MS: its Python cost (one
index extend + look-ups of n = 4..1), measured once (follower_table times it: ~0.002 ms on a
2-core EPYC) and fixed, so that a compile with a reused cost model stays deterministic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from conflayers.runtime.ngram import NGramIndex, NGramPolicy
from conflayers.runtime.speculation import speedup_over_plain

N_MAX = 4                                   # longest match tried by any policy here
MARGIN = 1.03                               # n-gram / hybrid must beat the model draft by 3%
NGRAM_MS = 0.01                             # one proposal (measured ~0.002 ms; rounded up)


@dataclass
class Walk:
    """One policy's replay: steps, drafted and accepted tokens (model steps may be fractional
    where the mean stands in) and the predicted time."""
    steps: int = 0
    ngram_steps: int = 0
    drafted: float = 0.0
    accepted: float = 0.0
    tokens: float = 0.0
    ms: float = 0.0

    def speedup(self, step_ms: float) -> float:
        if not self.steps:
            return 0.0
        return speedup_over_plain(self.tokens / self.steps - 1, self.ms / self.steps, step_ms)


def follower_table(seq: list[int]) -> tuple[np.ndarray, float]:
    """follow[pos, n] = the position after the most recent earlier occurrence of seq[pos-n+1..pos]
    (-1: none), as the runtime's NGramIndex sees the text seq[:pos+1]; and the index's cost in ms
    per step (one extend + one lookup of every n)."""
    index = NGramIndex(N_MAX)
    out = np.full((len(seq), N_MAX + 1), -1, np.int64)
    t0 = time.perf_counter()
    for pos, tok in enumerate(seq):
        index.extend([tok])
        for n in range(1, min(N_MAX, pos + 1) + 1):
            f = index.follow[n].get(tuple(seq[pos + 1 - n:pos + 1]))
            if f is not None:
                out[pos, n] = f
    per_step_ms = (time.perf_counter() - t0) * 1000.0 / max(len(seq), 1)
    return out, per_step_ms


def model_block_positions(refs, blocks, k_max: int, max_new_tokens: int) -> list[dict]:
    """Per reference, position -> index of the model draft's recorded block there (evaluate.py's
    walk: it advances by the full-vocabulary draft's accepted length + 1)."""
    out, i = [], 0
    for ref in refs:
        t, pos, here = len(ref.sequence) - 1, len(ref.prompt), {}
        while i < len(blocks):
            produced = pos - len(ref.prompt) + 1
            if min(k_max, t - pos, max_new_tokens - produced - 1) < 1:
                break
            here[pos] = i
            pos += blocks[i].accepted_full + 1
            i += 1
        out.append(here)
    return out


def _model_step(block, k: int, stop: float | None) -> tuple[int, int]:
    n = min(k, block.available)
    if stop is not None:
        below = np.nonzero(block.confidence[:n] < stop)[0]
        if len(below):
            n = int(below[0]) + 1
    lead = block.matches[:n]
    return n, int(np.argmin(lead)) if not lead.all() else len(lead)


def walk(refs, tables, max_new_tokens: int, cost, ngram: NGramPolicy | None, min_match: int | None,
         model=None, ngram_ms: float = 0.0) -> Walk:
    """Replay one drafter over the references. ngram None: model only; min_match None: n-gram
    only; both: hybrid. model: (blocks of the full vocabulary walk, their blocks for the chosen
    vocabulary, positions per reference, k, stop, draft_ms, mean drafted, mean accepted)."""
    w = Walk()
    for r, (ref, follow) in enumerate(zip(refs, tables)):
        seq, t = ref.sequence, len(ref.sequence) - 1
        pos = len(ref.prompt)
        while True:
            produced = pos - len(ref.prompt) + 1
            limit = min(t - pos, max_new_tokens - produced - 1)
            if limit < 1:
                break
            proposal, match = [], 0
            if ngram is not None:
                for n in range(min(ngram.n_max, pos + 1), ngram.n_min - 1, -1):
                    f = follow[pos, n]
                    if f >= 0:
                        proposal, match = seq[f:min(f + min(ngram.max_tokens, limit), pos + 1)], n
                        break
            w.steps += 1
            if ngram is not None and (min_match is None or (proposal and match >= min_match)):
                acc = 0
                while acc < len(proposal) and proposal[acc] == seq[pos + 1 + acc]:
                    acc += 1
                w.ngram_steps += 1
                w.drafted += len(proposal)
                w.accepted += acc
                w.tokens += acc + 1
                w.ms += ngram_ms + cost.verify_ms(len(proposal) + 1)
                pos += acc + 1
                continue
            _, chosen, positions, k, stop, draft_ms, mean_d, mean_a = model
            if pos in positions[r]:
                d, a = _model_step(chosen[positions[r][pos]], k, stop)
                d = min(d, limit)
                a = min(a, d)
            else:                   # no recorded block here: the model's mean step stands in
                d, a = min(mean_d, limit), min(mean_a, limit)
            w.drafted += d
            w.accepted += a
            w.tokens += a + 1
            w.ms += ngram_ms * (ngram is not None) + d * draft_ms + cost.verify_ms(d + 1)
            pos += int(round(a)) + 1
    return w


def search(refs, max_new_tokens: int, cost, record, choice, k_max: int) -> dict:
    """The drafter kind with the best predicted tokens/s: the model draft (the search's choice),
    n-gram lookup or the hybrid, over a small grid of n-gram settings. Returns the profile's
    search.drafter section (the choice, why, and every candidate's prediction)."""
    from .evaluate import replay
    tables = [follower_table(r.sequence)[0] for r in refs]
    ngram_ms = NGRAM_MS
    full_blocks, chosen = record.blocks[None], record.blocks[choice.vocab]
    mean = replay(chosen, choice.k, choice.confidence_stop)
    positions = model_block_positions(refs, full_blocks, record.k_max, max_new_tokens)
    model = (full_blocks, chosen, positions, choice.k, choice.confidence_stop, choice.draft_ms,
             mean.drafted_tokens / max(mean.draft_steps, 1), mean.accepted_tokens / max(mean.draft_steps, 1))
    step = cost.full_ms[0]
    rows = [{"kind": "model", "predicted_speedup": walk(refs, tables, max_new_tokens, cost, None, None,
                                                        model).speedup(step)}]
    lengths = sorted({t for t in (3, 5, 8, k_max) if t <= k_max})
    for n_max in (2, 3, 4):
        for n_min in (1, 2):
            for max_tokens in lengths:
                g = NGramPolicy(n_min, n_max, max_tokens, min_match=n_min)
                w = walk(refs, tables, max_new_tokens, cost, g, None, model, ngram_ms)
                rows.append({"kind": "ngram", "ngram": g.to_json(), "predicted_speedup": w.speedup(step),
                             "accepted_per_step": w.accepted / max(w.steps, 1)})
                for min_match in range(max(n_min, 2), n_max + 1):
                    h = NGramPolicy(n_min, n_max, max_tokens, min_match)
                    w = walk(refs, tables, max_new_tokens, cost, h, min_match, model, ngram_ms)
                    rows.append({"kind": "hybrid", "ngram": h.to_json(), "predicted_speedup": w.speedup(step),
                                 "ngram_step_share": w.ngram_steps / max(w.steps, 1)})
    for row in rows:
        row["predicted_speedup"] = round(row["predicted_speedup"], 4)
    model_sp = rows[0]["predicted_speedup"]
    best = max(rows[1:], key=lambda x: x["predicted_speedup"])
    if best["predicted_speedup"] > max(model_sp, 1.0) * MARGIN:
        pick = best
        why = (f"{best['kind']} predicted x{best['predicted_speedup']:.2f} beats the model draft's "
               f"x{model_sp:.2f} (and plain decoding) by more than {MARGIN - 1:.0%}")
    else:
        pick = rows[0]
        why = (f"no n-gram or hybrid setting beats the model draft's x{model_sp:.2f} (or plain decoding) "
               f"by more than {MARGIN - 1:.0%} (best: {best['kind']} x{best['predicted_speedup']:.2f})")
    top = sorted(rows[1:], key=lambda x: -x["predicted_speedup"])[:12]
    ngram_sp = max(r["predicted_speedup"] for r in rows if r["kind"] == "ngram")
    return {"kind": pick["kind"], "ngram": pick.get("ngram"), "predicted_speedup": pick["predicted_speedup"],
            "model_predicted_speedup": model_sp, "ngram_predicted_speedup": ngram_sp, "why": why, "ngram_ms_per_step": round(ngram_ms, 4),
            "method": "replay on the calibration references (exact for n-gram proposals and recorded "
                      "model blocks, the model's mean step elsewhere), per-step verify widths",
            "candidates": top}


def apply(profile: dict, section: dict) -> None:
    """Record the drafter choice in a profile built for the model draft: draft.kind / draft.ngram
    when n-gram or hybrid won (a model draft's fields stay: the hybrid uses them, an n-gram
    profile ignores them), search.drafter, and the predicted speed-up of the choice."""
    profile["search"]["drafter"] = section
    if section["kind"] != "model":
        profile["draft"]["kind"] = section["kind"]
        profile["draft"]["ngram"] = section["ngram"]
        profile["figures"]["predicted_speedup"] = section["predicted_speedup"]
