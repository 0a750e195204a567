"""The GPU check: the runtime on ONNX Runtime's CUDA execution provider, measured and checked.

    python -m conflayers.tools.gpu_check BUNDLE [--json OUT] [--task NAME] [--num-prompts 3]
                                         [--max-new-tokens 128] [--no-genai] [--deadline SECONDS]

tools/gpu_check.sh runs it on a machine with an NVIDIA GPU, after installing onnxruntime-gpu and
exporting the shipped gsm8k profile. It loads BUNDLE with Engine(device="cuda") and prints, side
by side, on GSM8K test prompts (the bench's prompt machinery):
  - plain tok/s, the profile as served here (its policy re-planned for this device: the shipped
    profiles were tuned on a CPU) and the profile with its compiled policy, guard off;
  - per prompt, whether each speculative output is identical to plain greedy output;
  - device costs: a one-token step, verify passes of 1, 2, 4, 8 tokens and a draft step, with the KV
    cache on the device (as the engine keeps it) and on the host, for comparison;
  - which execution provider each graph's nodes ran on (ONNX Runtime's profiler says so per
    node): CUDA's GroupQueryAttention has float16/bfloat16 kernels only, so an fp32 graph's
    attention runs on the CPU provider, and then a device-resident KV cache crosses to the host
    and back in every step. That is reported as found, never hidden;
  - ONNX Runtime GenAI's CUDA model of the same weights (builder -e cuda, fp16), where
    onnxruntime-genai-cuda is installed: a reference row, not expected to be token-identical.
It writes every figure to --json. Exit status 1 on any mismatch of the runtime's speculative
output, a target the engine refuses as inexact on this GPU, or sessions that are not on CUDA;
0 otherwise, and 0 with the one line "skipped: no CUDA device" where no CUDA device is usable.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

SKIPPED = "skipped: no CUDA device"
WIDTHS = (1, 2, 4, 8)            # verify-of-n widths timed


def cuda_missing() -> str | None:
    """None where a CUDA device is usable through ONNX Runtime here, else why not."""
    from conflayers.runtime.device import available_providers, cuda_unusable
    have = available_providers()
    if "CUDAExecutionProvider" not in have:
        return f"this onnxruntime has no CUDAExecutionProvider ({', '.join(have)})"
    return cuda_unusable()


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- device costs

def device_costs(engine, task: str | None, kv_device: str, context: int = 128, reps: int = 10) -> dict:
    """Median ms of a one-token step, verify passes of WIDTHS tokens and one draft step of `task`'s
    model draft, at `context` tokens of (zero) past, with the KV cache on `kv_device`
    (interleaved, after a warm-up, as probe.measure times them)."""
    from conflayers.runtime.ort_backend import KVCache
    spec = engine.spec
    context = max(1, min(context, engine.capacity - max(WIDTHS) - 2))
    cache = KVCache(spec, context + max(WIDTHS) + 2, kv_device)
    full, token = engine.full.bind(cache), min(10, spec.vocab_size - 1)
    jobs = {f"verify_{n}": (lambda n=n: full.run([token] * n, context)) for n in WIDTHS}
    drafter = engine.drafters.get(task) if task else None
    model = getattr(drafter, "model", None)
    if model is not None:
        draft = model.stepper(cache)
        jobs["draft_step"] = lambda: draft(token, context)
    for fn in jobs.values():
        fn()
    samples = {k: [] for k in jobs}
    for _ in range(reps):
        for k, fn in jobs.items():
            t = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t) * 1000.0)
    med = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    return {"kv_on": cache.keys[0].device_name(), "context": context, "step_ms": med["verify_1"],
            "verify_ms": {str(n): med[f"verify_{n}"] for n in WIDTHS}, "draft_step_ms": med.get("draft_step")}


# ----------------------------------------------------------------------------- node placement

def placement(path: str, providers: list[str], spec, kv_layers: list[int], output: str, kv_device: str) -> dict:
    """Run one pass of the graph at `path` in a profiled session and count, from ONNX Runtime's
    profile, the nodes each execution provider ran; which op types ran on the CPU provider."""
    import numpy as np
    import onnxruntime as ort

    from conflayers.runtime import ort_backend
    from conflayers.runtime.ort_backend import GraphRunner, KVCache
    tmp = tempfile.mkdtemp(prefix="conflayers-gpu-profile-")
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if ort_backend._global_pool:        # the engine's CPU sessions made one: ORT then requires it
            so.use_per_session_threads = False
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")     # not the working directory
        session = ort.InferenceSession(path, so, providers=providers)
        runner = GraphRunner(session, kv_layers, output)
        if output == "logits" and not kv_layers:             # a draft head: hidden -> logits
            runner.run_head(np.zeros((1, 2, spec.hidden_size), np.float32))
        else:
            runner.bind(KVCache(spec, 16, kv_device)).run([10, 11], 0)
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nodes = [e["args"] for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
             and "provider" in e.get("args", {})]
    by_provider = Counter(a["provider"] for a in nodes)
    on_cpu = Counter(a.get("op_name", "?") for a in nodes if a["provider"] == "CPUExecutionProvider")
    return {"session_providers": session.get_providers(), "nodes_by_provider": dict(by_provider),
            "ops_on_cpu": dict(sorted(on_cpu.items())),
            "memcpy_nodes": sum(1 for a in nodes if str(a.get("op_name", "")).startswith("Memcpy"))}


def placements(engine, task: str | None) -> dict:
    """placement() of the full graph and of `task`'s draft body and head."""
    b, spec, kv = engine.bundle, engine.spec, engine.device
    out = {"full": placement(b.full_graph, engine.providers, spec, list(range(spec.num_layers)), "logits", kv)}
    graphs = b.draft_graphs(task) if task else None
    if graphs is not None:
        out["draft_body"] = placement(graphs.body, engine.providers, spec, graphs.kv_layers, "hidden", kv)
        out["draft_head"] = placement(graphs.head, engine.providers, spec, [], "logits", kv)
    return out


