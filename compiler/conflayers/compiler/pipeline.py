"""conflayers-compile, step by step: resolve -> calibrate -> measure -> search -> export ->
validate through the runtime -> report. Each phase is timed; the times go into the profile."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnxruntime

from conflayers.runtime.draftplan import DraftPlan
from conflayers.runtime.ort_backend import resolve_providers
from conflayers.runtime.profile import PROFILE_SCHEMA, PROFILE_SCHEMA_VERSION, task_name

from . import __version__
from .search import STOP_THRESHOLDS, SearchSettings
from .target import DEFAULT_DRAFT_PRECISIONS



@dataclass
class CompileOptions:
    model: str = "smollm2-135m-instruct"
    calib: str = "gsm8k"
    task: str | None = None
    out: str | None = None
    num_prompts: int = 16
    validation_prompts: int = 6
    max_new_tokens: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    max_context: int = 4096
    chat: bool | None = None
    force: bool = False
    profiles: list = field(default_factory=list)     # export-only: shipped profile JSON paths
    cost_model: str | None = None                     # reuse measured timings (repeatable compiles)
    settings: SearchSettings = field(default_factory=SearchSettings)
    quiet: bool = False
    target: str = "native"                            # see target.py
    fallback_target: str | None = None                # --fallback-target: where the target is not exact here
    target_from_profiles: bool = False                # export only: take the target from the profiles


class Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._start = None
        self._name = None

    def __call__(self, msg: str):
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def phase(self, key: str, message: str | None = None):
        """Start phase `key` (a fixed name: the profile's compile_seconds key, so it never holds
        a path or an option's value); `message` is what the log shows (default: the key)."""
        self.end()
        self._name, self._start = key, time.perf_counter()
        self(f"[{time.perf_counter() - self.t0:6.1f}s] {message or key}")

    def end(self):
        if self._name is not None:
            self.phases[self._name] = round(time.perf_counter() - self._start, 1)
            self._name = None

    def bar(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=self.quiet, file=sys.stderr, leave=False)


def _prompt_ids(tokenizer, prompt, chat: bool) -> list[int]:
    """Token ids exactly as the runtime's TextCodec makes them (render, then encode)."""
    from .data import chat_messages
    if chat:
        text = tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt.text)["input_ids"])


@dataclass
class ModelSetup:
    """resolve -> fingerprint -> target -> tokenizer: what a compile and an export both start from."""
    resolved: object
    hf_model: object
    tokenizer: object
    spec: object
    weights: dict
    target: object                  # target.Target
    model_info: dict                # name, source, fingerprint, target: the manifest's model section
    identity: dict                  # the profiles' model section
    stop_ids: frozenset
    max_context: int

    def writer(self, out: str, force: bool):
        from .export.bundle_writer import BundleWriter
        return BundleWriter(out, self.spec, self.weights, self.model_info, self.max_context, force,
                            target=self.target.precision, native=self.target.native,
                            verify_boundaries=self.target.verify_boundaries, checked_on=self.target.checked_on)

    def write_tokenizer(self, bw, workdir: str):
        tok_dir = os.path.join(workdir, "tokenizer")
        self.tokenizer.save_pretrained(tok_dir)
        gen = os.path.join(self.resolved.path, "generation_config.json")
        if not os.path.isfile(os.path.join(tok_dir, "generation_config.json")) and os.path.isfile(gen):
            shutil.copyfile(gen, os.path.join(tok_dir, "generation_config.json"))
        t = self.tokenizer
        bw.write_tokenizer(tok_dir, bos_token=t.bos_token, eos_token=t.eos_token,
                           bos_token_id=t.bos_token_id, eos_token_ids=sorted(self.stop_ids))


