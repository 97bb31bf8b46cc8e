"""WebSocket plumbing shared by the message, stream and file clients (over ``websocket-client``)."""
from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Dict, Optional

import websocket

from agentcp.base.http import VerifySetting, resolve_verify
from agentcp.msg.mask import MaskKeys

__all__ = ["sslopt", "WsConnection"]


def sslopt(verify: Optional[VerifySetting]) -> Dict[str, Any]:
    """websocket-client TLS options for a verify setting (``None`` follows ``AGENTCP_TLS_VERIFY``; default on)."""
    checked = resolve_verify(verify)
    if checked is False:
        return {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
    if isinstance(checked, str):
        return {"ca_certs": checked}
    return {}


class WsConnection:
    """One WebSocket connection and its reader thread. Only the reader closes the socket (one owner)."""

    def __init__(self, ws: websocket.WebSocket, gen: int) -> None:
        self.ws = ws
        ws.set_mask_key(MaskKeys())  # fresh random keys without a system call per frame
        self.gen = gen
        self.reader: Optional[threading.Thread] = None
        self.opened_at = time.monotonic()

    def send(self, text: str) -> None:
        self.ws.send(text)

    def ping(self, payload: bytes = b"") -> None:
        self.ws.ping(payload)

    def abort(self) -> None:
        """Wake the reader (shutdown, not close: closing under a blocked recv() would race for the descriptor)."""
        sock = getattr(self.ws, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass  # already closed: the reader is waking up anyway
