"""Decoder-only architectures the compiler understands, as data.

Each supported Hugging Face `model_type` maps to an Architecture: how to read its config into a
ModelSpec, where its per-layer weights live, and which modules produce the attention and MLP
outputs that are added to the residual stream (for the confidence hooks). Adding a Llama-like
architecture is one entry in ARCHITECTURES.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conflayers.runtime.modelspec import ModelSpec


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    # HF parameter names inside one decoder layer, keyed by our canonical names.
    layer_weights: dict
    # Modules whose outputs are what the layer adds to the residual stream.
    attn_output_module: str
    mlp_output_module: str
    gemma_style: bool = False


LLAMA_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}

GEMMA3_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}

# Qwen3: a Llama layer plus an RMSNorm over each head of q and k before the rotary embedding
QWEN3_LAYER = {**LLAMA_LAYER, "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}

LLAMA = Architecture(("llama", "mistral", "qwen2"), LLAMA_LAYER, "self_attn", "mlp")
QWEN3 = Architecture(("qwen3",), QWEN3_LAYER, "self_attn", "mlp")
GEMMA3 = Architecture(("gemma3_text",), GEMMA3_LAYER, "post_attention_layernorm",
                      "post_feedforward_layernorm", gemma_style=True)
ARCHITECTURES = (LLAMA, QWEN3, GEMMA3)
SUPPORTED = tuple(t for a in ARCHITECTURES for t in a.model_types)

NORM_NAMES = ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")
MATMUL_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}. "
        "Decoder-only Llama-like models are a small addition in conflayers/compiler/arch.py.")


def _rope_theta(config, layer_type: str | None) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type and layer_type in params:      # Gemma 3 keeps one entry per layer type
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedArchitecture(
            f"rope_type {rope_type!r} is not supported (only 'default' rotary embeddings)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedArchitecture("config has no rope_theta")
    return float(theta)


def model_spec(config) -> ModelSpec:
    """Read a transformers config into the ModelSpec the graphs and the runtime use."""
    model_type = config.model_type
    if model_type == "gemma3":  # multimodal wrapper: the text model is what we decode with
        config = config.text_config
        model_type = config.model_type
    arch = architecture_for(model_type)
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if arch.gemma_style:
        layer_types = list(config.layer_types)
        window = int(config.sliding_window)
        sliding = tuple(window if t == "sliding_attention" else -1 for t in layer_types)
        theta = tuple(_rope_theta(config, t) for t in layer_types)
        act = config.hidden_activation
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedArchitecture(f"activation {act!r} is not supported")
        return ModelSpec(
            architecture=model_type, num_layers=n, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=float(config.rms_norm_eps), activation="gelu_tanh",
            attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
            rope_theta=theta, sliding_window=sliding,
            embed_scale=float(np.float32(config.hidden_size ** 0.5)), norm_offset=1.0,
            qk_norm=True, sandwich_norm=True, attention_bias=bool(config.attention_bias),
            final_logit_softcap=float(config.final_logit_softcapping or 0.0),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"activation {act!r} is not supported (only silu)")
    window = getattr(config, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        window = None
    return ModelSpec(
        architecture=model_type, num_layers=n, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=float(config.rms_norm_eps), activation="silu",
        attn_scale=head_dim ** -0.5,
        rope_theta=tuple(_rope_theta(config, None) for _ in range(n)),
        sliding_window=tuple(int(window) if window else -1 for _ in range(n)),
        attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=arch is QWEN3,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def canonical_weights(spec: ModelSpec, state_dict: dict) -> dict[str, np.ndarray]:
    """Weights under canonical names, fp32 numpy. Matmul weights are [in, out] (ONNX MatMul);
    norm weights already include the architecture's offset (Gemma's 1 + w)."""
    arch = architecture_for(spec.architecture)

    def get(name):
        t = state_dict.get(name)
        if t is None:
            t = state_dict.get("model." + name)
        if t is None:
            t = state_dict.get("model.language_model." + name)
        return None if t is None else t.detach().float().cpu().numpy()

    out = {}
    embed = get("model.embed_tokens.weight")
    if embed is None:
        embed = get("embed_tokens.weight")
    if embed is None:
        raise UnsupportedArchitecture("cannot locate the token embedding (model.embed_tokens)")
    out["embed"] = embed
    lm_head = get("lm_head.weight")
    out["lm_head"] = embed if (lm_head is None or spec.tie_word_embeddings) else lm_head
    norm = get("model.norm.weight")
    if norm is None:
        norm = get("norm.weight")
    if norm is None:
        raise UnsupportedArchitecture("cannot locate the final norm (model.norm)")
    out["final_norm"] = norm + spec.norm_offset
    for i in range(spec.num_layers):
        for canon, hf in arch.layer_weights.items():
            w = get(f"model.layers.{i}.{hf}")
            if w is None:
                w = get(f"layers.{i}.{hf}")
            if w is None:
                if canon.endswith("_bias") and not spec.attention_bias:
                    continue
                raise UnsupportedArchitecture(f"cannot locate layer weight {hf} of layer {i}")
            if canon in NORM_NAMES:
                w = w + spec.norm_offset
            elif canon in MATMUL_NAMES:
                w = np.ascontiguousarray(w.T)
            out[f"layers.{i}.{canon}"] = w
    return out
