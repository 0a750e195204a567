"""The systems conflayers-bench compares, and how each one is loaded, run and measured.

Every system generates greedily from the *same prompt token ids* (the runtime's tokenizer and chat
template), so outputs can be compared token by token with the runtime's plain decoding.

- runtime systems (`plain`, `profile:<name>`, `auto`) share one `Engine` over the bundle; `ngram`
  (the runtime drafting by n-gram lookup, default settings) has its own over the full graph;
- `hf` / `hf-prompt-lookup` share one transformers model (torch + transformers needed);
- `genai`, `genai-int4` (+ `-ngram`: its n-gram speculative mode) are ONNX Runtime GenAI over
  models its own builder made from the same HF weights, at fp32 and int4;
- `llamacpp` / `llamacpp-prompt-lookup`: llama-cpp-python on the GGUF file the model came from
  (optional: tools/install_llama_cpp.sh).

Timing matches the runtime's metrics for every system: time to first token = request start to
the first new token; tokens/s = the decode rate after the first token (tokens after the first
chunk / time from the first chunk to the last).

This module imports neither torch nor transformers at import time (the runtime systems and the
`--memory` children of the runtime must run without them). It is also the `--memory` child:
`python -m conflayers.tools.bench_systems child SPEC_JSON` loads one system, generates one prompt
and prints its VmHWM as JSON on the last line.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

RUNTIME = "runtime"
HF = "hf"
GENAI = "genai"
LLAMACPP = "llamacpp"
PROMPT_LOOKUP_TOKENS = 10
# GenAI's n-gram mode matches the last ngram_size - 1 tokens: 3 = the last 2, like transformers'
# and llama-cpp-python's prompt lookup (max n-gram 2); fixed width (no adaptive K, no chaining).
GENAI_NGRAM_SIZE = 3
LLAMA_CPP_INSTALL_HINT = "llama-cpp-python is not installed: run bash tools/install_llama_cpp.sh"


def runtime_threads() -> int:
    """The thread count the runtime's ONNX Runtime uses: $CONFLAYERS_THREADS, else every core."""
    try:
        n = int(os.environ.get("CONFLAYERS_THREADS", "0") or 0)
    except ValueError:
        n = 0
    return n if n > 0 else (os.cpu_count() or 1)


def path_bytes(path: str | None) -> int | None:
    """Size on disk of a file, or of every file under a directory (symlinks not followed)."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                total += os.path.getsize(fp)
    return total


class Unavailable(Exception):
    """A system that cannot run here; the message is the reason shown in the report."""


# ----------------------------------------------------------------------------- memory

def proc_status_kb() -> dict[str, int]:
    """VmRSS / VmHWM of this process in kB (Linux /proc); ru_maxrss as VmHWM elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except OSError:
        import resource         # Unix only, and needed only where /proc is missing
        out["VmHWM"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return out


def rss_mb() -> float | None:
    kb = proc_status_kb().get("VmRSS")
    return kb / 1024.0 if kb is not None else None


# ----------------------------------------------------------------------------- prompts and runs

@dataclass
class BenchPrompt:
    uid: str
    text: str
    messages: list | None      # None with --no-chat
    ids: list[int]              # the prompt token ids every system is fed
    category: str | None = None

    def runtime_kwargs(self) -> dict:
        return {"messages": self.messages} if self.messages is not None else {"prompt": self.text}


@dataclass
class Run:
    """One generation of one system on one prompt."""
    token_ids: list[int]            # generated ids, cut before the first stop token
    generated: int                  # tokens the system produced (a stop token included)
    ttft_s: float
    tokens_per_s: float             # decode rate after the first token
    total_s: float
    full_passes: int                # full-model forward passes, the prefill included
    draft_forwards: int = 0         # draft (body + head) passes: one per drafted token
    draft_steps: int = 0            # speculative iterations (draft k, verify once)
    drafted: int = 0
    accepted: int = 0
    accept_lengths: list = field(default_factory=list)
    profile: str | None = None      # the runtime profile used (auto: the chosen one)
    guard_stopped: bool = False


def cut_at_stop(ids, stop_ids) -> list[int]:
    out = []
    for t in ids:
        t = int(t)
        if t in stop_ids:
            break
        out.append(t)
    return out


# ----------------------------------------------------------------------------- weight accounting

def _gather_only(model) -> set[str]:
    """Names of the initializers a graph (subgraphs included) uses only as the table of a Gather."""
    import onnx
    consumers: dict[str, list] = {}

    def walk(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node.op_type, i))
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)
    walk(model.graph)
    return {name for name, uses in consumers.items() if all(op == "Gather" and i == 0 for op, i in uses)}


