"""ONNX Runtime sessions and the in-place KV cache they share.

Why a global thread pool: the full graph and the draft run alternately. With one pool per
session, the idle session's threads spin and steal the cores from the running one (measured on a
2-core CPU: a speculative iteration took 2.6x longer). One process-wide pool avoids that, and its
spin-waiting makes each pass start sooner: on an idle 2-core machine plain decoding ran at
46-48 tok/s with it against 39-41 with per-session pools that do not spin.
On a machine shared with other busy processes spinning turns against you (measured there: 16 tok/s
with spinning against 28 without): set CONFLAYERS_SPIN=0 for per-session pools that sleep instead.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort

from . import attention, contract, head, kernels
from .device import available_providers, device_of, resolve_providers  # noqa: F401 (their home was here)
from .modelspec import ModelSpec

_pool_lock = threading.Lock()
_global_pool: bool | None = None


def _use_global_pool(num_threads: int | None) -> bool:
    global _global_pool
    with _pool_lock:
        if _global_pool is None and os.environ.get("CONFLAYERS_SPIN", "1") == "0":
            _global_pool = False
        if _global_pool is None:
            n = num_threads or int(os.environ.get("CONFLAYERS_THREADS", "0")) or (os.cpu_count() or 1)
            try:
                ort.set_global_thread_pool_sizes(n, 1)
                _global_pool = True
            except Exception:  # the ORT environment already exists in this process
                _global_pool = False
        return _global_pool


def rewritten(path: str, kv_cache: str = "float32", screen_head: bool = False) -> bytes | None:
    """The graph file at `path` as this CPU session runs it (serialized; its external weights stay
    in their files): SlotAttention where the library runs it (attention.py), the screened head where
    asked and the library screens (head.py); None where neither changes it."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    changed = attention.available() and attention.rewrite_or_refuse(model, path, kv_cache)
    if screen_head and head.available():
        changed = head.rewrite(model) or changed
    return model.SerializeToString() if changed else None


def create_session(path: str | bytes, providers: list[str], num_threads: int | None = None,
                   external_dir: str | None = None, initializers=(), kv_cache: str = "float32",
                   screen_head: bool = False) -> ort.InferenceSession:
    """A session for a model file, or for serialized model bytes whose external weights files lie
    in `external_dir` (the batched engine's derived graphs); `initializers`: (name, OrtValue)
    pairs the session uses in place of the graph's own (ONNX Runtime keeps no copy of them).
    A CPU session of a graph file runs the kernel library's SlotAttention where the library has
    it (attention.py), with the file's weights shared with every other session of the process;
    kv_cache "float16": over half KV caches (attention.KVCacheError where that cannot run);
    screen_head (a full graph): the screened head where the library screens (head.py)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if kv_cache != "float32":
        attention.check_kv_cache(kv_cache, providers)
    if isinstance(path, str) and providers[0] == "CPUExecutionProvider" and \
            (attention.available() or (screen_head and head.available())):     # (both need onnx)
        data = rewritten(path, kv_cache, screen_head)
        if data is not None:
            path, external_dir, initializers = data, os.path.dirname(os.path.abspath(path)), mapped_weights(path)
    for name, value in initializers:
        so.add_initializer(name, value)
    library = kernels.library() if providers[0] == "CPUExecutionProvider" else None
    if library:
        so.register_custom_ops_library(library)
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", external_dir)
    if providers[0] == "CPUExecutionProvider" and _use_global_pool(num_threads):
        so.use_per_session_threads = False
    elif _global_pool:      # a CUDA session where CPU sessions made the global pool: ORT then requires it
        so.use_per_session_threads = False
    else:
        if num_threads:
            so.intra_op_num_threads = num_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=providers)


_mapped: dict[tuple, list] = {}         # graph file (_file_key) -> its external weights
_maps: dict[tuple, np.memmap] = {}      # weights file (_file_key) -> its one map in this process


def mapped_weights(path: str) -> list[tuple[str, ort.OrtValue]]:
    """The external weights of the graph at `path` as OrtValues over one copy-on-write map of each
    weights file, made once per process. Sessions given them share those pages; each session
    that loads the file itself maps it again (measured, SmolLM2 native: ~100 MB more resident per
    packed width, against ~3 MB shared)."""
    key = _file_key(path)
    if key in _mapped:
        return _mapped[key]
    import onnx
    from onnx import TensorProto, helper
    model = onnx.load(path, load_external_data=False)
    out = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = os.path.join(os.path.dirname(path), info["location"])
        wkey = _file_key(where)
        if wkey not in _maps:
            _maps[wkey] = np.memmap(where, dtype=np.uint8, mode="c")   # "c": writable for ORT, never written back
        start = int(info.get("offset", 0))
        raw = _maps[wkey][start:start + int(info["length"])]
        array = raw.view(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
        out.append((t.name, ort.OrtValue.ortvalue_from_numpy(array)))
    _mapped[key] = out
    return out


def _file_key(path: str) -> tuple:
    """A file as it is now: a file rewritten at the same path (a recompiled bundle) is another."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns


