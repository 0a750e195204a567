"""Continuous batching: many requests decoded together, one full-graph pass per step.

    from conflayers.runtime import Engine
    from conflayers.runtime.batching import BatchedEngine
    batched = BatchedEngine(Engine.load("bundles/smollm2-135m-instruct"), max_batch=8)
    result = batched.generate("What is 17 * 23?", max_new_tokens=64)   # from any number of threads

A scheduler thread owns a batched KV cache of `max_batch` slots. At each step boundary it admits
waiting requests into free slots, runs one chunk (at most `prefill_chunk` tokens) of one
newcomer's prompt, then one batched step over every sequence already decoding: for the requests
that draft, one batched draft pass per draft position (one per draft body) and one batched full
pass that verifies every request's drafts and steps the plain ones. A stream already decoding
therefore never waits longer than one prefill chunk, and a finished or cancelled request leaves
its slot at the next step boundary without stalling the others.

Exactness. Rows of a batched pass are ragged (1 token for a plain step, k+1 for a verify): every
row feeds the pass's width S, a shorter one padded after its last real token, and the padding's
KV is written past the sequence's length (never read: each later pass rewrites those positions
before attending to them). GroupQueryAttention computes each sequence separately, the masked
tail of a row contributes exact zeros, and the matrix products compute each row alike whatever
the number of rows (the property that makes a verify pass equal single steps, see
export/decoder_graph.py), so each request's logits are bit for bit those of its solo run
(measured on the tiny bundle and SmolLM2, fp32 and native; tests/test_batching.py asserts it):
greedy output equals Engine.generate's, request by request, whatever joins, leaves or is
cancelled around it. A seeded sampled request always drafts as it would alone (the batch rule
below and the guard do not apply to it), so it reproduces its solo sample too.

Speculation and batch size. Batching and speculation both spend spare compute; on a CPU the
batch soon uses it all. Each step, with n sequences in the batch (decoding or still prefilling),
a greedy request drafts with its profile's model draft only as far as `draft_length(profile, n)`
says (the draft length whose predicted tokens/s beats batched plain decoding most, or none), and
takes n-gram proposals only where `ngram_proposes(profile, n)`: predictions from what the batched
passes cost on this machine, measured through the packed graphs when the engine starts
(batchcost.py), and for n-gram proposals from their acceptance as served (proposal_rate). A
seeded sampled request always drafts as alone.

Drafters: a model profile drafts in the batch; a cascade drafts with its top stage alone (the
stages' check passes are not batched yet); an n-gram profile proposes from its own index per
sequence (no pass at all) and a hybrid proposes as alone (NGramIndex match, else its model draft
in the batched draft passes), so every kind's drafts join the one batched verify pass.

CPU only (the slots are views of one host buffer); bundles written before the graphs had a batch
dimension are refused with a message saying to recompile.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnxruntime as ort

from .cascade import CascadeDrafter
from .decoding import DecodeStats
from .drafter import LayerSkipDrafter, draft_token
from .engine import Engine, Request, StreamChunk, stream_or_result
from .modelspec import ModelSpec
from .ngram import BoundNGramDrafter, HybridDrafter, NGramDrafter, one_hot
from .ort_backend import GraphRunner, create_session
from . import batchcost, contract

OBSERVE_AFTER = 64          # verified n-gram proposals before their served rate replaces the figures


class BatchingError(RuntimeError):
    """The bundle, device or environment cannot be served by the batched engine."""


# -- the packed graph ---------------------------------------------------------------------------
def pack_graph(path: str, slots: int) -> tuple[bytes, bool]:
    """The decoder graph at `path` (full or draft body) rewritten for `slots` sequences packed
    along its sequence axis. Returns (serialized model, whether its attention pads a row).

    Every node but attention computes each position on its own, so it runs on the packed rows
    unchanged. Each GroupQueryAttention node becomes one per slot: its rows are split by
    `seg_lens`, each slot's segment gets exactly what the solo graph gives it (the extra row of a
    padded full graph included) and its own KV buffers (past_key.{i}.{b} bound as both past and
    present), and the results are concatenated again. An empty segment attends with one zero row,
    written at the slot's length and dropped. The final Slice from `logits_from` becomes a Gather
    of `rows` (the positions whose logits or hidden states are wanted).

    Inputs:  input_ids [1, T], seg_lens [N] int64 (sum T), seqlens_k [N] int32 (the solo graph's
             value per slot: start + n - 1; for an empty segment the row lands at seqlens_k + 1
             when padded, seqlens_k otherwise), rows [R] int64, past_key.{i}.{b}, past_value.{i}.{b}
    Outputs: logits or hidden [1, R, W], present_key.{i}.{b}, present_value.{i}.{b}
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise BatchingError("the batched engine derives its graphs with the `onnx` package: "
                            "pip install 'onnx>=1.17'") from None
    model = onnx.load(path, load_external_data=False)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    padded = any(n.name == contract.ATTENTION_PAD[0] for n in g.node)
    N = int(slots)
    new: list = []
    skip: set[int] = set()
    consts: list = []
    counter = [0]

    def op(op_type, inputs, n_out=1, domain="", **attrs):
        counter[0] += 1
        base = f"pack/{op_type}_{counter[0]}"
        outs = [f"{base}/out{j}" for j in range(n_out)]
        new.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(name, array):
        consts.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    zero_i64, one_i64 = const("pack/zero", np.array([0], np.int64)), const("pack/one", np.array([1], np.int64))
    minus_one, axis1 = const("pack/minus_one", np.array([-1], np.int64)), const("pack/axis1", np.array([1], np.int64))
    big = const("pack/max", np.array([np.iinfo(np.int64).max], np.int64))
    one_i32 = const("pack/one_i32", np.array(1, np.int32))
    fzero = const("pack/fzero", np.array(0.0, np.float32))
    per_slot = []            # (n_b [1] int64, min(n_b, 1), seqlens_b [1] int32, total_b [1] int32)
    for b in range(N):
        idx = const(f"pack/slot{b}", np.array([b], np.int64))
        n_b = op("Gather", ["seg_lens", idx])
        s_b = op("Gather", ["seqlens_k", idx])
        if padded:
            s_b = op("Add", [s_b, one_i32])
        per_slot.append((n_b, op("Min", [n_b, one_i64]), s_b, op("Add", [s_b, one_i32])))
    setup, new = new, []

    kv_dims = {}
    for x in g.input:
        if x.name.startswith("past_key."):
            kv_dims[x.name] = x.type.tensor_type.shape
    gqa_nodes = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa_nodes:
        raise BatchingError(f"{path} has no GroupQueryAttention node")
    rewrite: dict[int, list] = {}
    dropped_io: set[str] = {"total_seq_len", "logits_from"}
    added_in, added_out = [], []
    for n in gqa_nodes:
        layer = n.input[3][len("past_key."):]
        srcs = []
        for x in n.input[:3]:
            if not x:
                srcs.append("")
                continue
            if padded:          # Pad(x, edge) (or, older graphs, Concat([x, Slice(x, -1:)])) -> x
                pad = producer[x]
                mode = {a.name: helper.get_attribute_value(a) for a in pad.attribute}.get("mode")
                if pad.op_type == "Pad" and mode == b"edge":
                    skip.add(id(pad))
                else:
                    last = producer.get(pad.input[1]) if len(pad.input) > 1 else None
                    if pad.op_type != "Concat" or last is None or last.op_type != "Slice" or last.input[0] != pad.input[0]:
                        raise BatchingError(f"{path}: unexpected attention padding before {n.name}")
                    skip.update((id(pad), id(last)))
                srcs.append(pad.input[0])
            else:
                srcs.append(x)
        out_name = n.output[0]
        if padded:              # Slice(attn, 0, -1) drops the extra row
            (trim,) = consumers[n.output[0]]
            if trim.op_type != "Slice":
                raise BatchingError(f"{path}: unexpected attention output of {n.name}")
            skip.add(id(trim))
            out_name = trim.output[0]
        for j in (1, 2):        # the present outputs: graph outputs, or (older graphs) Identity nodes'
            dropped_io.add(n.output[j])
            for c in consumers.get(n.output[j], []):
                skip.add(id(c))
                dropped_io.add(c.output[0])
        dropped_io.update((n.input[3], n.input[4]))
        segs, zeros = [], []
        for src in srcs:
            if not src:
                segs.append(None)
                zeros.append(None)
                continue
            segs.append(op("Split", [src, "seg_lens"], n_out=N, axis=1) if N > 1 else [op("Identity", [src])])
            zeros.append(op("Mul", [op("Slice", [src, zero_i64, one_i64, axis1]), fzero]))
        outs = []
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for b in range(N):
            n_b, has_b, s_b, total_b = per_slot[b]
            ins = []
            for seg, zero in zip(segs, zeros):
                if seg is None:
                    ins.append("")
                    continue
                with_zero = op("Concat", [zero, seg[b]], axis=1)
                if padded:      # + the last row (the zero row when the segment is empty)
                    ins.append(op("Concat", [seg[b], op("Slice", [with_zero, minus_one, big, axis1])], axis=1))
                else:           # the segment, or the zero row alone when it is empty
                    ins.append(op("Slice", [with_zero, has_b, big, axis1]))
            pk, pv = f"past_key.{layer}.{b}", f"past_value.{layer}.{b}"
            counter[0] += 1
            name = f"pack/L{layer}/s{b}/attn"
            o = [f"{name}/out{j}" for j in range(3)]
            o[1:] = [f"present_key.{layer}.{b}", f"present_value.{layer}.{b}"]
            new.append(helper.make_node("GroupQueryAttention", ins + [pk, pv, s_b, total_b] + list(n.input[7:]),
                                        o, name=name, domain=n.domain, **attrs))
            outs.append(op("Slice", [o[0], zero_i64, n_b, axis1]))
            shape = [d.dim_value or d.dim_param for d in kv_dims[n.input[3]].dim]
            for nm in (pk, pv):
                added_in.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, shape))
            for nm in (f"present_key.{layer}.{b}", f"present_value.{layer}.{b}"):
                added_out.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, shape))
        new.append(helper.make_node("Concat", outs, [out_name], name=f"pack/L{layer}/concat", axis=1))
        rewrite[id(n)], new = new, []

    nodes = list(setup)
    for n in g.node:
        if id(n) in skip or n.name in contract.ATTENTION_PAD:
            continue
        if id(n) in rewrite:
            nodes.extend(rewrite[id(n)])
        elif n.op_type == "Slice" and n.name.startswith("keep_positions"):
            nodes.append(helper.make_node("Gather", [n.input[0], "rows"], list(n.output), name=n.name, axis=1))
        else:
            nodes.append(n)
    inputs = [x for x in g.input if x.name not in dropped_io and x.name != "seqlens_k"]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [N]),
               helper.make_tensor_value_info("seg_lens", TensorProto.INT64, [N]),
               helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])] + added_in
    outputs = [x for x in g.output if x.name not in dropped_io] + added_out
    used = {x for n in nodes for x in n.input}
    stale = used & dropped_io
    if stale:
        raise BatchingError(f"{path}: cannot pack the graph (still uses {sorted(stale)})")
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    g.initializer.extend(consts)
    return model.SerializeToString(), padded