def kv_copied(engine, where: dict) -> bool:
    """Whether a step moves the KV cache across: a device-resident cache read by attention on the CPU."""
    cpu_attention = where["full"]["ops_on_cpu"].get("GroupQueryAttention", 0) > 0
    return engine.device != "cpu" and cpu_attention


# ----------------------------------------------------------------------------- generation

def gsm8k_prompts(engine, n: int, max_new: int, seed: int = 0):
    """n GSM8K test prompts as conflayers-bench picks and encodes them (BenchPrompt)."""
    from .bench import encode_prompts, load_sections
    args = argparse.Namespace(prompts=None, task=["gsm8k"], num_prompts=n, seed=seed)
    sections = load_sections(args, engine.bundle)
    encode_prompts(sections, engine, bool(engine.codec.chat_template), max_new)
    return sections[0]["bench_prompts"]


@contextlib.contextmanager
def compiled_policy(engine, task: str):
    """The profile's compiled policy, guard off, for the requests inside: what its draft does here."""
    engine.adapt_policy(task)
    model = engine.drafters[task].model
    saved, guard = model.policy, engine.use_guard
    model.policy, engine.use_guard = engine.bundle.profiles[task].policy, False
    try:
        yield
    finally:
        model.policy, engine.use_guard = saved, guard


def runtime_systems(engine, task: str | None) -> list[tuple[str, dict, object]]:
    """(name, generate kwargs, context manager factory) of the runtime's systems."""
    none = contextlib.nullcontext
    systems = [("plain", {"speculate": False}, none)]
    if task:
        systems.append((f"profile:{task} (as served)", {"task": task}, none))
        if getattr(engine.drafters[task], "model", None) is not None:
            systems.append((f"profile:{task} (compiled policy, no guard)", {"task": task},
                            lambda: compiled_policy(engine, task)))
    return systems


