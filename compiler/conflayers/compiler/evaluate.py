"""Measure how well a draft agrees with the full model, fast and exactly.

References: each calibration prompt is decoded greedily by the full graph with the runtime's own
loop; the KV cache it leaves holds the full model's keys/values for every position.

Evaluation of a draft walks each reference in blocks, as the runtime's speculative loop would
with k = k_max: from block start p (cache valid below p) the draft runs token by token, exactly
like BoundDrafter.propose, over the full model's KV; the verify pass is replaced by a lookup of
the known greedy output (greedy speculative output equals it). The draft's KV writes are undone
from the reference after each block. Drafting continues past the first mismatch until the
draft's confidence falls below `min_stop` (or k_max), so policies with a confidence stop can be
replayed from the same record (`replay`). With k = k_max and no confidence stop, the accepted
lengths equal the real loop's (tests/test_evaluate.py checks this on SmolLM2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from conflayers.runtime.decoding import generate
from conflayers.runtime.ort_backend import GraphRunner, KVCache
from conflayers.runtime.sampling import Sampler


@dataclass
class Reference:
    prompt: list[int]
    output: list[int]
    keys: dict = field(repr=False, default_factory=dict)     # layer -> [1, kvH, T, D] copy
    values: dict = field(repr=False, default_factory=dict)

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output


def make_references(full: GraphRunner, spec, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: frozenset, progress=None) -> list[Reference]:
    """Greedy full-model continuations of the prompts, with the KV cache they leave."""
    refs = []
    for ids in prompts:
        cache = KVCache(spec, len(ids) + max_new_tokens + 1)
        out = []
        for new in generate(full.bind(cache), ids, max_new_tokens, Sampler(), stop_ids=stop_ids):
            out.extend(new)
        t = len(ids) + len(out) - 1          # positions whose KV the loop computed
        ref = Reference(list(ids), out)
        for i in range(spec.num_layers):
            ref.keys[i] = cache.key_array(i)[:, :, :t].copy()
            ref.values[i] = cache.value_array(i)[:, :, :t].copy()
        refs.append(ref)
        if progress:
            progress(1)
    return refs


@dataclass
class BlockRecord:
    """One speculative step. matches/confidence cover the drafted positions that were recorded
    (drafting stops early once every option has mismatched and dropped below min_stop);
    `available` is how many positions the step could have drafted (k_max or to the end)."""
    matches: np.ndarray      # bool [n]
    confidence: np.ndarray   # float [n]
    available: int

    @property
    def accepted_full(self) -> int:
        return int(np.argmin(self.matches)) if not self.matches.all() else len(self.matches)


@dataclass
class DraftRecord:
    """Blocks per vocabulary option (None = full vocabulary), walked with k_max drafts."""
    k_max: int
    blocks: dict = field(default_factory=dict)    # vocab option -> list[BlockRecord]
    tokens: int = 0                                # reference tokens covered
    complete: bool = True                          # False when screened out early


def _score(logits: np.ndarray, options: dict) -> dict:
    """Draft choice and confidence (top-1 softmax probability) per vocabulary option, from one
    exponentiation of the full logits (a 262k vocabulary makes this the costly part)."""
    zmax = float(logits.max())
    e = np.exp(logits - zmax)
    out = {}
    for name, ids in options.items():
        if ids is None:
            i = int(np.argmax(logits))
            out[name] = (i, float(1.0 / e.sum()))
            continue
        sub = e[ids]
        j = int(np.argmax(sub))
        if sub[j] == 0.0:                 # the whole subset underflowed: decide on the logits
            z = logits[ids]
            j = int(np.argmax(z))
            sub = np.exp(z - z[j])
        out[name] = (int(ids[j]), float(sub[j] / sub.sum()))
    return out


def evaluate(body: GraphRunner, head: GraphRunner, spec, refs: list[Reference], k_max: int,
             max_new_tokens: int, vocab_options: dict | None = None,
             min_stop: float = 0.5, give_up=None) -> DraftRecord:
    """Walk every reference with the draft.

    vocab_options: name -> sorted token ids, or None for the full vocabulary (one dict for all
    references, or a list with one dict per reference: leave-one-out subsets; None, the full
    vocabulary, must be among them). The draft feeds the full vocabulary's own tokens (exactly
    the runtime's drafting with it); the other options are scored on the same path, exact up to
    their first mismatch, which is all that their accepted counts depend on. give_up(record) -> bool is asked after each reference, to
    screen out hopeless drafts early."""
    vocab_options = vocab_options if vocab_options is not None else {None: None}
    per_ref = vocab_options if isinstance(vocab_options, list) else [vocab_options] * len(refs)
    if None not in per_ref[0]:
        raise ValueError("the full vocabulary (None) must be among the vocabulary options")
    record = DraftRecord(k_max, {name: [] for name in per_ref[0]})
    kv_layers = body.kv_layers
    cache = KVCache(spec, max(len(r.sequence) for r in refs) + k_max + 1)
    bound = body.bind(cache)
    for ref, vocab_options in zip(refs, per_ref):
        seq = ref.sequence
        t = len(seq) - 1
        for i in kv_layers:
            cache.key_array(i)[:, :, :t] = ref.keys[i]
            cache.value_array(i)[:, :, :t] = ref.values[i]
        pos = len(ref.prompt)                 # position of output[0], the first token fed
        while True:
            # As the runtime: never draft past max_new_tokens (k <= remaining - 1).
            produced = pos - len(ref.prompt) + 1
            n_max = min(k_max, t - pos, max_new_tokens - produced - 1)
            if n_max < 1:
                break
            matches = {name: [] for name in vocab_options}
            confs = {name: [] for name in vocab_options}
            alive = dict.fromkeys(vocab_options, True)
            low = dict.fromkeys(vocab_options, False)
            feed = seq[pos]
            for j in range(n_max):
                hidden = bound.run([feed], pos + j)
                logits = head.run_head(hidden[None])[0, -1]
                target = seq[pos + 1 + j]
                for name, (pred, conf) in _score(logits, vocab_options).items():
                    alive[name] = alive[name] and pred == target
                    matches[name].append(alive[name])
                    confs[name].append(conf)
                    low[name] = low[name] or conf < min_stop
                    if name is None:
                        feed = pred
                if not any(alive.values()) and all(low.values()):
                    break
            for name in vocab_options:
                record.blocks[name].append(BlockRecord(np.array(matches[name], bool),
                                                       np.array(confs[name], np.float32), n_max))
            accepted = record.blocks[None][-1].accepted_full
            # Undo the draft's KV writes at positions pos.. before the next block reads them.
            end = min(pos + n_max, t)
            for i in kv_layers:
                cache.key_array(i)[:, :, pos:end] = ref.keys[i][:, :, pos:end]
                cache.value_array(i)[:, :, pos:end] = ref.values[i][:, :, pos:end]
            pos += accepted + 1
        record.tokens += len(ref.output)
        if give_up is not None and give_up(record):
            record.complete = False
            break
    return record


@dataclass
class PolicyResult:
    """Acceptance of a policy, named as the runtime's DecodeStats names it."""
    k: int
    confidence_stop: float | None
    draft_steps: int
    drafted_tokens: int
    accepted_tokens: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.accepted_tokens / self.draft_steps if self.draft_steps else 0.0


