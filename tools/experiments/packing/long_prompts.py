"""Long-context prompts for conflayers-bench --prompts: each joins `--join` consecutive evaluation
prompts of a task (Spec-Bench RAG by default: passages and a question, ~700 tokens each), so the
model answers the last question over ~3k tokens of context, much of it copyable.

    python tools/experiments/packing/long_prompts.py --out long_rag.jsonl [--task spec_bench:rag]
        [--join 4] [--prompts 3]
    conflayers-bench bundles/smollm2-native --prompts long_rag.jsonl --max-new-tokens 128 ...
"""
from __future__ import annotations

import argparse
import json

from conflayers.compiler.data import load_prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="spec_bench:rag")
    ap.add_argument("--join", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=3)
    a = ap.parse_args(argv)
    texts = [p.text for p in load_prompts(a.task, "evaluation")]
    if len(texts) < a.join * a.prompts:
        raise SystemExit(f"{a.task} has {len(texts)} evaluation prompts, fewer than {a.join} x {a.prompts}")
    with open(a.out, "w") as f:
        for i in range(a.prompts):
            part = texts[i * a.join:(i + 1) * a.join]
            f.write(json.dumps({"id": f"long-{a.task.replace(':', '-')}-{i}", "prompt": "\n\n".join(part)}) + "\n")
    print(f"{a.out}: {a.prompts} prompts of {a.join} joined {a.task} prompts each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
