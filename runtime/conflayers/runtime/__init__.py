"""conflayers runtime: torch-free speculative decoding over compiled bundles (ONNX Runtime)."""
from .bundle import Bundle, BundleError
from .engine import Engine, GenerationMetrics, GenerationResult, RequestError, StreamChunk
from .profile import Profile, ProfileError

__all__ = ["Bundle", "BundleError", "Engine", "GenerationMetrics", "GenerationResult", "Profile",
           "ProfileError", "RequestError", "StreamChunk"]
