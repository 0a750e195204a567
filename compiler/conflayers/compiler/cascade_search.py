"""Choosing a draft cascade: a cheaper evaluated draft proposing for the chosen draft, by replay.

In greedy decoding a cascade proposes exactly its top stage's own tokens (the top stage keeps
only the lower stage's tokens it would have drafted itself, runtime/cascade.py), so the target
accepts what the top stage alone would get: that part is replayed exactly from the top stage's
recorded blocks under the cascade's (k, confidence stop), as ngram_search.walk replays the model
draft. What changes is what those tokens cost: rounds of lower-stage steps, each closed by one
top-stage check pass over them, instead of one top-stage step per token. The rounds are replayed
from the lower stage's recorded blocks at the same positions (its run of agreement from position
x is known wherever its k_max walk fed the reference's own tokens up to x; elsewhere its mean
round stands in). Its agreement with the top stage is estimated by its recorded agreement with
the target: the top stage agrees with the target on most tokens (0.9-0.99 for SmolLM2's int8
draft), so this is a stand-in; the measurement below checks the pick.

Costs come from the cost model: a lower step draft_ms(lower), a check pass over n tokens
check_ms(top, n) (the top's step times its precision's measured width curve), a verify over n
tokens verify_ms(n). A cascade is picked only where predicted more than MARGIN faster than the
top stage alone (and plain decoding), and, when the compile measures its own costs, measured
faster too: the best predicted cascade and the top stage alone decode a few search references
through the runtime's loop, interleaved (their output must equal the reference: greedy
identity). A compile with a reused cost model (--cost-model) decides by prediction alone, so that
it stays repeatable.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .evaluate import replay
from . import ngram_search
from .ngram_search import _model_step, model_block_positions

MARGIN = 1.03                 # a cascade must beat the top stage alone by 3%
LOWER_MAX_COST = 0.8          # a lower stage must cost less than this share of a top-stage step
MAX_LOWERS = 4                # lower-stage candidates tried (the best by their own prediction)
LOWER_K = (1, 2, 3, 4, 6)
LOWER_STOPS = (None, 0.5, 0.7, 0.9)
TOP_STOPS = (None, 0.5, 0.6, 0.7, 0.8, 0.9)    # search.STOP_THRESHOLDS
MEASURE_PROMPTS = 3


@dataclass
class Draft:
    """One evaluated draft as a stage: its blocks (full vocabulary walk, its chosen vocabulary),
    where they start per reference, its step cost and its vocabulary size (None: full)."""
    cand: object                 # search.Candidate
    full: list
    chosen: list
    starts: list                 # per reference: (sorted start positions, block indices)
    ms: float
    vocab: int | None
    size: int                    # vocabulary its head scores
    runs: dict = field(default_factory=dict)     # (reference, position, stop) -> lower_run's answer


def as_stage(cand, refs, max_new_tokens: int, cost, vocab_size: int) -> Draft:
    full, vocab = cand.record.blocks[None], cand.choice.vocab
    at = model_block_positions(refs, full, cand.record.k_max, max_new_tokens)
    starts = [(sorted(d), [d[p] for p in sorted(d)]) for d in at]
    size = vocab or vocab_size
    return Draft(cand, full, cand.record.blocks[vocab], starts, cost.draft_ms(cand.plan, size), vocab, size)


def lower_run(low: Draft, r: int, x: int):
    """(tokens the lower stage agrees for from position x on, its confidences there), or None
    where its recorded walk did not feed the reference's own tokens up to x. A run that reaches
    the end of a fully agreed block goes on in the block that follows it (the one position in
    between, the target's own token in the lower stage's walk, is counted as agreed)."""
    starts, idx = low.starts[r]
    i = bisect.bisect_right(starts, x) - 1
    if i < 0:
        return None
    o = x - starts[i]
    b = low.chosen[idx[i]]
    run = min(low.full[idx[i]].accepted_full, b.accepted_full)    # fed the reference's tokens
    if o > run or o >= len(b.matches):
        return None
    agreed, conf = run - o, [b.confidence[o:]]
    while run == len(b.matches) and i + 1 < len(starts) and starts[i + 1] == starts[i] + run + 1:
        i += 1
        b = low.chosen[idx[i]]
        run = min(low.full[idx[i]].accepted_full, b.accepted_full)
        agreed += 1 + run
        conf += [conf[-1][-1:], b.confidence]
    return agreed, np.concatenate(conf)


def stopped_run(low: Draft, r: int, x: int, stop):
    """lower_run's (agreed tokens, index of the first confidence below `stop` or a large number),
    cached: every policy of the grid asks for the same positions."""
    key = (r, x, stop)
    if key not in low.runs:
        run = lower_run(low, r, x)
        if run is None:
            low.runs[key] = None
        else:
            below = np.nonzero(run[1] < stop)[0] if stop is not None else []
            low.runs[key] = (run[0], int(below[0]) if len(below) else 1 << 30)
    return low.runs[key]


@dataclass
class Walk(ngram_search.Walk):
    """A cascade policy's replay: ngram_search.Walk's tallies, plus the lower stage's rounds,
    drafted and accepted tokens."""
    rounds: float = 0.0
    lower_drafted: float = 0.0
    lower_accepted: float = 0.0


def top_steps(refs, top: Draft, k: int, stop, max_new_tokens: int) -> list[tuple]:
    """The target steps of the top stage under (k, stop): (reference, position, drafted, accepted,
    most it could draft) per step, exact at recorded blocks, its mean step elsewhere
    (ngram_search.walk's model walk)."""
    mean = replay(top.chosen, k, stop)
    mean_d = mean.drafted_tokens / max(mean.draft_steps, 1)
    mean_a = mean.accepted_tokens / max(mean.draft_steps, 1)
    out = []
    for r, ref in enumerate(refs):
        starts, idx = top.starts[r]
        at = dict(zip(starts, idx))
        t, pos = len(ref.sequence) - 1, len(ref.prompt)
        while True:
            limit = min(t - pos, max_new_tokens - (pos - len(ref.prompt) + 1) - 1)
            if limit < 1:
                break
            if pos in at:
                d, a = _model_step(top.chosen[at[pos]], k, stop)
                d = min(d, limit)
                a = min(a, d)
            else:
                d, a = min(mean_d, limit), min(mean_a, limit)
            out.append((r, pos, d, a, min(k, limit)))
            pos += int(round(a)) + 1
    return out


def walk(steps, top: Draft, cost, low: Draft | None = None, k1: int = 0, stop1=None) -> Walk:
    """Replay the steps with the top stage drafting alone (low None) or fed by the lower stage
    under its policy (k1, stop1)."""
    w = Walk()
    if low is not None:
        mean = replay(low.chosen, k1, stop1)
        mean_d1 = mean.drafted_tokens / max(mean.draft_steps, 1)
        mean_a1 = mean.accepted_tokens / max(mean.draft_steps, 1)
    plan, size = top.cand.plan, top.size
    if low is not None:    # check[n]: a check pass over n lower tokens + the fed one
        check = [cost.check_ms(plan, size, n + 1) for n in range(k1 + 1)]
    for r, pos, d, a, most in steps:
        w.steps += 1
        w.drafted += d
        w.accepted += a
        w.tokens += a + 1
        w.ms += cost.verify_ms(d + 1)
        if low is None:
            w.ms += d * top.ms
            continue
        made = 0.0
        while made < d - 1e-9:          # rounds: lower steps, then one check pass over them
            room = d - made
            # the lower stage drafts for the room the policy leaves (the runtime cannot know
            # where the top stage's confidence stop will end the draft)
            n1 = min(k1, int(np.ceil(most - made)) - 1)
            m = 0.0
            if n1 > 0:
                run = stopped_run(low, r, pos + int(round(made)), stop1)
                if run is None:
                    n1, m = min(mean_d1, n1), min(mean_a1, n1)
                else:
                    agreed, first_below = run
                    n1 = min(n1, first_below + 1)
                    m = min(agreed, n1)
            w.rounds += 1
            w.lower_drafted += n1
            w.lower_accepted += m
            w.ms += n1 * low.ms + (check[int(n1)] if n1 == int(n1) else cost.check_ms(plan, size, n1 + 1))
            made += min(m + 1, room)
    return w


def search(refs, max_new_tokens: int, cost, result, vocab_size: int, k_max: int, measure=None, log=print) -> dict:
    """The best predicted cascade under the search's best draft (its top stage) from the other
    evaluated drafts, or the reason there is none. measure(lower, k1, stop1, k, stop) -> (single,
    cascade) tokens/s through the runtime, or None when no graphs are at hand. Returns the
    profile's search.cascade section."""
    best = result.best
    top = as_stage(best, refs, max_new_tokens, cost, vocab_size)
    step = cost.full_ms[0]
    ch = best.choice
    single = walk(top_steps(refs, top, ch.k, ch.confidence_stop, max_new_tokens), top, cost)
    single_sp = single.speedup(step)
    section = {"kind": "model", "single_predicted_speedup": round(single_sp, 4), "stages": None,
               "method": "replay of the top stage's recorded blocks (exact target acceptance) with rounds of "
                         "the lower stage's recorded blocks (its agreement with the target standing in for "
                         "its agreement with the top stage), cost model incl. the check pass width curve",
               "check_relative": cost.draft_relative.get(best.plan.precision) or "full graph's verify curve"}
    lowers = [c for c in result.candidates
              if c.record.complete and c.plan.key != best.plan.key
              and set(c.plan.kv_layers) <= set(best.plan.kv_layers)
              and cost.draft_ms(c.plan, c.choice.vocab or vocab_size) < LOWER_MAX_COST * top.ms]
    lowers = sorted(lowers, key=lambda c: -c.choice.speedup)[:MAX_LOWERS]
    if not lowers:
        section["why"] = (f"no evaluated draft costs less than {LOWER_MAX_COST:.0%} of the top stage's step "
                          f"({top.ms:.2f} ms) while keeping attention only where it does")
        section["candidates"] = []
        return section
    policies = [(k, s) for k in range(1, k_max + 1) for s in TOP_STOPS]
    steps = {p: top_steps(refs, top, p[0], p[1], max_new_tokens) for p in policies}
    rows = []
    for cand in lowers:
        low = as_stage(cand, refs, max_new_tokens, cost, vocab_size)
        for (k, stop), st in steps.items():
            for k1 in (x for x in LOWER_K if x < k):
                for stop1 in LOWER_STOPS:
                    w = walk(st, top, cost, low, k1, stop1)
                    rows.append({"lower": cand.origin, "lower_plan": cand.plan.to_json(), "lower_vocab": low.vocab,
                                 "lower_ms": round(low.ms, 3), "k": k, "confidence_stop": stop, "lower_k": k1,
                                 "lower_confidence_stop": stop1, "predicted_speedup": round(w.speedup(step), 4),
                                 "rounds_per_step": round(w.rounds / max(w.steps, 1), 3),
                                 "lower_acceptance": round(w.lower_accepted / max(w.lower_drafted, 1e-9), 4),
                                 "_cand": cand})
    rows.sort(key=lambda x: -x["predicted_speedup"])
    pick = rows[0] if rows else None
    section["candidates"] = [{k: v for k, v in r.items() if k != "_cand"} for r in rows[:10]]
    if pick is None or pick["predicted_speedup"] <= max(single_sp, 1.0) * MARGIN:
        got = f"x{pick['predicted_speedup']:.2f}" if pick else "none"
        section["why"] = (f"no cascade is predicted more than {MARGIN - 1:.0%} faster than the top stage alone "
                          f"(x{single_sp:.2f}) and plain decoding (best cascade: {got}, lower stage "
                          f"{pick['lower'] if pick else '-'})")
        return section
    if measure is not None:
        measured = measure(pick["_cand"], pick["lower_k"], pick["lower_confidence_stop"], pick["k"],
                           pick["confidence_stop"])
        section["measured"] = measured
        log(f"  cascade measured: top stage alone {measured['single_tokens_per_s']:.1f} tok/s, cascade "
            f"{measured['cascade_tokens_per_s']:.1f} tok/s on {measured['prompts']} search prompts")
        if measured["cascade_tokens_per_s"] <= measured["single_tokens_per_s"]:
            section["why"] = (f"the best cascade was predicted x{pick['predicted_speedup']:.2f} against the top "
                              f"stage's x{single_sp:.2f}, but measured slower "
                              f"({measured['cascade_tokens_per_s']:.1f} vs {measured['single_tokens_per_s']:.1f} tok/s)")
            return section
    c = pick["_cand"]
    section.update(kind="cascade", predicted_speedup=pick["predicted_speedup"],
                   top={"k": pick["k"], "confidence_stop": pick["confidence_stop"]},
                   stages=[{**c.plan.to_json(), "max_draft_tokens": pick["lower_k"],
                            "confidence_stop": pick["lower_confidence_stop"], "vocab": pick["lower_vocab"],
                            "found_by": c.origin}],
                   why=(f"a cascade with the lower stage {c.origin} (k={pick['lower_k']}, stop="
                        f"{pick['lower_confidence_stop']}) is predicted x{pick['predicted_speedup']:.2f} against "
                        f"the top stage alone x{single_sp:.2f}"
                        + (", and measured faster" if measure is not None else "")))
    return section


def apply(profile: dict, section: dict, vocab_ids_for) -> None:
    """Record the cascade choice in a profile (search.cascade always; draft.kind "cascade" with
    its stages when a cascade won and beats the drafter ngram_search picked, if any).
    vocab_ids_for(size) -> the token ids of a vocabulary subset of that size."""
    profile["search"]["cascade"] = section
    if section["kind"] != "cascade":
        return
    draft = profile["draft"]
    other = profile["search"].get("drafter") or {}
    if draft.get("kind", "model") != "model" and other.get("predicted_speedup", 0.0) >= section["predicted_speedup"]:
        section["why"] += (f"; not used: the {draft['kind']} drafter is predicted faster "
                           f"(x{other['predicted_speedup']:.2f})")
        section["kind"] = "model"
        return
    stages = []
    for st in section["stages"]:
        ids = None if st["vocab"] is None else list(vocab_ids_for(st["vocab"]))
        stages.append({k: st[k] for k in ("skip_layers", "skip_attention", "skip_mlp", "precision",
                                          "max_draft_tokens", "confidence_stop")}
                      | {"vocab_subset": None if ids is None else {"size": len(ids), "token_ids": ids}})
    draft.pop("ngram", None)
    draft.update(kind="cascade", max_draft_tokens=section["top"]["k"],
                 confidence_stop=section["top"]["confidence_stop"], cascade={"stages": stages})
    profile["figures"]["predicted_speedup"] = section["predicted_speedup"]


def measurer(factory, spec, refs, best, ids_for, prompts: int = MEASURE_PROMPTS):
    """search()'s measure: the top stage alone (its own policy) and the cascade decode the first
    search references greedily through the runtime's loop, interleaved per prompt, after one
    warm-up; each output must equal the reference (greedy identity)."""
    from conflayers.runtime.cascade import CascadeDrafter
    from conflayers.runtime.decoding import DecodeStats, generate
    from conflayers.runtime.drafter import DraftPolicy, LayerSkipDrafter
    from conflayers.runtime.ort_backend import KVCache, device_of
    from conflayers.runtime.sampling import Sampler

    def model(cand, k, stop):
        vocab = cand.choice.vocab
        ids = None if vocab is None else np.asarray(ids_for(vocab), np.int64)
        return LayerSkipDrafter(factory.body(cand.plan), factory.head(cand.plan.precision, ids), ids,
                                spec.vocab_size, DraftPolicy(k, stop))

    def decode(drafter, ref, n):
        cache = KVCache(spec, len(ref.prompt) + n + 16, device_of(factory.providers))   # where the runtime keeps it
        stats = DecodeStats()
        out = [t for it in generate(factory.full().bind(cache), ref.prompt, n, Sampler(),
                                    drafter=drafter.bind(ref.prompt), stats=stats) for t in it]
        if out != ref.output[:n]:
            raise RuntimeError("a draft cascade changed the greedy output while measuring it (a bug: "
                               "only the target's verify decides what is kept)")
        return stats

    def measure(lower, k1, stop1, k, stop):
        ch = best.choice
        systems = {"single": model(best, ch.k, ch.confidence_stop),
                   "cascade": CascadeDrafter(model(lower, k1, stop1), model(best, k, stop))}
        used = [r for r in refs if len(r.output) > 1][:prompts]
        for d in systems.values():        # warm-up: first runs of new head sessions are slow
            decode(d, used[0], min(16, len(used[0].output)))
        secs, toks = dict.fromkeys(systems, 0.0), dict.fromkeys(systems, 0)
        for ref in used:
            for name, d in systems.items():
                st = decode(d, ref, len(ref.output))
                secs[name] += st.decode_s
                toks[name] += st.tokens - 1
        rate = {n: toks[n] / secs[n] if secs[n] else 0.0 for n in systems}
        return {"prompts": len(used), "single_tokens_per_s": round(rate["single"], 2),
                "cascade_tokens_per_s": round(rate["cascade"], 2)}

    return measure