def setup_model(opts: CompileOptions, log: "Log", dtype: str = "float32") -> ModelSetup:
    from . import models
    from .arch import canonical_weights, model_spec
    from .target import resolve_target

    log.phase("resolve model", f"resolve model {opts.model} (target {opts.target})")
    resolved = models.resolve_model(opts.model, progress=not opts.quiet)
    hf_model, tokenizer = models.load_model(resolved, dtype)
    spec = model_spec(hf_model.config)
    weights = canonical_weights(spec, hf_model.state_dict())
    target = resolve_target(opts.target, resolved, spec, weights, log)
    m = ModelSetup(resolved, hf_model, tokenizer, spec, weights, target, {}, {},
                   frozenset(_eos_ids(hf_model, tokenizer)), min(opts.max_context, spec.max_position_embeddings))
    return _with_target(m, target)


def _with_target(m: ModelSetup, target) -> ModelSetup:
    """m at `target`: the manifest's and the profiles' model sections record it."""
    from .export.bundle_writer import fingerprint, model_identity
    fp = {**fingerprint(m.spec, m.weights), "target": target.precision}
    m.target = target
    m.model_info = {"name": m.resolved.name, "source": m.resolved.source, **fp, "target_info": target.describe()}
    m.identity = model_identity(m.resolved.name, m.spec, fp)
    return m