def _graph_ranges(path: str) -> dict[tuple, bool] | None:
    """External weight byte ranges a graph references -> True when the tensor is only used as
    the table of a Gather (an embedding lookup reads one row per token, not the table).
    None when the `onnx` package is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(path, load_external_data=False)
    tables = _gather_only(model)
    base = os.path.dirname(os.path.abspath(path))
    ranges: dict[tuple, bool] = {}
    for t in model.graph.initializer:
        gather_only = t.name in tables
        if t.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            key = (os.path.join(base, d["location"]), int(d.get("offset", 0)), int(d.get("length", 0)))
        else:
            key = ("inline:" + path, t.name, len(t.raw_data))
        ranges[key] = ranges.get(key, True) and gather_only
    return ranges


def kernel_read_bytes(path: str) -> int | None:
    """Bytes of weights one pass of the graph at `path` reads as the kernel library holds them here
    (kernels/qmatmul.h): QMatMul codes at their stored width (narrow 8-bit codes in 5 or 6 bits on
    the AVX-512 engine, the screened head's top 6 bits: head.py; its low bits, read for the few
    groups left exact, are not counted), scales and offsets in fp16 where every value is exact,
    every other weight as stored, gather-only tables left out. None without the `onnx` package or
    where the library's QMatMul does not run."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    from conflayers.runtime import head, kernels
    lib = kernels.library()
    said = kernels.cpu_path(lib).split() if lib else []
    if not any(w.startswith("qmatmul:") and w != "qmatmul:off" for w in said):
        return None
    planes = "qmatmul:avx512" in said and os.environ.get("CONFLAYERS_QMATMUL_PLANES", "").strip().lower() not in ("off", "0")
    screened = planes and head.available()
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    read, done = 0, set()

    def values(name):              # fp32 values held in fp16 where each is exact (ColumnValues)
        v = numpy_helper.to_array(inits[name])
        return v.size * (2 if v.dtype == np.float16 or np.array_equal(v.astype(np.float16).astype(v.dtype), v) else 4)
    for n in model.graph.node:
        if n.domain != kernels.DOMAIN or not n.op_type.startswith("QMatMul"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        w0 = 3 if n.op_type.startswith("QMatMulNorm") else 1
        codes = numpy_helper.to_array(inits[n.input[w0]])
        width = attrs["bits"]
        if planes and width == 8 and attrs["block_size"] == 32:
            span = int(codes.max()) - int(codes.min())
            width = 6 if screened and n.name == head.HEAD_NODE else 5 if span < 32 else 6 if span < 64 else 8
        read += codes.size * width // attrs["bits"]
        for name in n.input[w0 + 1:]:
            if name in inits and name not in done:
                read += values(name)
        done.update(n.input[w0:])
    tables = _gather_only(model)
    for t in model.graph.initializer:
        if t.name not in done and t.name not in tables:
            read += numpy_helper.to_array(t).nbytes
    return read


def _read_bytes(*paths: str) -> int | None:
    merged: dict[tuple, bool] = {}
    for p in paths:
        r = _graph_ranges(p)
        if r is None:
            return None
        for k, g in r.items():
            merged[k] = merged.get(k, True) and g
    return sum(k[2] for k, gather_only in merged.items() if not gather_only)


def weight_accounting(bundle) -> dict:
    """Bytes of weights one pass reads: the full graph and each profile's draft (body + head).

    full: the manifest's size of weights.bin (every parameter, as gpt-fast's model_size).
    draft: the external-data byte ranges its body and head graphs reference, each range once,
    leaving out tables used only by Gather (the embedding lookup); needs the `onnx` package.
    Without it: the draft's weights file (weights.bin for fp32, weights_<precision>.bin
    otherwise) scaled by the fraction of layers the draft keeps (a rough estimate)."""
    from conflayers.runtime.draftplan import weights_file_name
    files = bundle.manifest["files"]
    # the target's own weights file (a native target's weights.bin holds only small tables)
    target_file = weights_file_name(bundle.manifest["model"].get("target", "fp32"))
    full = kernel_read_bytes(bundle.full_graph) if bundle.manifest["model"].get("target") == "native" else None
    method_full = "as the kernels hold them: QMatMul codes at their held width, fp16-exact scales"
    if full is None:
        full = files.get(target_file, {}).get("bytes")
        method_full = f"manifest size of {target_file}"
    if full is None:
        full = _read_bytes(bundle.full_graph)
        method_full = "external data referenced by the full graph"
    drafts, methods = {}, {}
    for name, profile in bundle.profiles.items():
        graphs = bundle.draft_graphs(name)
        if graphs is None:            # an n-gram profile: no draft weights
            drafts[name], methods[name] = 0, "n-gram lookup: no draft graphs"
            continue
        exact = _read_bytes(graphs.body, graphs.head)
        if exact is not None:
            drafts[name] = exact
            methods[name] = "external data read by the draft body + head graphs (each byte range once, " \
                            "gather-only embedding tables excluded)"
            if profile.kind == "cascade":
                methods[name] += "; a cascade: its top stage only, as if it drafted every token alone " \
                                 "(the lower stages' passes are not counted)"
        else:
            precision = profile.plan.precision
            rel = weights_file_name(precision)
            size = files.get(rel, files.get("weights.bin", {})).get("bytes", full or 0)
            drafts[name] = int(size * (1.0 - profile.plan.skipped_fraction))
            methods[name] = f"estimate: {rel} x kept-layer fraction (install onnx for the exact count)"
    return {"full_bytes": full, "full_method": method_full, "draft_bytes": drafts, "draft_method": methods}


# ----------------------------------------------------------------------------- runtime

class RuntimeBackend:
    kind = RUNTIME

    def __init__(self, bundle_path: str, guard: bool = True, verify: bool = True, kv_cache: str = "float32"):
        from conflayers.runtime import Engine
        # every system prefills every prompt whole (the anchors keep no prompt cache across calls)
        self.engine = Engine.load(bundle_path, verify=verify, guard=guard, prompt_cache=False, kv_cache=kv_cache)
        self.accounting = weight_accounting(self.engine.bundle)


NGRAM = "ngram"


def ngram_profile_json(model: dict, task: str = NGRAM) -> dict:
    """A profile that drafts by n-gram lookup with the runtime's default settings (NGramPolicy())."""
    from conflayers.runtime.ngram import NGramPolicy
    from conflayers.runtime.profile import PROFILE_SCHEMA, PROFILE_SCHEMA_VERSION
    return {"schema": PROFILE_SCHEMA, "schema_version": PROFILE_SCHEMA_VERSION, "task": task,
            "model": {k: v for k, v in model.items() if k != "spec"},
            "draft": {"kind": "ngram", "ngram": NGramPolicy().to_json()}}


class NGramBackend:
    """The `ngram` system: the runtime with an n-gram drafter (default settings) on the bundle's
    full graph. Its own Engine over the same bundle with only that profile, so that the bundle's
    profiles (and task="auto") are untouched."""
    kind = RUNTIME

    def __init__(self, runtime: RuntimeBackend):
        import copy

        from conflayers.runtime import Engine
        from conflayers.runtime.profile import Profile
        base = runtime.engine
        bundle = copy.copy(base.bundle)
        bundle.manifest = {**bundle.manifest, "profiles": {NGRAM: {}}, "default_profile": NGRAM}
        bundle.profiles = {NGRAM: Profile.from_json(ngram_profile_json(bundle.manifest["model"]))}
        self.engine = Engine(bundle, guard=base.use_guard, prompt_cache=False, kv_cache=base.kv_cache)
        self.accounting = {**runtime.accounting, "draft_bytes": {NGRAM: 0}}


class RuntimeSystem:
    kind = RUNTIME

    def __init__(self, name: str, backend: RuntimeBackend, task: str | None, speculate: bool, guard: bool = True):
        self.name, self.backend, self.task, self.speculate = name, backend, task, speculate
        self.guard = guard          # False: this system runs without the speculation guard

    @property
    def speculative(self) -> bool:
        return self.speculate

    def weight_bytes(self, run: Run) -> tuple[int, int]:
        acc = self.backend.accounting
        return acc["full_bytes"] or 0, acc["draft_bytes"].get(run.profile or "", 0)

    def generate(self, prompt: BenchPrompt, max_new: int) -> Run:
        engine = self.backend.engine
        kept, engine.use_guard = engine.use_guard, engine.use_guard and self.guard   # one request at a time
        try:
            r = engine.generate(**prompt.runtime_kwargs(), task=self.task, max_new_tokens=max_new,
                                temperature=0.0, speculate=self.speculate)
        finally:
            engine.use_guard = kept
        m = r.metrics
        if m.prompt_tokens != len(prompt.ids):
            raise RuntimeError(f"the runtime tokenised prompt {prompt.uid} to {m.prompt_tokens} tokens, "
                               f"the benchmark to {len(prompt.ids)}")
        generated = m.completion_tokens + (1 if r.finish_reason == "stop" else 0)
        return Run(token_ids=list(r.token_ids), generated=generated, ttft_s=m.time_to_first_token_s,
                   tokens_per_s=m.tokens_per_s, total_s=m.total_s,
                   full_passes=max(generated - m.accepted_tokens, 1),
                   draft_forwards=m.drafted_tokens, draft_steps=m.draft_steps, drafted=m.drafted_tokens,
                   accepted=m.accepted_tokens, accept_lengths=list(r.accept_lengths), profile=m.profile,
                   guard_stopped=m.guard_stopped_at is not None)


# ----------------------------------------------------------------------------- transformers

def local_source(source) -> str | None:
    """A manifest's local model source as a path that exists here, or None. Sources carry no
    machine path ("dir:<folder name>", "gguf:<file name>"): the name is looked up relative to the
    working directory (older bundles recorded the absolute path, used as is)."""
    if not isinstance(source, str):
        return None
    for prefix in ("dir:", "gguf:"):
        if source.startswith(prefix):
            source = source[len(prefix):]
            break
    path = os.path.expanduser(source)
    return os.path.abspath(path) if os.path.exists(path) else None


def resolve_hf_dir(manifest_model: dict, override: str | None) -> str:
    """The local Hugging Face directory of the bundle's model (or of --hf-model): an alias, a hub
    id, or a local source found from the working directory (local_source)."""
    from conflayers.compiler.models import ALIASES, HUB_ID, ModelResolutionError, resolve_model
    if override:
        candidates = [override]
    else:
        name, source = manifest_model.get("name"), manifest_model.get("source")
        candidates = []
        if local_source(source):
            candidates.append(local_source(source))
        if name in ALIASES:
            candidates.append(name)
        if isinstance(source, str) and source not in candidates and HUB_ID.match(source):
            candidates.append(source)      # a hub id: works where the hub is reachable
        if not candidates:
            raise Unavailable(f"the bundle's model (name {name!r}, source {source!r}) cannot be found "
                              "here; pass --hf-model DIR|ALIAS")
    errors = []
    for c in candidates:
        try:
            return resolve_model(c, progress=False).path
        except ModelResolutionError as e:
            errors.append(f"{c}: {e}")
    raise Unavailable("cannot resolve the model: " + "; ".join(errors) +
                      ("" if override else "; pass --hf-model DIR|ALIAS"))


class _TimingStreamer:
    """A transformers streamer that only records when each chunk of new tokens arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.counts: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        now = time.perf_counter()
        if not self._prompt_seen:          # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(now)
        self.counts.append(int(value.numel()))

    def end(self):
        pass


class HFBackend:
    kind = HF

    def __init__(self, hf_dir: str, manifest_model: dict | None = None):
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"torch/transformers are not installed ({e})") from None
        from transformers.utils import logging as hf_logging
        from conflayers.compiler.models import ResolvedModel, load_model
        hf_logging.disable_progress_bar()
        torch.set_num_threads(os.cpu_count() or 1)
        self.hf_dir = hf_dir
        self.model, _ = load_model(ResolvedModel(os.path.basename(hf_dir), hf_dir, hf_dir))
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.matches_bundle = None
        if manifest_model is not None:
            self.matches_bundle = self._fingerprint() == manifest_model.get("weights_sha256")
        self.forwards = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.forwards += 1

    def _fingerprint(self) -> str | None:
        try:
            from conflayers.compiler.arch import canonical_weights, model_spec
            from conflayers.compiler.export.bundle_writer import fingerprint
            spec = model_spec(self.model.config)
            weights = canonical_weights(spec, self.model.state_dict())
            fp = fingerprint(spec, weights)["weights_sha256"]
            del weights
            gc.collect()
            return fp
        except Exception:  # noqa: BLE001 - an unsupported model: no check, the outputs will tell
            return None


@contextlib.contextmanager
def _prompt_lookup_probe(stats: dict):
    """Record candidate and accepted counts of transformers' prompt-lookup candidate generator."""
    from transformers.generation import candidate_generator as cg
    cls = cg.PromptLookupCandidateGenerator
    orig_get, orig_update = cls.get_candidates, cls.update_candidate_strategy
    last = {"n": 0}

    def get_candidates(self, input_ids, *args, **kwargs):
        out = orig_get(self, input_ids, *args, **kwargs)
        last["n"] = int(out[0].shape[1] - input_ids.shape[1])
        return out

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        if last["n"] > 0:
            stats["steps"] += 1
            stats["drafted"] += last["n"]
            stats["accepted"] += int(num_matches)
            stats["lengths"].append(int(num_matches))
        return orig_update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        yield
    finally:
        cls.get_candidates, cls.update_candidate_strategy = orig_get, orig_update


class HFSystem:
    kind = HF

    def __init__(self, name: str, backend: HFBackend, stop_ids, prompt_lookup: bool,
                 lookup_tokens: int = PROMPT_LOOKUP_TOKENS):
        self.name, self.backend, self.prompt_lookup = name, backend, prompt_lookup
        self.lookup_tokens = int(lookup_tokens)
        self.stop_ids = frozenset(stop_ids)

    @property
    def speculative(self) -> bool:
        return self.prompt_lookup

    def weight_bytes(self, run: Run) -> tuple[int, int]:
        return self.backend.param_bytes, 0

    def generate(self, prompt: BenchPrompt, max_new: int) -> Run:
        import torch
        model = self.backend.model
        ids = torch.tensor([prompt.ids], dtype=torch.long)
        eos = sorted(self.stop_ids)
        streamer = _TimingStreamer()
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=eos or None, pad_token_id=eos[0] if eos else None, streamer=streamer)
        stats = {"steps": 0, "drafted": 0, "accepted": 0, "lengths": []}
        probe = contextlib.nullcontext()
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.lookup_tokens
            probe = _prompt_lookup_probe(stats)
        self.backend.forwards = 0
        t0 = time.perf_counter()
        with torch.inference_mode(), probe:
            out = model.generate(ids, **kwargs)
        total = time.perf_counter() - t0
        new = [int(t) for t in out[0, ids.shape[1]:].tolist()]
        cut = cut_at_stop(new, self.stop_ids)
        generated = min(len(cut) + 1, len(new))
        times, counts = streamer.times, streamer.counts
        ttft = times[0] - t0 if times else total
        rest = sum(counts[1:])
        tps = rest / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return Run(token_ids=cut, generated=generated, ttft_s=ttft, tokens_per_s=tps, total_s=total,
                   full_passes=self.backend.forwards, draft_steps=stats["steps"], drafted=stats["drafted"],
                   accepted=stats["accepted"], accept_lengths=stats["lengths"])


