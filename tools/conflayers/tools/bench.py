"""conflayers-bench: the runtime's speculative decoding against plain decoding and reference
systems, on the same prompts, in one process, interleaved.

    conflayers-bench BUNDLE [--prompts FILE.jsonl | --task NAME ...] [--num-prompts N]
                     [--max-new-tokens M] [--seed S] [--systems LIST] [--json FILE] [--plot FILE.png]
                     [--hf-model NAME] [--gguf FILE] [--prompt-lookup-tokens N] [--chat|--no-chat]
                     [--memory] [--no-guard] [--own-profile] [--kv-cache float32|float16]
    conflayers-bench plot A.json [B.json ...] -o FILE.png     (one chart from several runs)

Systems (--systems a,b,c; default: all):
  plain             the runtime, plain greedy decoding with the full graph: the baseline (always run)
  profile:<name>    the runtime, speculative decoding with that profile's draft
  unguarded:<name>  the same without the speculation guard (only when named: what the guard
                    gains or costs, side by side)
  auto              the runtime, task="auto" (the profile is chosen per prompt)
  ngram             the runtime with its n-gram drafter (prompt lookup, default settings: match the
                    last 3..1 tokens, propose up to 8, cut to the length this machine's verify
                    cost pays for) on the bundle's full graph
  hf                transformers generate(), greedy, same model, torch threads = cores
  hf-prompt-lookup  transformers prompt-lookup decoding (prompt_lookup_num_tokens=10), greedy
  genai             ONNX Runtime GenAI plain greedy decoding of the same model (fp32, cpu), built
                    once by its model builder and cached under $CONFLAYERS_CACHE/genai/
  genai-int4        the same at int4 (builder -p int4: MatMulNBits, block 32, symmetric, accuracy
                    level 4), the precision matching a Q4 GGUF
  genai-ngram, genai-int4-ngram
                    GenAI's own n-gram speculative decoding (ngram_size 3 = match the last 2 tokens,
                    max_draft_tokens = --prompt-lookup-tokens, fixed width) on those two models
  llamacpp          llama-cpp-python greedy decoding of the GGUF file the model came from (--gguf),
                    optional: bash tools/install_llama_cpp.sh
  llamacpp-prompt-lookup
                    llama-cpp-python's prompt lookup decoding (LlamaPromptLookupDecoding,
                    num_pred_tokens = --prompt-lookup-tokens, max_ngram_size 2), greedy

Method:
- Every system gets the same prompt token ids (the runtime's tokenizer and chat template).
- One warm-up generation per system (not measured), then for each prompt every system runs once,
  in an order rotated by one per prompt, so machine noise hits all systems alike.
- tokens/s is the decode rate after the first token (as the runtime's metrics), averaged over the
  prompts; speed-up = tokens/s / plain's tokens/s from the same run; time to first token is the
  request start to the first new token.
- identical_to_plain: every prompt's output (generated ids cut before the first end token) equals
  the runtime's plain greedy output token for token. For the runtime's systems this is the
  lossless guarantee: the tool exits with status 1 when one of them differs.
- Achieved weight bandwidth (as gpt-fast prints it) = bytes of weights read per generated token
  x tokens/s, where bytes per token = (full passes x full bytes + draft passes x draft bytes) /
  generated tokens, summed over the prompts. Full bytes = the manifest size of the target's weights
  file (weights.bin, or weights_native.bin for a native target: every parameter; the HF model's
  parameter bytes for hf, the GenAI model's weight files for genai).
  Draft bytes = the weights the draft body and head graphs read (see bench_systems.
  weight_accounting). Full passes = generated tokens - accepted draft tokens (each full pass,
  the prefill included, yields one token of its own plus the drafts it accepts); draft passes =
  drafted tokens (every drafted token is one pass of the draft body and head; a speculative step
  drafts up to k). HF prompt lookup: full passes = counted forward calls of the model. Plain
  decoding: one full pass per token, i.e. full bytes x tokens/s. KV-cache reads are not counted.
- Threads: the runtime, genai and llama.cpp use the runtime's count ($CONFLAYERS_THREADS, else
  one thread per core); torch uses torch.set_num_threads(cores) with OMP_WAIT_POLICY=PASSIVE (only when a torch system
  runs: it slows llama.cpp's OpenMP threads ~3x, so bench llama.cpp and hf in separate runs) unless the environment sets it
  (spin-waiting OpenMP threads made torch 5-10x slower on a busy shared machine).
- llama.cpp: fed the prompt token ids (not text), a cold prefill per prompt (no KV-cache prefix
  reuse), temp 0 (its greedy sampler), no repeat penalty, stopped at the runtime's end ids; its
  context = the bundle's. Full bytes = the GGUF file size.
- Disk: the bundle directory, the HF model directory, the GenAI model directory, the GGUF file.
- Memory. Without --memory: the process's VmRSS after loading each backend and warming up its
  systems, in the order runtime -> hf -> genai -> llamacpp (cumulative; the delta is that backend's share;
  plain, the profiles and auto share one Engine, hf and hf-prompt-lookup one model). With
  --memory: one subprocess per system loads only that system (plain: the full graph alone;
  profile:X: full + X's draft; auto: the bundle as Engine.load opens it) and generates one
  prompt; its peak RSS (VmHWM) is reported. --memory also measures the runtime's memory target:
  VmHWM of "full graph + every draft" / VmHWM of "full graph alone" (<= 1.5x wanted), and the same
  ratio above a bare interpreter that only imported the runtime.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from importlib.metadata import version

from conflayers.runtime.attention import KVCacheError
from conflayers.runtime.profile import task_name

from .bench_systems import (GENAI, GENAI_NGRAM_SIZE, HF, LLAMA_CPP_INSTALL_HINT, LLAMACPP, NGRAM, PROMPT_LOOKUP_TOKENS,
                            RUNTIME, NGramBackend,
                            BenchPrompt, GenAIBackend, GenAISystem, HFBackend, HFSystem, LlamaCppBackend,
                            LlamaCppSystem, RuntimeBackend, RuntimeSystem, Unavailable, genai_model_dir,
                            import_llama_cpp, locate_gguf, path_bytes, resolve_hf_dir, runtime_threads,
                            proc_status_kb, rss_mb, spawn_child)

# name -> (builder precision, n-gram speculative mode)
GENAI_SYSTEMS = {"genai": ("fp32", False), "genai-ngram": ("fp32", True),
                 "genai-int4": ("int4", False), "genai-int4-ngram": ("int4", True)}
LLAMACPP_SYSTEMS = ("llamacpp", "llamacpp-prompt-lookup")
REFERENCE_SYSTEMS = ("hf", "hf-prompt-lookup", *GENAI_SYSTEMS, *LLAMACPP_SYSTEMS)
MEMORY_TARGET = 1.5
PART = "evaluation"


class BenchError(Exception):
    """Bad input: printed as one `Error:` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(f"{message} (see conflayers-bench --help)")


