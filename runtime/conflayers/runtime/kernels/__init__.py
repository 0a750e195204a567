"""conflayers' CPU kernel library: ONNX Runtime custom ops (domain "conflayers") that the compiler
writes into graphs together with an ONNX function computing the same thing, so a graph runs
with or without the library. Each .cc file says what its ops do and why they are exact:
  block_offsets.cc  AddBlockOffsets(16): the GGUF offsets' term (AVX2, FMA, F16C)
  qmatmul.cc        QMatMul, QMatMulOffsets(16), QMatMul16 (Q6_K's 8-bit blocks of 16): the
                    4/8-bit matrix product, exact integer block products and one float
                    sequence per row (qmatmul.h), on one of its engines: qmatmul_amx.cc
                    (AMX-INT8), qmatmul_avx512.cc (AVX-512 VNNI), qmatmul_avx2.cc (any AVX2
                    CPU), qmatmul_scalar.cc (the reference); the engines agree bit for bit.
                    The AVX-512 engine holds narrow 8-bit codes (GGUF's Q5 types) in 5/6-bit
                    planes, and QMatMul(Norm)Screened, the screened head (head.py), reads an
                    8-bit head's top 6 bits to find each row's greedy token exactly
  attention.cc      SlotAttention: causal GQA attention with rotary over in-place KV caches,
                    one sequence or many packed, every row in one fixed order (AVX2, FMA; on
                    AVX-512 CPUs two queries per instruction, the same bits); the runtime
                    writes it in place of GroupQueryAttention (attention.py)
  library.cc        which of them this CPU runs, and the registration

Built by tools/build_kernels.sh (setup.sh runs it) into kernels/build/. The runtime registers the
library in every CPU session when it is there and the CPU has its kernels;
CONFLAYERS_KERNELS=off runs the ONNX functions instead (for A/B measurement),
CONFLAYERS_QMATMUL=off only QMatMul's (=amx|avx512|avx2|scalar picks its engine),
CONFLAYERS_QMATMUL_PLANES=off keeps every code in bytes (the screened head then computes every
column), CONFLAYERS_HEAD_SCREEN=off keeps the plain head,
CONFLAYERS_ATTENTION=off keeps ONNX Runtime's GroupQueryAttention, CONFLAYERS_ATTENTION_ISA=avx2
keeps SlotAttention on its AVX2 path (=avx512 insists on the AVX-512 one),
CONFLAYERS_KERNELS=/path/lib.so names another build. Not for CUDA sessions: their nodes would run
on the CPU with copies. With the library, a one-token step and a verify agree by construction,
on every CPU with AVX2, and so do the QMatMul engines; the ONNX functions' MatMulNBits differ by
rounding from QMatMul (greedy text can differ between a machine with the library and one
without), and on AVX2-only CPUs between its 1-row and 2+-row kernels (the runtime pads there).
"""
from __future__ import annotations

import ctypes
import functools
import os

DOMAIN = "conflayers"
LIBRARY_NAME = "libconflayers_kernels.so"
BUILT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", LIBRARY_NAME)


@functools.lru_cache(maxsize=None)
def library() -> str | None:
    """Path of the kernel library to register in CPU sessions, or None (the ONNX functions run):
    not built, switched off, or a CPU its kernels do not cover."""
    choice = os.environ.get("CONFLAYERS_KERNELS", "").strip()
    if choice.lower() in ("off", "0", "no", "none"):
        return None
    path = choice or BUILT
    if not os.path.isfile(path):
        if choice:
            raise FileNotFoundError(f"CONFLAYERS_KERNELS={choice}: no such file (build it with "
                                    "tools/build_kernels.sh, or unset the variable)")
        return None
    said = cpu_path(path)
    if said.startswith("error: "):
        raise ValueError(said[len("error: "):])
    return path if said != "none" else None


def cpu_path(path: str = BUILT) -> str:
    """Which kernels the library at `path` runs on this CPU: "offsets:avx2 qmatmul:<engine>
    attention:<path>" (engine amx, avx512, avx2, scalar, or off; SlotAttention's path avx512 or
    avx2, the same bits), "none", or "error: ..." (a CONFLAYERS_QMATMUL or
    CONFLAYERS_ATTENTION_ISA it refuses)."""
    lib = ctypes.CDLL(path)
    lib.conflayers_kernels_path.restype = ctypes.c_char_p
    return lib.conflayers_kernels_path().decode()


def qmatmul_layouts(path: str = BUILT) -> str:
    """The weights QMatMul holds repacked in this process, by stored code width: "4-bit:30/5898240
    5-bit:..." (matrices / code bytes; 5 and 6 bits: narrow or split 8-bit codes in planes,
    qmatmul.h), "" when none."""
    lib = ctypes.CDLL(path)
    lib.conflayers_qmatmul_layouts.restype = ctypes.c_char_p
    return lib.conflayers_qmatmul_layouts().decode()


def describe() -> str:
    """One line for reports: what computes the conflayers ops in CPU sessions."""
    path = library()
    return f"{LIBRARY_NAME} ({cpu_path(path)})" if path else "ONNX functions (kernel library not loaded)"
