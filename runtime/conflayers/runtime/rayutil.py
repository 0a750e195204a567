"""Ray, imported only where a command asks for it (--ray): the base runtime does not need it."""
from __future__ import annotations

INSTALL_HINT = "pip install 'conflayers[ray]'"


class RayMissing(RuntimeError):
    pass


def import_ray(serve: bool = False):
    """The ray module (and ray.serve with serve=True), or RayMissing naming the extra."""
    try:
        import ray
        if serve:
            from ray import serve as _serve   # noqa: F401 - ray[serve]'s own dependencies
    except ImportError as e:
        what = "ray[serve]" if serve else "ray"
        raise RayMissing(f"--ray needs {what} ({e.name or e} is not installed): {INSTALL_HINT}") from None
    return ray


def connect(address: str | None, **init_args):
    """Join the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379"), or start a local
    instance when address is None or ""; reuse the connection this process already has."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address or None, **init_args)
    return ray