def replay(blocks: list[BlockRecord], k: int, confidence_stop: float | None) -> PolicyResult:
    """What a policy (draft at most k, stop after a token below confidence_stop) would have done
    on the recorded blocks."""
    steps = drafted = accepted = 0
    for b in blocks:
        n = min(k, b.available)
        if n == 0:
            continue
        if confidence_stop is not None:
            below = np.nonzero(b.confidence[:n] < confidence_stop)[0]
            if len(below):
                n = int(below[0]) + 1
        lead = b.matches[:n]
        acc = int(np.argmin(lead)) if not lead.all() else len(lead)
        steps += 1
        drafted += n
        accepted += acc
    return PolicyResult(k, confidence_stop, steps, drafted, accepted)


def policy_table(blocks: list[BlockRecord], k_max: int, stops, draft_ms: float) -> dict:
    """The profile's policy_table: for every policy (k in 1..k_max, each confidence stop) the mean
    tokens drafted and accepted per step on the recorded blocks, so that the runtime can choose k
    and the stop for its own machine's costs (conflayers/runtime/policy.py; no stop is written as
    0, which never stops). draft_ms: the draft step on the compiling machine, for reference."""
    rows = []
    for k in range(1, k_max + 1):
        for stop in stops:
            r = replay(blocks, k, stop)
            steps = max(r.draft_steps, 1)
            rows.append([k, stop or 0, r.drafted_tokens / steps, r.accepted_tokens / steps])   # unrounded: exact ties
    return {"columns": ["k", "confidence_stop", "drafted_per_step", "accepted_per_step"], "rows": rows,
            "draft_ms": draft_ms}
