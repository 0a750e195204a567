"""Whether a full graph computes each row bit for bit alike in every pass shape, on this machine.

Speculative output equals plain decoding only if a verify pass over n tokens computes each of
them exactly as n one-token steps do, and a batched pass as the solo one. The graphs are built so
(contract.py: no pass runs a single row), but the kernels are this machine's: ONNX Runtime picks
them by instruction set and version. So the compiler checks the target where it builds it, and
the runtime checks it again where it serves it (Engine.load), on the pass shapes it will use:

  reference   a one-token step at each of `length` positions (random tokens)
  dense       passes of 2 and 3 tokens at every start (also where boundaries show, below)
  sparse      every verify width at a few starts, and prefill-like passes over all positions
              (split where the runtime splits them)

Verify boundaries: Gemma 3 (head_dim 256) on ONNX Runtime's CPU GroupQueryAttention computes the
rows just below lengths 64, 192, 320, ... differently when their pass reaches past such a length
B while their own one-token step does not. Passes that never reach past B from below are exact,
so the runtime keeps every pass off them (GraphRunner.verify_room). `scan` finds them as
(first, every); the load check finds them again here, or refuses the target.

The result of the load check is cached per (graph, weights, ONNX Runtime version, kernel path,
threads) under $CONFLAYERS_CACHE/exactness/, so a service pays for it once per machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass

import numpy as np

from . import attention, contract, head, kernels

LOAD_CHECK_LENGTH = 140      # positions of the load check: a 129-row pass fits
BOUNDARY_CHECK_LENGTH = 200  # ... of a target with verify boundaries: two of Gemma's (64, 192) fit


class TargetNotExact(ValueError):
    """A target whose passes are not bit-identical to one-token steps on this machine."""


# -- this machine -------------------------------------------------------------------------------
def kernel_path() -> str:
    """The instruction set ONNX Runtime's CPU kernels (MLAS) dispatch to here, as MLAS picks it:
    x86-64 AVX-512 VNNI > AVX-512 > AVX2-VNNI > AVX2 > SSE; ARM NEON with dotprod / i8mm / SVE.
    From the CPU's own answer (CPUID, as numpy reads it), /proc/cpuinfo where numpy cannot say:
    inside an emulator or some VMs the file describes the host, not the CPU the code runs on."""
    machine = platform.machine().lower()
    cpu = _numpy_features()
    flags = _cpuinfo_flags()
    has = (lambda name, flag: cpu[name] if name in cpu else flag in flags)   # noqa: E731
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if all(has(n, f) for n, f in (("AVX512F", "avx512f"), ("AVX512BW", "avx512bw"),
                                       ("AVX512DQ", "avx512dq"), ("AVX512VL", "avx512vl"))):
            return "x86_64 avx512vnni" if has("AVX512VNNI", "avx512_vnni") else "x86_64 avx512"
        if has("AVX2", "avx2") and has("FMA3", "fma"):
            # numpy does not report AVX-VNNI: trust the file only if it agrees there is no AVX-512
            vnni = "avx_vnni" in flags and "avx512f" not in flags
            return "x86_64 avx2vnni" if vnni else "x86_64 avx2"
        return "x86_64 sse"
    if machine in ("aarch64", "arm64"):
        extra = [name for key, flag, name in (("ASIMDDP", "asimddp", "dotprod"), ("I8MM", "i8mm", "i8mm"),
                                              ("SVE", "sve", "sve")) if has(key, flag)]
        return "aarch64 neon" + "".join(f"+{e}" for e in extra)
    return f"{machine} unknown"


def _numpy_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as f
        except ImportError:
            return {}
    return dict(f)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def machine(num_threads: int | None = None) -> dict:
    """What decides the kernels a bundle runs with: recorded in the manifest where the compiler
    checked it, and the key of the load check's cache."""
    import onnxruntime as ort
    threads = num_threads or int(os.environ.get("CONFLAYERS_THREADS", "0")) or (os.cpu_count() or 1)
    return {"onnxruntime": ort.__version__, "kernels": kernel_path(), "threads": int(threads),
            "conflayers_kernels": kernels.describe(),     # the custom ops' kernels, or their ONNX functions
            "attention": attention.OP if attention.available() else "GroupQueryAttention",
            "head": "screened" if head.available() else "plain"}      # the full graph's head (head.py)


