"""The compiler's fast evaluator against the runtime's real speculative loop.

The evaluator drafts exactly as the runtime does but looks the verification up in the full
model's greedy output instead of running it. Its only differences from the real loop come from
floating point: its KV cache was computed by single-token decoding, the real loop's by batched
verify passes, which can flip a near-tie in the draft. So: the same outputs, and (nearly) the same
acceptance, block by block."""

import numpy as np
import pytest

from conflayers.compiler.arch import canonical_weights, model_spec
from conflayers.compiler.drafts import DraftFactory
from conflayers.compiler.evaluate import evaluate, make_references, replay
from conflayers.runtime.decoding import DecodeStats, generate
from conflayers.runtime.draftplan import DraftPlan
from conflayers.runtime.drafter import DraftPolicy, LayerSkipDrafter
from conflayers.runtime.ort_backend import KVCache
from conflayers.runtime.sampling import Sampler


def decode_and_measure(full, drafter, spec, prompts, max_new_tokens, stop_ids):
    """The runtime's real loop on prompts: (outputs, DecodeStats) per prompt."""
    results = []
    for ids in prompts:
        cache = KVCache(spec, len(ids) + max_new_tokens + 1)
        stats = DecodeStats()
        out = [t for new in generate(full.bind(cache), ids, max_new_tokens, Sampler(), drafter=drafter.bind(ids),
                                     stop_ids=stop_ids, stats=stats) for t in new]
        results.append((out, stats))
    return results


def compare(factory, spec, prompts, plan, k, max_new, stop_ids=frozenset()):
    full = factory.full()
    refs = make_references(full, spec, prompts, max_new, stop_ids)
    body, head = factory.body(plan), factory.head(plan.precision)
    record = evaluate(body, head, spec, refs, k, max_new)
    drafter = LayerSkipDrafter(body, head, None, spec.vocab_size, DraftPolicy(k))
    real = decode_and_measure(full, drafter, spec, prompts, max_new, stop_ids)
    assert [out for out, _ in real] == [r.output for r in refs]          # lossless, both ways
    ev = [min(b.accepted_full, k) for b in record.blocks[None]]
    rl = [a for _, st in real for a in st.accept_lengths]
    r = replay(record.blocks[None], k, None)
    real_accepted = sum(st.accepted_tokens for _, st in real)
    real_drafted = sum(st.drafted_tokens for _, st in real)
    return ev, rl, r, real_accepted, real_drafted


def agreement(ev, rl):
    same = sum(a == b for a, b in zip(ev, rl))
    return same / max(len(ev), len(rl))


@pytest.mark.parametrize("precision,skip", [("fp32", (1,)), ("int8", ())])
def test_evaluator_matches_the_real_loop_on_a_tiny_model(tiny_llama, precision, skip, tmp_path):
    spec = model_spec(tiny_llama.config)
    factory = DraftFactory(str(tmp_path), spec, canonical_weights(spec, tiny_llama.state_dict()), 256,
                           ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, spec.vocab_size, 12).tolist() for _ in range(4)]
    ev, rl, r, acc, drafted = compare(factory, spec, prompts, DraftPlan(spec.num_layers, skip, precision=precision), 4, 40)
    assert agreement(ev, rl) >= 0.9
    assert r.accepted_tokens == pytest.approx(acc, rel=0.1, abs=2)
    assert r.drafted_tokens == pytest.approx(drafted, rel=0.1, abs=4)
    factory.close()


@pytest.mark.real_model
def test_evaluator_matches_the_real_loop_on_smollm2(tmp_path):
    from conflayers.compiler import data, models
    resolved = models.resolve_model("smollm2-135m-instruct", progress=False)
    model, tok = models.load_model(resolved)
    spec = model_spec(model.config)
    factory = DraftFactory(str(tmp_path), spec, canonical_weights(spec, model.state_dict()), 1024,
                           ["CPUExecutionProvider"])
    pool = data.pick(data.load_prompts("gsm8k", "calibration"), 3, seed=5)
    prompts = []
    for p in pool:
        text = tok.apply_chat_template(data.chat_messages(p), add_generation_prompt=True, tokenize=False)
        prompts.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    ev, rl, r, acc, drafted = compare(factory, spec, prompts, DraftPlan(spec.num_layers, (), precision="int8"),
                                      5, 64, frozenset({2}))
    # After the first near-tie flip, blocks start at different positions, so compare aggregates.
    assert r.mean_accepted_tokens == pytest.approx(acc / len(rl), rel=0.1)
    assert r.acceptance_rate == pytest.approx(acc / drafted, abs=0.05)
    assert r.draft_steps == pytest.approx(len(rl), rel=0.1)
    factory.close()