def parse_args(argv):
    p = _Parser(prog="conflayers-bench", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Systems: plain, profile:<name>, auto, ngram, hf, hf-prompt-lookup, genai, genai-ngram, "
                       "genai-int4, genai-int4-ngram, llamacpp, llamacpp-prompt-lookup. "
                       "Subcommand: conflayers-bench plot A.json [B.json ...] -o FILE.png")
    p.add_argument("bundle", help="a compiled conflayers bundle directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="your own prompts (JSONL or text; see conflayers.compiler.data)")
    src.add_argument("--task", action="append", metavar="NAME",
                     help="named prompt set, evaluation part: gsm8k, humaneval, spec_bench[:category|group]; "
                          "repeat for several tasks (one section each). Default: the default profile's calibration task")
    p.add_argument("--num-prompts", type=int, default=8, metavar="N", help="prompts per task (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="default 128")
    p.add_argument("--seed", type=int, default=0, help="which prompts are picked (default 0)")
    p.add_argument("--systems", metavar="LIST", help="comma-separated subset of the systems (default: all)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="speed-up and acceptance-length chart")
    p.add_argument("--hf-model", metavar="NAME", help="model for hf/genai (alias, HF dir, .gguf, hub id); "
                                                      "default: the bundle's model")
    p.add_argument("--gguf", metavar="FILE", help="GGUF file for llamacpp / llamacpp-prompt-lookup (default: the "
                                                  "bundle's model source when it is a .gguf, else the model "
                                                  "resolver's cached GGUF of the alias)")
    p.add_argument("--prompt-lookup-tokens", type=int, default=PROMPT_LOOKUP_TOKENS, metavar="N",
                   help=f"tokens per proposal of hf-prompt-lookup, llamacpp-prompt-lookup and the genai n-gram "
                        f"systems (default {PROMPT_LOOKUP_TOKENS}; GenAI allows 1-16)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_const", const=True, default=None,
                      help="apply the bundle's chat template to the prompts (default: when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_const", const=False,
                      help="feed the raw prompt text, no chat template")
    p.add_argument("--memory", action="store_true", help="peak RSS per system, one subprocess each")
    p.add_argument("--own-profile", action="store_true",
                   help="with several tasks: run on each task only its own profile (and auto), not every "
                        "profile of the bundle (the per-task headline; saves time)")
    p.add_argument("--no-guard", action="store_true",
                   help="runtime without its speculation guard (by default it runs as users get it)")
    p.add_argument("--kv-cache", choices=("float32", "float16"), default="float32",
                   help="the runtime's KV cache element type, every conflayers system alike (default float32; "
                        "float16: see conflayers-run --help)")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    if args.max_new_tokens < 1:
        raise BenchError("--max-new-tokens must be at least 1")
    if args.prompt_lookup_tokens < 1:
        raise BenchError("--prompt-lookup-tokens must be at least 1")
    return args


# ----------------------------------------------------------------------------- helpers

def _version(module: str) -> str | None:
    try:
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    from conflayers.runtime import head, kernels
    from conflayers.runtime.exactness import kernel_path
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu or platform.processor() or None, "kernels": kernel_path(),
            "platform": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "busy_at_start": busy_share(), "copy_bandwidth_gb_s": copy_bandwidth(),
            "conflayers_kernels": kernels.describe(),
            "head": "screened" if head.available() else "plain"}      # runtime/head.py


def copy_bandwidth(mb: int = 256, threads: int | None = None) -> float:
    """Memory bandwidth as a copy of `mb` MB split over the runtime's threads (read + write bytes
    per second, best of 5): the bound a decoder that reads its weights once per token works against."""
    import threading

    import numpy as np
    threads = threads or runtime_threads()
    src = np.ones(mb * 2**18, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    spans = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    best = float("inf")
    for _ in range(5):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in spans]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return round(2 * mb / 1024 / best, 1)


def busy_share(seconds: float = 1.0) -> float | None:
    """The share of the CPUs other work used over `seconds` before the bench starts (/proc/stat:
    1 - idle; a load average would also count what ran just before)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def cpu_steal() -> tuple[int, int] | None:
    """(steal, total) CPU jiffies so far (/proc/stat): a VM's share of time taken by its host."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (fields[7] if len(fields) > 7 else 0), sum(fields)
    except (OSError, ValueError):
        return None


def busy_warnings(meta: dict, steal0) -> list[str]:
    """Why this run's figures may be low: other work on the machine when it started, or CPU time
    the host took during it (llama.cpp's OpenMP threads collapse under contention: 31 tok/s
    against its usual ~100 was measured so)."""
    out = []
    m = meta["machine"]
    busy = m.get("busy_at_start")
    if busy is not None and busy > 0.25:
        out.append(f"the machine was busy when the bench started ({busy:.0%} of its {m['cores']} cores in use by "
                   "other work): they share the cores, so every system runs slower and ratios are noisier")
    steal1 = cpu_steal()
    if steal0 and steal1 and steal1[1] > steal0[1]:
        share = (steal1[0] - steal0[0]) / (steal1[1] - steal0[1])
        meta["machine"]["cpu_steal_share"] = round(share, 3)
        if share > 0.05:
            out.append(f"the host took {share:.0%} of this VM's CPU time during the run (steal): figures are low "
                       "and noisy; rerun on a quieter machine")
    return out


def versions() -> dict:
    return {k: _version(k) for k in ("conflayers", "onnxruntime", "onnxruntime-genai", "transformers", "torch",
                                     "llama-cpp-python")}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs

def resolve_systems(spec: str | None, profiles: list[str]) -> list[str]:
    available = ["plain", *[f"profile:{p}" for p in profiles]] + (["auto"] if profiles else []) + [NGRAM] \
        + list(REFERENCE_SYSTEMS)
    if not spec or spec.strip() == "all":
        return available
    names = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in available and not (name.startswith("unguarded:") and name.split(":", 1)[1] in profiles):
            raise BenchError(f"unknown system {name!r}; available: {', '.join(available)}")
        if name not in names:
            names.append(name)
    if not names:
        raise BenchError(f"--systems is empty; available: {', '.join(available)}")
    if "plain" not in names:
        names.insert(0, "plain")   # the baseline of every speed-up and of identical_to_plain
    return names


def load_sections(args, bundle) -> list[dict]:
    from conflayers.compiler.data import DataError, describe, load_prompts, pick
    if args.prompts:
        tasks = [args.prompts]
        if not os.path.isfile(os.path.expanduser(args.prompts)):
            raise BenchError(f"--prompts {args.prompts}: no such file")
    elif args.task:
        tasks = list(dict.fromkeys(t.strip() for t in args.task))
    else:
        default = bundle.default_profile or (sorted(bundle.profiles)[0] if bundle.profiles else None)
        calib = bundle.profiles[default].raw.get("calibration", {}).get("source") if default else None
        if not isinstance(calib, str) or os.path.exists(calib) or not calib or calib.startswith("file:"):
            raise BenchError("give the prompts: --task NAME (gsm8k, humaneval, spec_bench:<category>) "
                             "or --prompts FILE.jsonl")
        tasks = [calib]
    sections = []
    for task in tasks:
        try:
            prompts = load_prompts(task, PART)
            info = describe(task, PART)
        except DataError as e:
            raise BenchError(str(e)) from None
        if not prompts:
            raise BenchError(f"task {task!r} has no prompts in its {PART} part")
        n = min(args.num_prompts, len(prompts))
        chosen = pick(prompts, n, args.seed)
        named = not os.path.exists(os.path.expanduser(task))
        calib_uids = set()
        for prof in bundle.profiles.values():
            cal = prof.raw.get("calibration", {})
            for key in ("search_uids", "validation_uids", "uids"):
                calib_uids.update(u for u in cal.get(key, []) or [] if isinstance(u, str))
        overlap = sorted(p.uid for p in chosen if p.uid in calib_uids)
        sections.append({"task": task, "named": named, "prompts": chosen, "available": len(prompts),
                         "requested": args.num_prompts, "split": info.get("split"),
                         "source": info.get("source"), "calibration_overlap": overlap,
                         "calibration_uids_known": len(calib_uids)})
    return sections


def encode_prompts(sections, engine, chat: bool, max_new: int) -> None:
    """Every prompt's token ids as the runtime makes them, checked by the engine (context, chat
    template) before any system runs."""
    from conflayers.compiler.data import chat_messages
    from conflayers.runtime import RequestError
    for sec in sections:
        out = []
        for p in sec["prompts"]:
            messages = chat_messages(p) if chat else None
            try:
                ids = engine.prepare(**({"messages": messages} if chat else {"prompt": p.text}),
                                     max_new_tokens=max_new).ids
            except RequestError as e:
                hint = {"max_new_tokens": "; lower --max-new-tokens", "messages": " (or pass --no-chat)"}
                raise BenchError(f"prompt {p.uid}: {e.message_for('--max-new-tokens')}"
                                 f"{hint.get(e.param, '')}") from None
            out.append(BenchPrompt(p.uid, p.text, messages, ids, p.category))
        sec["bench_prompts"] = out


# ----------------------------------------------------------------------------- systems

class Slot:
    """A requested system: the object that generates, or why it cannot run here."""

    def __init__(self, name: str):
        self.name = name
        self.system = None
        self.reason: str | None = None
        self.status = "pending"
        self.rss: dict = {}
        self.disk: dict | None = None     # {"bytes", "path", "what"}: the files this system loads
        self.kind = RUNTIME if name in ("plain", "auto", NGRAM) or name.startswith(("profile:", "unguarded:")) else \
            (GENAI if name in GENAI_SYSTEMS else LLAMACPP if name in LLAMACPP_SYSTEMS else HF)

    @property
    def ok(self) -> bool:
        return self.system is not None and self.status == "ok"


def build_systems(names, args, runtime: RuntimeBackend, warm_prompt: BenchPrompt, meta: dict) -> list[Slot]:
    slots = {n: Slot(n) for n in names}
    engine = runtime.engine
    warm_new = min(args.max_new_tokens, 16)
    rss_before = meta["memory"]["rss_start_mb"]

    def warm(group):
        for s in group:
            if s.system is None:
                continue
            try:
                s.system.generate(warm_prompt, warm_new)
                s.status = "ok"
            except Exception as e:  # noqa: BLE001 - a reference system failing is a result, not a crash
                if s.kind == RUNTIME:
                    raise
                s.system, s.status, s.reason = None, "failed", f"warm-up failed: {type(e).__name__}: {e}"

    def record(group, backend_name, shared_note):
        nonlocal rss_before
        gc.collect()
        now = rss_mb()
        meta["memory"]["backends"][backend_name] = {"rss_after_mb": now, "delta_mb": (now - rss_before)
                                                    if now is not None and rss_before is not None else None}
        for s in group:
            if s.ok:
                s.rss = {"method": "in-process VmRSS after loading and warming up this backend (cumulative "
                                   "in load order runtime -> hf -> genai -> llamacpp)", "rss_mb": now,
                         "delta_mb": meta["memory"]["backends"][backend_name]["delta_mb"],
                         "shared": shared_note}
        rss_before = now

    # runtime: one Engine for plain, every profile and auto
    rt = [slots[n] for n in names if slots[n].kind == RUNTIME]
    for s in rt:
        if s.name == "plain":
            s.system = RuntimeSystem("plain", runtime, None, speculate=False)
        elif s.name == "auto":
            s.system = RuntimeSystem("auto", runtime, "auto", speculate=True)
        elif s.name == NGRAM:
            s.system = RuntimeSystem(NGRAM, NGramBackend(runtime), NGRAM, speculate=True)
        else:
            s.system = RuntimeSystem(s.name, runtime, s.name.split(":", 1)[1], speculate=True,
                                     guard=not s.name.startswith("unguarded:"))
    warm(rt)
    record(rt, "runtime", "one Engine (full graph + every draft) serves plain, the profiles and auto")
    rt_disk = {"bytes": path_bytes(engine.bundle.path), "path": engine.bundle.path, "what": "bundle directory"}
    for s in rt:
        s.disk = rt_disk

    hf_dir, hf_reason = None, None
    if any(slots[n].kind in (HF, GENAI) for n in names):
        try:
            hf_dir = resolve_hf_dir(engine.bundle.manifest["model"], args.hf_model)
        except Unavailable as e:
            hf_reason = str(e)
        meta["hf_model_dir"] = hf_dir

    hf = [slots[n] for n in names if slots[n].kind == HF]
    if hf:
        backend = None
        if hf_reason:
            reason = hf_reason
        else:
            try:
                backend = HFBackend(hf_dir, engine.bundle.manifest["model"])
                reason = None
                meta["hf_matches_bundle_weights"] = backend.matches_bundle
            except Unavailable as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001
                reason = f"loading the model failed: {type(e).__name__}: {e}"
        for s in hf:
            if backend is None:
                s.status, s.reason = "skipped", reason
            else:
                s.system = HFSystem(s.name, backend, engine.stop_ids, prompt_lookup=s.name == "hf-prompt-lookup",
                                    lookup_tokens=args.prompt_lookup_tokens)
                s.disk = {"bytes": path_bytes(hf_dir), "path": hf_dir, "what": "Hugging Face model directory"}
        warm(hf)
        record(hf, "hf", "one transformers model serves hf and hf-prompt-lookup")

    # genai: one model per builder precision, shared by its plain and n-gram systems
    threads = runtime_threads()
    for precision in dict.fromkeys(GENAI_SYSTEMS[n][0] for n in names if n in GENAI_SYSTEMS):
        group = [slots[n] for n in names if n in GENAI_SYSTEMS and GENAI_SYSTEMS[n][0] == precision]
        reason, backend, rewindable = hf_reason, None, None
        if reason is None:
            try:
                import onnxruntime_genai  # noqa: F401
                model_dir = genai_model_dir(hf_dir, engine.bundle.manifest["model"].get("name") or "model", _log,
                                            precision=precision)
                backend = GenAIBackend(model_dir, threads)
                meta.setdefault("genai_model_dirs", {})[precision] = model_dir
                if precision == "fp32":
                    meta["genai_model_dir"] = model_dir
            except ImportError as e:
                reason = f"onnxruntime-genai is not installed ({e}); pip install conflayers[bench]"
            except Unavailable as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {e}"
        for s in group:
            if backend is None:
                s.status, s.reason = "skipped", reason
                continue
            ngram = args.prompt_lookup_tokens if GENAI_SYSTEMS[s.name][1] else None
            if ngram is not None and not 1 <= ngram <= 16:
                s.status, s.reason = "skipped", (f"not available: GenAI's max_draft_tokens must be 1-16, "
                                                 f"--prompt-lookup-tokens is {ngram}")
                continue
            if ngram is not None and backend.min_length and backend.min_length < engine.capacity:
                # a sliding window (Gemma 3): its n-gram mode needs a cache that evicts nothing
                if rewindable is None:
                    rewindable = GenAIBackend(model_dir, threads, cache_slack=engine.capacity)
                s.system = GenAISystem(s.name, rewindable, engine.stop_ids, ngram=ngram)
            else:
                s.system = GenAISystem(s.name, backend, engine.stop_ids, ngram=ngram)
            s.disk = {"bytes": path_bytes(backend.model_dir), "path": backend.model_dir,
                      "what": f"GenAI model directory ({precision})"}
        warm(group)
        for s in group:
            if GENAI_SYSTEMS[s.name][1] and s.status == "failed":
                s.reason = (f"not available: onnxruntime-genai {_version('onnxruntime-genai')}'s n-gram speculative "
                            f"decoding failed on this model on CPU ({s.reason})")
        record(group, f"genai-{precision}", f"one GenAI {precision} model serves "
               + ", ".join(s.name for s in group)
               + ("; the n-gram one a second copy whose sliding-window cache keeps the whole context"
                  if rewindable is not None else ""))

    # llama.cpp: one Llama per system (prompt lookup needs every position's logits), same GGUF file
    lc = [slots[n] for n in names if slots[n].kind == LLAMACPP]
    if lc:
        reason, gguf = None, None
        try:
            import_llama_cpp()
            gguf = locate_gguf(engine.bundle.manifest["model"], args.gguf)
            meta["gguf"] = {"path": gguf, "bytes": path_bytes(gguf)}
            meta["llama_cpp_system_info"] = import_llama_cpp().llama_print_system_info().decode().strip()
        except Unavailable as e:
            reason = str(e)
        for s in lc:
            if reason:
                s.status, s.reason = "skipped", reason
                continue
            try:
                lookup = args.prompt_lookup_tokens if s.name == "llamacpp-prompt-lookup" else None
                backend = LlamaCppBackend(gguf, engine.capacity, threads, lookup)
                s.system = LlamaCppSystem(s.name, backend, engine.stop_ids)
                s.disk = {"bytes": path_bytes(gguf), "path": gguf, "what": "GGUF file"}
            except Exception as e:  # noqa: BLE001
                s.status, s.reason = "skipped", f"loading {gguf} failed: {type(e).__name__}: {e}"
        warm(lc)
        record(lc, "llamacpp", "one llama.cpp model per system (mmap of the same GGUF file)")
    return [slots[n] for n in names]


# ----------------------------------------------------------------------------- measuring

def run_sections(sections, slots, max_new: int, own_profile: bool = False) -> None:
    for sec in sections:
        own = f"profile:{task_name(sec['task'])}"
        active = [s for s in slots if s.ok and not (own_profile and s.name.startswith("profile:") and s.name != own)]
        runs = {s.name: [] for s in active}
        prompts = sec["bench_prompts"]
        for i, prompt in enumerate(prompts):
            k = i % len(active)
            order = active[k:] + active[:k]
            for s in order:
                if not s.ok:
                    continue
                gc.collect()
                try:
                    r = s.system.generate(prompt, max_new)
                except Exception as e:  # noqa: BLE001 - a failing reference system is reported, not fatal
                    if s.kind == RUNTIME:
                        raise
                    s.status, s.reason = "failed", f"{type(e).__name__}: {e} (on prompt {prompt.uid})"
                    sec.setdefault("failures", {})[s.name] = s.reason
                    _log(f"{s.name} failed: {s.reason}")
                    continue
                runs[s.name].append(r)
                _log(f"[{sec['task']} {i + 1}/{len(prompts)}] {s.name:<22} {r.tokens_per_s:7.2f} tok/s  "
                     f"{len(r.token_ids)} tokens")
        sec["runs"] = runs


def summarize(sec, slots, engine) -> list[dict]:
    runs = sec["runs"]
    plain = runs["plain"]
    plain_tps = _mean(r.tokens_per_s for r in plain)
    headline = {"auto", f"profile:{task_name(sec['task'])}"}
    out = []
    for s in slots:
        obj = {"name": s.name, "task": sec["task"], "status": s.status if s.status != "pending" else "skipped",
               "reason": s.reason, "kind": s.kind, "headline": s.name in headline,
               "n_prompts": 0, "speculative": bool(s.system.speculative) if s.system is not None else None,
               "tokens_per_s": None, "tokens_per_s_per_prompt": [], "speedup_vs_plain": None,
               "speedup_per_prompt": [], "ttft_s": None, "ttft_s_per_prompt": [],
               "mean_accepted_tokens": None, "acceptance_rate": None, "draft_steps": None,
               "drafted_tokens": None, "accepted_tokens": None, "accept_length_histogram": {},
               "completion_tokens_per_prompt": [], "identical_to_plain": None, "mismatches": [],
               "profiles_used": {}, "guard_stopped_prompts": None, "weight_bytes_full": None,
               "weight_bytes_draft": None, "bytes_per_token": None, "bandwidth_gb_s": None, "rss": s.rss or None,
               "disk": s.disk or None}
        failed_here = sec.get("failures", {}).get(s.name)
        # a system that failed on a later task still reports the tasks it ran whole
        ran = s.system is not None and bool(runs.get(s.name)) and failed_here is None
        if failed_here:
            obj.update(status="failed", reason=failed_here)
        elif ran:
            obj.update(status="ok", reason=None)
        if s.ok and s.name not in runs:
            obj.update(status="skipped", reason="not run on this task (--own-profile)")
        if ran:
            rs = runs[s.name]
            tps = [r.tokens_per_s for r in rs]
            mean_tps = _mean(tps)
            obj.update(n_prompts=len(rs), tokens_per_s=mean_tps, tokens_per_s_per_prompt=tps,
                       speedup_vs_plain=(mean_tps / plain_tps) if plain_tps else None,
                       speedup_per_prompt=[(a / b) if b else None for a, b in zip(tps, (r.tokens_per_s for r in plain))],
                       ttft_s=_mean(r.ttft_s for r in rs), ttft_s_per_prompt=[r.ttft_s for r in rs],
                       completion_tokens_per_prompt=[len(r.token_ids) for r in rs])
            if s.name == "plain":
                obj["speedup_vs_plain"] = 1.0
                obj["speedup_per_prompt"] = [1.0] * len(rs)
            if obj["speculative"]:
                steps = sum(r.draft_steps for r in rs)
                drafted = sum(r.drafted for r in rs)
                accepted = sum(r.accepted for r in rs)
                obj.update(draft_steps=steps, drafted_tokens=drafted, accepted_tokens=accepted,
                           mean_accepted_tokens=accepted / steps if steps else 0.0,
                           acceptance_rate=accepted / drafted if drafted else 0.0,
                           accept_length_histogram={str(k): v for k, v in sorted(
                               Counter(a for r in rs for a in r.accept_lengths).items())})
            if s.kind == RUNTIME:
                obj["profiles_used"] = dict(Counter(r.profile or "(none)" for r in rs))
                obj["guard_stopped_prompts"] = sum(r.guard_stopped for r in rs)
            mism = []
            for p, r, ref in zip(sec["bench_prompts"], rs, plain):
                if r.token_ids != ref.token_ids:
                    first = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref.token_ids)) if a != b),
                                 min(len(r.token_ids), len(ref.token_ids)))
                    mism.append({"uid": p.uid, "first_difference_at": first, "tokens": len(r.token_ids),
                                 "plain_tokens": len(ref.token_ids)})
            obj["identical_to_plain"] = not mism
            obj["mismatches"] = mism
            total_bytes = total_tokens = 0
            fb = db = 0
            for r in rs:
                fb, db = s.system.weight_bytes(r)
                total_bytes += r.full_passes * fb + r.draft_forwards * db
                total_tokens += r.generated
            if s.kind == RUNTIME:
                acc = s.system.backend.accounting
                names = [k for k in obj["profiles_used"] if k in acc["draft_bytes"]]
                db = acc["draft_bytes"][names[0]] if len(names) == 1 else (
                    {k: acc["draft_bytes"][k] for k in names} if names else 0)
            bpt = total_bytes / total_tokens if total_tokens else None
            obj.update(weight_bytes_full=fb, weight_bytes_draft=db if obj["speculative"] else 0,
                       bytes_per_token=bpt, bandwidth_gb_s=(bpt * mean_tps / 1e9) if bpt and mean_tps else None)
        out.append(obj)
    return out