class SlotCache:
    """One slot of a BatchedKVCache as a batch-1 KVCache (views, no copy)."""

    def __init__(self, owner: "BatchedKVCache", slot: int):
        self.capacity = owner.capacity
        self.length = 0
        self.device = "cpu"
        self.keys = {i: ort.OrtValue.ortvalue_from_numpy(a[slot:slot + 1]) for i, a in owner.k.items()}
        self.values = {i: ort.OrtValue.ortvalue_from_numpy(a[slot:slot + 1]) for i, a in owner.v.items()}

    def reset(self):
        self.length = 0


class BatchedKVCache:
    """KV buffers of `slots` sequences, [slots, kv_heads, capacity + KV_SPARE, head_dim] per layer
    (+ the spare slot a padding row writes, as KVCache)."""

    def __init__(self, spec: ModelSpec, slots: int, capacity: int):
        self.slots, self.capacity = int(slots), int(capacity)
        shape = (self.slots, spec.num_kv_heads, self.capacity + contract.KV_SPARE, spec.head_dim)
        self.k = {i: np.zeros(shape, np.float32) for i in range(spec.num_layers)}
        self.v = {i: np.zeros(shape, np.float32) for i in range(spec.num_layers)}
        self.slot = [SlotCache(self, b) for b in range(self.slots)]


