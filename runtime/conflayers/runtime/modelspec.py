"""The model facts the runtime needs, independent of torch and of the architecture's code.

The compiler fills a ModelSpec from a Hugging Face config; the bundle's manifest stores it, so
the runtime can size KV caches and map layers without transformers.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    architecture: str            # Hugging Face model_type, e.g. "llama", "gemma3_text"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    activation: str              # "silu" or "gelu_tanh"
    attn_scale: float
    rope_theta: tuple[float, ...]        # per layer
    sliding_window: tuple[int, ...]      # per layer, -1 = full attention
    embed_scale: float = 1.0             # Gemma multiplies embeddings by sqrt(hidden)
    norm_offset: float = 0.0             # Gemma's RMSNorm scales by (offset + weight)
    qk_norm: bool = False                # per-head RMSNorm on q and k (Gemma 3)
    sandwich_norm: bool = False          # extra norms after attention and MLP (Gemma 2/3)
    attention_bias: bool = False
    final_logit_softcap: float = 0.0
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rope_theta"] = list(self.rope_theta)
        d["sliding_window"] = list(self.sliding_window)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        """Checked field by field: a manifest is input, and a wrong type must fail here, naming the
        field, not deep in a session or a cache allocation."""
        if not isinstance(d, dict):
            raise ValueError("model spec must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model spec has unknown fields {sorted(unknown)}")
        missing = [k for k, f in cls.__dataclass_fields__.items()
                   if k not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"model spec lacks the fields {missing}")
        d = dict(d)
        for name in _POSITIVE_INTS:
            _check(d, name, _is_int(d.get(name)) and 0 < d[name] <= _MAX_SIZE, "a positive integer")
        for name in _STRINGS:
            _check(d, name, isinstance(d.get(name), str), "a string")
        for name in _NUMBERS:
            if name in d:
                _check(d, name, _is_number(d[name]), "a finite number")
        for name in _BOOLS:
            if name in d:
                _check(d, name, isinstance(d[name], bool), "true or false")
        if "extra" in d:
            _check(d, "extra", isinstance(d["extra"], dict), "an object")
        n = d["num_layers"]
        _check(d, "rope_theta", isinstance(d.get("rope_theta"), list) and len(d["rope_theta"]) == n
               and all(_is_number(v) for v in d["rope_theta"]), f"a list of {n} numbers")
        _check(d, "sliding_window", isinstance(d.get("sliding_window"), list) and len(d["sliding_window"]) == n
               and all(_is_int(v) and -1 <= v <= _MAX_SIZE for v in d["sliding_window"]),
               f"a list of {n} integers")
        d["rope_theta"] = tuple(d["rope_theta"])
        d["sliding_window"] = tuple(d["sliding_window"])
        return cls(**d)


_MAX_SIZE = 1 << 31          # larger sizes are corrupt manifests, not models
_POSITIVE_INTS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings")
_STRINGS = ("architecture", "activation")
_NUMBERS = ("rms_norm_eps", "attn_scale", "embed_scale", "norm_offset", "final_logit_softcap")
_BOOLS = ("qk_norm", "sandwich_norm", "attention_bias", "tie_word_embeddings")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) and abs(v) <= _MAX_SIZE) or (isinstance(v, float) and math.isfinite(v))


def _check(d: dict, name: str, ok: bool, what: str):
    if not ok:
        raise ValueError(f"model spec field {name!r} must be {what}, got {str(d.get(name))[:40]!r}")