class KVCache:
    """Preallocated key/value buffers for every layer, shared by the full graph and the drafts.

    `length` is the number of valid positions. Graphs write new positions in place; rolling back
    rejected draft tokens is lowering `length` (the stale positions are overwritten later)."""

    def __init__(self, spec: ModelSpec, capacity: int, device: str = "cpu", dtype=np.float32):
        self.capacity = int(capacity)
        self.length = 0
        # + the spare slot a padding row writes (contract.py: no pass runs a single row)
        shape = (1, spec.num_kv_heads, self.capacity + contract.KV_SPARE, spec.head_dim)
        self.device = device
        if device == "cpu":
            self._host = {}
            self.keys, self.values = {}, {}
            for i in range(spec.num_layers):
                for store, kind in ((self.keys, "k"), (self.values, "v")):
                    arr = np.zeros(shape, dtype)        # calloc'd: pages become resident as used
                    self._host[(kind, i)] = arr
                    store[i] = ort.OrtValue.ortvalue_from_numpy(arr)
        else:
            # device-resident: a step moves only token ids in and logits out. Zeroed (one host
            # copy at allocation) as the CPU buffers are, so never-written positions hold no NaN
            zeros = np.zeros(shape, np.float32)
            self.keys = {i: ort.OrtValue.ortvalue_from_numpy(zeros, device, 0) for i in range(spec.num_layers)}
            self.values = {i: ort.OrtValue.ortvalue_from_numpy(zeros, device, 0) for i in range(spec.num_layers)}

    def reset(self):
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's keys and values."""
        return sum(v.tensor_size_in_bytes() for store in (self.keys, self.values) for v in store.values())

    def key_array(self, layer: int) -> np.ndarray:
        """Host view of one layer's keys (CPU only; used by tests and the compiler's evaluator)."""
        return self._host[("k", layer)] if self.device == "cpu" else self.keys[layer].numpy()

    def value_array(self, layer: int) -> np.ndarray:
        return self._host[("v", layer)] if self.device == "cpu" else self.values[layer].numpy()