class PackedGraph:
    """A packed graph (pack_graph) bound to every slot of a BatchedKVCache."""

    def __init__(self, path: str, kv_layers: list[int], output: str, cache: BatchedKVCache,
                 providers: list[str], num_threads: int | None, solo: GraphRunner | None = None):
        data, self.padded = pack_graph(path, cache.slots)
        # a pass with a single sequence runs the solo graph on its slot: the same result (it is
        # the solo computation) without the empty slots' attention nodes
        self.solo = None if solo is None else [solo.bind(slot) for slot in cache.slot]
        self.session = create_session(data, providers, num_threads, external_dir=os.path.dirname(path))
        self.cache, self.output = cache, output
        b = self.session.io_binding()
        for s, slot in enumerate(cache.slot):
            for i in kv_layers:
                b.bind_ortvalue_input(f"past_key.{i}.{s}", slot.keys[i])
                b.bind_ortvalue_output(f"present_key.{i}.{s}", slot.keys[i])
                b.bind_ortvalue_input(f"past_value.{i}.{s}", slot.values[i])
                b.bind_ortvalue_output(f"present_value.{i}.{s}", slot.values[i])
        self.binding = b

    def run(self, segments: list[tuple[list[int], int]], rows: list[int]) -> np.ndarray:
        """segments[b] = (tokens, start) of slot b (tokens may be empty: start is then the slot's
        length, where a scratch row is written); returns the output rows `rows` (indices into the
        packed tokens) as [len(rows), width]."""
        lens = np.array([len(t) for t, _ in segments], np.int64)
        busy = np.flatnonzero(lens)
        if self.solo is not None and len(busy) == 1 and list(rows) == list(range(int(lens.sum()))):
            toks, start = segments[busy[0]]      # (a decoding step: every row wanted)
            return self.solo[busy[0]].run(toks, start)
        for toks, start in segments:
            if start + len(toks) > self.cache.capacity:
                raise ValueError(f"context length {start + len(toks)} exceeds the KV cache capacity "
                                 f"{self.cache.capacity}")
        pad = self.padding
        wanted = len(rows)
        if pad is not None:
            segments, rows = _pad_segments(segments, rows, pad)
            lens = np.array([len(t) for t, _ in segments], np.int64)
            if (pad.single and wanted == 1) or (wanted > 1 and contract.single_row(wanted)):
                rows = list(rows) + [rows[-1]]     # the head never computes a lone row either
        ids = np.fromiter((t for toks, _ in segments for t in toks), np.int64, int(lens.sum())).reshape(1, -1)
        seqlens = np.empty(len(segments), np.int32)
        for b, (toks, start) in enumerate(segments):
            seqlens[b] = start + len(toks) - 1 if toks or self.padded else start
        bind = self.binding
        bind.bind_cpu_input(contract.INPUT_IDS, ids)
        bind.bind_cpu_input("seg_lens", lens)
        bind.bind_cpu_input(contract.SEQLENS, seqlens)
        bind.bind_cpu_input("rows", np.asarray(rows, np.int64))
        bind.bind_output(self.output, "cpu")
        self.session.run_with_iobinding(bind)
        return bind.get_outputs()[-1].numpy()[0][:wanted]

    @property
    def padding(self):
        """The full graph's padding on this machine (the solo graph's, set by the engine's load
        check); drafts: None."""
        return None if self.solo is None else self.solo[0].graph.padding


