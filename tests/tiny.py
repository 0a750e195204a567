"""Tiny randomly initialised models and bundles for fast tests (no downloads)."""
from __future__ import annotations

import json
import os

CORPUS = [
    "Janet has 3 apples and buys 5 more. How many apples does she have now?",
    "The train leaves at 9 and arrives at 11. How long is the trip in hours?",
    "Translate the following sentence into French: the cat sleeps on the warm mat.",
    "Summarize the article about the city council meeting in two sentences.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Question: what is 12 times 7? Answer: 12 * 7 = 84. #### 84",
    "Write a short poem about the sea, the wind and the old lighthouse keeper.",
    "A farmer sells 40 eggs a day at $2 each. How much money does he make in a week?",
] * 20
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
VOCAB = 384


def make_tokenizer(out_dir: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return out_dir


def make_config(arch: str, vocab: int = VOCAB, layers: int = 4):
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, initializer_range=0.2, rope_theta=10000.0,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, initializer_range=0.2, rope_theta=10000.0,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                           tie_word_embeddings=True, initializer_range=0.2, rope_theta=10000.0,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gemma3_text":
        from transformers import Gemma3TextConfig
        types = ["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3) + \
                ["sliding_attention"] * (layers % 3)
        return Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                max_position_embeddings=512, sliding_window=8, layer_types=types,
                                query_pre_attn_scalar=16, initializer_range=0.2,
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    raise ValueError(arch)


def make_model(arch: str, tokenizer_dir: str | None = None, seed: int = 0, layers: int = 4):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, layers=layers), dtype=torch.float32)
    model.eval()
    return model


def identity(spec, weights, name="tiny"):
    from conflayers.compiler.export.bundle_writer import fingerprint, model_identity
    return model_identity(name, spec, fingerprint(spec, weights))


def profile_json(task: str, model: dict, precision="int8", skip_layers=(), skip_attention=(), skip_mlp=(),
                 k=4, confidence_stop=None, vocab_ids=None, signature=None) -> dict:
    return {
        "schema": "conflayers.profile", "schema_version": 1, "task": task, "model": model,
        "draft": {"skip_layers": list(skip_layers), "skip_attention": list(skip_attention),
                  "skip_mlp": list(skip_mlp), "precision": precision, "max_draft_tokens": k,
                  "confidence_stop": confidence_stop,
                  "vocab_subset": None if vocab_ids is None else {"size": len(vocab_ids), "token_ids": list(vocab_ids)}},
        "selection": {"signature": signature or {}},
    }


def native_weights(spec, weights: dict, type_name: str = "Q4_1", embed_type: str | None = None):
    """The tiny model as if it came from a GGUF file of `type_name`: every matmul weight and the
    (tied) embedding (of `embed_type`, default `type_name`; real files keep it in Q8_0 or Q6_K)
    quantized by the gguf package, read back by the native importer. Returns (canonical weights =
    the gguf package's dequantization, native QuantMatrix dict)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    from conflayers.compiler.arch import MATMUL_NAMES
    from conflayers.compiler.export.gguf_import import from_blocks
    out, native = dict(weights), {}
    for name, w in weights.items():
        if name == "embed" or name.split(".")[-1] in MATMUL_NAMES:
            kind = (embed_type or type_name) if name == "embed" else type_name
            qtype = GGMLQuantizationType[kind]
            rows = w if name == "embed" else w.T                # GGUF layout: [N, K]
            raw = gq.quantize(np.ascontiguousarray(rows), qtype)
            deq = gq.dequantize(raw, qtype).astype(np.float32)
            out[name] = deq if name == "embed" else np.ascontiguousarray(deq.T)
            native[name] = from_blocks(raw, kind, rows.shape[1])
    if spec.tie_word_embeddings:
        out["lm_head"], native["lm_head"] = out["embed"], native["embed"]
    return out, native


def make_bundle(out: str, model, tokenizer_dir: str, profiles=None, force=True, target: str = "fp32",
                gguf_type: str = "Q4_1", embed_type: str | None = None) -> str:
    """A bundle of a tiny model written by the compiler's BundleWriter. target="native": the
    weights as a GGUF file of `gguf_type` (its embedding `embed_type`) would hold them
    (native_weights)."""
    from conflayers.compiler.arch import canonical_weights, model_spec
    from conflayers.compiler.export.bundle_writer import BundleWriter, fingerprint, model_identity
    spec = model_spec(model.config)
    weights = canonical_weights(spec, model.state_dict())
    native = None
    if target == "native":
        weights, native = native_weights(spec, weights, gguf_type, embed_type)
    fp = {**fingerprint(spec, weights), "target": target}
    ident = model_identity("tiny", spec, fp)
    if profiles is None:
        profiles = [
            profile_json("int8skip", ident, "int8", skip_layers=[1], k=4),
            profile_json("fp32sub", ident, "fp32", skip_attention=[2], k=3, confidence_stop=0.3,
                         vocab_ids=list(range(3, 300))),
        ]
    else:
        profiles = [p(ident) if callable(p) else p for p in profiles]
    with BundleWriter(out, spec, weights, {"name": "tiny", "source": "random init", **fp}, 512, force,
                      target=target, native=native) as bw:
        bw.write_full()
        for p in profiles:
            bw.add_profile(p)
        bw.write_tokenizer(tokenizer_dir, bos_token="<|im_start|>", eos_token="<|im_end|>", bos_token_id=0,
                           eos_token_ids=[1])
        return bw.publish()
