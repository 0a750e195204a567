"""The runtime's Python API: load a bundle once, then generate per request.

    from conflayers.runtime import Engine
    engine = Engine.load("bundles/smollm2-gsm8k")
    result = engine.generate(messages=[{"role": "user", "content": "..."}], task="auto")
    print(result.text, result.metrics.tokens_per_s)

Sessions for the full graph and every draft are created at load (measured: creating an int8 draft
session costs ~0.3 s, which a first request should not pay). Requests are decoded by the one loop
(scheduler.py) in a thread of its own, over a KV cache of `max_batch` slots preallocated to the
context length and reused: max_batch=1 (the default here) decodes one request at a time, more
decode together (continuous batching, the server's default); generate() from any thread.

Loading checks that the full graph computes every pass shape bit for bit like one-token steps on
this machine's kernels, and how its passes must be padded for that (exactness.py; cached per
machine): a target that is not exact here is refused with the reason, never served inexactly.

A profile's drafting policy (draft length, confidence stop) is chosen for this machine on the first
request that uses it (adapt_policy: a few full and draft steps timed here, policy.py), so a
profile compiled elsewhere does not slow this one; the speculation guard remains the last line.
A profile tuned on another device (cost_model.device: a CPU-tuned one on a GPU, or the reverse) has
its policy chosen here in the same way even with adapt=False (Engine.replan names them).
"""
from __future__ import annotations

import logging
import numbers
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from . import contract, exactness, probe
from .batchplan import BatchPlanner, ngram_part
from .bundle import Bundle
from .cascade import CascadeDrafter
from .drafter import DraftPolicy, LayerSkipDrafter
from .ngram import HybridDrafter, NGramDrafter, NGramPolicy
from .ort_backend import GraphRunner, create_session, resolve_providers
from .scheduler import Scheduler, Sequence
from .speculation import DecodeStats, SpeculationGuard
from .policy import MachineCosts, choose as choose_policy, rows_from_figures
from .sampling import Sampler, SamplingError
from .selection import ProfileSelector
from .textio import ChatError, lone_surrogate