class GraphRunner:
    """One decoder graph (full, draft body or draft head) and the layers whose KV it uses.

    For a full graph: verify_boundaries, (first, every), the lengths a pass must not reach past
    unless its first row's one-token step does (bundle.verify_boundaries; None: no limit), and
    padding, how each pass's rows are padded on this machine (contract.Padding; the engine's load
    check sets it). Drafts and heads run their passes as they come (padding None)."""

    def __init__(self, session: ort.InferenceSession, kv_layers: list[int], output: str,
                 verify_boundaries: tuple[int, int] | None = None, padding: contract.Padding | None = None,
                 path: str | None = None):
        self.session = session
        self.path = path              # the graph file (packing.py derives batched graphs from it)
        self.verify_boundaries = verify_boundaries
        self.padding = padding
        meta = session.get_modelmeta().custom_metadata_map
        # positions past max_context its rotary tables cover: what padding rows may reach
        self.spare_positions = int(meta.get(contract.META_SPARE_POSITIONS, "1"))
        self.kv_layers = list(kv_layers)
        self.output = output
        self.input_names = {i.name for i in session.get_inputs()}
        missing = [i for i in self.kv_layers if contract.past_key(i) not in self.input_names]
        if missing:
            raise ValueError(f"graph has no KV inputs for layers {missing}")
        types = {i.name: i.type for i in session.get_inputs()}
        # the KV caches' element type this graph reads and writes (attention.py: float16 caches)
        self.kv_dtype = np.float16 if self.kv_layers and types[contract.past_key(self.kv_layers[0])] == \
            "tensor(float16)" else np.float32
        # the screened head (head.py): its logits are exact only where they may be the argmax,
        # unless a pass asks for all of them (full_logits, which every pass then binds)
        self.screened = contract.FULL_LOGITS in self.input_names

    def new_cache(self, spec: ModelSpec, capacity: int, device: str = "cpu") -> "KVCache":
        """A KV cache of the element type this graph's KV inputs take."""
        return KVCache(spec, capacity, device, self.kv_dtype)

    def bind(self, cache: KVCache) -> "BoundGraph":
        return BoundGraph(self, cache)

    def verify_room(self, start: int) -> int | None:
        """The most draft tokens a verify pass feeding position `start` may carry (None: no
        limit): 1 + k tokens within pass_room; 0 means a plain step."""
        room = self.pass_room(start)
        return None if room is None else room - 1

    def pass_room(self, start: int) -> int | None:
        """The most tokens one pass at `start` may take without reaching past a verify boundary
        (contract.Padding.pass_room; None: any)."""
        if self.verify_boundaries is None:
            return None
        return (self.padding or contract.SINGLE_ROW_OK).pass_room(start, self.verify_boundaries)

    def run_head(self, hidden: np.ndarray) -> np.ndarray:
        """A draft head over hidden [1, n, H] -> [1, n, V] (padded to 2 rows where single rows are)."""
        n = hidden.shape[1]
        if self.padding is not None and self.padding.rows(n) != n:
            rows = self.padding.rows(n)
            hidden = np.concatenate([hidden, np.repeat(hidden[:, -1:], rows - n, axis=1)], axis=1)
        return self.session.run([self.output], {contract.HIDDEN: hidden})[0][:, :n]


class BoundGraph:
    """A graph bound to one KV cache: KV buffers are bound once, per step only the token inputs."""

    def __init__(self, graph: GraphRunner, cache: KVCache):
        self.graph, self.cache = graph, cache
        b = graph.session.io_binding()
        for i in graph.kv_layers:
            b.bind_ortvalue_input(contract.past_key(i), cache.keys[i])
            b.bind_ortvalue_output(contract.present_key(i), cache.keys[i])
            b.bind_ortvalue_input(contract.past_value(i), cache.values[i])
            b.bind_ortvalue_output(contract.present_value(i), cache.values[i])
        self.binding = b

    def run(self, tokens, start: int, logits_from: int = 0, full_logits: bool = False) -> np.ndarray:
        """Feed `tokens` at positions start.. (writing their KV in place); returns the output rows
        for positions start+logits_from.. as [rows, width]. full_logits: every logit exact, where
        the graph has the screened head (a sampled row needs them; greedy rows need only the argmax,
        the same either way)."""
        n = len(tokens)
        if start + n > self.cache.capacity:
            raise ValueError(f"context length {start + n} exceeds the KV cache capacity {self.cache.capacity}")
        pad = self.graph.padding
        rows = n if pad is None else pad.rows(n)
        first = logits_from if pad is None else pad.head_from(logits_from, rows)
        ids = np.empty((1, rows), np.int64)
        ids[0, :n] = tokens
        ids[0, n:] = ids[0, n - 1]              # padding rows: copies of the last token
        b = self.binding
        b.bind_cpu_input(contract.INPUT_IDS, ids)
        b.bind_cpu_input(contract.SEQLENS, np.array([start + rows - 1], np.int32))
        b.bind_cpu_input(contract.TOTAL, np.array(start + rows, np.int32))
        b.bind_cpu_input(contract.LOGITS_FROM, np.array([first], np.int64))
        if self.graph.screened:
            b.bind_cpu_input(contract.FULL_LOGITS, np.array([int(full_logits)], np.int64))
        b.bind_output(self.graph.output, "cpu")
        self.graph.session.run_with_iobinding(b)
        out = b.get_outputs()[-1].numpy()[0]
        return out if rows == n and first == logits_from else out[logits_from - first: n - first]
