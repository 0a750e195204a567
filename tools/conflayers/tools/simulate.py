"""Beyond this machine's models: the cost side of layer skipping at real model shapes.

    python -m conflayers.tools.simulate                       # the shapes below, contexts 256 and 2048
    python -m conflayers.tools.simulate --shapes llama-3.2-1b,qwen3-4b --contexts 512,4096 --json out.json
    python -m conflayers.tools.simulate --shapes path/to/config.json      # your own model's shape

The only real models offline here have 135M and 270M parameters, where layers are not redundant.
This tool builds, for each shape, a random-weight checkpoint with the real widths, vocabulary and
head layout but only `--layers` decoder layers (transformers' own config and model classes, read
by the compiler's architecture reader), exports it with the compiler's graph builder and times it
with the compiler's cost model (`costmodel.measure`: the same ONNX Runtime sessions, KV cache and
interleaved medians as a compile). Per-layer attention and MLP costs scale to the real layer
count; the simulated graph's verify-width curve stands for the real one's.

From those costs it prints, per shape and context: the full step (fp32 and int4 targets), the
lm_head's share, verify-of-9 relative to one step, and for drafts that skip a fraction of the
layers (whole layers, or attention only) at the target's precision: the draft's cost relative to
a step, the break-even acceptance (the per-token acceptance at which the best draft length
reaches plain decoding's speed) and the predicted speed-up at the given acceptance rates. A fp32
target's whole-model int8 draft is the lever this product ships today; its row uses
`--int8-acceptance` (0.97: measured here on SmolLM2-135M, teacher-forced top-1 agreement).

Acceptance is NOT measured here (random weights agree with nothing). The rates to compare with
are published: SWIFT (Xia et al., 2024, arXiv:2410.06916) reports draft acceptance of 90-100%
for on-the-fly layer skipping on LLaMA-2 and CodeLLaMA backbones (7B and larger, GPU) with
1.3-1.6x wall-clock speed-ups. Cited, not measured: a model's own acceptance at a skip ratio comes
from compiling it (`conflayers-compile --model PATH`).

Memory: one shape at a time, freed before the next; the default set peaked at 17 GB resident
(Qwen3-4B: its fp32 head and graphs at every precision), qwen3-8b needs more. On a smaller machine
pass --shapes.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import click
import numpy as np

# Public configs (hidden, MLP, layers, heads, kv heads, head dim, vocabulary, tied head, rope theta)
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                   vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               vocab_size=151936, tie_word_embeddings=False, rope_theta=1000000.0)),
}
DEFAULT_SHAPES = "smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,llama-3.2-1b,llama-3.2-3b,qwen3-4b"
SKIP_RATIOS = (0.25, 0.4, 0.5)
MAX_DRAFT = 8


def tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens a step keeps with k drafted tokens, each accepted with probability alpha
    given the ones before it (the standard i.i.d. model), plus the target's own token."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speedup(alpha: float, draft_rel: float, verify_rel: list) -> tuple[float, int]:
    """Best predicted speed-up over plain decoding and its draft length, for a draft costing
    draft_rel of a target step and verify passes of n tokens costing verify_rel[n-1] steps
    (the runtime's speedup_over_plain, in units of a target step)."""
    from conflayers.runtime.speculation import speedup_over_plain
    best, best_k = 0.0, 0
    for k in range(1, min(MAX_DRAFT, len(verify_rel) - 1) + 1):
        s = speedup_over_plain(tokens_per_step(alpha, k) - 1, k * draft_rel + verify_rel[k], 1.0)
        if s > best:
            best, best_k = s, k
    return best, best_k


def break_even(draft_rel: float, verify_rel: list, goal: float = 1.0) -> float | None:
    """The lowest acceptance at which the best draft length reaches `goal` x plain decoding
    (None: not even at acceptance 1). Bisection: speed-up grows with acceptance."""
    if speedup(1.0, draft_rel, verify_rel)[0] < goal:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if speedup(mid, draft_rel, verify_rel)[0] >= goal:
            hi = mid
        else:
            lo = mid
    return hi


def make_config(shape: str, layers: int):
    """(transformers config with `layers` decoder layers, the real layer count, label)."""
    from transformers import AutoConfig
    if shape in SHAPES:
        model_type, kw = SHAPES[shape]
        config = AutoConfig.for_model(model_type, **kw, max_position_embeddings=32768)
        label = shape
    elif os.path.isfile(shape):
        with open(shape, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or "model_type" not in d:
            raise click.BadParameter(f"{shape} is not a transformers config.json (no model_type)")
        model_type = d.pop("model_type")
        config = AutoConfig.for_model(model_type, **d)
        label = os.path.basename(os.path.dirname(os.path.abspath(shape))) or shape
    else:
        raise click.BadParameter(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}, or a config.json path")
    real_layers = int(config.num_hidden_layers)
    config.num_hidden_layers = min(layers, real_layers)
    for attr in ("layer_types",):        # per-layer lists follow the layer count
        v = getattr(config, attr, None)
        if isinstance(v, list):
            setattr(config, attr, v[:config.num_hidden_layers])
    return config, real_layers, label


def random_checkpoint(config):
    """The compiler's ModelSpec and canonical weights of a random-weight model of this config."""
    import torch
    from transformers import AutoModelForCausalLM

    from conflayers.compiler.arch import canonical_weights, model_spec
    torch.manual_seed(0)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spec = model_spec(model.config)
    weights = canonical_weights(spec, model.state_dict())
    del model
    return spec, weights


def measure_shape(shape: str, layers: int, contexts: list[int], reps: int, vocab_subset: int, log) -> dict:
    from conflayers.compiler import costmodel
    from conflayers.compiler.drafts import DraftFactory
    config, real_layers, label = make_config(shape, layers)
    t0 = time.time()
    spec, weights = random_checkpoint(config)
    params = sum(int(w.size) for k, w in weights.items() if not (k == "lm_head" and spec.tie_word_embeddings))
    per_layer = sum(int(w.size) for k, w in weights.items() if k.startswith("layers.0."))
    real_params = params + (real_layers - spec.num_layers) * per_layer
    log(f"{label}: {spec.architecture}, {real_layers} layers (simulated {spec.num_layers}), hidden "
        f"{spec.hidden_size}, vocabulary {spec.vocab_size}, ~{real_params / 1e9:.2f}B parameters "
        f"(random weights built in {time.time() - t0:.0f} s)")
    vocab_sizes = sorted({v for v in (vocab_subset,) if v < spec.vocab_size} | {spec.vocab_size})
    out = {"shape": label, "architecture": spec.architecture, "layers": real_layers,
           "simulated_layers": spec.num_layers, "hidden_size": spec.hidden_size,
           "vocab_size": spec.vocab_size, "parameters": real_params, "contexts": []}
    with tempfile.TemporaryDirectory(prefix="conflayers-simulate-") as work:
        factory = DraftFactory(work, spec, weights, max(contexts) + 16, ["CPUExecutionProvider"])
        try:
            for ctx in contexts:
                t0 = time.time()
                cm = costmodel.measure(factory, spec, ctx, MAX_DRAFT + 1, ("fp32", "int8", "int4"),
                                       vocab_sizes, reps=reps)
                row = analyse(cm, spec, real_layers, vocab_sizes)
                row["measure_seconds"] = round(time.time() - t0, 1)
                out["contexts"].append(row)
                log(f"  context {ctx}: measured in {row['measure_seconds']:.0f} s")
        finally:
            factory.close()
    return out


def analyse(cm, spec, real_layers: int, vocab_sizes: list[int]) -> dict:
    """Scale the simulated graph's costs to the real layer count; drafts and break-evens."""
    L, Ls, V = real_layers, spec.num_layers, spec.vocab_size
    layer = {p: cm.attn_ms[p] + cm.mlp_ms[p] for p in cm.base_ms}

    def width_curve(ms):
        # relative to one token; a pass over more tokens never costs less (timing noise aside)
        return [float(v) for v in np.maximum.accumulate(np.asarray(ms, float) / ms[0])]
    fp32_step = cm.full_ms[0] + (L - Ls) * layer["fp32"]
    targets = {
        # fp32 full graph: the simulated full graph plus the missing layers; its width curve
        "fp32": (fp32_step, width_curve(cm.full_ms)),
        # int4 target: the all-layer int4 draft with the full head is that graph (no padding rows)
        "int4": (cm.base_ms["int4"] + L * layer["int4"] + cm.head_cost("int4", V), width_curve(cm.draft_relative["int4"])),
    }

    def draft_ms(p, keep_attn, keep_mlp, vocab=V):
        return cm.base_ms[p] + keep_attn * cm.attn_ms[p] + keep_mlp * cm.mlp_ms[p] + cm.head_cost(p, vocab)

    row = {"context": cm.context, "targets": {}, "drafts": []}
    for t, (step, rel) in targets.items():
        head = cm.head_cost(t, V)
        row["targets"][t] = {"step_ms": round(step, 2), "head_share": round(head / step, 3),
                             "attention_share": round(L * cm.attn_ms[t] / step, 3),
                             "verify9_rel": round(rel[MAX_DRAFT], 3), "per_layer_ms": round(layer[t], 3),
                             "attention_ms": round(cm.attn_ms[t], 4), "mlp_ms": round(cm.mlp_ms[t], 4)}
    subset = min(vocab_sizes)
    for t, (step, rel) in targets.items():
        kinds = []
        for s in SKIP_RATIOS:
            keep = L - int(round(s * L))
            kinds.append((f"skip {s:.0%} layers", t, keep, keep, V))
            kinds.append((f"skip {s:.0%} attention", t, keep, L, V))
            if subset < V:
                kinds.append((f"skip {s:.0%} layers + head {subset}", t, keep, keep, subset))
        if t == "fp32":
            kinds.append(("int8 whole model (shipped today)", "int8", L, L, V))
            if subset < V:
                kinds.append((f"int8 whole model + head {subset}", "int8", L, L, subset))
            for s in SKIP_RATIOS[:1]:
                keep = L - int(round(s * L))
                kinds.append((f"int8 + skip {s:.0%} layers", "int8", keep, keep, V))
        for name, p, ka, km, vocab in kinds:
            rel_cost = draft_ms(p, ka, km, vocab) / step
            row["drafts"].append({"target": t, "draft": name, "precision": p, "cost_rel": round(rel_cost, 3),
                                  "break_even": break_even(rel_cost, rel), "_verify_rel": rel})
    return row


def predictions(result: dict, acceptances: list[float], int8_acceptance: float) -> None:
    """Add predicted speed-ups at the given acceptance rates (int8 whole-model rows: at
    int8_acceptance) and the acceptance a skip draft needs to match the int8 draft."""
    for ctx in result["contexts"]:
        int8 = {}
        for d in ctx["drafts"]:
            rel = d.pop("_verify_rel")
            if d["draft"].startswith("int8 whole model"):
                d["speedup"] = {f"{int8_acceptance:.2f}": round(speedup(int8_acceptance, d["cost_rel"], rel)[0], 2)}
                int8.setdefault(d["target"], (d["speedup"][f"{int8_acceptance:.2f}"], rel))
            else:
                d["speedup"] = {f"{a:.2f}": round(speedup(a, d["cost_rel"], rel)[0], 2) for a in acceptances}
        for d in ctx["drafts"]:
            if d["target"] in int8 and not d["draft"].startswith("int8 whole model"):
                goal, rel = int8[d["target"]]
                d["to_match_int8"] = break_even(d["cost_rel"], rel, goal)


def _pct(x) -> str:
    return "never" if x is None else f"{x:.2f}"


def report(results: list[dict], acceptances: list[float], int8_acceptance: float) -> str:
    lines = []
    for r in results:
        lines.append(f"\n## {r['shape']} ({r['architecture']}, {r['layers']} layers, ~{r['parameters'] / 1e9:.2f}B, "
                     f"vocabulary {r['vocab_size']}; simulated with {r['simulated_layers']} layers)")
        for c in r["contexts"]:
            t = c["targets"]
            lines.append(f"\ncontext {c['context']}: step fp32 {t['fp32']['step_ms']:.1f} ms "
                         f"(head {t['fp32']['head_share']:.0%}, attention {t['fp32']['attention_share']:.0%}, "
                         f"verify-of-9 {t['fp32']['verify9_rel']:.2f}x), int4 {t['int4']['step_ms']:.1f} ms "
                         f"(head {t['int4']['head_share']:.0%}, attention {t['int4']['attention_share']:.0%}, "
                         f"verify-of-9 {t['int4']['verify9_rel']:.2f}x)")
            acc = " | ".join(f"x at {a:.2f}" for a in acceptances)
            lines.append(f"\n| target | draft | cost / step | break-even acceptance | {acc} | to match int8 |")
            lines.append("|---|---|---|---|" + "---|" * len(acceptances) + "---|")
            for d in c["drafts"]:
                if d["draft"].startswith("int8 whole model"):
                    sp = f"x{d['speedup'][f'{int8_acceptance:.2f}']:.2f} at {int8_acceptance:.2f} (measured on SmolLM2)"
                    cells = [sp] + [""] * (len(acceptances) - 1)
                else:
                    cells = [f"x{d['speedup'][f'{a:.2f}']:.2f}" for a in acceptances]
                match = _pct(d["to_match_int8"]) if "to_match_int8" in d else "-"
                lines.append(f"| {d['target']} | {d['draft']} | {d['cost_rel']:.2f} | {_pct(d['break_even'])} | "
                             + " | ".join(cells) + f" | {match} |")
    lines.append("\nAcceptance is cited, not measured: SWIFT (arXiv:2410.06916) reports 90-100% draft acceptance "
                 "for layer skipping on LLaMA-2/CodeLLaMA 7B+ (GPU). Costs are measured on this machine with "
                 "random weights of the real shapes (costs do not depend on the values).")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shapes", default=DEFAULT_SHAPES, show_default=True,
              help=f"Comma-separated shape names ({', '.join(SHAPES)}) or paths to a transformers config.json. "
                   "Memory grows with the widest shape: the default set peaked at 17 GB RSS (Qwen3-4B).")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Decoder layers actually built per shape (their cost scales to the real count).")
@click.option("--contexts", default="256,2048", show_default=True, help="Context lengths to time at (tokens of past).")
@click.option("--acceptance", "acceptances", default="0.80,0.90,0.95", show_default=True,
              help="Per-token acceptance rates to predict skip drafts at (cited, not measured).")
@click.option("--int8-acceptance", default=0.97, show_default=True, type=click.FloatRange(0, 1),
              help="Acceptance of the whole-model int8 draft (0.97: measured on SmolLM2-135M here).")
@click.option("--vocab-subset", default=16384, show_default=True, type=click.IntRange(1),
              help="Draft head subset size to include (the shipped profiles use 8k-16k).")
@click.option("--reps", default=8, show_default=True, type=click.IntRange(1), help="Timing repetitions (medians).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write every figure here too.")
def main(shapes, layers, contexts, acceptances, int8_acceptance, vocab_subset, reps, json_out):
    """Time real model shapes (random weights) through the compiler's export and cost model and
    print where layer skipping pays: draft cost, break-even acceptance, predicted speed-ups."""
    try:
        ctx = sorted({int(c) for c in contexts.split(",") if c.strip()})
        accs = [float(a) for a in acceptances.split(",") if a.strip()]
    except ValueError:
        raise click.BadParameter("--contexts and --acceptance take comma-separated numbers") from None
    if not ctx or min(ctx) < 1 or not accs or not all(0 <= a <= 1 for a in accs):
        raise click.BadParameter("--contexts must be positive integers and --acceptance rates in [0, 1]")
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    for n in names:
        if n not in SHAPES and not os.path.isfile(n):
            raise click.BadParameter(f"unknown shape {n!r}: one of {', '.join(SHAPES)}, or a config.json path",
                                     param_hint="--shapes")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    results = []
    for n in names:
        r = measure_shape(n, layers, ctx, reps, vocab_subset, log)
        predictions(r, accs, int8_acceptance)
        results.append(r)
        print(report([r], accs, int8_acceptance).rsplit("\nAcceptance is cited", 1)[0], flush=True)
        if json_out:        # after every shape: a long run keeps what it measured
            tmp = json_out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"acceptances": accs, "int8_acceptance": int8_acceptance, "shapes": results}, f, indent=1)
            os.replace(tmp, json_out)
    print(report([], accs, int8_acceptance).strip())


if __name__ == "__main__":
    main()
