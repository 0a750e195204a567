"""A GGUF file's own quantized weights, exactly, as MatMulNBits blocks (the `native` target).

Every supported GGML type is a scale (and maybe an offset) per block of 32 (or 16) weights times a
small integer. Each type is rewritten into the QuantMatrix form

    w = scale * (code - mid) + offset        4-bit codes (mid 8) or 8-bit codes (mid 128)

    type   block  what GGUF stores               bits  code         scale    offset
    Q4_0   32     d, q in 0..15: d*(q-8)         4     q            d        -
    Q4_1   32     d, m, q in 0..15: d*q + m      4     q            d        m + 8d
    Q4_K   32     d*sc*q - dmin*mn (6-bit sc,mn) 4     q            d*sc     8*d*sc - dmin*mn
    Q5_0   32     d*(q-16), q in 0..31           8     q - 16 + 128 d        -
    Q5_1   32     d*q + m                        8     q + 128      d        m
    Q5_K   32     d*sc*q - dmin*mn               8     q + 128      d*sc     -dmin*mn
    Q6_K   16     d*sc*(q-32), q in 0..63        8     q - 32 + 128 d*sc     -
    Q8_0   32     d*q, q in -128..127            8     q + 128      d        -
    F32/F16/BF16  plain fp32 (converted exactly)

The 8-bit forms are the GGUF arithmetic itself (same products, same roundings); the 4-bit forms
with an offset fold 8*scale into it (one extra fp32 rounding of the offset). tests/test_gguf_import.py
checks each type against the `gguf` package's own dequantization.

Names and row order come from the model transformers loaded from the same file: each GGUF
matrix is matched to its canonical weight by value (llama.cpp stores Llama's q/k rows permuted
for its rotary layout; the permutation is recovered and checked), so a tensor that does not
dequantize to what the fp32 graph multiplies by is refused instead of exported.
"""
from __future__ import annotations

import numpy as np

from .quantize import QuantMatrix, pack_codes

# canonical per-layer name -> llama.cpp tensor name
LAYER_TENSORS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                 "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F32", "F16", "BF16")
PLAIN_TYPES = ("F32", "F16", "BF16")
ROW_CHUNK = 8192          # rows converted at a time: bounds the temporary fp32 copies


class GGUFImportError(ValueError):
    pass


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _unit_codes(gq, qtype, blocks: np.ndarray, set_unit) -> np.ndarray:
    """The integer part of each weight, read by the gguf package's own dequantizer from a copy of
    the blocks whose scales are set to 1 and offsets to 0 (so the bit layouts are gguf's, not ours)."""
    unit = blocks.copy()
    set_unit(unit)
    return np.rint(gq.dequantize(unit, qtype)).astype(np.int32)


def _one(unit, at):
    unit[:, at:at + 2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)


def _zero(unit, at):
    unit[:, at:at + 2] = 0


def _k_unit(unit):
    """Q4_K / Q5_K: d = 1, dmin = 0, every 6-bit sub-block scale 1 and min 0."""
    _one(unit, 0)
    _zero(unit, 2)
    # the 12 packed bytes (gguf's Q4_K.get_scale_min): 0-3 sc[0..3] (+ high bits of sc[4..7]),
    # 4-7 mn[0..3] (+ high bits of mn[4..7]), 8-11 low nibble sc[4..7], high nibble mn[4..7]
    unit[:, 4:8] = 1
    unit[:, 8:12] = 0
    unit[:, 12:16] = 0x01


