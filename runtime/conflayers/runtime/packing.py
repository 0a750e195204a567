"""Packed passes: several sequences' rows in one pass of a decoder graph, over one batched KV cache.

pack_graph rewrites a decoder graph (full graph or draft body) so the sequences of n KV cache
slots are packed along its sequence axis: every node but attention computes each position on its
own, so it runs on the packed rows unchanged; each GroupQueryAttention node becomes one per slot,
fed exactly the rows (and the extra attention row) the solo graph would feed. PackedGraph runs a
pass over any set of slots: through the solo graph when one sequence is in it (the same
computation), else through the graph packed for exactly that many sequences, bound to their
slots, with the rows padded as the solo passes are (contract.py). The scheduler (scheduler.py)
makes every pass through here, a request alone included.

CPU only (the slots are views of one host buffer); graphs with no GroupQueryAttention are refused.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import onnxruntime as ort

from . import attention, contract, head
from .modelspec import ModelSpec
from .ort_backend import GraphRunner, KVCache, create_session, mapped_weights


class BatchingError(RuntimeError):
    """The bundle, device or environment cannot be served by the batched engine."""


# -- the packed graphs --------------------------------------------------------------------------
def _onnx():
    """(onnx, TensorProto, helper), or a BatchingError saying how to install them."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise BatchingError("the batched engine derives its graphs with the `onnx` package: "
                            "pip install 'onnx>=1.17'") from None
    return onnx, TensorProto, helper


def pack_slot_graph(path: str, kv_cache: str = "float32", screen_head: bool = False) -> bytes:
    """The decoder graph at `path` (full or draft body) with SlotAttention (attention.py) for any
    number of sequences packed along its sequence axis: every node but attention computes each
    position on its own, and each SlotAttention node takes every segment, over the whole batched
    KV buffers (past_key.{i} [slots, ...], bound as both past and present). The final Slice from
    `logits_from` becomes a Gather of `rows`.

    Inputs:  input_ids [1, T], seg_lens [N] int64 (each >= 1, sum T), slots [N] int64 (each
             segment's KV slot), seqlens_k [N] int32 (start + n - 1 per segment), rows [R] int64,
             past_key.{i}, past_value.{i} [slots, kv_heads, L, head_dim]
    Outputs: logits or hidden [1, R, W], present_key.{i}, present_value.{i}
    """
    onnx, TensorProto, helper = _onnx()
    model = onnx.load(path, load_external_data=False)
    if not attention.rewrite(model, path, kv_cache):
        raise BatchingError(f"{path}: its attention does not run as SlotAttention")
    if screen_head:
        head.rewrite(model)          # as the solo graph's session has it (head.py)
    g = model.graph
    nodes = []
    for n in g.node:
        if n.op_type in (attention.OP, attention.OP_F16):
            del n.input[8:]
            n.input.extend(["seg_lens", "slots"])
        elif n.op_type == "Slice" and n.name.startswith("keep_positions"):
            n = helper.make_node("Gather", [n.input[0], "rows"], list(n.output), name=n.name, axis=1)
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    inputs = []
    for x in g.input:
        if x.name.startswith(("past_key.", "past_value.")):
            x.type.tensor_type.shape.dim[0].dim_param = "slots"
        if x.name in used and x.name != contract.SEQLENS:
            inputs.append(x)
    for x in g.output:
        if x.name.startswith(("present_key.", "present_value.")):
            x.type.tensor_type.shape.dim[0].dim_param = "slots"
    inputs += [helper.make_tensor_value_info(contract.SEQLENS, TensorProto.INT32, ["N"]),
               helper.make_tensor_value_info("seg_lens", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("slots", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])]
    del g.input[:]
    g.input.extend(inputs)
    return model.SerializeToString()