def generate(engine, prompt, kwargs, max_new: int) -> dict:
    r = engine.generate(**prompt.runtime_kwargs(), max_new_tokens=max_new, temperature=0.0, **kwargs)
    m = r.metrics
    return {"ids": list(r.token_ids), "tokens_per_s": m.tokens_per_s, "tokens": m.completion_tokens,
            "draft_steps": m.draft_steps, "mean_accepted": m.mean_accepted_tokens, "speculative": m.speculative}


def genai_row(engine, prompts, max_new: int, seconds: float) -> dict:
    """GenAI's CUDA model (fp16) of the bundle's weights over the same prompt ids, or why not."""
    from .bench_systems import GenAIBackend, GenAISystem, Unavailable, genai_model_dir, resolve_hf_dir
    try:
        import onnxruntime_genai as og
        if not og.is_cuda_available():
            return {"status": "skipped", "reason": "this onnxruntime-genai has no CUDA support "
                                                   "(pip install onnxruntime-genai-cuda)"}
        hf_dir = resolve_hf_dir(engine.bundle.manifest["model"], None)
        model_dir = genai_model_dir(hf_dir, engine.bundle.manifest["model"].get("name", "model"),
                                    log=lambda m: print(m, file=sys.stderr), precision="fp16",
                                    provider="cuda", timeout=max(seconds, 1.0))
        system = GenAISystem("genai-cuda", GenAIBackend(model_dir), engine.stop_ids)
        system.generate(prompts[0], min(16, max_new))                    # warm-up
        runs = [system.generate(p, max_new) for p in prompts]
    except ImportError as e:
        return {"status": "skipped", "reason": f"onnxruntime-genai is not installed ({e})"}
    except Unavailable as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 (a reference system: its failure is reported, not fatal)
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "precision": "fp16", "runs": [{"ids": r.token_ids, "tokens_per_s": r.tokens_per_s}
                                                         for r in runs]}


# ----------------------------------------------------------------------------- the check

