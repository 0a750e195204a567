"""Admission: the server's resource bounds and the slots requests wait for (429/503 beyond)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .schema import RETRY_AFTER_S, busy


@dataclass(frozen=True)
class ServerLimits:
    """The server's resource bounds (conflayers-serve flags). Request-meaning limits (messages,
    stop strings, special tokens) are the engine's: RequestLimits."""
    max_concurrency: int = 4          # requests generating at once
    max_queue: int = 64               # requests waiting for one of those slots; the next gets 503
    max_connections: int = 128        # connection threads; the next connection gets 503
    max_body_bytes: int = 4 << 20     # larger bodies get 413, unread
    request_timeout: float = 600.0    # seconds from arrival: queueing + generation
    api_key: str | None = None        # required as "Authorization: Bearer KEY" (not for /health)
    allowed_hosts: tuple = ()         # Host header names accepted besides the loopback names

    def __post_init__(self):
        for name in ("max_concurrency", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queue < 0 or self.max_body_bytes < 1 or not self.request_timeout > 0:
            raise ValueError("max_queue must be >= 0, max_body_bytes >= 1 and request_timeout > 0")


class Admission:
    """max_concurrency requests generate at once; up to max_queue more wait, in arrival order;
    beyond that, or past the request's deadline while waiting, 503 with Retry-After."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self.running = self.waiting = 0
        self._cond = threading.Condition()

    def enter(self, deadline: float, client_gone) -> None:
        with self._cond:
            if self.running < self.slots and self.waiting == 0:
                self.running += 1
                return
            if self.waiting >= self.queue:
                raise busy(f"the server is busy ({self.running} requests generating, {self.waiting} "
                           f"waiting, the queue's limit); retry in {RETRY_AFTER_S} s")
            self.waiting += 1
            try:
                while self.running >= self.slots:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise busy("the request timed out waiting for a free generation slot")
                    self._cond.wait(min(left, 0.25))
                    if client_gone():
                        raise ClientGone()
                self.running += 1
            finally:
                self.waiting -= 1

    def leave(self):
        with self._cond:
            self.running -= 1
            self._cond.notify()


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""
