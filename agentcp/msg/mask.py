"""WebSocket masking keys drawn from a buffer of ``os.urandom`` bytes.

RFC 6455 §5.3 asks for a fresh, unpredictable 32-bit masking key per client frame. ``websocket-client`` calls
``os.urandom(4)`` for each frame: one system call per message, and one release of the GIL that a busy process
pays for with a thread switch. :class:`MaskKeys` reads 4 KiB from the same source at a time and hands out
consecutive slices, so every key is still from the OS's cryptographic generator and never reused.
"""
from __future__ import annotations

import os
import threading

__all__ = ["MaskKeys"]


class MaskKeys:
    """``get_mask_key`` for ``websocket.WebSocket.set_mask_key``: ``keys(n)`` returns the next ``n`` random
    bytes (thread-safe: pings and sends may come from different threads)."""

    __slots__ = ("_chunk", "_buf", "_pos", "_lock")

    def __init__(self, chunk: int = 4096) -> None:
        self._chunk = chunk
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()

    def __call__(self, length: int) -> bytes:
        with self._lock:
            end = self._pos + length
            if end > len(self._buf):
                self._buf = os.urandom(max(self._chunk, length))
                self._pos, end = 0, length
            key = self._buf[self._pos:end]
            self._pos = end
            return key
