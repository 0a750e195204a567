"""Which ONNX Runtime execution providers a device name means here: 'cpu', 'cuda' or 'auto'.

Why more than a look at the provider list: the onnxruntime-gpu wheel lists CUDAExecutionProvider
on every machine, with or without a GPU, a driver or the CUDA libraries, and a session asked for
it then quietly falls back to the CPU. Only putting a tensor on the device tells, so 'auto' takes
CUDA only where that works, and 'cuda' fails at once with the reason instead of running elsewhere.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]   # nodes CUDA has no kernel for run on the CPU

_cuda_why: str | None = None    # cuda_unusable's answer, once per process ("" = usable)


def available_providers() -> list[str]:
    return ort.get_available_providers()


def cuda_unusable() -> str | None:
    """None when a CUDA device takes a tensor here, else why not. The CUDA and cuDNN libraries of
    the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) are loaded first: onnxruntime-gpu does not
    find them on its own unless torch loaded them."""
    global _cuda_why
    if _cuda_why is None:
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            ort.OrtValue.ortvalue_from_shape_and_type((1,), np.float32, "cuda", 0)
            _cuda_why = ""
        except Exception as e:  # noqa: BLE001 (no device, no driver, a missing library: all mean no)
            lines = str(e).strip().splitlines()
            _cuda_why = f"{type(e).__name__}: {lines[0] if lines else 'no detail'}"
    return _cuda_why or None


def device_of(providers: list[str]) -> str:
    """'cuda' or 'cpu': where sessions with these providers (resolve_providers) run."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


def resolve_providers(device: str) -> list[str]:
    """'cpu', 'cuda' or 'auto' -> ONNX Runtime execution providers, with a clear error for 'cuda'
    where it cannot run. 'auto' is CUDA where a CUDA device is usable here, else the CPU."""
    if device == "cpu":
        return list(CPU)
    if device not in ("cuda", "auto"):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or auto")
    have = available_providers()
    if "CUDAExecutionProvider" not in have:
        if device == "auto":
            return list(CPU)
        raise RuntimeError(
            "device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(have)}); install conflayers[gpu] (onnxruntime-gpu, in place of "
            "onnxruntime) on a GPU machine: bash tools/gpu_check.sh does it")
    why = cuda_unusable()
    if why is None:
        return list(CUDA)
    if device == "auto":
        return list(CPU)
    raise RuntimeError(
        f"device 'cuda' asked for, but no CUDA device is usable here ({why}); check nvidia-smi, and that "
        "the CUDA and cuDNN libraries this onnxruntime-gpu was built for are installed "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]')")