def _pad_segments(segments, rows, pad: contract.Padding):
    """A packed pass padded as `pad` pads a solo pass (contract.py): each busy segment gets the
    padding row its solo pass would, and where the product's rows are then 128 j + 1 one more row
    goes to an idle slot (a scratch token where nothing valid lives) or, with none idle, to the
    longest segment. Returns the segments and `rows` renumbered into the padded packing."""
    segments = [(list(t), st) for t, st in segments]
    lens = [len(t) for t, _ in segments]
    extra = [int(n > 0 and (pad.every or (pad.single and n == 1))) for n in lens]
    if contract.single_row(sum(lens) + sum(extra)):
        idle = [b for b, n in enumerate(lens) if not n]
        if idle:
            extra[idle[0]] = 1          # a scratch token (its output is never read)
            segments[idle[0]][0].append(0)
        else:
            extra[max(range(len(lens)), key=lens.__getitem__)] += 1
    where, at = [], 0                    # old packed index -> new packed index
    for (toks, _), n, e in zip(segments, lens, extra):
        where.extend(range(at, at + n))
        at += n + e
        toks.extend(toks[-1:] * (n + e - len(toks)))
    return segments, [where[r] for r in rows]


# -- the scheduler ------------------------------------------------------------------------------
@dataclass
class _Seq:
    """One request in the batch (owned by the scheduler thread once admitted)."""
    request: Request
    drafter: LayerSkipDrafter | None         # its model draft with a policy, or None
    ngram: BoundNGramDrafter | None          # its n-gram proposer (n-gram and hybrid profiles)
    name: str | None                         # its profile
    out: queue.Queue
    always_draft: bool                       # seeded sampling: draft as alone, whatever the batch
    stats: DecodeStats = field(default_factory=DecodeStats)
    slot: int = -1
    fed: int = 0                             # prompt tokens already in the cache
    length: int = 0                          # valid cache positions
    token: int | None = None                 # last token out, not yet in the cache
    drafted: list = field(default_factory=list)
    draft_q: list | None = None
    speculating: bool = False                # drafts this step
    proposed: bool = False                   # this step's drafts are an n-gram proposal
    drafting: bool = False                   # still drafting in this step's draft passes
    cancelled: bool = False
    t_start: float = 0.0
    t_decode: float = 0.0

    @property
    def next_pos(self) -> int:
        """The first cache position nothing valid lives at (where a scratch row may be written)."""
        if self.token is None:
            return self.fed
        return self.length + len(self.drafted)


_DONE = object()


