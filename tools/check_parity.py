#!/usr/bin/env python
"""Check the exported ONNX graphs of one model against transformers, end to end, and time them.

    python tools/check_parity.py --model smollm2-135m-instruct
    python tools/check_parity.py --model /path/to/hf_dir --tokens 600 --skip-layer 4

Loads the model (alias, local directory, GGUF file or hub id, through the compiler's resolver),
exports the full graph, one fp32 draft (one layer skipped) and the same draft in int8 into a
temporary directory, and prints:
  - export time;
  - full graph vs torch: max abs diff and argmax agreement on a prefill of --tokens tokens (make it
    longer than a sliding window, e.g. Gemma 3's 512, so the window matters), on single-token
    decode steps and on one multi-token verify step (the greedy continuation);
  - fp32 draft vs a torch reference with the layer removed (prefix KV from the full model);
  - top-1 agreement of the drafts with the full model and of int8 with fp32 (teacher-forced);
  - ONNX Runtime step latency of the full graph and the drafts for 1/4/8 new tokens at
    --past tokens of past.
Exit status 1 when the full-graph or fp32-draft parity is off (max abs diff > --atol or any
argmax difference).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in long strips "
    "after decades of salt wind. Every evening the keeper climbed the one hundred and twelve steps, "
    "trimmed the wick, wound the clockwork that turned the great lens, and wrote the weather in a "
    "leather book: wind from the north-east, sea moderate, two fishing boats returned before dark. "
    "Ships far out on the water counted the flashes, three short and one long, and knew where the "
    "rocks were. When the keeper retired, the light was automated, and the book went to the town "
    "museum, where children still read the entries aloud and guess which storms were the worst. "
)
CPU = ["CPUExecutionProvider"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="alias, local HF directory, .gguf file or hub id")
    p.add_argument("--tokens", type=int, default=600, help="prompt length for the prefill check (default 600)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--verify", type=int, default=5, help="tokens in the multi-token verify step")
    p.add_argument("--skip-layer", type=int, default=None, help="layer the drafts skip (default: num_layers // 3)")
    p.add_argument("--draft-steps", type=int, default=3, help="sequential draft tokens checked against torch")
    p.add_argument("--past", type=int, default=200, help="tokens of past for the latency figures")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency figure")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--keep", default=None, help="export into this directory and keep it")
    p.add_argument("--no-window-check", action="store_true",
                   help="skip exporting full graphs with the sliding window off by one (they show that "
                        "the prompt is long enough for the window to matter)")
    return p.parse_args(argv)


def log(msg=""):
    print(msg, flush=True)


def prompt_ids(tokenizer, n: int) -> np.ndarray:
    text = PARAGRAPH
    while True:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= n:
            return np.asarray(ids[:n], np.int64)
        text += PARAGRAPH


def diff_agree(a, b):
    return float(np.abs(a - b).max()), float((a.argmax(-1) == b.argmax(-1)).mean())


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """{name: (median, min) ms}. The functions take turns, so a load change on a shared machine
    hits all of them alike; the min is the better figure when the machine is busy."""
    for fn in fns.values():                                # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: (1000 * float(np.median(v)), 1000 * float(np.min(v))) for name, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = args.keep or tempfile.mkdtemp(prefix="conflayers_parity_")
    try:
        return check(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def check(args, tmp: str) -> int:
    import onnx
    import torch
    from transformers import DynamicCache

    from conflayers.compiler.arch import canonical_weights, model_spec
    from conflayers.compiler.export.decoder_graph import WeightStores, build
    from conflayers.compiler.export.reference import draft_reference
    from conflayers.compiler.models import load_model, resolve_model
    from conflayers.runtime.draftplan import DraftPlan
    from conflayers.runtime.ort_backend import GraphRunner, KVCache, create_session

    t0 = time.perf_counter()
    model, tokenizer = load_model(resolve_model(args.model))
    model = model.float().eval()
    spec = model_spec(model.config)
    log(f"model {args.model}: {spec.architecture}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"vocab {spec.vocab_size}, sliding windows {sorted(set(spec.sliding_window))} "
        f"(loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()})")

    skip = args.skip_layer if args.skip_layer is not None else spec.num_layers // 3
    plans = {"fp32": DraftPlan(spec.num_layers, skip_layers=(skip,)),
             "int8": DraftPlan(spec.num_layers, skip_layers=(skip,), precision="int8")}
    ids = prompt_ids(tokenizer, args.tokens)
    p = len(ids)
    n_new = args.decode_steps + args.verify
    max_context = p + n_new + 16

    # torch: greedy continuation (with cache), then one forward over the whole sequence
    t = time.perf_counter()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor(ids[None]), cache=cache, use_cache=True)
        seq = list(ids)
        for _ in range(n_new):
            nxt = int(out.logits[0, -1].argmax())
            seq.append(nxt)
            out = model(torch.tensor([[nxt]]), cache=cache, use_cache=True)
        seq = np.asarray(seq, np.int64)
        ref = model(torch.tensor(seq[None])).logits[0].float().numpy()
        del cache, out
    log(f"torch reference over {len(seq)} tokens: {time.perf_counter() - t:.1f} s")

    os.makedirs(tmp, exist_ok=True)
    t = time.perf_counter()
    weights = canonical_weights(spec, model.state_dict())
    stores = WeightStores(tmp, weights)
    times = {}
    tt = time.perf_counter()
    onnx.save(build(spec, stores, None, "full", max_context=max_context), os.path.join(tmp, "full.onnx"))
    times["full"] = time.perf_counter() - tt
    for prec, plan in plans.items():
        tt = time.perf_counter()
        onnx.save(build(spec, stores, plan, "body", max_context=max_context), os.path.join(tmp, f"body_{prec}.onnx"))
        onnx.save(build(spec, stores, plan, "head"), os.path.join(tmp, f"head_{prec}.onnx"))
        times[prec] = time.perf_counter() - tt
    win = sorted(set(w for w in spec.sliding_window if w > 0))
    window_variants = {}
    if win and not args.no_window_check and p > min(win):
        import dataclasses
        for delta in (-1, 1):       # same weights (deduplicated in weights.bin), window +-1
            off = dataclasses.replace(
                spec, sliding_window=tuple(w + delta if w > 0 else w for w in spec.sliding_window))
            name = f"full_window{delta:+d}.onnx"
            onnx.save(build(off, stores, None, "full", max_context=max_context), os.path.join(tmp, name))
            window_variants[delta] = name
    sizes = {pr: f.size for pr, f in stores.files.items()}
    stores.close()
    del weights, stores
    log(f"export: {time.perf_counter() - t:.1f} s total (full {times['full']:.1f} s, fp32 draft {times['fp32']:.1f} s, "
        f"int8 draft {times['int8']:.1f} s; weights.bin {sizes['fp32'] / 2**20:.0f} MiB, "
        f"weights_int8.bin {sizes['int8'] / 2**20:.0f} MiB)" + (f" in {tmp}" if args.keep else ""))

    t = time.perf_counter()
    sess = {"full": create_session(os.path.join(tmp, "full.onnx"), CPU)}
    for prec in plans:
        sess[f"body_{prec}"] = create_session(os.path.join(tmp, f"body_{prec}.onnx"), CPU)
        sess[f"head_{prec}"] = create_session(os.path.join(tmp, f"head_{prec}.onnx"), CPU)
    log(f"ORT sessions created in {time.perf_counter() - t:.1f} s")
    all_layers = list(range(spec.num_layers))
    full_g = GraphRunner(sess["full"], all_layers, "logits")
    bodies = {pr: GraphRunner(sess[f"body_{pr}"], plan.kv_layers, "hidden") for pr, plan in plans.items()}
    heads = {pr: GraphRunner(sess[f"head_{pr}"], [], "logits") for pr in plans}

    def head_rows(prec, hidden, chunk=128):       # bounded memory for big vocabularies
        return np.concatenate([heads[prec].run_head(hidden[None, i:i + chunk])[0]
                               for i in range(0, len(hidden), chunk)])

    ok = True

    def report(name, ours, theirs):
        nonlocal ok
        d, a = diff_agree(ours, theirs)
        good = d <= args.atol and a == 1.0
        ok &= good
        log(f"  {name:<34} max abs diff {d:.3g}   argmax agreement {a:.4f} ({len(ours)} positions)"
            f"{'' if good else '   <-- FAIL'}")

    # --- full graph parity
    log(f"full graph vs torch (logit range {ref.min():.1f}..{ref.max():.1f}):")
    kv = KVCache(spec, max_context)
    run = full_g.bind(kv)
    t = time.perf_counter()
    pre = run.run(seq[:p], 0, logits_from=0)
    t_pre = time.perf_counter() - t
    report(f"prefill {p} tokens ({1000 * t_pre:.0f} ms)", pre, ref[:p])
    if win and p > min(win):
        report(f"  of which positions >= window {min(win)}", pre[min(win):], ref[min(win):p])
    del pre
    for delta, name in window_variants.items():
        g = GraphRunner(create_session(os.path.join(tmp, name), CPU), all_layers, "logits")
        off = g.bind(KVCache(spec, max_context)).run(seq[:p], 0, logits_from=min(win))
        d, a = diff_agree(off, ref[min(win):p])
        log(f"  (control) window {delta:+d} graph, positions >= {min(win)}: max abs diff {d:.3g}, "
            f"argmax agreement {a:.4f}{'' if d > args.atol else '   <-- window does not matter here'}")
        del g, off
    dec = np.concatenate([run.run(seq[p + j:p + j + 1], p + j) for j in range(args.decode_steps)])
    report(f"decode {args.decode_steps} x 1 token", dec, ref[p:p + args.decode_steps])
    q = p + args.decode_steps
    report(f"verify step of {args.verify} tokens", run.run(seq[q:q + args.verify], q), ref[q:q + args.verify])

    # --- fp32 draft parity (prefix KV from the full model, draft for the next positions)
    plan = plans["fp32"]
    kv = KVCache(spec, max_context)
    full_g.bind(kv).run(seq[:p], 0, logits_from=p - 1)
    body = bodies["fp32"].bind(kv)
    ours = np.concatenate([head_rows("fp32", body.run(seq[p + j:p + j + 1], p + j)) for j in range(args.draft_steps)])
    theirs = draft_reference(model, plan, spec.sandwich_norm, seq, p, args.draft_steps)
    log(f"fp32 draft (skip layer {skip}) vs torch with the layer removed:")
    report(f"{args.draft_steps} draft steps after the prefix", ours, theirs)

    # --- draft agreement, teacher-forced over the prompt (each draft computes its own KV)
    full_top = ref[:p].argmax(-1)
    tops = {}
    for prec in plans:
        hidden = bodies[prec].bind(KVCache(spec, max_context)).run(seq[:p], 0)
        tops[prec] = np.concatenate([head_rows(prec, hidden[i:i + 128]).argmax(-1) for i in range(0, p, 128)])
    log(f"top-1 agreement over {p} prompt positions (teacher-forced): "
        f"fp32 draft vs full {np.mean(tops['fp32'] == full_top):.3f}, "
        f"int8 draft vs full {np.mean(tops['int8'] == full_top):.3f}, "
        f"int8 vs fp32 draft {np.mean(tops['int8'] == tops['fp32']):.3f}")

    # --- latency
    past = min(args.past, p)
    kv = KVCache(spec, max_context)
    full_run = full_g.bind(kv)
    full_run.run(seq[:past], 0, logits_from=past - 1)
    bound = {pr: bodies[pr].bind(kv) for pr in plans}
    log(f"ORT step latency, ms, median / min of {args.repeats} runs, at {past} tokens of past "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    log(f"  {'new tokens':<12}" + "".join(f"{n:>16}" for n in (1, 4, 8)))
    rows = {"full": lambda toks: full_run.run(toks, past, 0)}
    for pr in plans:
        rows[f"{pr} draft"] = (lambda pr: lambda toks: heads[pr].run_head(bound[pr].run(toks, past, 0)[None]))(pr)
    steps = {(name, n): (lambda fn, n: lambda: fn(seq[past:past + n]))(fn, n)
             for name, fn in rows.items() for n in (1, 4, 8)}
    ms = timed_interleaved(steps, args.repeats)
    for name in rows:
        rel = "" if name == "full" else "   (min: " + ", ".join(
            f"{ms[name, n][1] / ms['full', n][1]:.2f}x" for n in (1, 4, 8)) + " of full)"
        log(f"  {name:<12}" + "".join(f"{ms[name, n][0]:9.1f} /{ms[name, n][1]:5.1f}" for n in (1, 4, 8)) + rel)
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