def _convert_rows(gq, qtype, name: str, rows: np.ndarray, k: int) -> tuple:
    """(codes [n, nb, block] uint8, scales [n, nb], offsets [n, nb] | None, bits, block) of
    `rows` (uint8 [n, bytes per row]) of a tensor of GGML type `name`."""
    n = rows.shape[0]
    block_size, type_size = gq.GGML_QUANT_SIZES[qtype]
    blocks = rows.reshape(-1, type_size)            # one GGML block per row of `blocks`
    nb = k // (16 if name == "Q6_K" else 32)        # our blocks: K-quants' sub-blocks
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(blocks[:, 0:2]).reshape(n, nb)
        has_min = name in ("Q4_1", "Q5_1")
        m = _f16(blocks[:, 2:4]).reshape(n, nb) if has_min else None

        def unit_fn(u):
            _one(u, 0)
            if has_min:
                _zero(u, 2)
        q = _unit_codes(gq, qtype, blocks, unit_fn).reshape(n, nb, 32)
        if name == "Q4_0":     # q here is gguf's q - 8
            return q + 8, d, None, 4, 32
        if name == "Q4_1":
            return q, d, (m + np.float32(8) * d), 4, 32
        if name == "Q5_0":     # q - 16
            return q + 128, d, None, 8, 32
        if name == "Q5_1":
            return q + 128, d, m, 8, 32
        return q + 128, d, None, 8, 32            # Q8_0
    if name in ("Q4_K", "Q5_K"):
        d = _f16(blocks[:, 0:2])[:, None]
        dmin = _f16(blocks[:, 2:4])[:, None]
        sc, mn = gq.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scale = (d * sc.astype(np.float32)).reshape(n, nb)        # as gguf computes d*sc
        offset = -(dmin * mn.astype(np.float32)).reshape(n, nb)
        q = _unit_codes(gq, qtype, blocks, _k_unit).reshape(n, nb, 32)
        if name == "Q4_K":
            return q, scale, offset + np.float32(8) * scale, 4, 32
        return q + 128, scale, offset, 8, 32
    if name == "Q6_K":
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])[:, None]
        scale = (d * sc).reshape(n, nb)

        def unit_fn(u):
            u[:, 192:208] = 1
            _one(u, 208)
        q = _unit_codes(gq, qtype, blocks, unit_fn).reshape(n, nb, 16)   # q - 32
        return q + 128, scale, None, 8, 16
    raise GGUFImportError(f"GGML type {name} is not supported")


def quant_matrix(tensor) -> QuantMatrix | np.ndarray:
    """One GGUF tensor (gguf.GGUFReader's ReaderTensor) -> QuantMatrix ([K, N] with N = the
    tensor's rows), or an fp32 array in GGUF order for F32/F16/BF16."""
    from gguf import GGMLQuantizationType
    name = GGMLQuantizationType(tensor.tensor_type).name
    if name not in SUPPORTED_TYPES:
        raise GGUFImportError(
            f"tensor {tensor.name} has GGML type {name}, which the native target does not support "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); compile with --target int8 or --target fp32")
    return from_blocks(np.asarray(tensor.data), name, int(tensor.shape[0]))


def from_blocks(data: np.ndarray, type_name: str, k: int) -> QuantMatrix | np.ndarray:
    """Raw GGUF tensor data (uint8 [rows, bytes per row] for block types) of GGML type
    `type_name` with K = k elements per row -> QuantMatrix, or fp32 for F32/F16/BF16."""
    import gguf.quants as gq
    from gguf import GGMLQuantizationType
    qtype = GGMLQuantizationType[type_name]
    if type_name in PLAIN_TYPES:
        return gq.dequantize(data, qtype).astype(np.float32)
    block_size, _ = gq.GGML_QUANT_SIZES[qtype]
    if k % block_size:
        raise GGUFImportError(f"a {type_name} row of {k} elements is not a whole number of {block_size}-blocks")
    rows = data.reshape(-1, data.shape[-1])
    n = rows.shape[0]
    parts = [_convert_rows(gq, qtype, type_name, rows[i:i + ROW_CHUNK], k) for i in range(0, n, ROW_CHUNK)]
    bits, block = parts[0][3], parts[0][4]
    codes = np.concatenate([pack_codes(p[0], bits) for p in parts])
    scales = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), np.float32)
    offsets = None if parts[0][2] is None else np.ascontiguousarray(np.concatenate([p[2] for p in parts]), np.float32)
    return QuantMatrix(bits, block, k, codes, scales, offsets, source=type_name)


