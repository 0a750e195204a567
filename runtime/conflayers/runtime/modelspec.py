"""The model facts the runtime needs, independent of torch and of the architecture's code.

The compiler fills a ModelSpec from a Hugging Face config; the bundle's manifest stores it, so
the runtime can size KV caches and map layers without transformers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model spec has unknown fields {sorted(unknown)}")
        d = dict(d)
        d["rope_theta"] = tuple(d["rope_theta"])
        d["sliding_window"] = tuple(d["sliding_window"])
        return cls(**d)

    @property
    def kv_shape_per_token(self) -> tuple[int, int]:
        return (self.num_kv_heads, self.head_dim)
