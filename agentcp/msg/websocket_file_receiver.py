"""Receiving a file stream over WebSocket (messaging.md §4.5 "File pull"; 0.1.99 name, working).

``download_file_via_websocket(wss_url, save_path)`` connects to the pull URL of a ``file/binary`` stream, writes
every file chunk (binary frame, msg_type 5 / content_type 5) **at its offset** (so a chunk sent twice after a
reconnect is harmless) and returns when the server sends ``close_file_stream_req``. 0.1.99's version wrote nothing
(a local-variable error in its callback) and had no timeout. The file appears at ``save_path`` only when complete
(it is written to ``save_path + ".part"`` and renamed).

Hostile input is bounded (trust.md rule 4): a frame larger than ``limits.stream_chunk_max`` is refused from its
header (close 1009), a chunk must lie inside the announced ``file_size`` (when given) and inside
``limits.file_stream_max``; crossing fails the download truthfully (False, reported through ``on_limit``) and
deletes the partial file, so a chunk at offset 0xFFFFFFF0 can no longer make a 4 GiB sparse file.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Optional

import websocket

from agentcp.base.http import connect_error_text
from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from agentcp.msg.ws import BoundedReader, notify_limit, sslopt
from agentcp.msg.message_client import redact
from agentcp.msg.wss_binary_message import (
    CONTENT_TYPE_FILE,
    HEADER_SIZE,
    MSG_TYPE_FILE,
    MalformedFrame,
    decode_wss_binary_buffer,
    decode_wss_binary_message,
)

log = logging.getLogger("agentcp.msg")

__all__ = ["download_file_via_websocket"]


class ChunkOutsideFile(ValueError):
    """A file chunk lies (partly) beyond the size the sender announced."""


def download_file_via_websocket(wss_url: str, save_path: str, *, timeout: float = 600.0,
                                idle_timeout: float = 30.0, verify: Any = None, file_size: Optional[int] = None,
                                limits: Limits = DEFAULT_LIMITS,
                                on_limit: Optional[Callable[[LimitExceeded], Any]] = None) -> bool:
    """Download the file stream at ``wss_url`` into ``save_path``; True when the server closed the stream.

    ``timeout`` bounds the whole download, ``idle_timeout`` the wait for each frame. ``file_size``: the size the
    announce gave (``extra.file_size``); every chunk must lie inside it, and inside ``limits.file_stream_max``.
    On failure nothing is left at ``save_path`` and False is returned (the reason is logged; a crossed bound is
    also passed to ``on_limit``).
    """
    from agentcp.msg.stream_client import stream_ws_url

    url = stream_ws_url(wss_url)
    shown = url.split("?", 1)[0]
    part = save_path + ".part"
    deadline = time.monotonic() + timeout
    ws: Optional[websocket.WebSocket] = None
    done = False
    received = 0
    try:
        if file_size is not None and (not isinstance(file_size, int) or isinstance(file_size, bool) or file_size < 0):
            raise ValueError(f"the announced file size {file_size!r} is not a size")
        cap = limits.file_stream_max if file_size is None else min(file_size, limits.file_stream_max)
        ws = websocket.create_connection(url, timeout=min(idle_timeout, timeout), sslopt=sslopt(verify),
                                         suppress_origin=True)
        frames = BoundedReader(ws, limits.stream_chunk_max + HEADER_SIZE, "stream_chunk_max", f"file stream {shown}")
        with open(part, "wb") as fh:
            while not done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"file stream not finished within {timeout:.0f} s")
                ws.settimeout(min(idle_timeout, left))
                try:
                    opcode, data = frames.recv()
                except LimitExceeded:
                    frames.close_too_big()
                    raise
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    try:
                        frame = decode_wss_binary_buffer(data)
                    except MalformedFrame as exc:
                        log.warning("file stream %s: malformed binary frame ignored: %s", shown, exc)
                        continue
                    if frame.msg_type == MSG_TYPE_FILE and frame.content_type == CONTENT_TYPE_FILE:
                        _check_chunk(frame.reserved, len(frame.payload), file_size, cap, limits, shown)
                        fh.seek(frame.reserved)
                        fh.write(frame.payload)
                        received += len(frame.payload)
                        continue
                    try:
                        text = decode_wss_binary_message(data)
                    except MalformedFrame:
                        continue
                elif opcode == websocket.ABNF.OPCODE_TEXT:
                    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
                else:
                    continue
                done = _is_close(text)
    except LimitExceeded as exc:
        log.warning("file stream %s into %s failed after %d bytes: %s", shown, save_path, received, exc)
        notify_limit(on_limit, exc, shown)
    except (websocket.WebSocketException, OSError, TimeoutError, ValueError) as exc:
        log.warning("file stream %s into %s failed after %d bytes: %s", shown, save_path, received,
                    redact(connect_error_text(exc, shown), None))
    finally:
        if ws is not None:
            try:
                ws.close(timeout=1)
            except (websocket.WebSocketException, OSError):
                pass
    if not done:
        _remove(part)
        return False
    os.replace(part, save_path)
    return True


def _check_chunk(offset: int, length: int, file_size: Optional[int], cap: int, limits: Limits, shown: str) -> None:
    """Raise unless bytes ``[offset, offset + length)`` lie inside the announced size and the file cap."""
    end = offset + length
    if file_size is not None and end > file_size:
        raise ChunkOutsideFile(f"a chunk at bytes {offset}..{end} lies outside the announced file size {file_size}")
    if end > cap:
        raise LimitExceeded("file_stream_max", limits.file_stream_max, f"file stream {shown}", got=f"a chunk ending "
                            f"at byte {end}")


def _is_close(text: str) -> bool:
    try:
        frame = json.loads(text)
    except ValueError:
        return False
    return isinstance(frame, dict) and frame.get("cmd") in ("close_file_stream_req", "close_stream_req")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
