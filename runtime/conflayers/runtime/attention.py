"""The kernel library's SlotAttention in place of ONNX Runtime's GroupQueryAttention.

GroupQueryAttention on the CPU computes a one-row pass on another path than a 2+-row pass, so the
compiler's full graphs give it an extra row (a copy of the last: contract.py), and it takes one
sequence per node when rows are added to a past, so a packed pass of n sequences needs n nodes a
layer (packing.py). SlotAttention (kernels/attention.cc) computes every row in one fixed order,
whatever the pass: no extra row is needed, and one node takes the segments of many KV slots.

rewrite() replaces every GroupQueryAttention of a graph (with its padding) by SlotAttention;
create_session does it for every CPU session when the library runs it (CONFLAYERS_ATTENTION=off:
not), so a bundle's graphs run it without being recompiled.

KV caches in float16 (kv_cache="float16", the engine's option): SlotAttentionF16 keeps the caches
as halves, each key (after rotary) and value rounded once when written and converted exactly
when read, so every pass still computes a row alike (what exactness needs) and attention reads
half the bytes. It changes the model's numbers as llama.cpp's default f16 cache does: greedy output
then equals plain decoding with the same cache, not the float32 cache's. Only where SlotAttention
runs (CPU, kernel library); no ONNX fallback computes it. A graph whose attention it does not
cover (interleaved rotary, softcap, smooth softmax, a head size not a multiple of 8) keeps
GroupQueryAttention. Needs the `onnx` package (the runtime's `batching` extra); without it the
graphs run as written.
"""
from __future__ import annotations

import os

from . import contract, kernels

OP = "SlotAttention"
OP_F16 = "SlotAttentionF16"      # the same over float16 KV caches (kv_cache="float16")
KV_CACHES = ("float32", "float16")
KV_CACHE_HELP = ("KV cache element type. float16: half the memory and the bytes attention reads (a one-token step "
                 "at 4k positions ~0.66x the time on SmolLM2), keys and values rounded to half as llama.cpp's "
                 "default cache does, so output can differ from float32's; speculative output still equals "
                 "plain decoding with the same cache. CPU, with the kernel library's SlotAttention.")


class KVCacheError(ValueError):
    """A KV cache type this graph, device or build cannot run."""


class AttentionError(RuntimeError):
    """A graph's attention has a shape this module does not know how to rewrite."""


def available() -> bool:
    """Whether CPU sessions run SlotAttention: the kernel library registers it, the onnx package
    is there to rewrite the graphs, and CONFLAYERS_ATTENTION is not off."""
    if os.environ.get("CONFLAYERS_ATTENTION", "").strip().lower() in ("off", "0", "no", "none"):
        return False
    path = kernels.library()
    if path is None or "attention:" not in kernels.cpu_path(path):
        return False
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def sources(node, producer: dict, consumers: dict, where: str):
    """A GroupQueryAttention node's inputs and output as they were before the full graph's
    padding: ([query, key, value] unpadded ('' where absent), the name of its output with the
    extra row dropped, [padding nodes to leave out]). Graphs without the padding give the node's
    own inputs and output."""
    from onnx import helper
    padded = producer.get(node.input[5]) is not None and producer[node.input[5]].name == contract.ATTENTION_PAD[0]
    if not padded:
        return list(node.input[:3]), node.output[0], []
    srcs, skip = [], []
    for x in node.input[:3]:
        if not x:
            srcs.append("")
            continue
        pad = producer[x]       # Pad(x, edge), or (older graphs) Concat([x, Slice(x, -1:)])
        mode = {a.name: helper.get_attribute_value(a) for a in pad.attribute}.get("mode")
        if pad.op_type == "Pad" and mode == b"edge":
            skip.append(pad)
        else:
            last = producer.get(pad.input[1]) if len(pad.input) > 1 else None
            if pad.op_type != "Concat" or last is None or last.op_type != "Slice" or last.input[0] != pad.input[0]:
                raise AttentionError(f"{where}: unexpected attention padding before {node.name}")
            skip += [pad, last]
        srcs.append(pad.input[0])
    (trim,) = consumers[node.output[0]]         # Slice(attn, 0, -1) drops the extra row
    if trim.op_type != "Slice":
        raise AttentionError(f"{where}: unexpected attention output of {node.name}")
    return srcs, trim.output[0], skip + [trim]


