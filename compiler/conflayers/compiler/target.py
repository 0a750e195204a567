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
    verify_boundaries: tuple | None = None   # (first, every): see runtime/exactness.py
    checked_on: dict | None = None           # exactness.machine() where its exactness was checked
    padding: object = None                   # contract.Padding it was found exact with there
    fallback: dict | None = None             # --fallback-target: the target asked for and why not

    def describe(self) -> dict:
        """The manifest's and profiles' record of the target."""
        d = {"precision": self.precision}
        if self.types:
            d["gguf_types"] = self.types
        if self.fallback:
            d["fallback_from"] = self.fallback
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