def ensure_exact_target(m: ModelSetup, opts: CompileOptions, providers, log) -> ModelSetup:
    """A quantized target must compute every pass shape bit for bit like one-token steps on this
    machine's kernels (runtime/exactness.py). When it does not, the compile stops with the reason,
    unless --fallback-target names another target: then that one is built, and the summary, the
    manifest and the profile say so."""
    from conflayers.runtime.exactness import TargetNotExact, choose, machine, scan
    from .drafts import DraftFactory
    if m.target.precision == "fp32":
        return m
    here = machine()
    log.phase("target check", f"check that the {m.target.precision} target is exact (verify vs single steps)")
    workdir = tempfile.mkdtemp(prefix="conflayers-check-")
    try:
        factory = DraftFactory(workdir, m.spec, m.weights, m.max_context, providers,
                               target=m.target.precision, native=m.target.native)
        full, widths = factory.full(), sorted({2, 3, opts.settings.k_max + 1})
        # the cheapest padding exact here (the runtime chooses again where it serves), then every
        # pass width at every start in it, which finds the verify boundaries if there are any
        verdict = choose(full, m.spec, widths, None, m.max_context - 4)
        if not verdict.exact:
            raise TargetNotExact(verdict.problem)
        bounds = scan(full, m.spec, widths, limit=m.max_context - 4)
        factory.close()
        log(f"  exact here with passes padded {full.padding.name} ({here['kernels']}, onnxruntime {here['onnxruntime']})")
        if bounds:
            log(f"  verify passes are exact unless they reach past a length {bounds[0]} + i*{bounds[1]} "
                "(on this backend): the runtime shortens drafts there")
        m.target.verify_boundaries = bounds
        m.target.padding = full.padding
        m.target.checked_on = {**here, "padding": full.padding.name}
    except TargetNotExact as e:
        why = (f"the {m.target.precision} target is not exact on this machine's kernels ({here['kernels']}, "
               f"onnxruntime {here['onnxruntime']}): {e}")
        if not opts.fallback_target:
            raise TargetNotExact(f"{why}. Nothing was written. To build a bundle anyway, choose another target "
                                 f"(--target fp32), or let the compiler fall back where this happens "
                                 f"(--fallback-target fp32); please report the machine (conflayers "
                                 f"--version, /proc/cpuinfo flags)") from None
        log(f"  {why}\n  -> --fallback-target {opts.fallback_target}: compiling for {opts.fallback_target} instead")
        fallback = resolve_fallback(opts.fallback_target, m)
        fallback.fallback = {"from": m.target.precision, "reason": str(e), "machine": here}
        m = _with_target(m, fallback)
        return ensure_exact_target(m, _no_fallback(opts), providers, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return m


def resolve_fallback(choice: str, m: ModelSetup):
    from .target import resolve_target
    return resolve_target(choice, m.resolved, m.spec, m.weights)


def _no_fallback(opts: CompileOptions) -> CompileOptions:
    from dataclasses import replace
    return replace(opts, fallback_target=None)


@dataclass
class Calibration:
    search_prompts: list
    val_prompts: list
    search_ids: list
    val_ids: list
    pool_rest: list           # calibration-part prompts not drawn (vocabulary statistics)
    chat: bool


def draw_calibration(opts: CompileOptions, m: ModelSetup, log: "Log") -> Calibration:
    from . import data
    log.phase("calibration data", f"calibration data {opts.calib}")
    chat = opts.chat if opts.chat is not None else bool(getattr(m.tokenizer, "chat_template", None))
    pool = data.load_prompts(opts.calib, "calibration")
    chosen = data.pick(pool, opts.num_prompts, opts.seed)
    n_val = opts.validation_prompts
    search_prompts, val_prompts = data.split(chosen, opts.num_prompts - n_val, n_val, opts.seed)
    if len(search_prompts) < 2:
        raise ValueError(f"--num-prompts {opts.num_prompts} with --validation-prompts {n_val} leaves "
                         f"{len(search_prompts)} search prompts; at least 2 are needed")
    search_ids = [_prompt_ids(m.tokenizer, p, chat) for p in search_prompts]
    val_ids = [_prompt_ids(m.tokenizer, p, chat) for p in val_prompts]
    too_long = [i for i, ids in enumerate(search_ids + val_ids) if len(ids) + opts.max_new_tokens > m.max_context]
    if too_long:
        raise ValueError(f"{len(too_long)} calibration prompts do not fit in --max-context {m.max_context} "
                         f"with --max-new-tokens {opts.max_new_tokens}")
    _check_memory(m.spec, search_ids + val_ids, opts.max_new_tokens)
    used = {p.uid for p in search_prompts + val_prompts}
    pool_rest = [p for p in pool if p.uid not in used][:2000]
    return Calibration(search_prompts, val_prompts, search_ids, val_ids, pool_rest, chat)


@dataclass
class SearchOutcome:
    """Everything build_profile records about one compile's search."""
    task: str
    result: object            # search.SearchResult
    cost: object              # costmodel.CostModel
    attn: np.ndarray
    mlp: np.ndarray
    vocab_ids: list | None
    signature_counts: np.ndarray
    special: list
    vocab_counts: np.ndarray | None = None    # token counts the vocabulary subsets are drawn from

    def ids_for(self, size: int) -> list[int]:
        """The draft vocabulary subset of `size` tokens (the chosen draft's, or a cascade stage's)."""
        from . import vocab
        return vocab.top_ids(self.vocab_counts, size, self.special).tolist()


def reference_decoding(factory, m: ModelSetup, cal: Calibration, opts, log):
    from .evaluate import make_references
    log.phase("reference decoding",
              f"export full graph ({m.target.precision}) + reference decoding (full model, greedy)")
    full = factory.full()
    with log.bar(len(cal.search_ids) + len(cal.val_ids), "reference decoding") as bar:
        refs = make_references(full, m.spec, cal.search_ids, opts.max_new_tokens, m.stop_ids, bar.update)
        val_refs = make_references(full, m.spec, cal.val_ids, opts.max_new_tokens, m.stop_ids, bar.update)
    return refs, val_refs


def layer_confidence(m: ModelSetup, refs, s: SearchSettings, log):
    from . import confidence
    log.phase("layer confidence", f"per-layer confidence (last W={s.context_window} tokens of each context)")
    contexts = [r.sequence for r in refs]
    if all(len(c) < s.context_window for c in contexts):
        raise ValueError(f"every calibration context is shorter than the confidence window "
                         f"W={s.context_window} tokens (longest {max(len(c) for c in contexts)}); "
                         "lower --context-window or raise --max-new-tokens")
    contexts = [c for c in contexts if len(c) >= s.context_window]
    return confidence.layer_confidences(m.hf_model, m.spec.architecture, contexts, s.context_window)


def cost_model(factory, m: ModelSetup, refs, opts, providers, log):
    from . import costmodel
    s = opts.settings
    vocab_sizes = sorted(set(v for v in s.vocab_sizes if v < m.spec.vocab_size)) + [m.spec.vocab_size]
    # phase 1's drafts are at the target's precision, even when --precisions leaves it out
    precisions = list(s.precisions) + [p for p in [m.target.precision] if p not in s.precisions]
    if opts.cost_model:
        log.phase("cost model", f"cost model (reused from {opts.cost_model})")
        cost = costmodel.CostModel.load(opts.cost_model, precisions, s.k_max + 1)
    else:
        log.phase("cost model", "cost model (timings on " + providers[0] + ")")
        ctx_len = int(np.mean([len(r.sequence) for r in refs]))
        cost = costmodel.measure(factory, m.spec, ctx_len, s.k_max + 1, precisions, vocab_sizes)
    log(f"  full step ({m.target.precision}) {cost.full_ms[0]:.1f} ms, verify {s.k_max + 1} tokens "
        f"{cost.full_ms[-1]:.1f} ms; "
        + "; ".join(f"{p} draft (all layers, full vocab) "
                    f"{cost.draft_ms(DraftPlan(m.spec.num_layers, precision=p), m.spec.vocab_size):.1f} ms"
                    for p in s.precisions))
    return cost


def search_draft(factory, m: ModelSetup, cal: Calibration, refs, cost, attn, mlp, opts, task, log) -> SearchOutcome:
    from . import vocab
    from .search import run_search
    log.phase("search")
    s, spec = opts.settings, m.spec
    special = sorted(m.stop_ids)
    pool_counts = vocab.counts([_prompt_ids(m.tokenizer, p, False) for p in cal.pool_rest], spec.vocab_size)
    ref_tokens = [r.prompt + r.output for r in refs]
    options = vocab.leave_one_out_options(ref_tokens, pool_counts, s.vocab_sizes, spec.vocab_size, special)
    result = run_search(factory, spec, refs, opts.max_new_tokens, cost, s, options, attn, mlp, log=log,
                        target=m.target.precision)
    vocab_ids = None
    all_counts = pool_counts + vocab.counts(ref_tokens, spec.vocab_size)
    if result.best.choice.vocab is not None:
        vocab_ids = vocab.top_ids(all_counts, result.best.choice.vocab, special).tolist()
    log(f"  chosen: {describe_choice(result.best)}")
    raw_counts = vocab.counts([_prompt_ids(m.tokenizer, p, False) for p in cal.search_prompts + cal.pool_rest],
                              spec.vocab_size)
    return SearchOutcome(task, result, cost, attn, mlp, vocab_ids, raw_counts, special, all_counts)


def search_cascade(factory, m: ModelSetup, refs, outcome: SearchOutcome, opts, log) -> dict:
    """A cheaper evaluated draft proposing for the chosen one (cascade_search.py), measured
    against the chosen draft alone when predicted faster (the factory's graphs are still open),
    unless the cost model was reused: that compile must be repeatable, so prediction decides."""
    from . import cascade_search
    log.phase("cascade search", "cascade search (cheaper drafts proposing for the chosen draft)")
    measure = None if opts.cost_model else cascade_search.measurer(factory, m.spec, refs, outcome.result.best,
                                                                    outcome.ids_for)
    section = cascade_search.search(refs, opts.max_new_tokens, outcome.cost, outcome.result, m.spec.vocab_size,
                                    opts.settings.k_max, measure, log)
    log(f"  cascade: {section['kind']} ({section['why']})")
    return section


def compile_profile(opts: CompileOptions) -> str:
    """The whole compile, phase by phase. Returns the bundle path."""
    import torch

    from . import cascade_search, levers, ngram_search, report
    from .drafts import DraftFactory
    from .export.bundle_writer import check_output_dir

    log = Log(opts.quiet)
    providers = resolve_providers(opts.device)
    task = opts.task or task_name(opts.calib)
    m = ensure_exact_target(setup_model(opts, log, opts.dtype), opts, providers, log)
    if not opts.settings.precisions:     # default: drafts cheaper than the target
        opts.settings.precisions = DEFAULT_DRAFT_PRECISIONS[m.target.precision]
    opts.settings.validate(m.spec.num_layers)
    out = opts.out or os.path.join("bundles", m.resolved.name)
    check_output_dir(out, opts.force, m.model_info)       # refuse early, before minutes of work
    cal = draw_calibration(opts, m, log)

    workdir = tempfile.mkdtemp(prefix="conflayers-work-")
    try:
        factory = DraftFactory(workdir, m.spec, m.weights, m.max_context, providers,
                               target=m.target.precision, native=m.target.native,
                               verify_boundaries=m.target.verify_boundaries, padding=m.target.padding)
        refs, val_refs = reference_decoding(factory, m, cal, opts, log)
        attn, mlp = layer_confidence(m, refs, opts.settings, log)
        m.hf_model = None           # the torch model is not needed past the confidence pass
        torch.set_num_threads(1)
        cost = cost_model(factory, m, refs, opts, providers, log)
        outcome = search_draft(factory, m, cal, refs, cost, attn, mlp, opts, task, log)
        cascade = search_cascade(factory, m, refs, outcome, opts, log)
        factory.close()

        log.phase("export bundle")
        profile = build_profile(m, opts, cal, outcome)
        drafter = ngram_search.search(refs, opts.max_new_tokens, cost, outcome.result.best.record,
                                      outcome.result.best.choice, opts.settings.k_max)
        ngram_search.apply(profile, drafter)
        log(f"  drafter: {drafter['kind']} ({drafter['why']})")
        cascade_search.apply(profile, cascade, outcome.ids_for)
        profile["search"]["levers"] = levers.levers(profile)
        with m.writer(out, opts.force) as bw:
            bw.write_full()
            keep = _existing_profiles(bw, task)
            for p in keep:
                bw.add_profile(p)
            bw.add_profile(profile, default=not keep)      # the writer serialises it at finalize
            m.write_tokenizer(bw, workdir)
            log.phase("validation", "validation through the runtime (plain vs speculative, validation prompts)")
            figures = validate(bw.finalize(), task, cal.val_prompts, val_refs, opts.max_new_tokens, cal.chat, log,
                               opts.device)
            profile["figures"].update(figures)
            log.phase("report")
            for rel, blob in report.render(profile, outcome.result, cost).items():
                bw.write_bytes(f"report/{task}/{rel}", blob)
            log.end()
            profile["compile_seconds"] = {**log.phases}
            path = bw.publish()
        log(f"bundle written to {path}")
        log(f"  {task}: predicted x{profile['figures']['predicted_speedup']:.2f}, "
            f"measured x{figures['measured_speedup']:.2f} "
            f"on {figures['validation_prompts']} validation prompts, identical to plain decoding: "
            f"{figures['identical_to_plain']}")
        log(f"  levers: {profile['search']['levers']['summary']}")
        log(f"  target: {m.target.precision}" + (f" (--fallback-target: {m.target.fallback['from']} is not exact "
                                                 "on this machine, see the manifest)" if m.target.fallback else ""))
        return path
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(spec, prompts, max_new_tokens: int):
    """Refuse requests that cannot fit in memory before spending minutes on them: the reference
    KV caches of every calibration prompt are held during the search, beside ~3 copies of the
    weights (torch model, weights file pages, prepacked session weights)."""
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    kv = sum(len(ids) + max_new_tokens for ids in prompts) * kv_per_token
    params = spec.vocab_size * spec.hidden_size + spec.num_layers * (
        spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        + spec.num_heads * spec.head_dim * spec.hidden_size + 3 * spec.hidden_size * spec.intermediate_size)
    need = kv + 3 * 4 * params
    have = _available_bytes()
    if have is not None and need > have:
        raise ValueError(f"this compile needs about {need / 2**30:.1f} GiB (reference KV caches of "
                         f"{len(prompts)} prompts x {max_new_tokens} new tokens: {kv / 2**30:.1f} GiB, plus "
                         f"the model), but only {have / 2**30:.1f} GiB is available; lower --num-prompts or "
                         "--max-new-tokens")


def export_profiles(opts: CompileOptions) -> str:
    """Export only: a bundle from shipped profiles, without re-running the search. Each profile
    must have been compiled for this model and target (fingerprint check)."""
    from conflayers.runtime.profile import Profile, ProfileError

    log = Log(opts.quiet)
    loaded = []
    for path in opts.profiles:
        try:
            loaded.append(Profile.load(path))
        except ProfileError as e:
            raise ValueError(str(e)) from None
    if opts.target_from_profiles:       # --target not given: the profiles say which target they are for
        targets = {p.model.get("target", "fp32") for p in loaded}
        if len(targets) > 1:
            raise ValueError(f"the profiles are for different targets ({', '.join(sorted(targets))}); "
                             "export them into separate bundles with --target")
        opts.target = targets.pop()
    opts.fallback_target = None          # the profiles' target, or none: no fallback
    m = ensure_exact_target(setup_model(opts, log), opts, resolve_providers(opts.device), log)
    for path, prof in zip(opts.profiles, loaded):
        why = prof.matches_model(m.identity)
        if why:
            raise ValueError(f"{path}: {why}; compile a profile for this model instead")
    out = opts.out or os.path.join("bundles", m.resolved.name)
    log.phase("export bundle")
    new = {p.task for p in loaded}
    path = publish_profiles(m, out, [p.raw for p in loaded], opts.force)
    log.end()
    log(f"bundle written to {path} ({', '.join(sorted(new))}; export took {sum(log.phases.values()):.0f} s)")
    from .levers import levers
    for p in loaded:
        log(f"  {p.task} levers: {levers(p.raw)['summary']}")
    return path


def publish_profiles(m: ModelSetup, out: str, profiles: list[dict], force: bool = False,
                     files: dict[str, bytes] | None = None, keep_reports: bool = False) -> str:
    """Add (or replace) `profiles` in the bundle at `out` over one full graph, keeping the
    bundle's other profiles, in one atomic publish (export-only, and conflayers-sweep's driver).
    files: more bundle files (relative path -> bytes, e.g. the new profiles' reports);
    keep_reports: carry the kept profiles' report/<task>/ files over."""
    workdir = tempfile.mkdtemp(prefix="conflayers-export-")
    try:
        with m.writer(out, force) as bw:
            bw.write_full()
            new = {p["task"] for p in profiles}
            for p in _existing_profiles(bw, None):
                if p["task"] not in new:
                    bw.add_profile(p)
                    if keep_reports:
                        _copy_report(bw, p["task"])
            for i, p in enumerate(profiles):
                bw.add_profile(p, default=i == 0 and bw.default_profile is None)
            for rel, blob in (files or {}).items():
                bw.write_bytes(rel, blob)
            m.write_tokenizer(bw, workdir)
            return bw.publish()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _copy_report(bw, task: str):
    src = os.path.join(bw.out, "report", task)
    for root, _, names in os.walk(src):
        for n in names:
            full = os.path.join(root, n)
            with open(full, "rb") as f:
                bw.write_bytes(os.path.relpath(full, bw.out).replace(os.sep, "/"), f.read())


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if e is not None:
            ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _existing_profiles(bw, task: str) -> list[dict]:
    """Profiles already in the bundle at --out (same model): kept, except the one being rebuilt."""
    if bw.mode != "bundle":
        return []
    from conflayers.runtime.bundle import Bundle
    old = Bundle.open(bw.out, verify=False)
    return [p.raw for t, p in sorted(old.profiles.items()) if t != task]


def describe_choice(c) -> str:
    p = c.plan
    skipped = list(p.skip_layers)
    extra = []
    if p.skip_mlp:
        extra.append(f"MLP of {list(p.skip_mlp)}")
    if p.skip_attention:
        extra.append(f"attention of {list(p.skip_attention)}")
    ch = c.choice
    return (f"{p.precision} draft skipping layers {skipped or 'none'}"
            + (f" and the {' and '.join(extra)}" if extra else "")
            + f", k={ch.k}, confidence stop={ch.confidence_stop}, vocabulary={ch.vocab or 'full'}"
            + f" (found by: {c.origin}); predicted x{ch.speedup:.2f}")


def build_profile(m: ModelSetup, opts: CompileOptions, cal: Calibration, o: SearchOutcome) -> dict:
    from . import data
    from .evaluate import policy_table
    s = opts.settings
    result, cost, attn, mlp, vocab_ids = o.result, o.cost, o.attn, o.mlp, o.vocab_ids
    raw_counts, special, task = o.signature_counts, o.special, o.task
    search_prompts, val_prompts, chat = cal.search_prompts, cal.val_prompts, cal.chat
    best = result.best
    ch = best.choice
    sig_order = np.argsort(-raw_counts)
    sig = {}
    for t in sig_order[:256]:
        if raw_counts[t] == 0:
            break
        if int(t) not in special:
            sig[str(int(t))] = int(raw_counts[t])
    total = sum(sig.values()) or 1
    signature = {k: round(v / total, 6) for k, v in sig.items()}
    phase1 = result.phase1_best
    note = None
    if not (best.plan.skip_layers or best.plan.skip_mlp or best.plan.skip_attention):
        note = ("no layer is skipped: on this model and hardware every skip set measured cost more "
                "acceptance than it saved time; the draft's speed comes from its precision"
                + (" and vocabulary subset" if ch.vocab else ""))
    return {
        "schema": PROFILE_SCHEMA,
        "schema_version": PROFILE_SCHEMA_VERSION,
        "task": task,
        "model": m.identity,
        "calibration": {
            "source": data.portable_calib(opts.calib), "data": data.describe(opts.calib, "calibration"),
            "num_prompts": opts.num_prompts, "search_prompts": len(search_prompts),
            "validation_prompts": len(val_prompts), "seed": opts.seed, "max_new_tokens": opts.max_new_tokens,
            "chat_template": chat, "search_uids": [p.uid for p in search_prompts],
            "validation_uids": [p.uid for p in val_prompts],
        },
        "draft": {
            **best.plan.to_json(),
            "max_draft_tokens": ch.k,
            "confidence_stop": ch.confidence_stop,
            "vocab_subset": None if vocab_ids is None else {"size": len(vocab_ids), "token_ids": vocab_ids},
        },
        "search": {
            "strategy": best.origin.split(" ")[0],
            "found_by": best.origin,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
            "stop_reason": result.stop_reason,
            "final_lambda": result.final_lambda,
            "iterations": result.iterations,
            "phase1_best": None if phase1 is None else {
                "skip_layers": list(phase1.plan.skip_layers), "acceptance": round(phase1.paper["acceptance"], 4),
                "mean_accepted": round(phase1.paper["mean_accepted"], 4),
                "predicted_speedup": round(phase1.choice.speedup, 4)},
            "candidates": [{
                "origin": c.origin, **c.plan.to_json(), "complete": c.record.complete,
                "k": c.choice.k, "confidence_stop": c.choice.confidence_stop, "vocab": c.choice.vocab,
                "acceptance": round(c.choice.acceptance, 4), "mean_accepted": round(c.choice.mean_accepted, 4),
                "predicted_speedup": round(c.choice.speedup, 4)} for c in result.candidates],
            "seconds": result.seconds,
            "note": note,
            "target_fallback": m.target.fallback,
        },
        "confidence": {
            "window": s.context_window,
            "attention": [round(float(x), 6) for x in attn.mean(axis=0)],
            "mlp": [round(float(x), 6) for x in mlp.mean(axis=0)],
            "layer": result.mean_confidence,
            "thresholds": result.thresholds,
            "lambda": result.final_lambda,
            "ranking": result.ranking,
        },
        "cost_model": cost.to_json(),
        "policy_table": policy_table(best.record.blocks[ch.vocab], s.k_max, STOP_THRESHOLDS, ch.draft_ms),
        "figures": {
            "split": "validation",
            "search_acceptance": round(ch.acceptance, 4),
            "search_mean_accepted_tokens": round(ch.mean_accepted, 4),
            "predicted_speedup": round(ch.speedup, 4),
        },
        "selection": {"method": "token-frequency cosine (see conflayers/runtime/selection.py)",
                      "signature": signature},
        "compiler_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def validate(bundle_dir: str, task: str, val_prompts, val_refs, max_new_tokens: int, chat: bool, log,
             device: str = "cpu") -> dict:
    """Plain vs speculative decoding through the runtime's public API over the written bundle,
    interleaved per prompt: token identity (with each other and with the compiler's reference),
    acceptance and the measured speed-up. The runtime tokenises the prompts itself, so this also
    checks that its chat template rendering matches transformers'."""
    from conflayers.runtime.engine import Engine
    from .data import chat_messages

    # the compiled policy as written (no adaptation), on the device it was tuned on: its prediction is what is checked
    # plain and speculative runs of a prompt both prefill it whole (no prompt cache between them)
    engine = Engine.load(bundle_dir, device=device, verify=True, guard=False, adapt=False, prompt_cache=False)
    identical = True
    time_s = {"plain": 0.0, "spec": 0.0}
    tokens = {"plain": 0, "spec": 0}
    drafted = accepted = steps = 0
    hist: dict[int, int] = {}
    with log.bar(len(val_prompts), "validation") as bar:
        for prompt, ref in zip(val_prompts, val_refs):
            kwargs = {"messages": chat_messages(prompt)} if chat else {"prompt": prompt.text}
            outs = {}
            for mode in ("plain", "spec"):
                r = engine.generate(**kwargs, task=task, max_new_tokens=max_new_tokens, speculate=mode == "spec")
                outs[mode] = r.token_ids
                m = r.metrics
                time_s[mode] += (m.completion_tokens - 1) / m.tokens_per_s if m.tokens_per_s else 0.0
                tokens[mode] += max(m.completion_tokens - 1, 0)
                if mode == "spec":
                    drafted += m.drafted_tokens
                    accepted += m.accepted_tokens
                    steps += m.draft_steps
                    for a in r.accept_lengths:
                        hist[a] = hist.get(a, 0) + 1
            expected = [t for t in ref.output if t not in engine.stop_ids]
            identical &= outs["plain"] == outs["spec"] == expected
            bar.update(1)
    rate = {k: tokens[k] / time_s[k] if time_s[k] else 0.0 for k in time_s}
    if not identical:
        log("  WARNING: speculative output differed from plain decoding on a validation prompt")
    return {
        "validation_prompts": len(val_prompts),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_accepted_tokens": round(accepted / steps, 4) if steps else 0.0,
        "accept_histogram": {str(k): v for k, v in sorted(hist.items())},
        "plain_tokens_per_s": round(rate["plain"], 2),
        "speculative_tokens_per_s": round(rate["spec"], 2),
        "measured_speedup": round(rate["spec"] / rate["plain"], 4) if rate["plain"] else 0.0,
        "identical_to_plain": bool(identical),
        "measured_on": (f"{os.cpu_count()} CPU cores" if engine.device == "cpu" else "CUDA")
                       + ", onnxruntime " + onnxruntime.__version__,
    }