# ----------------------------------------------------------------------------- ONNX Runtime GenAI

def genai_model_dir(hf_dir: str, model_name: str, log=print, precision: str = "fp32", provider: str = "cpu",
                    timeout: float | None = None) -> str:
    """Build (once) ONNX Runtime GenAI's model of hf_dir at `precision` (builder -p: fp32, or
    int4 = its MatMulNBits defaults on CPU: block 32, symmetric, accuracy level 4; fp16 for CUDA)
    for execution provider `provider` (builder -e: cpu, or cuda for tools/gpu_check), cached under
    $CONFLAYERS_CACHE/genai/<model-name>-<precision>[-<provider>]. Raises Unavailable with the
    builder's error, or when it runs past `timeout` seconds."""
    from conflayers.compiler.models import cache_dir
    from conflayers.runtime.profile import safe_name
    suffix = "" if provider == "cpu" else f"-{provider}"      # the CPU models keep their old place
    out = os.path.join(cache_dir(), "genai", f"{safe_name(model_name, 'model')}-{precision}{suffix}")
    stamp = os.path.join(out, "conflayers_source.json")
    src = {"hf_dir": os.path.abspath(hf_dir), "config_mtime": os.path.getmtime(os.path.join(hf_dir, "config.json")),
           "precision": precision, **({"provider": provider} if suffix else {})}
    if os.path.isfile(stamp):
        with contextlib.suppress(OSError, ValueError):
            with open(stamp) as f:
                if json.load(f) == src and os.path.isfile(os.path.join(out, "genai_config.json")):
                    return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".genai-build-", dir=os.path.dirname(out))
    try:
        log(f"building the ONNX Runtime GenAI model of {hf_dir} ({precision}, {provider}) into {out} ...")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "conflayers.tools.genai_builder", "-i", hf_dir,
               "-o", os.path.join(work, "model"), "-p", precision, "-e", provider, "-c", os.path.join(work, "hf_cache")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"the ONNX Runtime GenAI model builder ran past {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.isfile(os.path.join(work, "model", "genai_config.json")):
            lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
            raise Unavailable("the ONNX Runtime GenAI model builder failed on this model: "
                              + (lines[-1].strip() if lines else f"exit status {proc.returncode}"))
        with open(os.path.join(work, "model", "conflayers_source.json"), "w") as f:
            json.dump(src, f)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(os.path.join(work, "model"), out)
        log(f"  built in {time.perf_counter() - t0:.1f} s")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def genai_sliding_window(model_dir: str) -> dict:
    """A GenAI model's decoder.sliding_window settings ({} without one)."""
    with open(os.path.join(model_dir, "genai_config.json")) as f:
        return ((json.load(f).get("model") or {}).get("decoder") or {}).get("sliding_window") or {}