def _llama_rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order transformers restores from llama.cpp's q/k layout (its reverse_permute)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(-1)


def _match(name: str, m: QuantMatrix, expected: np.ndarray, spec) -> QuantMatrix:
    """m in the row order of `expected` ([K, N], the fp32 weight transformers dequantized from
    the same tensor), or GGUFImportError when no known order reproduces it."""
    candidates = [None]
    heads = {"q": spec.num_heads, "k": spec.num_kv_heads}.get(name.split(".")[-1])
    if heads:
        candidates.append(_llama_rope_permutation(m.n, heads))
    if expected.shape != (m.k, m.n):
        raise GGUFImportError(f"GGUF tensor for {name} has shape [K={m.k}, N={m.n}], the model's "
                              f"weight {list(expected.shape)}; the file does not match the model's config")
    tolerance = 1e-6 * (np.abs(expected).max() or 1.0)
    for perm in candidates:
        ordered = m if perm is None else m.take_rows(perm)
        if max_abs_diff(ordered, expected) <= tolerance:
            return ordered
    raise GGUFImportError(
        f"GGUF tensor for {name} does not dequantize to the weight transformers loaded from the "
        "same file (metadata and tensors disagree, or an unknown row layout); compile with "
        "--target int8 or --target fp32")


def max_abs_diff(m: QuantMatrix, expected: np.ndarray) -> float:
    """max |m - expected| over a [K, N] weight, a slice of rows at a time (Gemma 3's head has
    262k rows: one float64 copy of it would be 1.3 GB)."""
    worst = 0.0
    for lo in range(0, m.n, ROW_CHUNK):
        part = m.take_rows(np.arange(lo, min(lo + ROW_CHUNK, m.n)))
        worst = max(worst, float(np.abs(part.dequantize() - expected[:, lo:lo + ROW_CHUNK]).max()))
    return worst


def gguf_tensor_name(canonical: str, tied: bool) -> str:
    if canonical == "embed":
        return "token_embd.weight"
    if canonical == "lm_head":
        return "token_embd.weight" if tied else "output.weight"
    _, i, part = canonical.split(".")
    return f"blk.{i}.{LAYER_TENSORS[part]}.weight"


def read_native(path: str, spec, weights: dict[str, np.ndarray], progress=None) -> dict[str, QuantMatrix]:
    """The quantized matrices of a GGUF file under canonical names, in canonical row order,
    each checked against `weights` (the fp32 canonical weights transformers read from the same
    file). Names whose GGUF tensor is F32/F16/BF16 are left out: the fp32 weight is exact."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - struct/value errors all mean a damaged file
        raise GGUFImportError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    tensors = {t.name: t for t in reader.tensors}
    names = ["embed", "lm_head"] + [f"layers.{i}.{p}" for i in range(spec.num_layers) for p in LAYER_TENSORS]
    tied = "output.weight" not in tensors
    out: dict[str, QuantMatrix] = {}
    converted: dict[str, QuantMatrix | np.ndarray] = {}
    for name in names:
        gname = gguf_tensor_name(name, tied)
        if gname not in tensors:
            raise GGUFImportError(f"{path} has no tensor {gname} (for {name}); the file does not "
                                  "match the model's config")
        if gname not in converted:
            converted[gname] = quant_matrix(tensors[gname])
        m = converted[gname]
        if isinstance(m, QuantMatrix):
            # embed and lm_head are [V, H]; the others are [K, N] already
            expected = weights[name].T if name in ("embed", "lm_head") else weights[name]
            out[name] = _match(name, m, expected, spec)
        if progress:
            progress(1)
    return out


def describe_types(path: str) -> dict[str, int]:
    """{GGML type name: tensor count} of a GGUF file (for the manifest and the report)."""
    from gguf import GGMLQuantizationType, GGUFReader
    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        key = GGMLQuantizationType(t.tensor_type).name
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
