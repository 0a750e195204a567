"""The human report next to a profile: three pictures and a short markdown page."""
from __future__ import annotations

import io


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def render(profile: dict, result, cost) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conf = profile["confidence"]
    draft = profile["draft"]
    figs = profile["figures"]
    task = profile["task"]
    L = len(conf["layer"])
    x = np.arange(L)
    out = {}

    # 1. Confidence curve, window thresholds, skipped layers.
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(x, conf["attention"], "o-", ms=3, label="attention confidence")
    ax.plot(x, conf["mlp"], "s-", ms=3, label="MLP confidence")
    ax.plot(x, conf["layer"], "k.-", label="layer confidence (sum)")
    thr = [np.nan if t is None else t for t in conf["thresholds"]]
    ax.plot(x, thr, "r--", label=f"window threshold (lambda={conf['lambda']:.2f})")
    p1 = (profile["search"].get("phase1_best") or {}).get("skip_layers", [])
    for i in p1:
        ax.axvspan(i - 0.4, i + 0.4, color="orange", alpha=0.15)
    for i in draft["skip_layers"]:
        ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("confidence")
    ax.set_title(f"{task}: per-layer confidence (orange: ConfLayers best set, red: shipped draft skips)")
    ax.legend(fontsize=7)
    out["confidence.png"] = _png(fig)

    # 2. Search: acceptance per iteration and predicted speed-up per candidate.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    its = profile["search"]["iterations"]
    if its:
        a1.plot([i["iteration"] for i in its], [i["acceptance"] for i in its], "o-", ms=3, label="acceptance")
        a1.plot([i["iteration"] for i in its], [i["skipped_fraction"] for i in its], "s-", ms=3, label="skipped fraction")
        a1.plot([i["iteration"] for i in its], [i["lambda"] for i in its], "^-", ms=3, label="lambda")
        a1.legend(fontsize=7)
    a1.set_xlabel("ConfLayers iteration")
    a1.set_title("phase 1: acceptance per iteration")
    cands = profile["search"]["candidates"]
    colors = {"fp32": "tab:blue", "int8": "tab:green", "int4": "tab:purple"}
    for j, c in enumerate(cands):
        a2.bar(j, c["predicted_speedup"], color=colors.get(c["precision"], "grey"),
               alpha=1.0 if c["complete"] else 0.35)
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_xlabel("candidate (evaluation order; pale = screened out)")
    a2.set_ylabel("predicted speed-up")
    a2.set_title("all candidates (blue fp32, green int8, purple int4)")
    out["search.png"] = _png(fig)

    # 3. Accepted tokens per speculative step on the validation prompts.
    hist = figs.get("accept_histogram", {})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if hist:
        ks = sorted(int(k) for k in hist)
        ax.bar(ks, [hist[str(k)] for k in ks])
    ax.set_xlabel("draft tokens accepted in a step")
    ax.set_ylabel("steps")
    ax.set_title(f"{task}: acceptance histogram (validation)")
    out["acceptance.png"] = _png(fig)

    md = [f"# conflayers profile `{task}` for {profile['model']['name']}", "",
          "| figure | value |", "|---|---|",
          f"| draft | {draft['precision']}, skipped layers {draft['skip_layers'] or 'none'}"
          + (f", MLP only {draft['skip_mlp']}" if draft["skip_mlp"] else "")
          + (f", attention only {draft['skip_attention']}" if draft["skip_attention"] else "") + " |",
          f"| drafting | up to {draft['max_draft_tokens']} tokens, confidence stop {draft['confidence_stop']} |",
          f"| draft vocabulary | {draft['vocab_subset']['size'] if draft['vocab_subset'] else 'full'} |",
          f"| found by | {profile['search']['found_by']} |",
          f"| acceptance (validation) | {figs.get('acceptance_rate')} |",
          f"| mean accepted tokens per step (validation) | {figs.get('mean_accepted_tokens')} |",
          f"| predicted speed-up | x{figs.get('predicted_speedup')} |",
          f"| measured speed-up (validation, {figs.get('validation_prompts')} prompts) | x{figs.get('measured_speedup')} |",
          f"| identical to plain decoding | {figs.get('identical_to_plain')} |",
          f"| plain / speculative tokens/s | {figs.get('plain_tokens_per_s')} / {figs.get('speculative_tokens_per_s')} |",
          "", f"ConfLayers phase: final lambda {conf['lambda']}, stop: {profile['search']['stop_reason']}."]
    if profile["search"].get("note"):
        md += ["", f"**Note:** {profile['search']['note']}."]
    for key, title in (("drafter", "Drafter kind (model, n-gram, hybrid)"), ("cascade", "Draft cascade")):
        section = profile["search"].get(key)
        if section:
            md += ["", f"**{title}:** {section['kind']}: {section['why']}."]
    if draft.get("kind") == "cascade":
        for i, st in enumerate(draft["cascade"]["stages"]):
            md += [f"Cascade stage {i} (proposes for the draft above): {st['precision']}, skipped layers "
                   f"{st['skip_layers'] or 'none'}, up to {st['max_draft_tokens']} tokens, confidence stop "
                   f"{st['confidence_stop']}, vocabulary {st['vocab_subset']['size'] if st['vocab_subset'] else 'full'}."]
    if profile["search"].get("levers"):
        from .levers import markdown
        md += markdown(profile["search"]["levers"])
    md += ["", f"Cost model ({cost.backend}, {cost.context} tokens of context): full step {cost.full_ms[0]} ms, "
           f"verify of {len(cost.full_ms)} tokens {cost.full_ms[-1]} ms.", "",
           "![confidence](confidence.png)", "", "![search](search.png)", "", "![acceptance](acceptance.png)", ""]
    out["report.md"] = "\n".join(md).encode()
    return out