def genai_window(model_dir: str) -> int:
    """The sliding window of a GenAI model (Gemma 3: 512; 0 without one): its KV cache must hold
    the window whole, so no request may ask for fewer positions."""
    return int(genai_sliding_window(model_dir).get("window_size") or 0)


class GenAIBackend:
    kind = GENAI

    def __init__(self, model_dir: str, threads: int | None = None, cache_slack: int = 0):
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise Unavailable(f"onnxruntime-genai is not installed ({e}); pip install conflayers[bench]") from None
        self.og = og
        self.model_dir = model_dir
        self.threads = threads or runtime_threads()
        self.min_length = genai_window(model_dir)
        config = og.Config(model_dir)      # the runtime's thread count, not GenAI's default
        decoder = {"session_options": {"intra_op_num_threads": self.threads}}
        if self.min_length and cache_slack:
            # positions a sliding-window cache keeps past the window. GenAI's n-gram speculation
            # rewinds only a cache that has evicted nothing ("Cannot rewind ... already been
            # evicted" past window + slack): its systems get a model with slack for the whole
            # context. (An overlay replaces the whole object: the builder's settings + the slack.)
            decoder["sliding_window"] = {**genai_sliding_window(model_dir), "cache_slack": int(cache_slack)}
        config.overlay(json.dumps({"model": {"decoder": decoder}}))
        self.model = og.Model(config)
        self.weight_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                                if f.endswith((".onnx.data", ".data")) or f.endswith(".onnx"))