def _covered(node, head_size) -> bool:
    from onnx import helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (attrs.get("rotary_interleaved", 0) == 0 and not attrs.get("softcap", 0.0)
            and not attrs.get("smooth_softmax", 0) and isinstance(head_size, int) and head_size % 8 == 0
            and head_size > 0)


def rewrite(model, where: str = "graph", kv_cache: str = "float32") -> bool:
    """Replace every GroupQueryAttention of `model` (an onnx ModelProto, changed in place) and its
    padding by SlotAttention (kv_cache "float16": SlotAttentionF16, the KV inputs and outputs
    float16); False (model unchanged) where it has none or one is not covered."""
    from onnx import TensorProto, helper
    g = model.graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        return False
    dims = {x.name: [d.dim_value or d.dim_param for d in x.type.tensor_type.shape.dim] for x in g.input}
    if not all(_covered(n, (dims.get(n.input[3]) or [None] * 4)[3]) for n in gqa):
        return False
    half = kv_cache == "float16"
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    replace, skip = {}, set()
    for n in gqa:
        srcs, out, dropped = sources(n, producer, consumers, where)
        skip.update(id(d) for d in dropped)
        seqlens = n.input[5]
        if producer.get(seqlens) is not None and producer[seqlens].name == contract.ATTENTION_PAD[0]:
            seqlens = producer[seqlens].input[0]        # the graph's own seqlens_k
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        scale = attrs.get("scale") or float(dims[n.input[3]][3]) ** -0.5
        replace[id(n)] = helper.make_node(
            OP_F16 if half else OP, srcs + [n.input[3], n.input[4], seqlens, n.input[7], n.input[8]], [out, n.output[1], n.output[2]],
            name=n.name, domain=kernels.DOMAIN, num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
            scale=float(scale), local_window_size=int(attrs.get("local_window_size", -1)),
            do_rotary=int(attrs.get("do_rotary", 0)))
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in skip and n.name not in contract.ATTENTION_PAD]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == kernels.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))
    if half:
        for x in list(g.input) + list(g.output):
            if x.name.startswith(("past_key.", "past_value.", "present_key.", "present_value.")):
                x.type.tensor_type.elem_type = TensorProto.FLOAT16
    return True


def rewrite_or_refuse(model, path: str, kv_cache: str = "float32") -> bool:
    """rewrite(model): True where the graph now runs SlotAttention, False where it keeps
    GroupQueryAttention (a graph without attention, a draft head, included). kv_cache "float16":
    a graph whose attention cannot run on half caches is a KVCacheError, naming why."""
    if rewrite(model, path, kv_cache):
        return True
    if kv_cache == "float16" and any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        raise KVCacheError(f"{path}: its attention (interleaved rotary, softcap, smooth softmax or a head size "
                           f"not a multiple of 8) has no float16 KV cache; use the float32 cache (--kv-cache float32)")
    return False


def check_kv_cache(kv_cache: str, providers: list[str]) -> None:
    """A KVCacheError naming what to do where `kv_cache` cannot run with `providers` here."""
    if kv_cache not in KV_CACHES:
        raise KVCacheError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    if kv_cache == "float32":
        return
    if providers[0] != "CPUExecutionProvider":
        raise KVCacheError("a float16 KV cache runs on the CPU only (the kernel library's SlotAttentionF16); "
                           "on a GPU use the float32 cache (--kv-cache float32)")
    if not available():
        raise KVCacheError("a float16 KV cache needs the kernel library's SlotAttention, which does not run here "
                           "(the library is not built or lacks it, the onnx package is missing, or "
                           "CONFLAYERS_ATTENTION=off); build it with tools/build_kernels.sh, or use the float32 "
                           "cache (--kv-cache float32)")
