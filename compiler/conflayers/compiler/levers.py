"""Which lever carried a profile's speed, and what layer skipping alone gives: the compile
report's answer to "where does the paper's move stand on this model".

Every figure is a prediction of the same cost model over the same calibration references (the
search's own candidates and the drafter search), so the levers compare with each other and with
the shipped choice. A draft's head subset (vocabulary) is chosen per candidate, so "layer skipping"
and "precision" below include the best head subset for that draft; "head subset" alone is the
target's own precision with nothing skipped."""
from __future__ import annotations


def _skips(c: dict) -> bool:
    return bool(c.get("skip_layers") or c.get("skip_attention") or c.get("skip_mlp"))


def _best(cands: list[dict], keep) -> dict | None:
    """The best candidate that `keep` admits: fully evaluated ones first, else screened ones (the
    search stopped them early on a part of the references: a rougher prediction, marked so)."""
    rows = [c for c in cands if keep(c)]
    done = [c for c in rows if c.get("complete", True)]
    return max(done or rows, key=lambda c: c["predicted_speedup"]) if rows else None


def _row(lever: str, c: dict | None, what: str) -> dict:
    if c is None:
        return {"lever": lever, "predicted_speedup": None, "draft": what + ": not among the candidates"}
    parts = [c["precision"]]
    if c.get("skip_layers"):
        parts.append(f"layers {c['skip_layers']}")
    if c.get("skip_attention"):
        parts.append(f"attention {c['skip_attention']}")
    if c.get("skip_mlp"):
        parts.append(f"MLP {c['skip_mlp']}")
    parts.append(f"head {c['vocab']}" if c.get("vocab") else "full head")
    if not c.get("complete", True):
        parts.append("screened only")
    return {"lever": lever, "predicted_speedup": c["predicted_speedup"], "draft": ", ".join(parts)}


def levers(profile: dict) -> dict:
    """The levers section of a profile (search.levers): one row per lever, the shipped choice and
    a sentence naming the lever that carried it."""
    target = profile["model"].get("target", "fp32")
    cands = profile["search"]["candidates"]
    rows = [
        _row("head subset", _best(cands, lambda c: c["precision"] == target and not _skips(c) and c.get("vocab")),
             f"{target} draft, nothing skipped, head subset"),
        _row("precision", _best(cands, lambda c: c["precision"] != target and not _skips(c)),
             "cheaper precision, nothing skipped"),
        _row("layer skipping", _best(cands, lambda c: c["precision"] == target and _skips(c)),
             f"layers skipped at the target's precision ({target})"),
        _row("layer skipping + precision", _best(cands, lambda c: c["precision"] != target and _skips(c)),
             "layers skipped at a cheaper precision"),
    ]
    drafter = profile["search"].get("drafter") or {}
    ngram = drafter.get("ngram_predicted_speedup")
    if ngram is None:         # profiles compiled before the field: the best listed n-gram candidate
        ngram = max((c["predicted_speedup"] for c in drafter.get("candidates", []) if c["kind"] == "ngram"),
                    default=None)
    if ngram is not None:
        rows.append({"lever": "n-gram", "predicted_speedup": ngram, "draft": "prompt lookup alone (no model draft)"})
    shipped = profile["figures"]["predicted_speedup"]
    d = profile["draft"]
    carried = []
    if d.get("kind") in ("ngram", "hybrid"):
        carried.append("n-gram lookup")
    if d.get("kind") != "ngram":
        if d["precision"] != target:
            carried.append(f"precision ({d['precision']} draft)")
        if d.get("vocab_subset"):
            carried.append(f"head subset ({d['vocab_subset']['size']} tokens)")
        if d.get("skip_layers") or d.get("skip_attention") or d.get("skip_mlp"):
            carried.append("layer skipping")
    skip, same = rows[2]["predicted_speedup"], rows[0]["predicted_speedup"]
    if skip is None:
        alone = "layer skipping alone was not evaluated at the target's precision"
    else:
        alone = f"layer skipping alone (at {target}) predicts x{skip:.2f}"
        if same is not None:      # its own gain: over the same draft with nothing skipped
            alone += f", x{skip / same:.2f} over the same draft with nothing skipped"
        if skip <= 1.0 or (same is not None and skip <= same):
            alone += ": it does not pay on this model and task"
    summary = (f"shipped x{shipped:.2f}, carried by {' + '.join(carried) or 'nothing (plain decoding)'}; {alone}")
    return {"target": target, "shipped_predicted_speedup": shipped, "carried_by": carried, "rows": rows,
            "layer_skipping_alone": skip, "summary": summary}


def markdown(section: dict) -> list[str]:
    """The report.md lines of a levers section."""
    md = ["", "## Which lever carried the speed", "", section["summary"] + ".", "",
          "| lever | best draft with it | predicted speed-up |", "|---|---|---|"]
    for r in section["rows"]:
        sp = "-" if r["predicted_speedup"] is None else f"x{r['predicted_speedup']:.2f}"
        md.append(f"| {r['lever']} | {r['draft']} | {sp} |")
    return md