class GenAISystem:
    """GenAI greedy decoding; with `ngram` (tokens per proposal) its own n-gram speculative
    decoding (`set_speculative_options(ngram_size=GENAI_NGRAM_SIZE, max_draft_tokens=ngram)`)."""
    kind = GENAI

    def __init__(self, name: str, backend: GenAIBackend, stop_ids, ngram: int | None = None):
        self.name, self.backend, self.ngram = name, backend, ngram
        self.stop_ids = frozenset(stop_ids)
        self.speculative = bool(ngram)

    def weight_bytes(self, run: Run) -> tuple[int, int]:
        return self.backend.weight_bytes, 0

    def generate(self, prompt: BenchPrompt, max_new: int) -> Run:
        og = self.backend.og
        params = og.GeneratorParams(self.backend.model)
        params.set_search_options(do_sample=False, max_length=max(len(prompt.ids) + max_new, self.backend.min_length))
        if self.ngram:
            params.set_speculative_options(ngram_size=GENAI_NGRAM_SIZE, max_draft_tokens=int(self.ngram))
        t0 = time.perf_counter()
        gen = og.Generator(self.backend.model, params)
        gen.append_tokens(prompt.ids)
        out, times = [], []
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            times.append(time.perf_counter())
            out.append(tok)
            if tok in self.stop_ids:
                break
        total = time.perf_counter() - t0
        stats = gen.get_speculative_stats() if self.ngram else {}
        del gen
        tps = (len(out) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        # each target pass yields one token of its own plus the proposals it accepts (the runtime's count)
        passes = len(out) - int(stats.get("draft_tokens_accepted", 0)) if self.ngram else len(out)
        return Run(token_ids=cut_at_stop(out, self.stop_ids), generated=len(out),
                   ttft_s=(times[0] - t0) if times else total, tokens_per_s=tps, total_s=total,
                   full_passes=passes, draft_steps=int(stats.get("target_verify_forward_passes", 0)),
                   drafted=int(stats.get("draft_tokens_evaluated", 0)),
                   accepted=int(stats.get("draft_tokens_accepted", 0)))


# ----------------------------------------------------------------------------- llama.cpp

def import_llama_cpp():
    """The llama_cpp module, or Unavailable with the install hint."""
    try:
        import llama_cpp
    except ImportError:
        raise Unavailable(LLAMA_CPP_INSTALL_HINT) from None
    return llama_cpp


def locate_gguf(manifest_model: dict, override: str | None) -> str:
    """The GGUF file the bundle's model came from: --gguf, else the manifest's source when it is a
    .gguf path, else `conflayers.compiler.models.resolve_model(name).gguf` (where the resolver
    keeps an alias's GGUF in the model cache). Raises Unavailable saying to pass --gguf."""
    if override:
        path = os.path.abspath(os.path.expanduser(override))
        if not os.path.isfile(path):
            raise Unavailable(f"--gguf {override}: no such file")
        return path
    name, source = manifest_model.get("name"), manifest_model.get("source")
    local = local_source(source)
    if local and local.lower().endswith(".gguf") and os.path.isfile(local):
        return local
    errors = []
    try:
        from conflayers.compiler.models import ALIASES, ModelResolutionError, resolve_model
    except ImportError as e:
        raise Unavailable(f"the bundle's GGUF file is not known (the compiler is not installed: {e}); "
                          "pass --gguf FILE") from None
    for cand in [c for c in (name, local) if isinstance(c, str) and (c in ALIASES or os.path.exists(c))]:
        try:
            gguf = getattr(resolve_model(cand, progress=False), "gguf", None)
        except ModelResolutionError as e:
            errors.append(f"{cand}: {e}")
            continue
        if gguf and os.path.isfile(gguf):
            return os.path.abspath(gguf)
        errors.append(f"{cand}: the model resolver does not give its GGUF file")
    raise Unavailable(f"the GGUF file of the bundle's model (name {name!r}, source {source!r}) is not known here"
                      + (f" ({'; '.join(errors)})" if errors else "") + "; pass --gguf FILE")


class _LookupProbe:
    """Wraps llama-cpp-python's draft model: records each proposal and where in the output it
    starts, so acceptance can be counted against the greedy output afterwards."""

    def __init__(self, draft):
        self.draft = draft
        self.out: list[int] = []
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, input_ids, /, **kwargs):
        d = self.draft(input_ids, **kwargs)
        self.calls.append((len(self.out), [int(t) for t in d]))
        return d


