"""Block-quantized matrices in the layout of ONNX Runtime's MatMulNBits.

MatMulNBits stores B transposed: for each of the N output columns, the K inputs split into blocks
of `block` elements, each block a run of `bits`-bit codes (low nibble first for 4 bits) and one
fp32 scale. Without zero points the kernel uses the midpoint (128 for 8 bits, 8 for 4 bits):

    w[k, n] = scales[n, b] * (codes[n, k] - mid) + offsets[n, b]        (b = k // block)

The offset term is ours, not the kernel's: MatMulNBits with float zero points takes a slow path
(~50x slower on CPU), so the graph adds it as a small fp32 MatMul of per-block sums of x
(`decoder_graph`), as llama.cpp does for Q4_1 and the K-quants. Two sources fill this form: our
round-to-nearest quantization of fp32 weights (`quantize_rtn`) and a GGUF file's own blocks
(`gguf_import`), exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 32


@dataclass(frozen=True)
class QuantMatrix:
    """A [K, N] weight as MatMulNBits blocks. codes: uint8 [N, n_blocks, block * bits / 8];
    scales, offsets: fp32 [N, n_blocks] (offsets None when zero)."""
    bits: int
    block: int
    k: int
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None
    source: str = "rtn"           # how it was made: "rtn" or the GGUF tensor type (Q4_1, Q6_K ...)

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def layout(self) -> tuple:
        """What must agree for two matrices to be concatenated into one MatMulNBits."""
        return (self.bits, self.block, self.k, self.offsets is not None)

    def unpacked_codes(self) -> np.ndarray:
        """uint8 [N, n_blocks, block]: one code per weight."""
        if self.bits == 8:
            return self.codes
        lo, hi = self.codes & 0x0F, self.codes >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.n, self.codes.shape[1], self.block)

    def dequantize(self) -> np.ndarray:
        """[K, N] fp32, the weight the graph multiplies by (computed in float64, rounded once)."""
        mid = 1 << (self.bits - 1)
        w = (self.unpacked_codes().astype(np.float64) - mid) * self.scales[..., None].astype(np.float64)
        if self.offsets is not None:
            w = w + self.offsets[..., None].astype(np.float64)
        return np.ascontiguousarray(w.reshape(self.n, -1)[:, : self.k].T.astype(np.float32))

    def take_rows(self, rows: np.ndarray) -> "QuantMatrix":
        """Only output columns `rows` (a vocabulary subset of the head)."""
        rows = np.asarray(rows, np.int64)
        return QuantMatrix(self.bits, self.block, self.k, np.ascontiguousarray(self.codes[rows]),
                           np.ascontiguousarray(self.scales[rows]),
                           None if self.offsets is None else np.ascontiguousarray(self.offsets[rows]),
                           self.source)

    @staticmethod
    def concat(parts: list["QuantMatrix"]) -> "QuantMatrix":
        """Stack along N (q, k and v into one qkv matmul); the parts must share a layout."""
        if len({p.layout for p in parts}) != 1:
            raise ValueError("matrices of different block layouts cannot be concatenated")
        offsets = None if parts[0].offsets is None else np.concatenate([p.offsets for p in parts])
        return QuantMatrix(parts[0].bits, parts[0].block, parts[0].k,
                           np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                           offsets, "+".join(sorted({p.source for p in parts})))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, n_blocks, block] -> MatMulNBits blobs (two 4-bit codes a byte, low first)."""
    codes = codes.astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes)


def quantize_rtn(w: np.ndarray, bits: int, block: int = BLOCK_SIZE) -> QuantMatrix:
    """Round-to-nearest symmetric block quantization of w [K, N] fp32 (ONNX MatMul layout):
    per block of `block` inputs of one output, scale = max|w| / (2^(bits-1) - 1), codes
    round(w / scale) + mid, no offset. K is zero-padded to a whole number of blocks."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    k, n = w.shape
    n_blocks = -(-k // block)
    wt = np.zeros((n, n_blocks * block), np.float32)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, n_blocks, block)
    qmax = (1 << (bits - 1)) - 1                       # 127 or 7
    mid = 1 << (bits - 1)                              # 128 or 8
    scales = (np.abs(blocks).max(axis=-1) / qmax).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.rint(blocks / safe[..., None]) + mid, 0, 2 * mid - 1)
    return QuantMatrix(bits, block, k, pack_codes(codes, bits), np.ascontiguousarray(scales))
