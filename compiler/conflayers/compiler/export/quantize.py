"""Block-wise symmetric weight quantization in the layout of ONNX Runtime's MatMulNBits.

MatMulNBits stores B transposed: for each of the N output columns, the K inputs split into blocks
of `block_size`, each block a run of `bits`-bit codes (low nibble first for 4 bits) and one fp32
scale. Without zero points the kernel uses the midpoint (128 for 8 bits, 8 for 4 bits).
"""
from __future__ import annotations

import numpy as np

BLOCK_SIZE = 32


def quantize_matmul_weight(w: np.ndarray, bits: int, block_size: int = BLOCK_SIZE):
    """w: [K, N] fp32 (ONNX MatMul layout). Returns (packed [N, n_blocks, blob], scales [N, n_blocks])."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    k, n = w.shape
    n_blocks = -(-k // block_size)
    wt = np.zeros((n, n_blocks * block_size), np.float32)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, n_blocks, block_size)
    qmax = (1 << (bits - 1)) - 1                       # 127 or 7
    mid = 1 << (bits - 1)                              # 128 or 8
    absmax = np.abs(blocks).max(axis=-1)
    scales = (absmax / qmax).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.rint(blocks / safe[..., None]) + mid, 0, 2 * mid - 1).astype(np.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales)


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of quantize_matmul_weight, back to [K, N] fp32 (used by tests and the evaluator)."""
    mid = 1 << (bits - 1)
    if bits == 4:
        lo, hi = packed & 0x0F, packed >> 4
        codes = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], packed.shape[1], -1)
    else:
        codes = packed
    w = (codes.astype(np.float32) - mid) * scales[..., None]
    return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :k].T)