class LlamaCppBackend:
    """One llama_cpp.Llama over the GGUF file (plain, or with prompt lookup as its draft model:
    llama-cpp-python then keeps the logits of every position, which verification needs)."""
    kind = LLAMACPP

    def __init__(self, gguf: str, n_ctx: int, threads: int | None = None, lookup_tokens: int | None = None):
        llama_cpp = import_llama_cpp()
        self.gguf, self.n_ctx = gguf, int(n_ctx)
        self.threads = threads or runtime_threads()
        self.probe = None
        kwargs = {}
        if lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            self.probe = _LookupProbe(LlamaPromptLookupDecoding(num_pred_tokens=int(lookup_tokens)))
            # with a draft model llama-cpp-python keeps every position's logits, but sizes that
            # buffer from the logits_all argument (n_batch rows when it is False): prompts longer
            # than n_batch (512) then fail ("could not broadcast ... into shape (0,)")
            kwargs.update(draft_model=self.probe, logits_all=True)
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=self.n_ctx, n_threads=self.threads,
                                   n_threads_batch=self.threads, verbose=False, **kwargs)
        self.version = getattr(llama_cpp, "__version__", None)
        self.file_bytes = os.path.getsize(gguf)


class LlamaCppSystem:
    """llama-cpp-python greedy decoding (temp 0: its greedy sampler, no repeat penalty) from the
    prompt token ids; prompt lookup when the backend has its draft model."""
    kind = LLAMACPP

    def __init__(self, name: str, backend: LlamaCppBackend, stop_ids):
        self.name, self.backend = name, backend
        self.stop_ids = frozenset(stop_ids)
        self.speculative = backend.probe is not None

    def weight_bytes(self, run: Run) -> tuple[int, int]:
        return self.backend.file_bytes, 0

    def generate(self, prompt: BenchPrompt, max_new: int) -> Run:
        llm, probe = self.backend.llm, self.backend.probe
        if len(prompt.ids) + max_new > self.backend.n_ctx:
            raise RuntimeError(f"prompt {prompt.uid} ({len(prompt.ids)} tokens) + {max_new} new tokens exceed "
                               f"llama.cpp's context of {self.backend.n_ctx}")
        llm.reset()             # no KV-cache prefix reuse from the previous prompt: a cold prefill like the others
        out: list[int] = []
        if probe is not None:
            probe.out, probe.calls = out, []
        times = []
        t0 = time.perf_counter()
        gen = llm.generate(prompt.ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        try:
            for tok in gen:
                times.append(time.perf_counter())
                out.append(int(tok))
                if int(tok) in self.stop_ids or len(out) >= max_new:
                    break
        finally:
            gen.close()
        total = time.perf_counter() - t0
        tps = (len(out) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        steps = drafted = accepted = 0
        lengths = []
        passes = len(out)                       # plain: the prefill, then one pass per token
        if probe is not None:
            passes = 1 + len(probe.calls)       # the prefill, then one verify pass per proposal
            for pos, d in probe.calls:
                if not d or pos >= len(out):
                    continue
                n = 0
                while n < len(d) and pos + n < len(out) and d[n] == out[pos + n]:
                    n += 1
                steps += 1
                drafted += len(d)
                accepted += n
                lengths.append(n)
        return Run(token_ids=cut_at_stop(out, self.stop_ids), generated=len(out),
                   ttft_s=(times[0] - t0) if times else total, tokens_per_s=tps, total_s=total,
                   full_passes=passes, draft_steps=steps, drafted=drafted, accepted=accepted,
                   accept_lengths=lengths)


# ----------------------------------------------------------------------------- --memory children

def spawn_child(spec: dict, timeout: float = 1800.0) -> dict:
    """Run one system in a fresh process (see child_main); returns its report or {"error": ...}."""
    cmd = [sys.executable, "-m", "conflayers.tools.bench_systems", "child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        return {"error": err[-1] if err else f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


def child_main(spec: dict) -> dict:
    """Load only what `spec` names, generate once per listed run, report VmHWM / VmRSS.

    kinds: "baseline" (python + the runtime imported, nothing loaded); "runtime" with
    profiles [] (full graph alone), [name] (full + that draft) or "all" (the bundle as Engine.load
    opens it) and `runs`: [[task, speculate], ...]; "hf" (prompt_lookup true/false); "genai"
    (genai_dir, ngram: tokens per n-gram proposal or null); "llamacpp" (gguf, n_ctx, lookup_tokens
    or null). `threads`: the runtime's thread count, for genai and llamacpp."""
    kind = spec["kind"]
    p = spec.get("prompt") or {}
    prompt = BenchPrompt(p.get("uid", "p"), p.get("text", ""), p.get("messages"), list(p.get("ids", [])))
    max_new = int(spec.get("max_new_tokens", 32))
    stop_ids = frozenset(spec.get("stop_ids", []))
    if kind == "baseline":
        import conflayers.runtime  # noqa: F401
    elif kind == RUNTIME:
        from conflayers.runtime import Bundle, Engine
        bundle = Bundle.open(spec["bundle"], verify=False)
        if spec["profiles"] != "all":
            bundle.profiles = {k: v for k, v in bundle.profiles.items() if k in spec["profiles"]}
        engine = Engine(bundle, guard=spec.get("guard", True), prompt_cache=False,
                        kv_cache=spec.get("kv_cache", "float32"))
        for task, speculate in spec.get("runs", [[None, False]]):
            engine.generate(**prompt.runtime_kwargs(), task=task, max_new_tokens=max_new, speculate=speculate)
    elif kind == HF:
        backend = HFBackend(spec["hf_dir"])
        HFSystem("hf", backend, stop_ids, bool(spec.get("prompt_lookup")),
                 lookup_tokens=int(spec.get("lookup_tokens") or PROMPT_LOOKUP_TOKENS)).generate(prompt, max_new)
    elif kind == GENAI:
        backend = GenAIBackend(spec["genai_dir"], spec.get("threads"))
        GenAISystem("genai", backend, stop_ids, ngram=spec.get("ngram")).generate(prompt, max_new)
    elif kind == LLAMACPP:
        backend = LlamaCppBackend(spec["gguf"], spec["n_ctx"], spec.get("threads"), spec.get("lookup_tokens"))
        LlamaCppSystem("llamacpp", backend, stop_ids).generate(prompt, max_new)
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    gc.collect()
    st = proc_status_kb()
    return {"vmhwm_mb": st.get("VmHWM", 0) / 1024.0, "vmrss_mb": st.get("VmRSS", 0) / 1024.0}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m conflayers.tools.bench_systems child SPEC_JSON (used by conflayers-bench --memory)")
