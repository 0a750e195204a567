"""What a draft keeps of the full model (layers, sub-layers, precision and vocabulary: DraftPlan)
and how far it drafts (DraftPolicy for a model draft, NGramPolicy for prompt lookup).

Shared by the compiler (which searches and exports plans) and the runtime (which reads them from
profiles), so both sides name a draft the same way.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

# fp32, our round-to-nearest int8/int4 blocks, or "native": the model file's own quantized
# weights (a GGUF's Q4_1, Q4_K, ...), the precision a `--target native` bundle's full graph runs at.
PRECISIONS = ("fp32", "int8", "int4", "native")


def weights_file_name(precision: str) -> str:
    """The bundle's weights file of a precision: fp32 graphs share the full graph's weights.bin,
    every graph of another precision shares weights_<precision>.bin."""
    return "weights.bin" if precision == "fp32" else f"weights_{precision}.bin"


def head_key(precision: str, vocab_ids=None) -> str:
    """Name of a draft head graph: heads with equal precision and vocabulary are one graph."""
    if vocab_ids is None:
        return f"{precision}-full"
    ids = [int(t) for t in vocab_ids]
    return f"{precision}-{hashlib.sha256(struct.pack(f'<{len(ids)}q', *ids)).hexdigest()[:10]}"


@dataclass(frozen=True)
class DraftPlan:
    num_layers: int
    skip_layers: tuple[int, ...] = ()        # whole layers removed
    skip_attention: tuple[int, ...] = ()     # only the attention block removed
    skip_mlp: tuple[int, ...] = ()           # only the MLP block removed
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"draft precision {self.precision!r} is not one of {PRECISIONS}")
        for name in ("skip_layers", "skip_attention", "skip_mlp"):
            vals = getattr(self, name)
            object.__setattr__(self, name, tuple(sorted(set(int(v) for v in vals))))
            bad = [v for v in getattr(self, name) if not 0 <= v < self.num_layers]
            if bad:
                raise ValueError(f"{name} has layer indices {bad} outside 0..{self.num_layers - 1}")
        overlap = set(self.skip_layers) & (set(self.skip_attention) | set(self.skip_mlp))
        if overlap:
            raise ValueError(f"layers {sorted(overlap)} are skipped whole and by sub-layer at once")
        both = set(self.skip_attention) & set(self.skip_mlp)
        if both:  # normalise: skipping both halves is skipping the layer
            object.__setattr__(self, "skip_layers", tuple(sorted(set(self.skip_layers) | both)))
            object.__setattr__(self, "skip_attention", tuple(sorted(set(self.skip_attention) - both)))
            object.__setattr__(self, "skip_mlp", tuple(sorted(set(self.skip_mlp) - both)))

    def keeps_attention(self, layer: int) -> bool:
        return layer not in self.skip_layers and layer not in self.skip_attention

    def keeps_mlp(self, layer: int) -> bool:
        return layer not in self.skip_layers and layer not in self.skip_mlp

    @property
    def kv_layers(self) -> list[int]:
        """Layers whose KV cache the draft reads and writes (those that keep attention)."""
        return [i for i in range(self.num_layers) if self.keeps_attention(i)]

    @property
    def skipped_fraction(self) -> float:
        """Fraction of the layer stack removed, counting a half-layer as half."""
        half = len(self.skip_attention) + len(self.skip_mlp)
        return (len(self.skip_layers) + 0.5 * half) / self.num_layers

    def to_json(self) -> dict:
        return {
            "skip_layers": list(self.skip_layers),
            "skip_attention": list(self.skip_attention),
            "skip_mlp": list(self.skip_mlp),
            "precision": self.precision,
        }

    @classmethod
    def from_json(cls, d: dict, num_layers: int) -> "DraftPlan":
        return cls(
            num_layers=num_layers,
            skip_layers=tuple(d.get("skip_layers", ())),
            skip_attention=tuple(d.get("skip_attention", ())),
            skip_mlp=tuple(d.get("skip_mlp", ())),
            precision=d.get("precision", "fp32"),
        )

    @property
    def key(self) -> str:
        """Short stable name, used for graph file names: drafts with equal plans share a graph."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return f"{self.precision}-{hashlib.sha256(blob).hexdigest()[:10]}"


@dataclass(frozen=True)
class DraftPolicy:
    max_tokens: int = 5                       # k: most tokens drafted per step
    confidence_stop: float | None = None      # stop drafting after a token whose top-1 prob is below

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.confidence_stop is not None and not 0.0 <= self.confidence_stop < 1.0:
            raise ValueError("confidence_stop must be in [0, 1)")


@dataclass(frozen=True)
class NGramPolicy:
    n_min: int = 1              # shortest match used
    n_max: int = 3              # longest match tried first
    max_tokens: int = 8         # longest proposal
    min_match: int = 2          # hybrid: shorter matches are left to the model draft

    def __post_init__(self):
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min} n_max={self.n_max}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_match < 1:
            raise ValueError("min_match must be >= 1")

    def to_json(self) -> dict:
        return {"n_min": self.n_min, "n_max": self.n_max, "max_tokens": self.max_tokens,
                "min_match": self.min_match}

    @classmethod
    def from_json(cls, d: dict) -> "NGramPolicy":
        if not isinstance(d, dict):
            raise ValueError("the n-gram settings must be an object")
        kw = {}
        for k in ("n_min", "n_max", "max_tokens", "min_match"):
            if k in d:
                v = d[k]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{k} must be an integer, got {v!r}")
                kw[k] = v
        unknown = set(d) - {"n_min", "n_max", "max_tokens", "min_match"}
        if unknown:
            raise ValueError(f"unknown n-gram settings {sorted(unknown)}")
        return cls(**kw)