def pack_graph(path: str, slots: int, screen_head: bool = False) -> tuple[bytes, bool]:
    """The decoder graph at `path` (full or draft body) rewritten for `slots` sequences packed
    along its sequence axis, each with at least one row. Returns (serialized model, whether its
    attention pads a row).

    Every node but attention computes each position on its own, so it runs on the packed rows
    unchanged. Each GroupQueryAttention node becomes one per slot: its rows are split by
    `seg_lens`, each slot's segment gets exactly what the solo graph gives it (the extra row of a
    padded full graph included) and its own KV buffers (past_key.{i}.{b} bound as both past and
    present), and the results are concatenated again. The final Slice from `logits_from` becomes a
    Gather of `rows` (the positions whose logits or hidden states are wanted).

    Inputs:  input_ids [1, T], seg_lens [N] int64 (each >= 1, sum T), seqlens_k [N] int32 (the solo
             graph's value per slot: start + n - 1), rows [R] int64, past_key.{i}.{b}, past_value.{i}.{b};
             padded graphs also attn_rows [T + N], attn_lens [N], attn_keep [T] (attention_rows())
    Outputs: logits or hidden [1, R, W], present_key.{i}.{b}, present_value.{i}.{b}
    """
    onnx, TensorProto, helper = _onnx()
    model = onnx.load(path, load_external_data=False)
    if screen_head:
        head.rewrite(model)
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

    one_i32 = const("pack/one_i32", np.array(1, np.int32))
    per_slot = []            # (seqlens_b [1] int32, total_b [1] int32) as the solo graph's attention gets them
    for b in range(N):
        s_b = op("Gather", ["seqlens_k", const(f"pack/slot{b}", np.array([b], np.int64))])
        if padded:
            s_b = op("Add", [s_b, one_i32])
        per_slot.append((s_b, op("Add", [s_b, one_i32])))
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
        try:
            srcs, out_name, dropped = attention.sources(n, producer, consumers, path)
        except attention.AttentionError as e:
            raise BatchingError(str(e)) from None
        skip.update(id(d) for d in dropped)
        for j in (1, 2):        # the present outputs: graph outputs, or (older graphs) Identity nodes'
            dropped_io.add(n.output[j])
            for c in consumers.get(n.output[j], []):
                skip.add(id(c))
                dropped_io.add(c.output[0])
        dropped_io.update((n.input[3], n.input[4]))
        # a padded graph's attention gets each segment + a copy of its last row, as solo: one
        # Gather of all segments' rows (attn_rows), split by attn_lens, the extra rows dropped
        # after by one Gather (attn_keep)
        lens = "attn_lens" if padded else "seg_lens"
        segs = [None if not src else
                op("Split", [op("Gather", [src, "attn_rows"], axis=1) if padded else src, lens], n_out=N, axis=1)
                if N > 1 else [op("Gather", [src, "attn_rows"], axis=1) if padded else src]
                for src in srcs]
        outs = []
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for b in range(N):
            s_b, total_b = per_slot[b]
            ins = ["" if seg is None else seg[b] for seg in segs]
            pk, pv = f"past_key.{layer}.{b}", f"past_value.{layer}.{b}"
            name = f"pack/L{layer}/s{b}/attn"
            o = [f"{name}/out0", f"present_key.{layer}.{b}", f"present_value.{layer}.{b}"]
            new.append(helper.make_node("GroupQueryAttention", ins + [pk, pv, s_b, total_b] + list(n.input[7:]),
                                        o, name=name, domain=n.domain, **attrs))
            outs.append(o[0])
            shape = [d.dim_value or d.dim_param for d in kv_dims[n.input[3]].dim]
            for nm in (pk, pv):
                added_in.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, shape))
            for nm in o[1:]:
                added_out.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, shape))
        joined = op("Concat", outs, axis=1) if N > 1 else outs[0]
        new.append(helper.make_node("Gather", [joined, "attn_keep"], [out_name], name=f"pack/L{layer}/keep", axis=1)
                   if padded else helper.make_node("Identity", [joined], [out_name], name=f"pack/L{layer}/out"))
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
    if padded:
        inputs += [helper.make_tensor_value_info("attn_rows", TensorProto.INT64, ["TN"]),
                   helper.make_tensor_value_info("attn_lens", TensorProto.INT64, [N]),
                   helper.make_tensor_value_info("attn_keep", TensorProto.INT64, ["T"])]
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
        self._k = {i: a[slot:slot + 1] for i, a in owner.k.items()}
        self._v = {i: a[slot:slot + 1] for i, a in owner.v.items()}
        self.keys = {i: ort.OrtValue.ortvalue_from_numpy(a) for i, a in self._k.items()}
        self.values = {i: ort.OrtValue.ortvalue_from_numpy(a) for i, a in self._v.items()}

    def reset(self):
        self.length = 0

    def key_array(self, layer: int) -> np.ndarray:
        """The slot's keys of one layer, [1, kv_heads, positions, head_dim] (a view: writable)."""
        return self._k[layer]

    def value_array(self, layer: int) -> np.ndarray:
        return self._v[layer]