# -- passes ---------------------------------------------------------------------------------------
def padding_of(full) -> contract.Padding:
    """How `full` pads its passes (a graph without padding: as SINGLE_ROW_OK, the 128 j + 1 rule
    aside, which no pass of these checks reaches)."""
    return getattr(full, "padding", None) or contract.SINGLE_ROW_OK


@dataclass
class Pass:
    start: int
    n: int
    diff: float         # max |logit difference| against the one-token steps (0.0: exact)


class _Probe:
    """One-token steps over `length` random positions as the reference, and passes to compare."""

    def __init__(self, full, spec, length: int, seed: int):
        from .ort_backend import KVCache
        self.full = full
        self.pad = padding_of(full)
        rng = np.random.default_rng(seed)
        self.ids = [int(x) for x in rng.integers(min(10, spec.vocab_size - 1), max(11, spec.vocab_size - 10), length)]
        self.cache = KVCache(spec, length + 2, dtype=full.kv_dtype)
        self.steps = full.bind(self.cache)
        self.expected = [self._digest(self.steps.run([t], j)[-1]) for j, t in enumerate(self.ids)]
        self.layers = range(spec.num_layers)
        self.pristine = {(kind, i): self._kv(kind, i).copy() for kind in "kv" for i in self.layers}

    def _kv(self, kind, i):
        return self.cache.key_array(i) if kind == "k" else self.cache.value_array(i)

    @staticmethod
    def _digest(row: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(row, np.float32).tobytes(), digest_size=12).digest()

    def run(self, st: int, n: int, last: int | None = None) -> Pass:
        """A pass of n tokens at st, its rows compared to the steps (only its `last` rows, as a
        prefill returns them: they attend over every earlier row's KV, so a row computed otherwise
        shows there too, and a large vocabulary's logits of every row would bloat the session's
        memory arena); the cache restored after."""
        first = 0 if last is None else max(n - last, 0)
        got = self.steps.run(self.ids[st:st + n], st, logits_from=first)
        for (kind, i), arr in self.pristine.items():          # undo what the pass wrote
            self._kv(kind, i)[:, :, st:st + n + 3] = arr[:, :, st:st + n + 3]
        bad = [j for j in range(first, n) if self._digest(got[j - first]) != self.expected[st + j]]
        if not bad:
            return Pass(st, n, 0.0)
        j = bad[0]                     # how far off (the step again, now that it is needed)
        ref = self.steps.run([self.ids[st + j]], st + j)[-1]
        for (kind, i), arr in self.pristine.items():
            self._kv(kind, i)[:, :, st + j:st + j + 3] = arr[:, :, st + j:st + j + 3]
        return Pass(st, n, _max_diff(got[j - first], ref))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, equal values counting 0 (the screened head's -inf logits, head.py, included)."""
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d[a == b] = 0.0
    return float(d.max())


SCAN_LIMIT = 1200            # longest scan that looks for a second boundary (Gemma 3 here: every 256)


class TooFewBoundaries(TargetNotExact):
    """Inexact passes around a single boundary: its period shows only over more positions."""


def scan(full, spec, widths, length: int = 300, seed: int = 0, limit: int = SCAN_LIMIT) -> tuple[int, int] | None:
    """The compile-time check of a quantized target: a pass of every width in `widths` (2 and 3
    always added) at every start over `length` positions (more, up to SCAN_LIMIT, when only one
    boundary shows; never past `limit`, the positions the graph covers). Returns None when every
    pass is exact, or the verify boundaries (first, every) when the inexact passes are exactly those
    that reach past such a length from below; TargetNotExact otherwise."""
    widths = sorted(set(widths) | {2, 3})
    return _dense(full, spec, widths, min(length, limit), seed, None, limit)[2]


def _dense(full, spec, widths, length, seed, recorded, limit):
    """Passes of each width in `widths` at every start over `length` positions, and the boundaries
    they show (boundaries_of), over twice the positions while only one boundary shows. Returns
    (probe, passes, boundaries, length)."""
    while True:
        probe = _Probe(full, spec, length, seed)
        passes = [probe.run(st, n) for n in widths for st in range(0, length - n + 1)]
        try:
            return probe, passes, boundaries_of(passes, probe.pad, length, max(widths), recorded), length
        except TooFewBoundaries:
            if length >= min(SCAN_LIMIT, limit):
                raise
            length = min(2 * length, SCAN_LIMIT, limit)


def boundaries_of(passes: list[Pass], pad: contract.Padding, length: int, widest: int,
                  recorded: tuple | None = None) -> tuple[int, int] | None:
    """(first, every) explaining every inexact pass in `passes` as one that reaches past a length
    first + i * every from below, None when all are exact; TargetNotExact when no such rule does.
    The rule is `recorded` (the bundle's) where the boundaries found are among its own, else the
    one the boundaries found follow (at least two, evenly spaced, none missing)."""
    bad = [p for p in passes if p.diff]
    if not bad:
        return None

    def refuse(why, kind=TargetNotExact):
        p = bad[0]
        return kind(f"a {p.n}-token pass at position {p.start} computes its tokens differently from one-token "
                    f"steps (max logit difference {p.diff:.3g}) and {why}, so speculative output could differ "
                    "from plain decoding")
    # a pass that reaches one past its first row's own step crosses only B = that step's reach
    found = sorted({pad.reach(p.start, 1) for p in bad if pad.reach(p.start, p.n) == pad.reach(p.start, 1) + 1})
    rules = []
    if recorded and found and all(b >= recorded[0] and (b - recorded[0]) % recorded[1] == 0 for b in found):
        rules.append(recorded)
    gaps = {b - a for a, b in zip(found, found[1:])}
    if len(found) >= 2 and len(gaps) == 1 and found[-1] + min(gaps) > length:
        rules.append((found[0], min(gaps)))
    if not rules:
        kind = TooFewBoundaries if len(found) == 1 else TargetNotExact
        raise refuse(f"the inexact passes follow no regular boundary (found at {found[:8]})", kind)
    for first, every in rules:
        if every <= widest:
            raise refuse(f"boundaries every {every} tokens leave no room for drafts")
        if all(crosses(p.start, p.n, pad, (first, every)) for p in bad):
            return first, every
    raise refuse(f"not only where a pass crosses a boundary (first {rules[0][0]}, every {rules[0][1]})")


def crosses(start: int, n: int, pad: contract.Padding, bounds: tuple[int, int] | None) -> bool:
    """Whether a pass of n tokens at `start` reaches past a boundary its first row's step does not."""
    return bounds is not None and contract.next_boundary(pad.reach(start, 1), bounds) < pad.reach(start, n)


# -- the load check ---------------------------------------------------------------------------------
@dataclass
class Verdict:
    exact: bool
    boundaries: tuple | None      # (first, every) found here, or the bundle's when none showed
    checked: str                  # what was run, in words
    problem: str | None = None    # why not exact
    padding: str = contract.PAD_SINGLE.name   # the contract.Padding it holds with

    def to_json(self) -> dict:
        d = asdict(self)
        d["boundaries"] = None if self.boundaries is None else list(self.boundaries)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Verdict":
        b = d.get("boundaries")
        return cls(bool(d["exact"]), None if b is None else (int(b[0]), int(b[1])), str(d["checked"]),
                   d.get("problem"), contract.PADDINGS[d.get("padding", contract.PAD_SINGLE.name)].name)


def choose(full, spec, widths, recorded: tuple | None, limit: int) -> Verdict:
    """The cheapest padding (contract.py) under which `full` is exact here, by load_check: rows
    as they come where the one-row kernels agree with the others (AVX-512 VNNI), else one-token
    passes padded (exact by construction), else every pass padded (what verify boundaries need
    when one-token passes are); sets full.padding to it. The last verdict when none holds.
    `limit`: the most positions the checks may use (the graph's context)."""
    candidates = [contract.SINGLE_ROW_OK, contract.PAD_EVERY] if recorded else \
        [contract.SINGLE_ROW_OK, contract.PAD_SINGLE, contract.PAD_EVERY]
    verdict = None
    for pad in candidates:
        full.padding = pad
        verdict = load_check(full, spec, widths, recorded, limit)
        if verdict.exact:
            return verdict
    return verdict


def load_check(full, spec, widths, recorded: tuple | None, limit: int, prefill_chunk: int = 32,
               seed: int = 1) -> Verdict:
    """The short check Engine.load runs on a quantized target (see the module docstring): dense
    passes of 2 and 3 tokens, each verify width in `widths` at a few starts, and prefill-like
    passes (all `length` positions, a chunk of `prefill_chunk`, a 129-token pass) split at the
    boundaries as the runtime splits them."""
    widths = sorted(set(widths) | {2, 3})
    # two of the recorded boundaries within reach
    length = max(BOUNDARY_CHECK_LENGTH, recorded[0] + recorded[1] + 16) if recorded else LOAD_CHECK_LENGTH
    length = min(length, limit)
    try:
        probe, _, bounds, length = _dense(full, spec, [2, 3], length, seed, recorded, limit)
    except TargetNotExact as e:
        return Verdict(False, recorded, _said(length, widths), str(e), padding_of(full).name)
    pad = probe.pad
    if bounds is None:
        bounds = recorded          # none showed here within `length`: keep what the compiler found
    more = []
    for n in widths[2:] + [prefill_chunk]:
        for st in (0, 1, (length - n) // 2, length - n):
            if 0 <= st <= length - n and not crosses(st, n, pad, bounds):
                more.append(probe.run(st, n, last=2 if n == prefill_chunk else None))
    for n in (length, 129):           # prefills, cut where the runtime cuts them
        st = 0
        while st < min(n, length):
            piece = min(n, length) - st
            room = pad.pass_room(st, bounds)
            piece = piece if room is None else max(1, min(piece, room))
            more.append(probe.run(st, piece, last=2))
            st += piece
    bad = [p for p in more if p.diff]
    if bad:
        p = bad[0]
        return Verdict(False, bounds, _said(length, widths),
                       f"a {p.n}-token pass at position {p.start} computes its tokens differently from one-token "
                       f"steps (max logit difference {p.diff:.3g})", pad.name)
    return Verdict(True, bounds, _said(length, widths), None, pad.name)


def _said(length: int, widths) -> str:
    return (f"one-token steps at {length} positions against 2- and 3-token passes at every start, "
            f"{', '.join(map(str, widths[2:])) or 'no other'}-token passes and prefills")


# -- the cache ------------------------------------------------------------------------------------
def cache_path(key: dict) -> str:
    root = os.path.abspath(os.path.expanduser(os.environ.get("CONFLAYERS_CACHE") or "~/.cache/conflayers"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(root, "exactness", f"{digest}.json")


def cached(key: dict) -> Verdict | None:
    try:
        with open(cache_path(key), encoding="utf-8") as f:
            d = json.load(f)
        if d.get("key") == key:
            return Verdict.from_json(d["verdict"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return None


def remember(key: dict, verdict: Verdict) -> None:
    """Store a verdict (best effort: a read-only cache only costs the check at the next start)."""
    path = cache_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "verdict": verdict.to_json()}, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