class BatchedEngine:
    """Continuous batching over an Engine's bundle (see the module docstring). Thread-safe:
    generate() from any number of threads; one scheduler thread runs the passes. Attributes it
    does not define (prepare, profiles, bundle, capacity, device, ...) are the engine's."""

    def __init__(self, engine: Engine, max_batch: int = 8, prefill_chunk: int = 32,
                 spec_max_batch: int | None = None):
        if engine.device != "cpu":
            raise BatchingError("the batched engine runs on the CPU only (device='cpu')")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.engine = engine
        self.max_batch, self.prefill_chunk = int(max_batch), int(prefill_chunk)
        self.spec_max_batch = spec_max_batch     # None: from costs measured here (draft_length)
        spec, bundle = engine.spec, engine.bundle
        self.cache = BatchedKVCache(spec, self.max_batch, engine.capacity)
        threads = getattr(engine, "num_threads", None)
        self.full = PackedGraph(bundle.full_graph, list(range(spec.num_layers)), "logits", self.cache,
                                engine.providers, threads, solo=engine.full)
        self.bodies: dict[str, PackedGraph] = {}          # body graph path -> packed graph
        self._body_of: dict[str, PackedGraph] = {}        # profile -> its packed body
        for name, drafter in engine.drafters.items():
            drafter = batched_draft(drafter)
            if drafter is None:
                continue                                   # n-gram drafters: no draft passes
            graphs = bundle.draft_graphs(name)
            if graphs.body not in self.bodies:
                self.bodies[graphs.body] = PackedGraph(graphs.body, graphs.kv_layers, "hidden", self.cache,
                                                       engine.providers, threads, solo=drafter.body)
            self._body_of[name] = self.bodies[graphs.body]
        self._decisions: dict[tuple, int | bool | None] = {}
        self._proposals: dict[str, tuple[int, int, int]] = {}    # profile -> n-gram (steps, drafted, kept)
        self._pending: list[_Seq] = []
        self._slots: list[_Seq | None] = [None] * self.max_batch
        self._order: list[_Seq] = []                      # admitted, oldest first
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0
        # every timing before any request: each profile's policy for this machine (the engine
        # would time it on first use, beside the scheduler's passes), then the batched passes
        for name in engine.drafters:
            engine.adapt_policy(name)
        self.costs: batchcost.BatchCosts | None = None
        if self.spec_max_batch is None and engine.drafters:
            self.costs = self._measure_costs()
        self._thread = threading.Thread(target=self._run, name="conflayers-batch", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path: str, max_batch: int = 8, prefill_chunk: int = 32, spec_max_batch: int | None = None,
             **engine_args) -> "BatchedEngine":
        return cls(Engine.load(path, **engine_args), max_batch, prefill_chunk, spec_max_batch)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- speculation vs batch size ---------------------------------------------------------------
    def _measure_costs(self) -> batchcost.BatchCosts:
        """BatchCosts at the widest step any profile may take (batchcost.measure)."""
        widths = [2]
        for name, drafter in self.engine.drafters.items():
            profile, model, ngram = self.engine.bundle.profiles[name], batched_draft(drafter), ngram_part(drafter)
            if model is not None and model.policy is not None:
                widths.append(model.policy.max_tokens + 1)
            widths += [r.k + 1 for r in profile.policy_table or []]
            if ngram is not None:
                widths.append(ngram.policy.max_tokens + 1)
        width = min(max(widths), 16)
        drafts = {name: (body, batched_draft(self.engine.drafters[name]).head) for name, body in self._body_of.items()}
        context = max(1, min(128, self.engine.capacity - width - 2))
        return batchcost.measure(self.full, drafts, self.max_batch, width, context)

    def draft_length(self, name: str, batch: int) -> int | None:
        """How many tokens profile `name`'s model draft drafts at most when `batch` sequences
        decode (None: none; see the module docstring)."""
        model = batched_draft(self.engine.drafters[name])
        policy = model.policy if model is not None else None
        if policy is None:
            return None
        if self.spec_max_batch is not None:
            return policy.max_tokens if batch < self.spec_max_batch else None
        if batch <= 1:
            return policy.max_tokens          # alone: the engine's own choice for this machine
        key = (name, "model", batch)
        if key not in self._decisions:
            rows = _model_rows(self.engine.bundle.profiles[name], policy)
            # nothing to predict from: draft only when decoding alone
            self._decisions[key] = batchcost.model_draft_length(rows, self.costs, name, batch) \
                if rows and self.costs is not None else None
        return self._decisions[key]

    def ngram_proposes(self, name: str, batch: int) -> bool:
        """Whether profile `name`'s n-gram proposals are taken when `batch` sequences decode."""
        if self.spec_max_batch is not None:
            return batch < self.spec_max_batch
        key = (name, "ngram", batch)
        if key not in self._decisions:
            rate = self.proposal_rate(name)
            if rate is not None and self.costs is not None:
                self._decisions[key] = batchcost.proposals_pay(*rate, self.costs, batch)
            else:
                self._decisions[key] = batch < 2
        return self._decisions[key]

    def speculation_plan(self) -> dict[str, str]:
        """Per drafting profile, what a greedy request drafts at each batch size, in words (the
        server prints it at start-up)."""
        out = {}
        for name, drafter in sorted(self.engine.drafters.items()):
            if self.engine.adapt_policy(name) is None:
                out[name] = "plain decoding (no drafting pays on this machine)"
                continue
            parts = []
            if batched_draft(drafter) is not None:
                ks = [self.draft_length(name, n) for n in range(1, self.max_batch + 1)]
                parts.append("model draft k " + ",".join(str(k) if k else "-" for k in ks))
            if ngram_part(drafter) is not None:
                on = [self.ngram_proposes(name, n) for n in range(1, self.max_batch + 1)]
                parts.append("n-gram " + ",".join("y" if x else "-" for x in on))
            out[name] = "; ".join(parts) + f" (batch 1..{self.max_batch})"
        return out

    def proposal_rate(self, name: str) -> tuple[float, float] | None:
        """(drafted, accepted) per n-gram proposal of profile `name`: as served here once
        OBSERVE_AFTER proposals were verified, else the profile's validation figures (a hybrid's
        mix its n-gram and model steps, so they are only a first guess)."""
        steps, drafted, accepted = self._proposals.get(name, (0, 0, 0))
        if steps >= OBSERVE_AFTER:
            return drafted / steps, accepted / steps
        return _figures_rate(self.engine.bundle.profiles[name])

    def _observe_proposal(self, name: str, drafted: int, accepted: int):
        """Count a verified n-gram proposal; the decisions follow the served rate, revised at
        OBSERVE_AFTER proposals and each doubling after."""
        steps, d, a = self._proposals.get(name, (0, 0, 0))
        steps += 1
        self._proposals[name] = (steps, d + drafted, a + accepted)
        if steps >= OBSERVE_AFTER and steps & (steps - 1) == 0:
            for key in [k for k in list(self._decisions) if k[0] == name and k[1] == "ngram"]:
                del self._decisions[key]

    def spec_batch_limit(self, name: str, kind: str = "model") -> int:
        """The smallest batch at which profile `name` stops drafting with its model draft (kind
        "model") or taking n-gram proposals (kind "ngram"); max_batch + 1 when it never does."""
        for n in range(1, self.max_batch + 1):
            if not (self.draft_length(name, n) if kind == "model" else self.ngram_proposes(name, n)):
                return n
        return self.max_batch + 1

    # -- requests ---------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, stream: bool = False, **kwargs):
        """Engine.generate's arguments and results, decoded in the batch."""
        return stream_or_result(self.stream_request(self.engine.prepare(prompt, **kwargs)), stream)

    def stream_request(self, request: Request) -> Iterator[StreamChunk]:
        name, drafter, ngram = request.profile, None, None
        whole = self.engine.drafters.get(name) if name else None
        if whole is not None and self.engine.adapt_policy(name) is not None:
            model = batched_draft(whole)
            drafter = model if model is not None and model.policy is not None else None
            ng = ngram_part(whole)
            ngram = ng.bind(None, request.ids) if ng is not None else None
        seq = _Seq(request, drafter, ngram, name, queue.Queue(),
                   always_draft=not request.sampler.greedy and not request.use_guard)
        return _present(self.engine, seq, self._tokens(seq))

    def _tokens(self, seq: _Seq) -> Iterator[list[int]]:
        with self._cond:
            if self._closed:
                raise BatchingError("the batched engine is closed")
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

    # -- the scheduler thread ---------------------------------------------------------------------
    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._admit():
                    self._cond.wait()
                if self._closed:
                    for s in self._order + self._pending:
                        s.out.put(BatchingError("the batched engine was closed"))
                    return
            try:
                self._step()
            except Exception as e:      # noqa: BLE001 - every request in the batch gets the error
                with self._cond:
                    for s in list(self._order):
                        s.out.put(e)
                        self._leave(s)

    def _admit(self) -> bool:
        """Drop cancelled sequences, admit waiting ones into free slots; True when any is active."""
        for s in list(self._order):
            if s.cancelled:
                self._leave(s)
        while self._pending and None in self._slots:
            s = self._pending.pop(0)
            s.slot = self._slots.index(None)
            self._slots[s.slot] = s
            self._order.append(s)
        return bool(self._order)

    def _leave(self, s: _Seq):
        if s.slot >= 0 and self._slots[s.slot] is s:
            self._slots[s.slot] = None
        if s in self._order:
            self._order.remove(s)

    def _finish(self, s: _Seq):
        s.out.put(_DONE)
        with self._cond:
            self._leave(s)

    def _step(self):
        self.steps += 1
        order = [s for s in self._order if not s.cancelled]
        decoding = [s for s in order if s.token is not None]
        prefill = next((s for s in order if s.token is None), None)
        # who drafts this step, and how far: the batch counts the sequences still prefilling too
        # (they join the decoding ones within a few steps, and long draft steps hold them back)
        for s in decoding:
            self._plan(s, len(order))
        self._draft([s for s in decoding if s.drafting])
        # one full pass: the newcomer's prompt chunk, every decoding sequence's token (+ drafts)
        segments = [([], 0)] * self.max_batch
        for b, s in enumerate(self._slots):
            if s is not None:
                segments[b] = ([], s.next_pos)
        rows, at = [], 0
        where = {}
        chunk = []
        if prefill is not None:
            room = self.engine.full.pass_room(prefill.fed)          # as the solo prefill
            size = self.prefill_chunk if room is None else max(1, min(self.prefill_chunk, room))
            chunk = prefill.request.ids[prefill.fed:prefill.fed + size]
        for b in range(self.max_batch):
            s = self._slots[b]
            if s is prefill and chunk:
                segments[b] = (chunk, prefill.fed)
                if prefill.fed + len(chunk) == len(prefill.request.ids):
                    where[id(s)] = len(rows)
                    rows.append(at + len(chunk) - 1)
                at += len(chunk)
            elif s is not None and s in decoding:
                toks = [s.token] + s.drafted
                segments[b] = (toks, s.length)
                where[id(s)] = len(rows)
                rows.extend(range(at, at + len(toks)))
                at += len(toks)
        if not rows and not chunk:
            return
        logits = self.full.run(segments, rows if rows else [0])
        if prefill is not None and chunk:
            prefill.fed += len(chunk)
            if prefill.fed == len(prefill.request.ids):
                prefill.length = prefill.fed
                tok = prefill.request.sampler.pick(logits[where[id(prefill)]])
                prefill.token = tok
                prefill.stats.prefill_s = time.perf_counter() - prefill.t_start
                prefill.stats.tokens = 1
                prefill.t_decode = time.perf_counter()
                prefill.out.put([tok])
                if tok in self.engine.stop_ids or prefill.request.max_new_tokens <= 1:
                    self._finish(prefill)
        for s in decoding:
            r = where[id(s)]
            st = s.stats
            if s.speculating:
                n, nxt = s.request.sampler.verify(s.drafted, s.draft_q, logits[r:r + len(s.drafted) + 1])
                st.draft_steps += 1
                st.drafted_tokens += len(s.drafted)
                st.accepted_tokens += n
                st.accept_lengths.append(n)
                new = s.drafted[:n] + [nxt]
            else:
                n, new = 0, [s.request.sampler.pick(logits[r])]
            if s.ngram is not None:               # the index follows the text, drafted or not
                s.ngram.kept(s.drafted)
                s.ngram.feedback(len(s.drafted), n)
            if s.proposed:
                self._observe_proposal(s.name, len(s.drafted), n)
            st.full_passes += 1
            s.length += len(new)
            s.drafted = []
            for j, t in enumerate(new):
                if t in self.engine.stop_ids:
                    new = new[:j + 1]
                    break
            remaining = s.request.max_new_tokens - st.tokens
            new = new[:remaining]
            st.tokens += len(new)
            st.decode_s = time.perf_counter() - s.t_decode
            s.token = new[-1]
            s.out.put(new)
            if new[-1] in self.engine.stop_ids or st.tokens >= s.request.max_new_tokens:
                self._finish(s)

    def _plan(self, s: _Seq, batch: int):
        """This step's proposal for a decoding sequence, as its solo drafter would make it
        (BoundHybridDrafter.propose): an n-gram match is taken now; a model draft is marked
        `drafting` for the batched draft passes; otherwise the sequence steps plainly."""
        s.drafted, s.draft_q, s.drafting, s.speculating, s.proposed = [], None, False, False, False
        room = self.engine.full.verify_room(s.length)        # as the solo loop (decoding.generate)
        limit = s.request.max_new_tokens - s.stats.tokens - 1
        if room is not None:
            limit = min(limit, room)
        if s.ngram is not None:
            s.ngram.observe(s.token, s.length)               # every step: the index stays in sync
        if limit <= 0:
            return

        greedy = s.request.sampler.greedy
        if s.ngram is not None and (s.always_draft or self.ngram_proposes(s.name, batch)):
            tokens, n = s.ngram.match(limit)
            if s.drafter is None or (tokens and n >= s.ngram.policy.min_match):
                s.speculating = s.proposed = True
                s.drafted = list(tokens)                          # (empty: a verify of one token)
                s.draft_q = None if greedy else one_hot(s.drafted, self.engine.spec.vocab_size)
                return
        if s.drafter is None:
            return
        k = s.drafter.policy.max_tokens if s.always_draft else self.draft_length(s.name, batch)
        if k:
            s.drafting = s.speculating = True
            s.draft_q = None if greedy else []
            s.limit = min(k, limit)

    def _draft(self, drafting: list[_Seq]):
        """Batched draft steps: per draft position, one pass per draft body over the sequences of
        its profiles still drafting, then each profile's head; each sequence's policy (k,
        confidence stop) as BoundDrafter.propose applies it."""
        going = list(drafting)
        j = 0
        while going:
            by_body: dict[int, list[_Seq]] = {}
            for s in going:
                by_body.setdefault(id(self._body_of[s.name]), []).append(s)
            for group in by_body.values():
                body = self._body_of[group[0].name]
                segments = [([], 0)] * self.max_batch
                for b, s in enumerate(self._slots):
                    if s is not None:
                        segments[b] = ([], s.next_pos)
                members = {s.slot: s for s in group}
                rows, order = [], []
                for b in range(self.max_batch):
                    if b in members:
                        s = members[b]
                        segments[b] = ([s.drafted[-1] if s.drafted else s.token], s.length + len(s.drafted))
                        rows.append(len(rows))
                        order.append(s)
                hidden = body.run(segments, rows)
                by_head: dict[int, list[int]] = {}
                for r, s in enumerate(order):
                    by_head.setdefault(id(s.drafter.head), []).append(r)
                for idx in by_head.values():
                    d = order[idx[0]].drafter
                    z_all = d.head.run_head(hidden[idx][None])[0]
                    for zi, r in enumerate(idx):
                        _draft_one(order[r], z_all[zi])
            j += 1
            going = [s for s in going if s.drafting and len(s.drafted) < s.limit]


