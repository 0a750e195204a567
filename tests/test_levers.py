"""The compile report's levers (compiler/levers.py) read from the shipped profiles' own search
records: what each lever alone predicts and which ones carried the shipped draft."""
import glob
import json
import os

import pytest

from conflayers.compiler.levers import levers, markdown

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = sorted(glob.glob(os.path.join(os.path.dirname(HERE), "profiles", "**", "*.json"), recursive=True))
PROFILES = [p for p in PROFILES if not p.endswith("schema.json")]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: os.path.relpath(p, os.path.dirname(HERE)))
def test_levers_of_a_shipped_profile(path):
    with open(path) as f:
        profile = json.load(f)
    lev = levers(profile)
    target = profile["model"].get("target", "fp32")
    d = profile["draft"]
    by = {r["lever"]: r for r in lev["rows"]}
    # layer skipping alone is the best same-precision candidate that skips anything
    skip = [c for c in profile["search"]["candidates"]
            if c["precision"] == target and (c["skip_layers"] or c["skip_attention"] or c["skip_mlp"])]
    done = [c for c in skip if c["complete"]] or skip
    want = max((c["predicted_speedup"] for c in done), default=None)
    assert lev["layer_skipping_alone"] == want == by["layer skipping"]["predicted_speedup"]
    # the shipped draft's levers are named
    assert ("n-gram lookup" in lev["carried_by"]) == (d.get("kind") in ("ngram", "hybrid"))
    if d.get("kind") != "ngram" and d["precision"] != target:
        assert any(c.startswith("precision") for c in lev["carried_by"])
    assert lev["summary"].startswith(f"shipped x{profile['figures']['predicted_speedup']:.2f}")
    md = "\n".join(markdown(lev))
    assert "| layer skipping |" in md and lev["summary"] in md


def test_a_profile_whose_draft_is_layer_skipping_only_says_so():
    cands = [{"origin": "anchor", "precision": "fp32", "skip_layers": [], "skip_attention": [], "skip_mlp": [],
              "vocab": 64, "complete": True, "predicted_speedup": 1.1},
             {"origin": "ladder", "precision": "fp32", "skip_layers": [1, 2], "skip_attention": [], "skip_mlp": [],
              "vocab": 64, "complete": True, "predicted_speedup": 1.6}]
    profile = {"model": {"target": "fp32"}, "search": {"candidates": cands},
               "draft": {"precision": "fp32", "skip_layers": [1, 2], "skip_attention": [], "skip_mlp": [],
                         "vocab_subset": None, "kind": "model"},
               "figures": {"predicted_speedup": 1.6}}
    lev = levers(profile)
    assert lev["carried_by"] == ["layer skipping"]
    assert "x1.60" in lev["summary"] and "x1.45 over the same draft" in lev["summary"]
    assert "does not pay" not in lev["summary"]