def measure_memory(args, slots, runtime, prompt: BenchPrompt, meta: dict) -> None:
    """--memory: one subprocess per system (VmHWM), plus the runtime's full+drafts / full ratio."""
    engine = runtime.engine
    base = {"bundle": engine.bundle.path, "max_new_tokens": args.max_new_tokens, "guard": not args.no_guard,
            "kv_cache": args.kv_cache,
            "stop_ids": sorted(engine.stop_ids),
            "prompt": {"uid": prompt.uid, "text": prompt.text, "messages": prompt.messages, "ids": prompt.ids}}
    profiles = sorted(engine.bundle.profiles)
    specs = {"baseline": {"kind": "baseline"},
             "full": {"kind": RUNTIME, "profiles": [], "runs": [[None, False]]},
             "all": {"kind": RUNTIME, "profiles": "all",
                     "runs": [[p, True] for p in profiles] + ([["auto", True]] if profiles else [[None, False]])}}
    wanted = {"plain": "full", "auto": "all"}
    for s in slots:
        if not s.ok:
            continue
        if s.name.startswith(("profile:", "unguarded:")):
            p = s.name.split(":", 1)[1]
            specs[s.name] = {"kind": RUNTIME, "profiles": [p], "runs": [[p, True]]}
            wanted[s.name] = s.name
        elif s.kind == HF:
            specs[s.name] = {"kind": HF, "hf_dir": s.system.backend.hf_dir, "prompt_lookup": s.name == "hf-prompt-lookup",
                             "lookup_tokens": args.prompt_lookup_tokens}
            wanted[s.name] = s.name
        elif s.kind == GENAI:
            specs[s.name] = {"kind": GENAI, "genai_dir": s.system.backend.model_dir, "ngram": s.system.ngram,
                             "threads": s.system.backend.threads}
            wanted[s.name] = s.name
        elif s.kind == LLAMACPP:
            b = s.system.backend
            specs[s.name] = {"kind": LLAMACPP, "gguf": b.gguf, "n_ctx": b.n_ctx, "threads": b.threads,
                             "lookup_tokens": args.prompt_lookup_tokens if b.probe is not None else None}
            wanted[s.name] = s.name
    reports = {}
    for key, spec in specs.items():
        _log(f"[memory] {key} ...")
        reports[key] = spawn_child({**base, **spec})
    method = ("subprocess VmHWM: a fresh process loads only this system and generates one prompt "
              f"({prompt.uid}, {args.max_new_tokens} new tokens max)")
    for s in slots:
        key = wanted.get(s.name)
        if s.ok and key:
            rep = reports[key]
            s.rss = {"method": method, "peak_rss_mb": rep.get("vmhwm_mb"), "error": rep.get("error"),
                     "loaded": {"full": "the full graph alone", "all": "full graph + every draft"}.get(key, s.name)}
    full, allp, bare = (reports[k].get("vmhwm_mb") for k in ("full", "all", "baseline"))
    ratio = allp / full if full and allp else None
    above = (allp - bare) / (full - bare) if full and allp and bare is not None and full > bare else None
    meta["runtime_memory"] = {
        "method": "subprocess VmHWM: Engine over the bundle (full + every draft, one generation per "
                  "profile and auto) vs Engine over the same bundle with no profiles (full graph alone, "
                  "one plain generation); baseline = python with the runtime imported, nothing loaded",
        "full_only_mb": full, "full_plus_drafts_mb": allp, "baseline_mb": bare, "ratio": ratio,
        "ratio_above_baseline": above, "target": MEMORY_TARGET,
        "within_target": (ratio <= MEMORY_TARGET) if ratio else None,
        "errors": {k: v["error"] for k, v in reports.items() if "error" in v}}