class BatchedKVCache:
    """KV buffers of `slots` sequences, [slots, kv_heads, capacity + KV_SPARE, head_dim] per layer
    (+ the spare slot a padding row writes, as KVCache); `slot[b]` is slot b as a KVCache.
    One slot is a plain KVCache (any device; `solo`: that one); several are views of one host
    buffer (CPU only)."""

    def __init__(self, spec: ModelSpec, slots: int, capacity: int, device: str = "cpu",
                 solo: KVCache | None = None, dtype=np.float32):
        self.slots, self.capacity = int(slots), int(capacity)
        if self.slots == 1:
            self.slot = [solo if solo is not None else KVCache(spec, self.capacity, device, dtype)]
            return
        if device != "cpu":
            raise BatchingError(f"batching (max_batch {slots}) runs on the CPU only; on {device} "
                                f"serve with max_batch 1")
        shape = (self.slots, spec.num_kv_heads, self.capacity + contract.KV_SPARE, spec.head_dim)
        self.k = {i: np.zeros(shape, dtype) for i in range(spec.num_layers)}
        self.v = {i: np.zeros(shape, dtype) for i in range(spec.num_layers)}
        self.slot = [SlotCache(self, b) for b in range(self.slots)]

    @property
    def nbytes(self) -> int:
        """Bytes of every slot's keys and values (allocated; pages become resident as written)."""
        if self.slots == 1:
            return self.slot[0].nbytes
        return sum(a.nbytes for a in (*self.k.values(), *self.v.values()))


class PackedGraph:
    """A decoder graph (full graph or draft body) bound to every slot of a BatchedKVCache.

    A pass with one sequence in it runs the graph itself on that slot (the solo computation).
    A pass over several runs a packed graph, derived from the graph's file when the scheduler
    starts (prepare()):
    - where the sessions run SlotAttention (attention.py), one graph for any set of slots
      (pack_slot_graph): one attention node a layer takes every segment;
    - else a graph per width n (pack_graph), bound to the n busy slots' KV, so idle slots cost
      nothing (measured: with 2 of 8 slots busy, a graph packed for all 8 spent more than half its
      pass on the idle slots' attention).
    The sessions share the weights (ort_backend.mapped_weights), and the kernel library caches
    its repacked weights."""

    BINDINGS = 64            # the IOBindings kept, one per set of busy slots (LRU)

    def __init__(self, runner: GraphRunner, cache: BatchedKVCache, providers: list[str] | None = None,
                 num_threads: int | None = None):
        self.runner, self.cache = runner, cache
        self.providers, self.num_threads = providers or ["CPUExecutionProvider"], num_threads
        self.solo = [runner.bind(slot) for slot in cache.slot]
        self.padded = False
        # as create_session decided for the solo graph's session
        self.slot_attention = self.providers[0] == "CPUExecutionProvider" and attention.available()
        self._sessions: dict[int, ort.InferenceSession] = {}       # width (0: any, SlotAttention) -> session
        self._bindings: OrderedDict[tuple, ort.IOBinding] = OrderedDict()

    def prepare(self, widths=None):
        """Build the packed sessions now, so that no pass waits for one (without SlotAttention:
        those of `widths`, default every width 2..slots)."""
        if self.cache.slots == 1:
            return
        if self.slot_attention:
            self._session(0)
            return
        for w in widths if widths is not None else range(2, self.cache.slots + 1):
            self._session(w)

    def run(self, segments: list[tuple[list[int], int]], rows: list[int], full_logits: bool = False) -> np.ndarray:
        """segments[b] = (tokens, start) of slot b (tokens empty: slot b takes no part); returns
        the output rows `rows` (indices into the packed tokens, ascending) as [len(rows), width].
        full_logits: as BoundGraph.run."""
        busy = [b for b, (toks, _) in enumerate(segments) if toks]
        if not busy:
            if rows:
                raise ValueError("rows asked of a pass with no tokens")
            return np.zeros((0, 0), np.float32)
        if len(busy) == 1:
            toks, start = segments[busy[0]]
            first = rows[0] if rows else len(toks) - 1
            if list(rows) == list(range(first, first + len(rows))) and (not rows or rows[-1] == len(toks) - 1):
                return self.solo[busy[0]].run(toks, start, logits_from=first, full_logits=full_logits)[:len(rows)]
        segments = [segments[b] for b in busy]      # empty segments hold no rows: `rows` stays valid
        for toks, start in segments:
            if start + len(toks) > self.cache.capacity:
                raise ValueError(f"context length {start + len(toks)} exceeds the KV cache capacity "
                                 f"{self.cache.capacity}")
        width = 0 if self.slot_attention else len(busy)
        bind = self._binding(() if self.slot_attention else tuple(busy))
        pad = self.runner.padding
        wanted = len(rows)
        if pad is not None:
            segments, rows = _pad_segments(segments, rows, pad)
            if (pad.single and wanted == 1) or (wanted > 1 and contract.single_row(wanted)):
                rows = list(rows) + [rows[-1]]     # the head never computes a lone row either
        lens = np.array([len(t) for t, _ in segments], np.int64)
        ids = np.fromiter((t for toks, _ in segments for t in toks), np.int64, int(lens.sum())).reshape(1, -1)
        seqlens = np.array([start + len(toks) - 1 for toks, start in segments], np.int32)
        bind.bind_cpu_input(contract.INPUT_IDS, ids)
        bind.bind_cpu_input("seg_lens", lens)
        bind.bind_cpu_input(contract.SEQLENS, seqlens)
        bind.bind_cpu_input("rows", np.asarray(rows, np.int64))
        if self.slot_attention:
            bind.bind_cpu_input("slots", np.asarray(busy, np.int64))
        elif self.padded:
            for name, value in zip(("attn_rows", "attn_lens", "attn_keep"), attention_rows(lens)):
                bind.bind_cpu_input(name, value)
        if self.runner.screened:
            bind.bind_cpu_input(contract.FULL_LOGITS, np.array([int(full_logits)], np.int64))
        bind.bind_output(self.runner.output, "cpu")
        self._sessions[width].run_with_iobinding(bind)
        return bind.get_outputs()[-1].numpy()[0][:wanted]

    def _session(self, width: int) -> ort.InferenceSession:
        if width not in self._sessions:
            path = self.runner.path
            if path is None or self.cache.slots == 1:
                raise BatchingError("a pass over several sequences needs the graph's file and a batched cache")
            if width == 0:
                data = pack_slot_graph(path, np.dtype(self.runner.kv_dtype).name, self.runner.screened)
            else:
                data, self.padded = pack_graph(path, width, self.runner.screened)
            self._sessions[width] = create_session(data, self.providers, self.num_threads,
                                                   external_dir=os.path.dirname(path),
                                                   initializers=mapped_weights(path))
        return self._sessions[width]

    def _binding(self, slots: tuple[int, ...]) -> ort.IOBinding:
        """The IOBinding of the session packed for len(slots), its slot j bound to cache slot
        slots[j]; () the SlotAttention session's, bound to the whole buffers."""
        bind = self._bindings.get(slots)
        if bind is not None:
            self._bindings.move_to_end(slots)
            return bind
        bind = self._session(len(slots)).io_binding()
        if not slots:
            for i in self.runner.kv_layers:
                for kind, arrays in (("key", self.cache.k), ("value", self.cache.v)):
                    whole = ort.OrtValue.ortvalue_from_numpy(arrays[i])
                    bind.bind_ortvalue_input(f"past_{kind}.{i}", whole)
                    bind.bind_ortvalue_output(f"present_{kind}.{i}", whole)
        for j, s in enumerate(slots):
            slot = self.cache.slot[s]
            for i in self.runner.kv_layers:
                bind.bind_ortvalue_input(f"past_key.{i}.{j}", slot.keys[i])
                bind.bind_ortvalue_output(f"present_key.{i}.{j}", slot.keys[i])
                bind.bind_ortvalue_input(f"past_value.{i}.{j}", slot.values[i])
                bind.bind_ortvalue_output(f"present_value.{i}.{j}", slot.values[i])
        self._bindings[slots] = bind
        if len(self._bindings) > self.BINDINGS:
            self._bindings.popitem(last=False)
        return bind