DEFAULT_MAX_NEW_TOKENS = 256     # max_new_tokens=None: this many, or fewer to fit the context
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (checked in prepare; front ends set these from their flags).
    Work per request grows with each: every stop string is searched after every token."""
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    special_tokens_in_prompt: bool = False   # a raw prompt's "<|im_end|>" text: a control token, not text


class RequestError(ValueError):
    """A request the engine cannot serve as asked (bad parameter, too long, unknown task).

    `param` is the offending argument of Engine.generate (None when no single one is at fault).
    The message names it as `{param}`, so a front end with other field names (the HTTP server's
    max_tokens) renders the same message with its own name: message_for(name)."""

    def __init__(self, message: str, param: str | None = None):
        self.template, self.param = message, param
        super().__init__(self.message_for(param))

    def message_for(self, name: str | None) -> str:
        return self.template.replace("{param}", name or "the request")


@dataclass
class GenerationMetrics:
    profile: str | None
    speculative: bool
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0     # of those, found in the prompt cache (not prefilled)
    completion_tokens: int = 0
    draft_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_tokens: float = 0.0
    tokens_per_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    guard_stopped_at: int | None = None
    selection_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (end token or stop string) or "length"
    metrics: GenerationMetrics
    accept_lengths: list[int] = field(default_factory=list, repr=False)


@dataclass
class Request:
    """A checked request (Engine.prepare), ready to generate once."""
    ids: list[int]
    profile: str | None           # the draft profile, None for plain decoding
    score: float | None           # task="auto": the chosen profile's selection score
    sampler: Sampler
    max_new_tokens: int
    stops: list[str]
    use_guard: bool
    deadline: float | None = None   # time.monotonic() after which generation ends ("length")


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]
    result: GenerationResult | None = None   # set on the last chunk


@runtime_checkable
class EngineAPI(Protocol):
    """What every front end calls (serving/, cli.py, Ray Serve's RayEngine, embedding code):
    submit = generate(...) (checked before the first token: RequestError); stream = generate(...,
    stream=True), an iterator of StreamChunk whose last chunk carries the result and its metrics
    (the stats); cancel = closing that iterator (the request leaves the loop at its next step).
    Engine and ray_serve.RayEngine both implement it; nothing else of an engine is reached into."""
    bundle: Bundle
    capacity: int
    device: str

    @property
    def profiles(self) -> list[str]: ...

    def generate(self, prompt: str | None = None, *, stream: bool = False, **kwargs): ...

    def close(self) -> None: ...


class Engine:
    def __init__(self, bundle: Bundle, device: str = "cpu", max_context: int | None = None,
                 num_threads: int | None = None, guard: bool = True, adapt: bool = True,
                 limits: RequestLimits | None = None, check_exactness: bool = True, max_batch: int = 1,
                 prefill_chunk: int = 32, spec_max_batch: int | None = None, prompt_cache: bool = True,
                 prompt_cache_mb: float = 256, kv_cache: str = "float32"):
        self.bundle = bundle
        self.adapt = adapt            # choose each profile's drafting policy for this machine
        self.spec = bundle.spec
        self.providers = resolve_providers(device)
        self.device = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"
        self.capacity = min(max_context or bundle.max_context, bundle.max_context)
        self.use_guard = guard
        self.limits = limits or RequestLimits()
        # float16: the KV caches as halves (attention.py; create_session refuses what cannot run)
        self.kv_cache = kv_cache

        def session(path, screen_head=False):
            return create_session(path, self.providers, num_threads, kv_cache=kv_cache, screen_head=screen_head)
        self.num_threads = num_threads
        # by construction exact on every CPU (contract.py); the load check may find a cheaper padding;
        # the screened head where the library has it (head.py: the same greedy tokens, fewer bytes)
        self.full = GraphRunner(session(bundle.full_graph, screen_head=True), list(range(self.spec.num_layers)), "logits",
                                verify_boundaries=bundle.verify_boundaries, path=bundle.full_graph,
                                padding=contract.PAD_EVERY if bundle.verify_boundaries else contract.PAD_SINGLE)
        # padding rows reach past the context as far as the graph's rotary tables allow
        self.capacity = min(self.capacity, bundle.max_context - (contract.KV_SPARE - self.full.spare_positions))
        bodies, heads = {}, {}
        self.drafters: dict[str, LayerSkipDrafter | NGramDrafter | HybridDrafter | CascadeDrafter] = {}

        def model_draft(graphs, vocab_ids, policy) -> LayerSkipDrafter:
            """A model draft over sessions shared by every profile (and stage) with the same graphs."""
            if graphs.body not in bodies:
                bodies[graphs.body] = GraphRunner(session(graphs.body), graphs.kv_layers, "hidden", path=graphs.body)
            if graphs.head not in heads:
                heads[graphs.head] = GraphRunner(session(graphs.head), [], "logits")
            return LayerSkipDrafter(bodies[graphs.body], heads[graphs.head], vocab_ids, self.spec.vocab_size, policy)

        for task, profile in bundle.profiles.items():
            graphs = bundle.draft_graphs(task)
            if graphs is None:          # draft.kind "ngram": no graphs
                self.drafters[task] = NGramDrafter(profile.ngram, self.spec.vocab_size)
                continue
            self.drafters[task] = model_draft(graphs, profile.vocab_ids, profile.policy)
            if profile.kind == "cascade":
                stages = [model_draft(g, st.vocab_ids, st.policy)
                          for g, st in zip(bundle.stage_graphs(task), profile.stages)]
                self.drafters[task] = CascadeDrafter.of(stages + [self.drafters[task]])
            if profile.kind == "hybrid":
                self.drafters[task] = HybridDrafter(NGramDrafter(profile.ngram, self.spec.vocab_size),
                                                    self.drafters[task])
        self.codec = bundle.codec
        self.stop_ids = bundle.stop_ids
        self.selector = ProfileSelector(bundle.profiles, bundle.default_profile)
        self.machine_costs: dict[str, MachineCosts | None] = {}   # per profile, once adapted
        self._adapt_lock = threading.Lock()
        # profiles tuned on another device (none recorded: the CPU) -> that device: their policy is
        # chosen again here whatever `adapt` says (a launch-bound GPU step favours other drafts)
        self.replan = {t: p.tuned_device for t, p in bundle.profiles.items() if p.tuned_device != self.device}
        for t, there in sorted(self.replan.items()):
            _log.info("profile %r was tuned on %s, this engine runs on %s: its drafting policy is chosen "
                      "again here on first use", t, there, self.device)
        self.exactness: exactness.Verdict | None = None
        if check_exactness:
            self._check_exactness()
        for runner in (*bodies.values(), *heads.values()):
            runner.padding = self.full.padding.for_drafts
        self.scheduler: Scheduler | None = None
        self.set_batching(max_batch, prefill_chunk, spec_max_batch, prompt_cache, prompt_cache_mb)

    # -- the decoding loop -----------------------------------------------------------------------
    def set_batching(self, max_batch: int = 1, prefill_chunk: int = 32, spec_max_batch: int | None = None,
                     prompt_cache: bool = True, prompt_cache_mb: float = 256):
        """Decode up to `max_batch` requests together (scheduler.py; 1: one at a time), prompts fed
        in chunks of at most `prefill_chunk` tokens while others decode (2 x prefill_chunk / n
        beside n decoding, at least 4); `prompt_cache`: a request
        reuses the KV a slot kept of a shared prompt prefix, or host memory did (up to
        `prompt_cache_mb` MB of recent sequences' KV; 0: the slots only); exact. With batching, every
        profile's policy for this machine and the batched passes are timed now, before any
        request (batchplan.py). Call while no request runs."""
        if self.scheduler is not None:
            if self.scheduler.active or self.scheduler.waiting:
                raise RuntimeError("set_batching while requests run")
            self.scheduler.close()
        planner = None
        if max_batch > 1:
            for name in self.drafters:
                self.adapt_policy(name)
            planner = BatchPlanner(self, max_batch, spec_max_batch)
        self.scheduler = Scheduler(self.full, self.spec, self.capacity, self.stop_ids, max_batch, prefill_chunk,
                                   planner, self.providers, self.num_threads, self.device,
                                   prompt_cache=prompt_cache, prompt_store_mb=prompt_cache_mb)
        if planner is not None:
            planner.measure(self.scheduler)
        self.planner = planner

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the decoding loop's KV caches, as allocated."""
        return self.scheduler.cache.nbytes

    @property
    def active(self) -> int:
        """Requests decoding now."""
        return self.scheduler.active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self.scheduler.waiting

    def speculation_plan(self) -> dict[str, str]:
        """Per drafting profile, what a greedy request drafts at each batch size, in words."""
        if self.planner is None:
            return {name: ("plain decoding (no drafting pays on this machine)" if self.adapt_policy(name) is None
                           else "drafts (batch 1)") for name in sorted(self.drafters)}
        return self.planner.speculation_plan()

    def close(self):
        """Stop the decoding loop (requests still running end with an error)."""
        self.scheduler.close()

    def _check_exactness(self):
        """The load check of the target on this machine's kernels (exactness.py), cached per
        machine: serve it exactly (with the padding and verify boundaries found here) or refuse it."""
        b = self.bundle
        widths = {2, 3, *self._verify_widths()}
        key = {"graph": b.manifest["files"][b.manifest["graphs"]["full"]["file"]]["sha256"],
               "weights": b.manifest["model"].get("weights_sha256"), "target": b.target,
               "recorded": list(b.verify_boundaries or ()), "widths": sorted(widths),
               "check": 1, **exactness.machine(self.num_threads),
               **({"providers": self.providers} if self.device != "cpu" else {})}   # GPU kernels differ
        verdict = exactness.cached(key)
        if verdict is None:
            verdict = exactness.choose(self.full, self.spec, sorted(widths), b.verify_boundaries,
                                       self.capacity - 4)
            exactness.remember(key, verdict)
        self.exactness = verdict
        if not verdict.exact:
            raise exactness.TargetNotExact(self._refusal(verdict, key))
        self.full.padding = contract.PADDINGS[verdict.padding]
        self.full.verify_boundaries = verdict.boundaries

    def _verify_widths(self) -> set[int]:
        """The verify pass widths this bundle's profiles may take (k + 1 for every k they allow,
        and the default n-gram drafter's)."""
        widths = {NGramPolicy().max_tokens + 1}
        for profile in self.bundle.profiles.values():
            ks = [p.max_tokens for p in (profile.policy, profile.ngram, *(st.policy for st in profile.stages)) if p]
            widths.update(k + 1 for k in ks + [r.k for r in profile.policy_table or []])
        return {w for w in widths if w <= 65}

    def _refusal(self, verdict, here: dict) -> str:
        b = self.bundle
        built = b.checked_on
        where = (f"; the compiler checked it on {built['kernels']}, onnxruntime {built['onnxruntime']}"
                 if built else "")
        fix = ("compile a bundle for this machine (conflayers-compile ... --target fp32, or --fallback-target "
               "fp32), or serve it with speculation off; please report this machine (its kernels and "
               "onnxruntime version above)")
        return (f"bundle {b.path}: its {b.target} target is not exact on this machine ({here['kernels']}, "
                f"onnxruntime {here['onnxruntime']}, {here['threads']} threads{where}): {verdict.problem}. "
                f"Speculative output could then differ from plain decoding, so the runtime refuses the bundle. "
                f"Fix: {fix}")

    @classmethod
    def load(cls, path: str, device: str = "cpu", max_context: int | None = None,
             num_threads: int | None = None, verify: bool = True, guard: bool = True,
             adapt: bool = True, limits: RequestLimits | None = None, check_exactness: bool = True,
             max_batch: int = 1, prefill_chunk: int = 32, spec_max_batch: int | None = None,
             prompt_cache: bool = True, prompt_cache_mb: float = 256, kv_cache: str = "float32") -> "Engine":
        return cls(Bundle.open(path, verify=verify), device, max_context, num_threads, guard, adapt, limits,
                   check_exactness, max_batch, prefill_chunk, spec_max_batch, prompt_cache, prompt_cache_mb,
                   kv_cache)

    @property
    def profiles(self) -> list[str]:
        return sorted(self.bundle.profiles)

    def adapt_policy(self, name: str) -> DraftPolicy | None:
        """The drafting policy of profile `name` on this machine (None: plain decoding is faster
        here). Chosen once, on first use: the profile's policy table with costs measured here;
        a profile without a table (or adapt=False) keeps its compiled policy. An n-gram or hybrid
        profile always drafts (n-gram proposals cost ~nothing); a hybrid's model part is adapted;
        a cascade keeps its compiled policy (see cascade.py). A profile in self.replan (tuned on
        another device) is adapted even with adapt=False, and without a table from its figures:
        its compiled policy where that is predicted to beat plain decoding here, else none."""
        drafter = self.drafters[name]
        model = drafter.model         # the model draft (None for an n-gram profile or a cascade)
        with self._adapt_lock:
            if name not in self.machine_costs:
                profile, costs = self.bundle.profiles[name], None
                rows = profile.policy_table
                if rows is None and name in self.replan:     # no table: its own policy or none, by its figures
                    rows = rows_from_figures(profile.policy, profile.figures)
                if model is not None and (self.adapt or name in self.replan) and rows:
                    width = max(r.k for r in rows) + 1
                    context = max(1, min(profile.cost_context, self.capacity - width - 1))
                    costs = probe.measure(self.full, model, self.spec, width, context,
                                          profile.verify_cost, self.device)
                    model.policy = choose_policy(rows, costs)
                ngram = ngram_part(drafter)
                if ngram is not None:
                    costs = self._ngram_costs(profile, ngram, costs)
                self.machine_costs[name] = costs
        return drafter.policy

    def _ngram_costs(self, profile, ngram: NGramDrafter, costs: MachineCosts | None) -> MachineCosts | None:
        """Give an n-gram drafter the verify curve its proposals are cut by (ngram.py): the one
        measured for the profile's model draft, else the full graph timed here at the profile's
        context (adapt), else the compiled curve where the profile has one (none: proposals are
        not cut). Returns the costs the guard then uses."""
        if costs is None and self.adapt:
            width = ngram.policy.max_tokens + 1
            context = max(1, min(profile.cost_context, self.capacity - width - 1))
            costs = probe.verify_curve(self.full, self.spec, width, context, self.device)
        if costs is not None:
            ngram.verify_cost = costs.verify_cost
        elif profile.verify_relative:
            ngram.verify_cost = profile.verify_cost
        return costs

    # -- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages=None, prompt_ids=None) -> list[int]:
        """The prompt's token ids, from exactly one of: text, chat messages (through the bundle's
        chat template) or token ids (checked against the vocabulary)."""
        given = [name for name, v in (("prompt", prompt), ("messages", messages), ("prompt_ids", prompt_ids))
                 if v is not None]
        if len(given) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_ids", given[-1] if given else "prompt")
        if messages is not None:
            if isinstance(messages, list) and len(messages) > self.limits.max_messages:
                raise RequestError(f"{{param}} has {len(messages)} messages, more than the limit of "
                                   f"{self.limits.max_messages}", "messages")
            try:
                return self.codec.encode_chat(messages)
            except ChatError as e:
                raise RequestError(str(e), "messages") from None
        if prompt_ids is not None:
            if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool)
                    and 0 <= t < self.spec.vocab_size for t in prompt_ids):
                raise RequestError(f"{{param}} must be a non-empty list of token ids in "
                                   f"0..{self.spec.vocab_size - 1}", "prompt_ids")
            return [int(t) for t in prompt_ids]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("{param} must be a non-empty string", "prompt")
        at = lone_surrogate(prompt)
        if at is not None:
            raise RequestError(f"{{param}} is not valid Unicode (a lone surrogate at character {at})", "prompt")
        return self.codec.encode(prompt, self.limits.special_tokens_in_prompt)

    def choose_profile(self, task: str | None, prompt_ids: list[int]) -> tuple[str | None, float | None]:
        if task is not None and not isinstance(task, str):
            raise RequestError("{param} must be a profile name or 'auto'", "task")
        if not self.drafters:
            return None, None
        if task is None:
            return self.bundle.default_profile, None
        if task == "auto":
            return self.selector.choose(prompt_ids)
        if task not in self.drafters:
            raise RequestError(f"unknown task {task!r}; this bundle has profiles: "
                               f"{', '.join(self.profiles) or '(none)'} (or use 'auto')", "task")
        return task, None

    def generate(self, prompt: str | None = None, *, messages=None, prompt_ids=None, task: str | None = None,
                 max_new_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
                 stream: bool = False, speculate: bool = True, deadline: float | None = None):
        """Generate a completion. Returns a GenerationResult, or with stream=True an iterator of
        StreamChunk whose last chunk carries the result. Greedy output (temperature 0) is
        token-identical to plain decoding with the full graph. max_new_tokens=None: up to
        DEFAULT_MAX_NEW_TOKENS, fewer when the prompt leaves less room in the context.
        Every argument is checked before the first token: RequestError (with .param) if invalid."""
        request = self.prepare(prompt, messages=messages, prompt_ids=prompt_ids, task=task,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, stop=stop, speculate=speculate, deadline=deadline)
        return stream_or_result(self._stream(request), stream)

    def prepare(self, prompt: str | None = None, *, messages=None, prompt_ids=None, task: str | None = None,
                max_new_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
                speculate: bool = True, deadline: float | None = None) -> Request:
        """Validate a request (generate's arguments) without generating: the one place requests
        are checked, so front ends can check a whole batch before any output."""
        try:
            sampler = Sampler(temperature, top_p, top_k, seed)
        except SamplingError as e:
            raise RequestError(str(e), e.param) from None
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            stops = []
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("{param} must be a non-empty string or a list of them", "stop")
        if len(stops) > self.limits.max_stop_strings or any(len(s) > self.limits.max_stop_chars for s in stops):
            raise RequestError(f"{{param}} takes at most {self.limits.max_stop_strings} strings of at most "
                               f"{self.limits.max_stop_chars} characters each", "stop")
        if not isinstance(speculate, bool):
            raise RequestError("{param} must be true or false", "speculate")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens <= 0):
            raise RequestError(f"{{param}} must be a positive integer, got {max_new_tokens!r}", "max_new_tokens")
        ids = self.encode(prompt, messages, prompt_ids)
        source = "messages" if messages is not None else "prompt_ids" if prompt_ids is not None else "prompt"
        if len(ids) > self.capacity:
            raise RequestError(f"the {{param}} is {len(ids)} tokens, longer than the context of "
                               f"{self.capacity} tokens; shorten it", source)
        room = self.capacity - len(ids) + 1     # the last token is returned, never fed back
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        if max_new_tokens > room:
            raise RequestError(f"prompt ({len(ids)} tokens) + {{param}} ({max_new_tokens}) exceeds the context "
                               f"of {self.capacity} tokens; lower {{param}} to at most {room}", "max_new_tokens")
        name, score = self.choose_profile(task, ids)      # also rejects an unknown task
        if not speculate:
            name, score = None, None
        # The guard decides from timings; when it turns drafting off mid-request, sampled output
        # takes another random path. A seeded sampled request must be reproducible: no guard.
        return Request(ids, name, score, sampler, max_new_tokens, list(stops),
                       use_guard=sampler.greedy or seed is None, deadline=deadline)

    def _stream(self, request: Request) -> Iterator[StreamChunk]:
        ids, name = request.ids, request.profile
        drafter = self.drafters.get(name) if name else None
        if drafter is not None and self.adapt_policy(name) is None:
            drafter = None            # no drafting policy pays on this machine: decode plainly
        costs = self.machine_costs.get(name) if drafter else None
        guard = (SpeculationGuard(costs.verify_cost if costs else self.bundle.profiles[name].verify_cost)
                 if drafter and self.use_guard and request.use_guard else None)
        seq = Sequence(ids, request.sampler, request.max_new_tokens, name if drafter else None,
                       drafter.bind(ids) if drafter else None, guard,
                       always_draft=not request.sampler.greedy and not request.use_guard)
        yield from self.present(self.scheduler.submit(seq), request, seq.stats, seq.name, len(ids), request.score)

    def present(self, loop: Iterator[list[int]], request, stats: DecodeStats, profile: str | None,
                prompt_tokens: int, score: float | None) -> Iterator[StreamChunk]:
        """The text side of a request, over the tokens a decoding loop yields (this engine's own
        loop or the batching scheduler's): detokenizing, stop strings held back until they cannot
        start one, the deadline, and the metrics on the last chunk."""
        stops = request.stops
        t0 = time.perf_counter()
        text_out = self.codec.stream()
        out_ids: list[int] = []
        shown = 0              # characters already yielded
        finish, ttft, stop_at = "length", None, None
        hold = max((len(s) for s in stops), default=1) - 1   # may be the start of a stop string
        for new in loop:
            if ttft is None:
                ttft = time.perf_counter() - t0
            ended = new[-1] in self.stop_ids
            if ended:
                new, finish = new[:-1], "stop"
            out_ids.extend(new)
            text_out.push(new)
            stop_at = _find_stop(text_out.text, stops, shown)
            if stop_at is not None or ended:
                break
            if request.deadline is not None and time.monotonic() >= request.deadline:
                break             # out of time: ends like max_new_tokens, finish_reason "length"
            safe = len(text_out.text) - hold
            if safe > shown:
                yield StreamChunk(text_out.text[shown:safe], new)
                shown = safe
            else:
                yield StreamChunk("", new)
        loop.close()
        total = time.perf_counter() - t0
        if stop_at is None:
            text_out.flush()
            stop_at = _find_stop(text_out.text, stops, shown)
        text = text_out.text if stop_at is None else text_out.text[:stop_at]
        if stop_at is not None:
            finish = "stop"
        metrics = GenerationMetrics(
            profile=profile, speculative=profile is not None,
            prompt_tokens=prompt_tokens, cached_prompt_tokens=stats.prompt_reused, completion_tokens=len(out_ids),
            draft_steps=stats.draft_steps, drafted_tokens=stats.drafted_tokens,
            accepted_tokens=stats.accepted_tokens, acceptance_rate=stats.acceptance_rate,
            mean_accepted_tokens=stats.mean_accepted_tokens,
            tokens_per_s=(stats.tokens - 1) / stats.decode_s if stats.decode_s > 0 else 0.0,
            time_to_first_token_s=ttft or 0.0, total_s=total, guard_stopped_at=stats.guard_stopped_at,
            selection_score=score)
        yield StreamChunk(text[shown:], [], GenerationResult(text, out_ids, finish, metrics,
                                                             list(stats.accept_lengths)))

def stream_or_result(chunks: Iterator[StreamChunk], stream: bool):
    """generate's return value: the chunks themselves, or the result their last one carries."""
    if stream:
        return chunks
    last = None
    for last in chunks:
        pass
    return last.result


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index of the earliest stop string in text that ends after `start`, or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
