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


def check_verify_identity(full, spec, widths, length: int = 160, seed: int = 0):
    """A quantized target is only lossless if a verify pass over n tokens computes each position
    bit for bit as n single steps do: MatMulNBits' int8 activations turn the smallest rounding
    difference into other tokens. Checked on the built full graph over `length` positions (past
    64: kernels change paths with the context) for every verify width. Measured: SmolLM2 holds;
    Gemma 3 (head_dim 256) does not, as ONNX Runtime's CPU GroupQueryAttention rounds differently
    for different row counts past 64 tokens of context."""
    from conflayers.runtime.ort_backend import KVCache
    ids = [int(x) for x in np.random.default_rng(seed).integers(10, spec.vocab_size - 10, length)]
    steps_cache = KVCache(spec, length + 2)
    steps = full.bind(steps_cache)
    expected = np.stack([steps.run([t], j)[-1] for j, t in enumerate(ids)])
    for n in widths:
        bound = full.bind(KVCache(spec, length + 2))
        got = np.concatenate([bound.run(ids[j:j + n], j) for j in range(0, length, n)])
        if not np.array_equal(got, expected):
            first = int(np.nonzero(np.abs(got - expected).max(-1) > 0)[0][0])
            raise TargetNotExact(
                f"this target is not exact on this backend: a {n}-token verify pass computes position "
                f"{first} differently from single steps (max logit difference "
                f"{float(np.abs(got - expected).max()):.3g}), so speculative output could differ from plain "
                "decoding. Compile with --target fp32 (or int8/int4 of a model without this attention "
                "shape)")