def attention_rows(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For segments of `lens` rows packed in order: the rows a padded graph's attention takes
    (each segment, then a copy of its last row), their lengths per segment, and the rows of the
    attention's output to keep (all but each segment's extra one)."""
    ends = np.cumsum(lens)
    starts = ends - lens
    take = np.concatenate([np.append(np.arange(a, e), e - 1) for a, e in zip(starts, ends)])
    keep = np.concatenate([np.arange(a, e) + b for b, (a, e) in enumerate(zip(starts, ends))])
    return take.astype(np.int64), (lens + 1).astype(np.int64), keep.astype(np.int64)


def _pad_segments(segments, rows, pad: contract.Padding):
    """A packed pass padded as `pad` pads a solo pass (contract.py): each segment gets the padding
    row its solo pass would, and where the product's rows are then 128 j + 1 the longest segment
    gets one more. Returns the segments and `rows` renumbered into the padded packing."""
    lens = [len(t) for t, _ in segments]
    extra = [int(pad.every or (pad.single and n == 1)) for n in lens]
    if contract.single_row(sum(lens) + sum(extra)):
        extra[max(range(len(lens)), key=lens.__getitem__)] += 1
    where, at, padded = [], 0, []        # where: old packed index -> new packed index
    for (toks, start), n, e in zip(segments, lens, extra):
        where.extend(range(at, at + n))
        at += n + e
        padded.append((list(toks) + [toks[-1]] * e, start))
    return padded, [where[r] for r in rows]
