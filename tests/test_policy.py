"""Profiles that travel: the runtime chooses draft length and confidence stop for this machine from
the profile's policy table and a few costs measured here (runtime/policy.py, probe.py)."""
import time

import pytest

from conflayers.runtime import Engine, ProfileError
from conflayers.runtime.policy import MachineCosts, PolicyRow, choose, parse_table, predicted_speedup
from conflayers.runtime.profile import Profile

COLUMNS = ["k", "confidence_stop", "drafted_per_step", "accepted_per_step"]
PROMPT = "Janet has 3 apples and buys 5 more. How many apples does she have now?"


def table(k_max=8, accept=0.9, stops=(0,)) -> dict:
    """A draft that agrees with the full model on each drafted token with probability `accept`."""
    rows = []
    for k in range(1, k_max + 1):
        for stop in stops:
            accepted = sum(accept ** j for j in range(1, k + 1))     # expected leading matches
            rows.append([k, stop, float(k), accepted])
    return {"columns": COLUMNS, "rows": rows}


def linear_costs(draft_ms: float, step_ms: float = 10.0, width: int = 9) -> MachineCosts:
    return MachineCosts(tuple(step_ms * (1 + 0.05 * n) for n in range(width)), draft_ms)


# ----------------------------------------------------------------------------- the choice

def test_a_dearer_draft_gets_a_shorter_draft_and_a_draft_dearer_than_a_step_gets_none():
    rows = parse_table(table())
    k = {d: getattr(choose(rows, linear_costs(d)), "max_tokens", None) for d in (0.5, 3.0, 30.0)}
    assert k[0.5] == 8 and 1 <= k[3.0] < k[0.5]
    assert k[30.0] is None            # a draft step of 3 full steps never pays: plain decoding


def test_choice_is_the_best_predicted_row_and_no_stop_is_written_as_zero():
    rows = parse_table(table(k_max=4, stops=(0, 0.5)))
    assert rows[0] == PolicyRow(1, None, 1.0, 0.9) and rows[1].confidence_stop == 0.5
    costs = linear_costs(2.0)
    chosen = next(r for r in rows if r.policy == choose(rows, costs))
    assert predicted_speedup(chosen, costs) == max(predicted_speedup(r, costs) for r in rows) > 1.0


def test_nothing_beats_plain_means_no_speculation():
    rows = parse_table(table(accept=0.0))          # never accepted: every step costs more than it gives
    assert choose(rows, linear_costs(0.1)) is None
    assert choose(rows, linear_costs(0.1), min_speedup=0.0) is not None


def test_machine_costs_interpolate_and_extrapolate_the_verify_curve():
    c = MachineCosts((10.0, 11.0, 13.0), 1.0)
    assert c.verify(1) == 10.0 and c.verify(2.5) == 12.0 and c.verify(5) == 13.0 + 1.5 * 2
    assert c.verify_cost(3) == pytest.approx(1.3)


@pytest.mark.parametrize("bad", [
    {"columns": ["k"], "rows": [[1, 0, 1, 1]]},
    {"columns": COLUMNS, "rows": []},
    {"columns": COLUMNS, "rows": [[0, 0, 1, 1]]},           # k < 1
    {"columns": COLUMNS, "rows": [[2, 1.5, 1, 1]]},         # stop >= 1
    {"columns": COLUMNS, "rows": [[2, 0, 1, 1.5]]},         # accepted > drafted
    {"columns": COLUMNS, "rows": [[2, 0, 1]]},
    {"columns": COLUMNS, "rows": [[2, 0, "x", 1]]},
])
def test_a_bad_policy_table_is_refused_by_name(bad, tiny_engine):
    raw = dict(tiny_engine.bundle.profiles["int8skip"].raw, policy_table=bad)
    with pytest.raises(ProfileError, match="policy_table"):
        Profile.from_json(raw)


# ----------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def table_bundle(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    """The tiny model with one profile that carries a policy table claiming a good draft."""
    import tiny

    def profile(ident):
        p = tiny.profile_json("travel", ident, "int8", skip_layers=[1], k=4)
        p["policy_table"] = table(k_max=6, accept=0.95, stops=(0, 0.5))
        p["cost_model"] = {"context": 40, "verify_relative": [1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3]}
        return p
    return tiny.make_bundle(str(tmp_path_factory.mktemp("travel") / "b"), tiny_llama, tiny_tokenizer_dir,
                            profiles=[profile])


class SlowRunner:
    """A draft body whose every pass also sleeps `delay` seconds (a slow draft session)."""

    def __init__(self, runner, delay: float):
        self.runner, self.delay = runner, delay
        self.kv_layers = runner.kv_layers

    def bind(self, cache):
        bound, delay = self.runner.bind(cache), self.delay

        class Slow:
            def run(self, tokens, start, logits_from=0):
                time.sleep(delay)
                return bound.run(tokens, start, logits_from)
        return Slow()


def test_a_slowed_draft_turns_speculation_off_and_output_stays_identical(table_bundle):
    engine = Engine.load(table_bundle)
    plain = engine.generate(PROMPT, max_new_tokens=24, speculate=False)
    step_s = 1.0 / plain.metrics.tokens_per_s
    drafter = engine.drafters["travel"]
    drafter.body = SlowRunner(drafter.body, max(3 * step_s, 0.002))     # a draft step >= 3 full steps
    r = engine.generate(PROMPT, max_new_tokens=24, task="travel")
    assert r.token_ids == plain.token_ids
    assert engine.adapt_policy("travel") is None and drafter.policy is None
    assert r.metrics.speculative is False and r.metrics.draft_steps == 0
    costs = engine.machine_costs["travel"]
    assert costs.draft_ms > 2.5 * costs.verify_ms[0]


def test_the_adapted_policy_is_measured_once_and_decodes_losslessly(table_bundle):
    engine = Engine.load(table_bundle)
    plain = engine.generate(PROMPT, max_new_tokens=24, speculate=False)
    policy = engine.adapt_policy("travel")
    costs = engine.machine_costs["travel"]
    r = engine.generate(PROMPT, max_new_tokens=24, task="travel")
    assert r.token_ids == plain.token_ids
    assert len(costs.verify_ms) == 7 and costs.verify_ms[0] > 0 and costs.draft_ms > 0
    assert engine.adapt_policy("travel") is policy and engine.machine_costs["travel"] is costs   # not re-measured
    assert policy == choose(engine.bundle.profiles["travel"].policy_table, costs)
    assert r.metrics.speculative is (policy is not None)


def test_a_profile_without_a_table_keeps_its_compiled_policy(tiny_bundle):
    engine = Engine.load(tiny_bundle)
    plain = engine.generate(PROMPT, max_new_tokens=16, speculate=False)
    r = engine.generate(PROMPT, max_new_tokens=16, task="fp32sub")
    assert r.token_ids == plain.token_ids
    profile = engine.bundle.profiles["fp32sub"]
    assert profile.policy_table is None and engine.adapt_policy("fp32sub") == profile.policy
    assert engine.machine_costs["fp32sub"] is None and r.metrics.draft_steps > 0


def test_adapt_false_keeps_the_compiled_policy(table_bundle):
    engine = Engine.load(table_bundle, adapt=False)
    plain = engine.generate(PROMPT, max_new_tokens=16, speculate=False)
    r = engine.generate(PROMPT, max_new_tokens=16, task="travel")
    assert r.token_ids == plain.token_ids
    assert engine.adapt_policy("travel") == engine.bundle.profiles["travel"].policy
    assert r.metrics.draft_steps > 0