# ----------------------------------------------------------------------------- output

def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _pct(gb_s, limit) -> str:
    return "-" if not gb_s or not limit else f"{100 * gb_s / limit:.0f}%"


def _disk_cell(disk: dict | None) -> str:
    return _f(disk.get("bytes") and disk["bytes"] / 1e6, "{:.0f}") if disk else "-"


def _rss_cell(rss: dict | None) -> str:
    if not rss:
        return "-"
    if "peak_rss_mb" in rss:
        return _f(rss.get("peak_rss_mb"), "{:.0f}")
    cell = _f(rss.get("rss_mb"), "{:.0f}")
    if rss.get("delta_mb") is not None:
        cell += f" (+{rss['delta_mb']:.0f})"
    return cell


def render(doc: dict) -> str:
    meta = doc["meta"]
    m, v = meta["machine"], meta["versions"]
    lines = [f"conflayers-bench  {meta['date']}",
             f"machine: {m['cores']} CPU cores ({m.get('cpu') or 'unknown CPU'}), {m['platform']}, python {m['python']}; "
             + ", ".join(f"{k} {v[k]}" if v.get(k) else f"{k} not installed"
                         for k in ("onnxruntime", "onnxruntime-genai", "transformers", "torch", "llama-cpp-python")),
             f"command: {meta['command']}",
             f"bundle: {meta['bundle']['path']} (model {meta['bundle']['model']}, source {meta['bundle']['source']}; "
             f"profiles: {', '.join(meta['bundle']['profiles']) or '(none)'})",
             f"settings: {meta['settings']['max_new_tokens']} new tokens max, greedy, "
             f"chat template {'on' if meta['settings']['chat'] else 'off'}, speculation guard "
             f"{'on' if meta['settings']['guard'] else 'off'}, seed {meta['settings']['seed']}"
             + (f", {meta['settings']['threads']} threads" if meta["settings"].get("threads") else "")
             + (f", prompt lookup {meta['settings']['prompt_lookup_num_tokens']} tokens/proposal")]
    lines.append(f"kernels: {m.get('kernels')} (ONNX Runtime's CPU path), conflayers ops: "
                 f"{m.get('conflayers_kernels', 'n/a')}, head {m.get('head', 'plain')}; memory bandwidth (copy, "
                 f"{meta['settings'].get('threads')} threads): {_f(m.get('copy_bandwidth_gb_s'), '{:.1f}')} GB/s; "
                 + (f"CPU busy at start {m['busy_at_start']:.0%}" if m.get("busy_at_start") is not None else "")
                 + (f", CPU steal during the run {m['cpu_steal_share']:.1%}" if m.get("cpu_steal_share") is not None else ""))
    if meta.get("gguf"):
        g = meta["gguf"]
        lines.append(f"gguf: {g['path']} ({_f(g.get('bytes') and g['bytes'] / 1e6, '{:.1f}')} MB)")
    if meta.get("llama_cpp_system_info"):
        lines.append(f"llama.cpp build: {meta['llama_cpp_system_info']}")
    for w in meta.get("warnings", []):
        lines.append(f"WARNING: {w}")
    wa = meta.get("weight_accounting") or {}
    if wa:
        parts = [f"full {wa['full_bytes'] / 1e6:.1f} MB ({wa['full_method']})"] if wa.get("full_bytes") else []
        parts += [f"draft {k} {b / 1e6:.1f} MB" for k, b in wa.get("draft_bytes", {}).items()]
        lines.append("weights read per pass: " + "; ".join(parts))
    for sec in meta["sections"]:
        lines.append("")
        lines.append(f"== task {sec['task']}: {sec['n_prompts']} prompt{'s' if sec['n_prompts'] != 1 else ''} of "
                     f"the {sec['part']} part "
                     f"({sec['available']} available; picked with seed {meta['settings']['seed']})")
        ov = sec["calibration_overlap"]
        if sec["named"]:
            lines.append(f"calibration never overlapped these prompts: {sec['split']}; checked against the "
                         f"bundle's recorded calibration prompt ids: {len(ov)} of {sec['n_prompts']} overlap")
        else:
            lines.append(f"user prompt file ({sec['split']}): {len(ov)} of {sec['n_prompts']} prompts appear "
                         "among the bundle's recorded calibration prompt ids")
        header = (f"  {'system':<22} {'tok/s':>7} {'speed-up':>8} {'TTFT ms':>8} {'acc/step':>8} {'acc rate':>8} "
                  f"{'identical':>9} {'RSS MB':>12} {'disk MB':>8} {'GB/s':>6} {'% bw':>5}")
        lines.append(header)
        lines.append("  " + "-" * (len(header) - 2))
        rows = [s for s in doc["systems"] if s["task"] == sec["task"]
                and not (s["reason"] or "").startswith("not run on this task")]
        for s in rows:
            mark = "*" if s["headline"] else " "
            if s["status"] != "ok":
                lines.append(f"{mark} {s['name']:<22} {s['status']}: {s['reason']}")
                continue
            ident = {True: "yes", False: "NO", None: "-"}[s["identical_to_plain"]]
            lines.append(f"{mark} {s['name']:<22} {_f(s['tokens_per_s']):>7} {_f(s['speedup_vs_plain'], '{:.2f}x'):>8} "
                         f"{_f(s['ttft_s'] and s['ttft_s'] * 1000, '{:.0f}'):>8} "
                         f"{_f(s['mean_accepted_tokens']):>8} {_f(s['acceptance_rate']):>8} {ident:>9} "
                         f"{_rss_cell(s['rss']):>12} {_disk_cell(s.get('disk')):>8} "
                         f"{_f(s['bandwidth_gb_s'], '{:.1f}'):>6} {_pct(s['bandwidth_gb_s'], m.get('copy_bandwidth_gb_s')):>5}")
        lines.append("  per-prompt tok/s:")
        for s in rows:
            if s["status"] == "ok":
                extra = ""
                if s["kind"] == RUNTIME and s["name"] != "plain":
                    extra = f"   profiles used: {s['profiles_used']}"
                    if s["guard_stopped_prompts"]:
                        extra += f", guard turned drafting off on {s['guard_stopped_prompts']} prompt(s)"
                lines.append(f"    {s['name']:<22} " + " ".join(f"{t:6.2f}" for t in s["tokens_per_s_per_prompt"]) + extra)
        for s in rows:
            for mm in s["mismatches"]:
                lines.append(f"  {s['name']}: output differs from plain on {mm['uid']} at token {mm['first_difference_at']}")
    lines.append("")
    lines.append("* headline systems of a task: auto and the profile compiled for it. tok/s: decode rate after "
                 "the first token, mean over prompts; speed-up: vs plain in this run; acc/step: mean accepted "
                 "draft tokens per speculative step; GB/s: weight bytes read per token x tok/s; % bw: that "
                 "against the machine's copy bandwidth (the gap to the memory-bandwidth limit); disk MB: the "
                 "files the system loads (bundle directory, HF / GenAI model directory, GGUF file).")
    mem = meta["memory"]
    if mem.get("mode") == "subprocess":
        rm = meta.get("runtime_memory") or {}
        lines.append("RSS MB: peak RSS (VmHWM) of a subprocess that loads only that system and generates one prompt.")
        if rm.get("ratio"):
            lines.append(f"runtime memory: full + every draft {rm['full_plus_drafts_mb']:.0f} MB vs full graph alone "
                         f"{rm['full_only_mb']:.0f} MB = {rm['ratio']:.2f}x (target <= {MEMORY_TARGET}x: "
                         f"{'met' if rm['within_target'] else 'NOT met'}); above a bare interpreter "
                         f"({rm['baseline_mb']:.0f} MB): {_f(rm.get('ratio_above_baseline'))}x")
        for k, e in (rm.get("errors") or {}).items():
            lines.append(f"memory child {k} failed: {e}")
    else:
        lines.append("RSS MB: process VmRSS after loading each backend and warming up its systems (load order "
                     "runtime -> hf -> genai -> llamacpp), (+increase); systems of one backend share it. Peak: "
                     f"{_f(mem.get('peak_rss_mb'), '{:.0f}')} MB. Per-system peaks and the runtime's "
                     "full+drafts/full ratio: --memory.")
    if meta.get("hf_matches_bundle_weights") is False:
        lines.append("WARNING: the HF model's weights do not match the bundle's weights fingerprint "
                     "(hf/genai outputs are not expected to be identical); pass --hf-model")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def run(args, argv) -> int:
    from conflayers.runtime import Bundle, BundleError
    try:
        bundle = Bundle.open(args.bundle, verify=False)
    except BundleError as e:
        raise BenchError(str(e)) from None
    names = resolve_systems(args.systems, sorted(bundle.profiles))
    # OpenMP threads that spin-wait at barriers make torch 5-10x slower on a shared, busy machine
    # (measured here: SmolLM2 HF generate 1.4 tok/s with 2 spinning threads, 13 tok/s passive), and
    # in one process they would steal the cores from ONNX Runtime after each HF run: passive when a
    # torch system runs. Not otherwise: llama.cpp's OpenMP build decodes SmolLM2 Q4_1 at ~30 tok/s
    # passive against ~100 spinning (measured here, quiet machine). Set before torch or llama.cpp
    # is imported (libgomp reads it once); the user's own setting wins.
    if any(n.startswith("hf") for n in names):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.systems and any(n in LLAMACPP_SYSTEMS for n in names):
        try:                    # asked for by name: fail now, not as a row of the table
            import_llama_cpp()
        except Unavailable as e:
            raise BenchError(str(e)) from None
    sections = load_sections(args, bundle)

    meta = {"tool": "conflayers-bench", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(shlex.quote(a) for a in ["conflayers-bench", *argv]),
            "machine": machine_info(), "versions": versions(),
            "bundle": {"path": bundle.path, "model": bundle.manifest["model"].get("name"),
                       "source": bundle.manifest["model"].get("source"), "profiles": sorted(bundle.profiles),
                       "default_profile": bundle.default_profile},
            "settings": {"max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts, "seed": args.seed,
                         "chat": args.chat, "guard": not args.no_guard, "kv_cache": args.kv_cache, "systems": names,
                         "memory": args.memory, "greedy": True, "torch_threads": os.cpu_count(),
                         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                         "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
                         "genai_ngram_size": GENAI_NGRAM_SIZE, "threads": runtime_threads()},
            "memory": {"mode": "subprocess" if args.memory else "in-process", "rss_start_mb": rss_mb(), "backends": {}}}
    _log(f"loading {bundle.path} ...")
    try:
        runtime = RuntimeBackend(args.bundle, guard=not args.no_guard, verify=True, kv_cache=args.kv_cache)
    except (BundleError, KVCacheError) as e:
        raise BenchError(str(e)) from None
    meta["weight_accounting"] = runtime.accounting
    if args.chat is None:       # like the compiler: the chat template when the model has one
        args.chat = meta["settings"]["chat"] = bool(runtime.engine.codec.chat_template)
    encode_prompts(sections, runtime.engine, args.chat, args.max_new_tokens)
    warm_prompt = sections[0]["bench_prompts"][0]
    slots = build_systems(names, args, runtime, warm_prompt, meta)
    steal0 = cpu_steal()
    run_sections(sections, slots, args.max_new_tokens, args.own_profile)
    meta["warnings"] = busy_warnings(meta, steal0)
    for w in meta["warnings"]:
        _log(f"WARNING: {w}")
    hwm = proc_status_kb().get("VmHWM")
    meta["memory"]["peak_rss_mb"] = hwm / 1024.0 if hwm else None
    if args.memory:
        measure_memory(args, slots, runtime, warm_prompt, meta)
    systems = []
    for sec in sections:
        systems += summarize(sec, slots, runtime.engine)
    meta["sections"] = [{"task": s["task"], "part": PART, "named": s["named"], "n_prompts": len(s["prompts"]),
                         "requested": s["requested"], "available": s["available"], "split": s["split"],
                         "source": s["source"], "uids": [p.uid for p in s["prompts"]],
                         "prompt_tokens": [len(p.ids) for p in s["bench_prompts"]],
                         "calibration_overlap": s["calibration_overlap"],
                         "headline": ["auto", f"profile:{task_name(s['task'])}"]} for s in sections]
    doc = {"meta": meta, "systems": systems}
    print(render(doc))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        _log(f"wrote {args.json}")
    if args.plot:
        from .bench_plot import plot_docs
        plot_docs([doc], args.plot)
        _log(f"wrote {args.plot}")
    lossy = [f"{s['name']} ({s['task']})" for s in systems if s["kind"] == RUNTIME and s["identical_to_plain"] is False]
    if lossy:
        print(f"LOSSLESS CHECK FAILED: the runtime's output differed from plain decoding for {', '.join(lossy)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        from .bench_plot import main as plot_main
        return plot_main(argv[1:])
    try:
        return run(parse_args(argv), argv)
    except BenchError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
