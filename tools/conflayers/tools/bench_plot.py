"""Charts of conflayers-bench results: speed-up per system and task, and the acceptance-length
histogram of the speculative systems. Takes one or several --json outputs (e.g. one per task run):

    conflayers-bench plot gsm8k.json spec_bench_qa.json -o speedup.png
    conflayers-bench plot --json gsm8k.json --json qa.json --plot speedup.png
    python -m conflayers.tools.bench_plot gsm8k.json -o speedup.png
"""
from __future__ import annotations

import argparse
import json
import sys


OWN = "profile of the task"


def _collect(docs: list[dict]) -> tuple[list[str], list[str], dict, dict]:
    """tasks, systems (first-seen order), speed-up[(task, system)], histogram[(task, system)]."""
    tasks, systems, speed, hist = [], [], {}, {}
    for doc in docs:
        for s in doc.get("systems", []):
            if s.get("status") != "ok" or s.get("speedup_vs_plain") is None:
                continue
            task, name = s.get("task") or "?", s["name"]
            if s.get("headline") and name.startswith("profile:"):
                name = OWN      # each task's own profile is one series across tasks
            if task not in tasks:
                tasks.append(task)
            if name not in systems:
                systems.append(name)
            speed[(task, name)] = s["speedup_vs_plain"]
            h = s.get("accept_length_histogram") or {}
            if name == OWN and h:
                hist[(task, name)] = {int(k): int(v) for k, v in h.items()}
    return tasks, systems, speed, hist


def plot_docs(docs: list[dict], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, systems, speed, hist = _collect(docs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(min(24, 8 + 1.4 * len(tasks)), 5.2),
                                   gridspec_kw={"width_ratios": [max(len(tasks), 1), 3]})
    width = 0.8 / max(len(systems), 1)
    for j, name in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        ys = [speed.get((t, name), 0.0) for t in tasks]
        ax1.bar(xs, ys, width, label=name)
        for x, y, t in zip(xs, ys, tasks):
            if (t, name) in speed:
                ax1.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_xticks(range(len(tasks)))
    ax1.set_xticklabels([t.replace("spec_bench:", "") for t in tasks], rotation=20, fontsize=8)
    ax1.set_ylabel("speed-up vs plain (decode tokens/s)")
    ax1.set_title("Speed-up per system and task")
    if speed:
        ax1.set_ylim(0, max(max(speed.values()), 1.0) * 1.35)
    if systems:
        ax1.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)

    if hist:
        maxlen = max(max(h) for h in hist.values())
        for (task, _), h in hist.items():
            total = sum(h.values()) or 1
            ax2.plot(range(maxlen + 1), [h.get(k, 0) / total for k in range(maxlen + 1)], "o-", ms=3,
                     label=task.replace("spec_bench:", ""))
        ax2.set_xticks(range(maxlen + 1))
        ax2.set_xlabel("draft tokens accepted per speculative step")
        ax2.set_ylabel("fraction of steps")
        ax2.set_ylim(0, 1.15)
        ax2.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    else:
        ax2.text(0.5, 0.5, "no speculative system ran", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    ax2.set_title("Acceptance length (each task's profile)")
    meta = docs[0].get("meta", {}) if docs else {}
    m = meta.get("machine", {})
    fig.suptitle(f"{meta.get('bundle', {}).get('model', '')}: {m.get('cores', '?')} CPU cores, "
                 f"{meta.get('settings', {}).get('max_new_tokens', '?')} new tokens, {meta.get('date', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="conflayers-bench plot", description="Chart one or more conflayers-bench JSON files.")
    p.add_argument("files", nargs="*", help="JSON files written by conflayers-bench --json")
    p.add_argument("--json", action="append", default=[], help="another JSON file (repeatable)")
    p.add_argument("-o", "--plot", "--out", dest="out", required=False, help="output PNG")
    args = p.parse_args(argv)
    files = list(args.files) + list(args.json)
    if not files or not args.out:
        print("Error: give one or more JSON files and -o FILE.png", file=sys.stderr)
        return 2
    docs = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"Error: cannot read {path}: {e}", file=sys.stderr)
            return 2
        if not isinstance(doc, dict) or "systems" not in doc:
            print(f"Error: {path} is not a conflayers-bench JSON file", file=sys.stderr)
            return 2
        docs.append(doc)
    plot_docs(docs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
