"""WebSocket plumbing shared by the message, stream and file clients (over ``websocket-client``).

Incoming messages are read frame by frame (:class:`BoundedReader`), not with ``websocket-client``'s
``recv_data_frame``: that one joins fragments without any bound and buffers whatever length a frame header
announces. Here the size of a message, all its fragments together, is checked against a limit from each frame
header *before* its payload is read, so a header announcing 2^40 bytes or an endless fragmented message costs at
most the limit (trust.md rule 4).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import websocket
from websocket._abnf import frame_buffer as _FrameBuffer

from agentcp.base.http import VerifySetting, resolve_verify
from agentcp.base.limits import LimitExceeded
from agentcp.msg.mask import MaskKeys

__all__ = ["sslopt", "ssl_context", "WsConnection", "BoundedReader", "STATUS_MESSAGE_TOO_BIG", "utf8_error", "notify_limit"]

#: RFC 6455 close code: "a message too big for it to process".
STATUS_MESSAGE_TOO_BIG = 1009

_OP = websocket.ABNF
_DATA = (_OP.OPCODE_TEXT, _OP.OPCODE_BINARY)


def utf8_error(text: str) -> Optional[str]:
    """None if ``text`` can be sent as UTF-8; otherwise why not (e.g. a lone surrogate from a peer's id)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end]
        return (f"the text cannot be encoded as UTF-8 ({exc.reason}: {bad.encode('unicode_escape').decode()!s} at "
                f"position {exc.start}); it was not sent")
    return None


def notify_limit(on_limit: Optional[Callable[[LimitExceeded], Any]], err: LimitExceeded, who: str) -> bool:
    """Tell ``on_limit`` (the agent's counter) of a crossed bound; False if there is none to tell."""
    if on_limit is None:
        return False
    try:
        on_limit(err)
    except Exception:  # a reporting callback's bug must not stop the reader that calls it
        logging.getLogger("agentcp.msg").exception("on_limit callback of %s raised", who)
    return True


class _CheckedFrameBuffer(_FrameBuffer):
    """``websocket-client``'s frame reader with a check between a frame's header and its payload."""

    def __init__(self, recv_fn: Callable[[int], bytes], skip_utf8_validation: bool,
                 check: Callable[[int, int], None]) -> None:
        super().__init__(recv_fn, skip_utf8_validation)
        self._check = check

    def recv_frame(self) -> Any:
        with self.lock:
            if self.needs_header():
                self.recv_header()
            if self.needs_length():
                self.recv_length()
            header, length = self.header, self.length
        assert header is not None and length is not None
        self._check(header[4], length)  # raises before a byte of the payload is buffered
        return super().recv_frame()


class BoundedReader:
    """Reads whole messages from one WebSocket, bounded by ``limit`` bytes per message (all fragments).

    :meth:`recv` returns ``(opcode, payload)`` for a complete text/binary message or a control frame (a ping is
    answered first). It raises :class:`LimitExceeded` as soon as a frame header would take the message past the
    limit; the caller closes the connection (:meth:`close_too_big`). State survives socket timeouts, so a reader
    with a read timeout can call :meth:`recv` again.
    """

    def __init__(self, ws: websocket.WebSocket, limit: int, bound: str, source: str) -> None:
        self.ws = ws
        self.limit = int(limit)
        self.bound = bound
        self.source = source
        self._opcode: Optional[int] = None  # of the fragmented message being assembled
        self._parts = bytearray()
        old = ws.frame_buffer
        ws.frame_buffer = _CheckedFrameBuffer(old.recv, old.skip_utf8_validation, self._check)

    def _check(self, opcode: int, length: int) -> None:
        if opcode >= 0x8:
            if length > 125:  # RFC 6455 §5.5: control frames carry at most 125 bytes
                raise websocket.WebSocketProtocolException(f"control frame of {length} bytes")
            return
        total = length + (len(self._parts) if opcode == _OP.OPCODE_CONT else 0)
        if total > self.limit:
            raise LimitExceeded(self.bound, self.limit, self.source, got=f"at least {total} bytes")

    def recv(self) -> Tuple[int, bytes]:
        while True:
            frame = self.ws.recv_frame()
            opcode, data = frame.opcode, frame.data
            if opcode in _DATA:
                if self._opcode is not None:
                    raise websocket.WebSocketProtocolException("a new message inside a fragmented one")
                if frame.fin:
                    return opcode, data
                self._opcode, self._parts = opcode, bytearray(data)
            elif opcode == _OP.OPCODE_CONT:
                if self._opcode is None:
                    raise websocket.WebSocketProtocolException("a continuation frame outside a message")
                self._parts += data
                if frame.fin:
                    opcode, whole = self._opcode, bytes(self._parts)
                    self._opcode, self._parts = None, bytearray()
                    return opcode, whole
            else:
                if opcode == _OP.OPCODE_PING:
                    self.ws.pong(data)
                return opcode, data

    def close_too_big(self) -> None:
        """Tell the peer the message was too big (close 1009); the caller then cuts the connection."""
        self._parts = bytearray()
        try:
            self.ws.send_close(STATUS_MESSAGE_TOO_BIG, b"message too big")
        except (websocket.WebSocketException, OSError):
            pass  # the connection is being cut anyway


def sslopt(verify: Optional[VerifySetting]) -> Dict[str, Any]:
    """websocket-client TLS options for a verify setting (``None`` follows ``AGENTCP_TLS_VERIFY``; default on)."""
    checked = resolve_verify(verify)
    if checked is False:
        return {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
    if isinstance(checked, str):
        return {"ca_certs": checked}
    return {}


_CONTEXTS: Dict[Any, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def ssl_context(verify: Optional[VerifySetting]) -> ssl.SSLContext:
    """The client TLS context for a verify setting (as :func:`sslopt`), shared per setting: a context holds the CA
    store, about 0.5 MiB, and 50 agents need one, not 50."""
    checked = resolve_verify(verify)
    key = checked if isinstance(checked, (bool, str)) else True
    with _CONTEXTS_LOCK:
        context = _CONTEXTS.get(key)
        if context is None:
            if key is False:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif isinstance(key, str):
                context = ssl.create_default_context(cafile=key)
            else:
                context = ssl.create_default_context()
            _CONTEXTS[key] = context
        return context


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
