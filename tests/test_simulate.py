"""conflayers.tools.simulate: the acceptance arithmetic, and a real run on a tiny shape through the
compiler's export and cost model (random weights; figures are timings, so only their relations
that hold by construction are asserted)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conflayers.tools import simulate


def test_tokens_per_step_is_the_expectation_of_the_accepted_prefix():
    rng = np.random.default_rng(0)
    for alpha, k in ((0.0, 3), (0.6, 4), (0.9, 8)):
        accepted = rng.random((200_000, k)) < alpha
        prefix = np.where(accepted.all(1), k, accepted.argmin(1))       # drafts kept before the first miss
        assert simulate.tokens_per_step(alpha, k) == pytest.approx(prefix.mean() + 1, rel=0.01)
    assert simulate.tokens_per_step(1.0, 5) == 6


def test_break_even_is_where_the_speedup_crosses_one():
    verify = [1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.6]
    for cost in (0.1, 0.3, 0.6, 0.9):
        a = simulate.break_even(cost, verify)
        assert a is not None
        assert simulate.speedup(a, cost, verify)[0] >= 1.0
        assert simulate.speedup(a - 1e-3, cost, verify)[0] < 1.0
    # a dearer draft needs a higher acceptance; one dearer than a step plus a verify never pays
    assert simulate.break_even(0.3, verify) < simulate.break_even(0.6, verify)
    assert simulate.break_even(1.5, verify) is None
    # the goal form: the acceptance to match another draft's speed-up
    goal = simulate.speedup(0.97, 0.25, verify)[0]
    need = simulate.break_even(0.5, verify, goal)
    assert need is None or simulate.speedup(need, 0.5, verify)[0] >= goal


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("shape") / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 2048, "max_position_embeddings": 512, "tie_word_embeddings": True}))
    return str(p)


def test_a_tiny_shape_runs_through_the_export_and_cost_model(tiny_config, tmp_path):
    out = tmp_path / "sim.json"
    r = CliRunner().invoke(simulate.main, ["--shapes", tiny_config, "--layers", "2", "--contexts", "16,64",
                                           "--reps", "1", "--vocab-subset", "512", "--json", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "break-even acceptance" in r.output and "int8 whole model" in r.output
    assert "cited, not measured" in r.output
    d = json.loads(out.read_text())
    (shape,) = d["shapes"]
    assert shape["layers"] == 12 and shape["simulated_layers"] == 2
    assert [c["context"] for c in shape["contexts"]] == [16, 64]
    for c in shape["contexts"]:
        for t in ("fp32", "int4"):
            assert c["targets"][t]["step_ms"] > 0 and 0 < c["targets"][t]["head_share"] < 1
        rows = {(x["target"], x["draft"]): x for x in c["drafts"]}
        for t in ("fp32", "int4"):
            # skipping more never costs more (per-block costs are >= 0), so it never needs a higher acceptance
            costs = [rows[(t, f"skip {s:.0%} layers")]["cost_rel"] for s in simulate.SKIP_RATIOS]
            assert costs == sorted(costs, reverse=True)
            for s in simulate.SKIP_RATIOS:
                whole = rows[(t, f"skip {s:.0%} layers")]
                attn = rows[(t, f"skip {s:.0%} attention")]
                assert attn["cost_rel"] >= whole["cost_rel"]          # attention-only keeps the MLPs
                assert set(whole["speedup"]) == {"0.80", "0.90", "0.95"}
        assert ("fp32", "int8 whole model (shipped today)") in rows


def test_unknown_shape_is_named():
    r = CliRunner().invoke(simulate.main, ["--shapes", "gpt-5"])
    assert r.exit_code != 0 and "unknown shape 'gpt-5'" in r.output and "qwen3-4b" in r.output
