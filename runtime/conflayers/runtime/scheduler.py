"""The one decoding loop. Every request is a slot of one batched KV cache; a request alone is a
batch of one. Plain, model-draft, n-gram, hybrid and cascade decoding all run here, alone or
together, by the same rules (the shape of gpt-fast's generate.py: prefill, then draft, verify in
one pass, keep the agreed prefix plus the target's own next token; and of vLLM's scheduler: one
loop over slots).

One step:
  1 admit   waiting requests take free slots; cancelled or finished ones leave
  2 plan    each decoding sequence's budget: the tokens it may still take (its max_new_tokens, the
            full graph's verify boundaries), how many of them a model draft may propose (alone: its
            drafter's policy for this machine, until the speculation guard turns drafting off; in a
            batch of n: the batch planner's draft length for n, batchplan.py) and whether n-gram
            proposals are taken; the batch guard may run a step of a batch without drafts, to
            measure what drafting gives there (batchguard.py)
  3 draft   each drafter begins its proposal (drafter.py); the draft passes they ask for run
            batched, one pass per draft body over the sequences that need it, then one per head,
            until every proposal is complete (n-gram proposals need none)
  4 verify  one full-graph pass: a prompt chunk of one sequence still prefilling (all of its prompt
            that fits when nothing else decodes; else prefill_chunk tokens beside one or two
            decoding sequences and 2 x prefill_chunk / n beside n, at least MIN_CHUNK: each row
            of a chunk delays every decoding stream, so the chunk shrinks as they grow, and a long
            prompt never stalls running streams for long) and every decoding sequence's token +
            drafts
  5 keep    per sequence the agreed prefix + the target's next token (sampling: the rejection
            rule); drafters and the guard learn from it; tokens go to the request's stream

Prompt cache: a slot keeps the KV of the last sequence that left it, and a new request takes the
free slot whose kept tokens share the longest prefix with its prompt, prefilling only the rest
(a shared system prompt, a repeated question, a conversation's earlier turns); the KV of recent
sequences also stays in host memory within a budget (promptstore.py), copied into a slot when it
shares more with a prompt than any free slot keeps. Exact for the same
reason chunked prefill is: the kept positions hold the full graph's own KV of those very tokens
(drafts read the target's KV and never keep their own), and every pass computes a position as
any other pass would. Idle slots' scratch rows land past what they keep.

Exact, request by request: every pass computes each row as a one-token step does (contract.py,
checked at load by exactness.py), attention is computed per sequence, and every sequence has its
own sampler, drawn in the same order alone or batched, so a request's output is bit for bit its
solo output whatever else runs beside it. Passes never reach past the full graph's verify
boundaries (prefill chunks included).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from .drafter import NOTHING, Budget, DraftJob
from .packing import BatchedKVCache, PackedGraph
from .promptstore import PromptStore, common_prefix
from .sampling import Sampler
from .speculation import DecodeStats, SpeculationGuard

_DONE = object()
PREFILL_ALONE = 2048          # the longest prefill pass when nothing else decodes (bounds its memory)
MIN_CHUNK = 4                 # the fewest prompt tokens a step takes beside decoding sequences


class SchedulerClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Sequence:
    """One request in the loop (owned by the scheduler once admitted)."""
    ids: list                                # the prompt's token ids
    sampler: Sampler
    max_new_tokens: int
    name: str | None = None                  # its profile (None: plain decoding)
    drafter: object | None = None            # its bound drafter (drafter.py), None for plain decoding
    guard: SpeculationGuard | None = None
    always_draft: bool = False               # seeded sampling: draft as alone whatever the batch
    out: queue.Queue = field(default_factory=queue.Queue)
    stats: DecodeStats = field(default_factory=DecodeStats)
    slot: int = -1
    fed: int = 0                             # prompt tokens already in the cache
    length: int = 0                          # valid cache positions
    cached: list = field(default_factory=list)   # the tokens at the valid positions (what the slot keeps)
    token: int | None = None                 # last token out, not yet in the cache
    job: DraftJob | None = None              # this step's proposal
    proposed: bool = False                   # this step's proposal is an n-gram one (batchplan)
    cancelled: bool = False
    t_start: float = 0.0
    t_decode: float = 0.0

    @property
    def next_pos(self) -> int:
        """The first cache position nothing valid lives at (where a scratch row may be written)."""
        if self.token is None:
            return self.fed
        return self.length + (len(self.job.tokens) if self.job is not None else 0)


class Scheduler:
    """The loop over a full graph (GraphRunner) and the drafts sequences bring, over `max_batch`
    KV cache slots (1: requests one at a time). Threaded: submit() from any number of threads (the
    loop starts its thread on the first); or drive() one sequence in the caller's thread.
    `planner` (batchplan.BatchPlanner): how far sequences draft in a batch; None: as alone."""

    def __init__(self, full, spec, capacity: int, stop_ids=frozenset(), max_batch: int = 1,
                 prefill_chunk: int = 32, planner=None, providers=None, num_threads: int | None = None,
                 device: str = "cpu", cache=None, prompt_cache: bool = True, prompt_store_mb: float = 0):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.max_batch, self.prefill_chunk = int(max_batch), int(prefill_chunk)
        self.capacity, self.stop_ids = int(capacity), frozenset(stop_ids)
        self.cache = BatchedKVCache(spec, self.max_batch, self.capacity, device, solo=cache, dtype=full.kv_dtype)
        self._graphs = (providers, num_threads)
        self.graph = full
        self.full = PackedGraph(full, self.cache, providers, num_threads)
        self.full.prepare()                               # every width now: no request waits for one
        self.bodies: dict[int, PackedGraph] = {}         # id(draft body runner) -> its packed graph
        self.planner = planner
        self._pending: list[Sequence] = []
        self._slots: list[Sequence | None] = [None] * self.max_batch
        self.prompt_cache = bool(prompt_cache)
        self._kept: list[list[int]] = [[] for _ in range(self.max_batch)]   # per free slot: tokens with valid KV
        # host copies of recent sequences' KV (CPU: the slots are host buffers)
        self.store = PromptStore(int(prompt_store_mb * 2 ** 20), spec.num_layers) \
            if self.prompt_cache and prompt_store_mb > 0 and device == "cpu" else None
        self._order: list[Sequence] = []                  # admitted, oldest first
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        self.steps = 0
        self._drafting = True                             # this step may draft (the batch guard)

    def packed(self, body) -> PackedGraph:
        """The packed graph of a draft body (GraphRunner) over this loop's cache."""
        if id(body) not in self.bodies:
            self.bodies[id(body)] = PackedGraph(body, self.cache, *self._graphs)
            self.bodies[id(body)].prepare()
        return self.bodies[id(body)]

    # -- requests -----------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    def submit(self, seq: Sequence):
        """The token lists of `seq` as the loop makes them (closing the iterator cancels it)."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="conflayers-scheduler", daemon=True)
                self._thread.start()
            seq.t_start = time.perf_counter()
            self._pending.append(seq)
            self._cond.notify_all()
        try:
            while True:
                item = seq.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._cond:
                seq.cancelled = True          # a no-op once finished; else frees the slot next step
                if seq in self._pending:
                    self._pending.remove(seq)
                self._cond.notify_all()

    def drive(self, seq: Sequence):
        """The token lists of `seq`, the loop run in this thread for it alone (the loop's thread
        must not run: the compiler's validation and tools decode this way)."""
        if self._thread is not None:
            raise RuntimeError("drive() on a scheduler whose thread runs: use submit()")
        seq.t_start = time.perf_counter()
        self._pending.append(seq)
        try:
            while self._admit():
                self._step()
                while not seq.out.empty():
                    item = seq.out.get()
                    if item is _DONE:
                        return
                    yield item
        finally:
            self._leave(seq)
            if seq in self._pending:
                self._pending.remove(seq)

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._admit():
                    self._cond.wait()
                if self._closed:
                    for s in self._order + self._pending:
                        s.out.put(SchedulerClosed("the engine was closed"))
                    return
            try:
                self._step()
            except Exception as e:      # noqa: BLE001 - every request in the batch gets the error
                with self._cond:
                    for s in list(self._order):
                        s.out.put(e)
                        self._leave(s, keep=False)

    def _admit(self) -> bool:
        """Drop cancelled sequences, admit waiting ones into free slots; True when any is active."""
        for s in list(self._order):
            if s.cancelled:
                self._leave(s)
        while self._pending and None in self._slots:
            s = self._pending.pop(0)
            free = [b for b, x in enumerate(self._slots) if x is None]
            shared = {b: common_prefix(self._kept[b], s.ids) for b in free} if self.prompt_cache else {}
            # the longest shared prefix; else the slot keeping least, so useful prefixes stay longer
            s.slot = max(free, key=lambda b: (shared.get(b, 0), -len(self._kept[b])))
            # the prompt's last token is always fed: its logits give the first new token
            reused = min(shared.get(s.slot, 0), len(s.ids) - 1)
            if self.store is not None:
                key, n = self.store.longest(s.ids)
                n = min(n, len(s.ids) - 1)
                if n > reused:               # host memory holds more of it than any free slot
                    s.slot = min(free, key=lambda b: len(self._kept[b]))
                    self.store.load(key, n, self.cache.slot[s.slot])
                    reused = n
            s.fed, s.cached = reused, list(s.ids[:reused])
            s.stats.prompt_reused = reused
            self._kept[s.slot] = []
            self.cache.slot[s.slot].reset()
            self._slots[s.slot] = s
            self._order.append(s)
        return bool(self._order)

    def _leave(self, s: Sequence, keep: bool = True):
        """Free `s`'s slot; it keeps the KV of `s`'s valid positions for the next request (not
        after a failed pass, which may have left them half-written)."""
        if s.slot >= 0 and self._slots[s.slot] is s:
            self._slots[s.slot] = None
            self._kept[s.slot] = s.cached if keep and self.prompt_cache else []
            if self.store is not None and self._kept[s.slot]:
                self.store.put(s.cached, self.cache.slot[s.slot])
        if s in self._order:
            self._order.remove(s)

    def _empty_segments(self) -> list[tuple[list, int]]:
        """A pass's segments before any tokens go in: per slot where a scratch row may be
        written, past its sequence's valid positions or, for a free slot, past the KV it keeps."""
        return [([], s.next_pos) if s is not None else ([], len(self._kept[b])) for b, s in enumerate(self._slots)]

    def _finish(self, s: Sequence):
        s.out.put(_DONE)
        with self._cond:
            self._leave(s)

    def _step(self):
        self.steps += 1
        order = [s for s in self._order if not s.cancelled]
        decoding = [s for s in order if s.token is not None]
        prefill = next((s for s in order if s.token is None), None)
        # the batch counts the sequences still prefilling too (they join within a few steps)
        t0 = time.perf_counter()
        self._drafting = self.planner is None or self.planner.drafting_allowed(len(order))
        # what the batch guard learns from: batched steps of decoding sequences only
        guarded = self.planner is not None and prefill is None and len(decoding) > 1 \
            and any(s.drafter is not None for s in decoding)
        before = sum(s.stats.tokens for s in decoding) if guarded else 0
        for s in decoding:
            self._plan(s, len(order))
        self._draft([s for s in decoding if s.job is not None])
        t1 = time.perf_counter()
        chunk = self._prefill_chunk(prefill, decoding) if prefill is not None else []
        segments = self._empty_segments()
        rows, where, at = [], {}, 0
        for b, s in enumerate(self._slots):
            if s is prefill and chunk:
                segments[b] = (chunk, prefill.fed)
                if prefill.fed + len(chunk) == len(prefill.ids):
                    where[id(s)] = len(rows)
                    rows.append(at + len(chunk) - 1)
                at += len(chunk)
            elif s is not None and s in decoding:
                toks = [s.token] + (s.job.tokens if s.job is not None else [])
                segments[b] = (toks, s.length)
                where[id(s)] = len(rows)
                rows.extend(range(at, at + len(toks)))
                at += len(toks)
        if not rows and not chunk:
            return
        # a sampled sequence needs every logit exact (the screened head, head.py); greedy ones the argmax
        logits = self.full.run(segments, rows, full_logits=any(not s.sampler.greedy for s in order))
        t2 = time.perf_counter()
        if prefill is not None and chunk:
            self._prefilled(prefill, chunk, logits[where[id(prefill)]] if id(prefill) in where else None)
        alone = len(order) == 1
        for s in decoding:
            r = where[id(s)]
            self._keep(s, logits[r:r + 1 + (len(s.job.tokens) if s.job is not None else 0)],
                       (t1 - t0, t2 - t1) if alone else None)
        if guarded:
            self.planner.observe_step(len(decoding), self._drafting,
                                      sum(s.stats.tokens for s in decoding) - before, time.perf_counter() - t0)

    def _prefill_chunk(self, s: Sequence, decoding: list) -> list[int]:
        """This step's prompt tokens of a prefilling sequence: all that fit when nothing else
        decodes, else prefill_chunk beside 1-2 decoding sequences and 2 x prefill_chunk / n beside
        n (at least MIN_CHUNK: the delay the chunk adds, summed over the streams it delays, stays
        about the same); never past a verify boundary."""
        if decoding:
            size = min(self.prefill_chunk, max(MIN_CHUNK, 2 * self.prefill_chunk // len(decoding)))
        else:
            size = PREFILL_ALONE
        room = self.graph.pass_room(s.fed)
        if room is not None:
            size = max(1, min(size, room))
        return s.ids[s.fed:s.fed + size]

    def _prefilled(self, s: Sequence, chunk: list[int], last_logits):
        s.fed += len(chunk)
        s.cached.extend(chunk)
        if s.fed < len(s.ids):
            return
        s.length = s.fed
        tok = s.sampler.pick(last_logits)
        s.token = tok
        s.stats.prefill_s = time.perf_counter() - s.t_start
        s.stats.tokens = 1
        s.t_decode = time.perf_counter()
        s.out.put([tok])
        if tok in self.stop_ids or s.max_new_tokens <= 1:
            self._finish(s)

    def _plan(self, s: Sequence, batch: int):
        """This step's proposal of a decoding sequence (step 2 of the module docstring)."""
        s.job, s.proposed = None, False
        if s.drafter is None:
            return
        limit = s.max_new_tokens - s.stats.tokens - 1   # the verify adds a token of its own
        room = self.graph.verify_room(s.length)
        if room is not None:
            limit = min(limit, room)
        budget = self._budget(s, batch, max(limit, 0))
        # every step, drafting or not: the drafter follows the text (an n-gram index)
        job = s.drafter.begin(s.token, s.length, s.sampler, budget)
        if job.kind == "ngram":            # a lookup (maybe empty: a verify of one token)
            s.job = job if budget.ngram else None
        else:                              # a model draft, unless its budget left it none
            s.job = job if job.tokens or job.next_pass() is not None else None
        s.proposed = s.job is not None and job.kind == "ngram"

    def _budget(self, s: Sequence, batch: int, limit: int) -> Budget:
        if limit <= 0 or (s.guard is not None and not s.guard.drafting()):
            return NOTHING
        if batch <= 1 or s.always_draft or self.planner is None:
            return Budget.alone(limit)
        if not self._drafting:
            return Budget(limit, 0, False)
        k = self.planner.draft_length(s.name, batch)
        return Budget(limit, min(limit, k or 0), self.planner.ngram_proposes(s.name, batch))

    def _draft(self, drafting: list[Sequence]):
        """The proposals' draft passes (step 3): per round, one packed pass per draft body over the
        sequences whose proposal needs it next, then one run of each head over its rows."""
        going = list(drafting)
        while True:
            asks = [(s, s.job.next_pass()) for s in going]
            asks = [(s, p) for s, p in asks if p is not None]
            if not asks:
                return
            by_body: dict[int, list] = {}
            for s, p in asks:
                by_body.setdefault(id(p.body), []).append((s, p))
            for group in by_body.values():
                packed = self.packed(group[0][1].body)
                segments = self._empty_segments()
                rows, spans, at = [], [], 0
                for b in range(self.max_batch):     # slot order: the packed rows' order
                    for s, p in group:
                        if s.slot == b:
                            segments[b] = (p.tokens, p.start)
                            spans.append((s, p, len(rows)))
                            rows.extend(range(at, at + len(p.tokens)))
                            at += len(p.tokens)
                hidden = packed.run(segments, rows)
                by_head: dict[int, list] = {}
                for s, p, r in spans:
                    by_head.setdefault(id(p.head), []).append((s, p, r))
                for members in by_head.values():
                    head = members[0][1].head
                    idx = [r + j for _, p, r in members for j in range(len(p.tokens))]
                    z = head.run_head(hidden[idx][None])[0]
                    at = 0
                    for s, p, _ in members:
                        s.job.take(z[at:at + len(p.tokens)])
                        at += len(p.tokens)
            going = [s for s, _ in asks]

    def _keep(self, s: Sequence, logits, timing):
        """Step 5 for one decoding sequence: logits [1 + drafted, V] of its verify rows; `timing`
        (draft s, verify s) when it was alone in the step (what the guard learns from)."""
        st, job = s.stats, s.job
        if job is not None:
            n, nxt = s.sampler.verify(job.tokens, job.probs, logits)
            st.draft_steps += 1
            st.drafted_tokens += len(job.tokens)
            st.accepted_tokens += n
            st.accept_lengths.append(n)
            new = job.tokens[:n] + [nxt]
            if s.proposed and self.planner is not None:
                self.planner.observe_proposal(s.name, len(job.tokens), n)
        else:
            n, new = 0, [s.sampler.pick(logits[0])]
        if s.guard is not None and s.guard.active:      # it learns from drafting and plain steps alike
            if job is None:
                s.guard.record_plain(sum(timing) if timing is not None else None)
            elif timing is not None:
                s.guard.record(n + 1, len(job.tokens), *timing)
            if not s.guard.active:
                st.guard_stopped_at = st.tokens + len(new)
        if s.drafter is not None:
            s.drafter.feedback(job.tokens if job is not None else [], n)
        st.full_passes += 1
        s.cached.append(s.token)              # the verify wrote the target's KV of these
        s.cached.extend(job.tokens[:n] if job is not None else [])
        s.length += len(new)
        s.job = None
        for j, t in enumerate(new):
            if t in self.stop_ids:
                new = new[:j + 1]
                break
        new = new[:s.max_new_tokens - st.tokens]
        st.tokens += len(new)
        st.decode_s = time.perf_counter() - s.t_decode
        s.token = new[-1]
        s.out.put(new)
        if new[-1] in self.stop_ids or st.tokens >= s.max_new_tokens:
            self._finish(s)

