"""ONNX Runtime GenAI's model builder, run as `python -m conflayers.tools.genai_builder ARGS...`
(its own arguments), with one fix for the configs transformers 5 makes: Gemma 3 keeps its RoPE
parameters per layer type (rope_parameters = {"full_attention": {...}, "sliding_attention":
{...}}), while onnxruntime-genai 0.18's Gemma 3 builder reads the flat form (rope_parameters
["rope_type"], rope_theta, rope_local_base_freq) and fails with KeyError: 'rope_type'. The fix
gives the builder that flat form, with the same values (global layers' theta, local layers'
theta); every other config passes through unchanged."""
from __future__ import annotations

import runpy


def flatten_rope(config):
    """Give `config` (and its text_config) the flat RoPE fields, where they are per layer type."""
    for c in (config, getattr(config, "text_config", None)):
        rp = getattr(c, "rope_parameters", None) if c is not None else None
        if isinstance(rp, dict) and "rope_type" not in rp and "full_attention" in rp:
            full = rp["full_attention"]
            local = rp.get("sliding_attention", full)
            c.rope_parameters = dict(full)
            c.rope_theta = full["rope_theta"]
            c.rope_local_base_freq = local["rope_theta"]
    return config


def main():
    import transformers
    load = transformers.AutoConfig.from_pretrained
    transformers.AutoConfig.from_pretrained = staticmethod(lambda *a, **k: flatten_rope(load(*a, **k)))
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