def check(args) -> tuple[dict, int]:
    import onnxruntime as ort

    from conflayers.runtime import Engine
    from conflayers.runtime.exactness import TargetNotExact
    t0 = time.monotonic()
    problems = []
    doc = {"status": "ran", "device": args.device, "gpu": gpu_name(), "onnxruntime": ort.__version__,
           "bundle": os.path.abspath(args.bundle),
           "install": os.environ.get("GPU_CHECK_INSTALL")}      # what tools/gpu_check.sh chose, and why
    try:
        engine = Engine.load(args.bundle, device=args.device)
    except TargetNotExact as e:       # measured anyway (the window on a GPU is short), and a failure
        problems.append(f"the engine refuses the target on this device: {e}")
        doc["exactness_refusal"] = str(e)
        engine = Engine.load(args.bundle, device=args.device, check_exactness=False)
    doc["exactness"] = None if engine.exactness is None else engine.exactness.to_json()
    doc["providers"] = engine.providers
    doc["session_providers"] = engine.full.session.get_providers()
    if args.device == "cuda" and "CUDAExecutionProvider" not in doc["session_providers"]:
        problems.append(f"the full graph's session is not on CUDA ({doc['session_providers']})")
    task = args.task or engine.bundle.default_profile
    if task is not None and task not in engine.drafters:
        raise SystemExit(f"Error: the bundle has no profile {task!r} (it has {', '.join(engine.profiles)})")
    profile = engine.bundle.profiles.get(task) if task else None

    prompts = gsm8k_prompts(engine, args.num_prompts, args.max_new_tokens)
    systems = runtime_systems(engine, task)
    for _, kwargs, ctx in systems:                   # warm-up (and the first use's re-plan), not measured
        with ctx():
            generate(engine, prompts[0], kwargs, min(16, args.max_new_tokens))
    if task:
        engine.adapt_policy(task)
        costs = engine.machine_costs.get(task)
        model = getattr(engine.drafters[task], "model", None)
        doc["replan"] = {"tuned_on": profile.tuned_device, "replanned": task in engine.replan,
                         "compiled_policy": _policy(profile.policy),
                         "policy_here": _policy(model.policy if model is not None else engine.drafters[task].policy),
                         "costs_here": None if costs is None else {"verify_ms": list(costs.verify_ms),
                                                                   "draft_ms": costs.draft_ms}}
    per_prompt = []
    for i, p in enumerate(prompts):
        order = systems[i % len(systems):] + systems[:i % len(systems)]      # rotated, as the bench does
        runs = {}
        for name, kwargs, ctx in order:
            with ctx():
                runs[name] = generate(engine, p, kwargs, args.max_new_tokens)
        plain = runs["plain"]["ids"]
        for name, run in runs.items():
            run["identical"] = run["ids"] == plain
            if not run["identical"]:
                problems.append(f"prompt {p.uid}: {name} differs from plain decoding")
        per_prompt.append({"uid": p.uid, "prompt_tokens": len(p.ids), "systems": runs})
    doc["prompts"] = per_prompt
    doc["systems"] = {name: _summary([pp["systems"][name] for pp in per_prompt]) for name, _, _ in systems}

    # measured after the outputs are in, each on its own: a failure here is reported, the rest still runs
    _guarded(doc, problems, "device_costs",
             lambda: {kv: device_costs(engine, task, kv) for kv in (engine.device, "cpu")})
    _guarded(doc, problems, "placement", lambda: placements(engine, task))
    doc["kv_crosses_to_host_each_step"] = (None if "error" in doc["placement"]
                                           else kv_copied(engine, doc["placement"]))
    left = args.deadline - (time.monotonic() - t0)
    if args.genai and left > 30:
        g = genai_row(engine, prompts, args.max_new_tokens, left - 20)
        if g.get("status") == "ok":
            for run, pp in zip(g["runs"], per_prompt):
                run["identical"] = run["ids"] == pp["systems"]["plain"]["ids"]
            g["summary"] = _summary(g["runs"])
        doc["genai_cuda"] = g
    else:
        doc["genai_cuda"] = {"status": "skipped", "reason": "--no-genai" if not args.genai else
                             f"{max(left, 0):.0f} s left of --deadline {args.deadline:.0f} s"}
    doc["problems"] = problems
    doc["seconds"] = round(time.monotonic() - t0, 1)
    return doc, 1 if problems else 0


def _guarded(doc: dict, problems: list, key: str, fn) -> None:
    """doc[key] = fn(), or the error it raised (also a problem)."""
    try:
        doc[key] = fn()
    except Exception as e:  # noqa: BLE001 (the one GPU run should bring back all it can)
        doc[key] = {"error": f"{type(e).__name__}: {e}"}
        problems.append(f"{key}: {doc[key]['error']}")


def _policy(p) -> dict | None:
    return None if p is None else {"k": p.max_tokens, "confidence_stop": getattr(p, "confidence_stop", None)}


def _summary(runs: list[dict]) -> dict:
    rates = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
    return {"tokens_per_s": round(statistics.mean(rates), 2) if rates else 0.0,
            "identical": all(r.get("identical", True) for r in runs),
            "mean_accepted": round(statistics.mean(r.get("mean_accepted", 0.0) for r in runs), 3)}


