"""The target: the precision the full graph runs at, which drafts are measured against.

    native  the model file's own weights: a GGUF file's quantized blocks, exactly (Q4_1, Q4_K,
            Q6_K, ...; see export/gguf_import.py); for a safetensors checkpoint, fp32
    fp32    the weights in fp32 (a GGUF file dequantized)
    int8    round-to-nearest symmetric 8-bit blocks of 32 (fp32 scale per block, no offset)
    int4    the same with 4-bit codes
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TARGETS = ("native", "fp32", "int8", "int4")
# Draft precisions the search considers by default, per target precision: drafts cheaper than the
# target. (2-bit MatMulNBits measured slower than 4-bit on this CPU: 43 vs 21 us per matmul.)
DEFAULT_DRAFT_PRECISIONS = {"fp32": ("fp32", "int8"), "int8": ("int8", "int4"), "int4": ("int4",),
                            "native": ("native", "int4")}


@dataclass
class Target:
    precision: str                                   # the full graph's precision
    native: dict = field(default_factory=dict)       # canonical name -> QuantMatrix (native only)
    types: dict = field(default_factory=dict)        # GGUF tensor types {name: count} (native only)
    verify_boundaries: tuple | None = None   # (first, every): see check_verify_identity

    def describe(self) -> dict:
        """The manifest's and profiles' record of the target."""
        d = {"precision": self.precision}
        if self.types:
            d["gguf_types"] = self.types
        return d


def resolve_target(choice: str, resolved, spec, weights: dict[str, np.ndarray], log=None) -> Target:
    """--target CHOICE for a resolved model. `native` reads the GGUF the model came from (every
    quantized matrix checked against `weights`, transformers' dequantization of the same file);
    a model without a GGUF file has fp32 as its native precision."""
    if choice not in TARGETS:
        raise ValueError(f"--target {choice!r} is not one of {', '.join(TARGETS)}")
    gguf = getattr(resolved, "gguf", None)
    if choice in ("int8", "int4"):
        _check_block_shapes(spec, choice)
    if choice != "native" or not gguf:
        return Target("fp32" if choice == "native" else choice)
    from .export.gguf_import import describe_types, read_native
    if log:
        log(f"  reading the GGUF file's own quantized weights ({gguf.rsplit('/', 1)[-1]})")
    native = read_native(gguf, spec, weights)
    return Target("native", native, describe_types(gguf))


def _check_block_shapes(spec, choice: str):
    """Every matmul's input width must be whole blocks of 32: a padded block would quantize
    zeros into the target the model never had."""
    from .export.quantize import BLOCK_SIZE
    widths = {"hidden size": spec.hidden_size, "intermediate size": spec.intermediate_size,
              "attention width (heads x head dim)": spec.num_heads * spec.head_dim}
    bad = [f"{k} {v}" for k, v in widths.items() if v % BLOCK_SIZE]
    if bad:
        raise ValueError(f"--target {choice} quantizes in blocks of {BLOCK_SIZE} inputs, which do not divide "
                         f"the model's {', '.join(bad)}; use --target fp32 (or native for a GGUF file)")


class TargetNotExact(ValueError):
    """A quantized target whose verify passes are not bit-identical to single steps here."""


def check_verify_identity(full, spec, widths, length: int = 300, seed: int = 0) -> tuple[int, int] | None:
    """A quantized target is only lossless if a verify pass over n tokens computes each position
    bit for bit as n single steps do: MatMulNBits' int8 activations turn the smallest rounding
    difference into other tokens. Checked on the built full graph: a pass of every width in
    `widths` (2 is always added) at every start over `length` positions of a single-step cache.

    Returns None when every pass is exact, or the verify boundaries (first, every): lengths
    B = first + i * every that a pass must not reach past unless it starts past them (the runtime
    shortens drafts to respect them: GraphRunner.verify_room). Measured: SmolLM2 holds everywhere.
    Gemma 3 (head_dim 256) has boundaries at 64, 192, 320, ...: ONNX Runtime's CPU
    GroupQueryAttention rounds the rows just below such a length differently when their pass
    reaches past it. TargetNotExact when the inexact passes follow no such rule."""
    from conflayers.runtime.ort_backend import KVCache
    widths = sorted(set(widths) | {2})
    ids = [int(x) for x in np.random.default_rng(seed).integers(10, spec.vocab_size - 10, length)]
    cache = KVCache(spec, length + max(widths) + 2)
    steps = full.bind(cache)
    expected = np.stack([steps.run([t], j)[-1] for j, t in enumerate(ids)])
    layers = range(spec.num_layers)
    pristine = {(kind, i): (cache.key_array(i) if kind == "k" else cache.value_array(i)).copy()
                for kind in "kv" for i in layers}
    bad = []              # (start, width, max logit difference) of inexact passes
    for n in widths:
        for st in range(0, length - n + 1):
            got = steps.run(ids[st:st + n], st)
            for (kind, i), arr in pristine.items():       # undo what the pass wrote
                live = cache.key_array(i) if kind == "k" else cache.value_array(i)
                live[:, :, st:st + n + 1] = arr[:, :, st:st + n + 1]
            diff = float(np.abs(got - expected[st:st + n]).max())
            if diff:
                bad.append((st, n, diff))
    if not bad:
        return None

    def refuse(why):
        st, n, diff = bad[0]
        return TargetNotExact(
            f"this target is not exact on this backend: a {n}-token verify pass at position {st} computes "
            f"its tokens differently from single steps (max logit difference {diff:.3g}) and {why}, so "
            "speculative output could differ from plain decoding. Compile with --target fp32 (or int8/int4 "
            "of a model without this attention shape)")
    # a 2-token pass at st reaches length st + 3 (its padding row included): it crosses B = st + 2
    found = sorted({st + 2 for st, n, _ in bad if n == 2})
    gaps = {b - a for a, b in zip(found, found[1:])}
    # regular: at least two, evenly spaced, none missing before `length`
    if len(found) < 2 or len(gaps) != 1 or found[-1] + min(gaps) <= length:
        raise refuse(f"the inexact passes follow no regular boundary (found at {found[:8]})")
    bounds = (found[0], min(gaps))
    if bounds[1] <= max(widths):
        raise refuse(f"boundaries every {bounds[1]} tokens leave no room for drafts")
    crosses = lambda st, n: any(st + 2 <= b < st + n + 1 for b in range(bounds[0], length + n + 2, bounds[1]))  # noqa: E731
    if not all(crosses(st, n) for st, n, _ in bad):
        raise refuse(f"not only where a pass crosses a boundary (first {bounds[0]}, every {bounds[1]})")
    return bounds