def batched_draft(drafter) -> LayerSkipDrafter | None:
    """The model draft the batched loop drafts with for a profile's drafter: the drafter itself,
    a cascade's top stage alone (its check passes over several tokens per sequence are not
    batched yet; the top stage drafting alone is a model draft like any other, so output is
    unchanged), a hybrid's model part, or None for an n-gram drafter."""
    if isinstance(drafter, CascadeDrafter):
        return drafter.top
    if isinstance(drafter, HybridDrafter):
        return drafter.model
    return drafter if isinstance(drafter, LayerSkipDrafter) else None


def ngram_part(drafter) -> NGramDrafter | None:
    """The n-gram proposer of an n-gram or hybrid profile's drafter, else None."""
    if isinstance(drafter, HybridDrafter):
        return drafter.ngram
    return drafter if isinstance(drafter, NGramDrafter) else None


def _draft_one(s: _Seq, z: np.ndarray):
    """One drafted token from draft scores z (the same step as BoundDrafter.propose)."""
    tok, q, more = draft_token(s.drafter, z, s.request.sampler)
    s.drafted.append(tok)
    if q is not None:
        s.draft_q.append(q)
    if not more:
        s.drafting = False


def _model_rows(profile, policy) -> list[tuple]:
    """(k, drafted per step, accepted per step) for the draft lengths up to the policy's, at its
    confidence stop: from the profile's policy table, else its validation figures (one row)."""
    rows = [(r.k, r.drafted_per_step, r.accepted_per_step) for r in profile.policy_table or []
            if r.confidence_stop == policy.confidence_stop and r.k <= policy.max_tokens]
    if not rows:
        rate = _figures_rate(profile)
        rows = [(policy.max_tokens, *rate)] if rate is not None else []
    return rows


def _figures_rate(profile) -> tuple[float, float] | None:
    """(drafted, accepted) per step as the profile's validation measured them (a hybrid's mix
    its n-gram and model steps), or None when it has no such figures."""
    fig = profile.figures
    rate, a = fig.get("acceptance_rate"), fig.get("mean_accepted_tokens")
    if isinstance(rate, bool) or isinstance(a, bool) or not isinstance(rate, (int, float)) \
            or not isinstance(a, (int, float)) or rate <= 0 or a <= 0:
        return None
    return a / rate, float(a)


def _present(engine: Engine, seq: _Seq, loop: Iterator[list[int]]) -> Iterator[StreamChunk]:
    """Engine.present over the scheduler's tokens for one request."""
    speculates = seq.drafter is not None or seq.ngram is not None
    try:
        yield from engine.present(loop, seq.request, seq.stats, seq.name if speculates else None,
                                  len(seq.request.ids), seq.request.score)
    finally:
        loop.close()