def render(doc: dict) -> str:
    """The side-by-side report."""
    lines = [f"GPU check ({doc['device']}): {doc.get('gpu') or 'no nvidia-smi'}, onnxruntime {doc['onnxruntime']}, "
             f"sessions {', '.join(doc['session_providers'])}, bundle {doc['bundle']}"]
    plain = doc["systems"]["plain"]["tokens_per_s"] or 1.0
    rows = [(name, s["tokens_per_s"], s["mean_accepted"], s["identical"]) for name, s in doc["systems"].items()]
    g = doc["genai_cuda"]
    lines += ["", f"{'system':<48} {'tok/s':>8} {'speed-up':>9} {'accepted/step':>14} {'identical':>10}"]
    for name, tps, acc, same in rows:
        accepted = f"{acc:.2f}" if name != "plain" else "-"
        lines.append(f"{name:<48} {tps:>8.1f} {tps / plain:>8.2f}x {accepted:>14} {'yes' if same else 'NO':>10}")
    if g.get("status") == "ok":
        s = g["summary"]
        tps = s["tokens_per_s"]
        lines.append(f"{'genai-cuda (fp16, reference)':<48} {tps:>8.1f} {tps / plain:>8.2f}x "
                     f"{'-':>14} {'yes' if s['identical'] else 'no':>10}")
    else:
        lines.append(f"genai-cuda: {g['status']} ({g.get('reason')})")
    lines += ["", "per prompt (tok/s, identical to plain):"]
    for pp in doc["prompts"]:
        cells = [f"{n}: {pp['systems'][n]['tokens_per_s']:.1f} {'yes' if pp['systems'][n]['identical'] else 'NO'}"
                 for n in doc["systems"]]
        lines.append(f"  {pp['uid']:<20} " + " | ".join(cells))
    r = doc.get("replan")
    if r:
        why = " (another device: re-planned here)" if r["replanned"] else ""
        lines += ["", f"policy: tuned on {r['tuned_on']}{why}: compiled {r['compiled_policy']} -> "
                      f"here {r['policy_here'] or 'no drafting (plain is faster)'}"]
    costs, where = doc["device_costs"], doc["placement"]
    context = "?" if "error" in costs else next(iter(costs.values()))["context"]
    lines += ["", f"device costs (ms, median; context {context}):"]
    if "error" in costs:
        lines.append(f"  failed: {costs['error']}")
    for c in ([] if "error" in costs else costs.values()):
        v = ", ".join(f"{n}: {ms}" for n, ms in c["verify_ms"].items())
        lines.append(f"  KV cache on {c['kv_on']:<5} step {c['step_ms']}, verify-of-n {v}, "
                     f"draft step {c['draft_step_ms']}")
    lines += ["", "execution providers (nodes run in one pass):"]
    if "error" in where:
        lines.append(f"  failed: {where['error']}")
    for graph, p in ([] if "error" in where else where.items()):
        cpu = ", ".join(f"{op} x{n}" for op, n in p["ops_on_cpu"].items()) or "none"
        lines.append(f"  {graph:<11} {p['nodes_by_provider']}; on the CPU provider: {cpu}; "
                     f"memcpy nodes {p['memcpy_nodes']}")
    if doc["kv_crosses_to_host_each_step"]:
        lines.append("  -> attention runs on the CPU provider (CUDA's GroupQueryAttention is float16/bfloat16 only): "
                     "every step copies the device-resident KV cache to the host and back")
    lines += ["", "result: " + ("OK, every speculative output identical to plain" if not doc["problems"]
                                else "FAILED\n  " + "\n  ".join(doc["problems"]))]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m conflayers.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle directory (tools/gpu_check.sh exports the shipped gsm8k profile)")
    p.add_argument("--json", metavar="OUT", help="write every result here")
    p.add_argument("--task", help="the profile to check [default: the bundle's default]")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-genai", dest="genai", action="store_false", help="leave out GenAI's CUDA model")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same check on the CPU (how the tests check this tool) [default: cuda]")
    p.add_argument("--deadline", type=float, default=180.0,
                   help="seconds this check may take: GenAI's row is left out when too few are left")
    return p.parse_args(argv)


def _write(path: str | None, doc: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why = cuda_missing() if args.device == "cuda" else None
    if why is not None:
        print(SKIPPED)
        _write(args.json, {"status": "skipped", "reason": why})
        return 0
    doc, status = check(args)
    _write(args.json, doc)
    print(render(doc))
    return status


if __name__ == "__main__":
    sys.exit(main())
