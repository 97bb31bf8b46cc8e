"""The stream endpoints of the fake message server (messaging.md §4): push WebSocket, text pull, file pull.

:class:`~agentcp.testing.message_server.MessageServer` mounts this as ``msg.streams`` and registers every stream
it allocates (``session_create_stream_req``):

* ``<prefix>/stream/push?session_id=..&message_id=..&agent_id=..&signature=..`` (WebSocket): only the stream's
  sender; a ``signature``, when present, must be its valid message-server token (0.1.99 sends none, and the real
  network accepts that: set ``require_push_signature`` to refuse it). Text frames ``push_text_stream_req`` (the form-encoded chunk is kept
  as sent), binary file frames (§4.5), ``close_stream_req`` ends the stream. Pings are answered in order, after
  every frame before them was stored. A sender may reconnect to an open stream and go on pushing.
* ``<prefix>/stream/pull?session_id=..&message_id=..&agent_id=..`` (HTTP GET): server-sent events for the
  receivers (and the sender): ``data: <chunk>`` per text chunk as it arrives, ``: keep-alive`` while idle,
  ``event: done`` once the stream is closed, then the connection closes.
* the same pull path as a WebSocket: every pushed frame as it arrives (file chunks as binary frames), then
  ``{"cmd":"close_file_stream_req","data":{...}}`` for file streams (``{"cmd":"close_stream_req"}`` for text).

A ``signature`` on a pull is checked when present. Fault controls: :meth:`StreamServer.drop_all` (cut every push
socket), :meth:`StreamServer.refuse` (answer new push handshakes with 503) and :meth:`StreamServer.stop_pongs`
(ignore pings: half-open push sockets).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from ._http import HttpRequest, HttpResponse

logger = logging.getLogger("agentcp.testing.msg")

__all__ = ["StreamServer", "FakeStream"]

#: Streams kept (closed ones too, for late pullers).
MAX_STREAMS = 256
#: Seconds between ``: keep-alive`` lines of an idle pull.
KEEPALIVE = 0.25


@dataclass
class FakeStream:
    """One stream: who may push and pull, and every frame pushed so far."""

    session_id: str
    message_id: str
    sender: str
    receivers: Tuple[str, ...]
    content_type: str
    #: ``("text", chunk)`` with the chunk form-encoded as pushed, or ``("file", raw binary frame)``.
    frames: List[Tuple[str, Any]] = field(default_factory=list)
    closed: bool = False
    push_connections: int = 0
    created: float = field(default_factory=time.monotonic)

    def text_chunks(self) -> List[str]:
        """The text chunks pushed so far (form-encoded, as sent)."""
        return [v for k, v in self.frames if k == "text"]


class StreamServer:
    """Stream endpoints on a :class:`~agentcp.testing.message_server.MessageServer`."""

    def __init__(self, messages: Any) -> None:
        self.messages = messages
        self.server = messages.server
        self.prefix = messages.prefix
        self._cond = threading.Condition()
        self._streams: "OrderedDict[Tuple[str, str], FakeStream]" = OrderedDict()
        self._push_socks: Set[socket.socket] = set()
        self._refuse = False
        self._no_pongs = False
        #: ``True``: refuse push handshakes without a ``signature`` (0.1.99 clients send none; the real network
        #: accepts them, so the default does too).
        self.require_push_signature = False
        self.counters: Dict[str, int] = {"streams": 0, "pushes": 0, "push_rejected": 0, "chunks": 0,
                                         "file_chunks": 0, "pulls": 0, "pull_rejected": 0, "closed": 0, "drops": 0}

    # ------------------------------------------------------------------------------------------------ setup
    def install(self) -> "StreamServer":
        http = self.server._http
        http.add_upgrade(f"{self.prefix}/stream/push", self._handle_push)
        http.add_upgrade(f"{self.prefix}/stream/pull", self._handle_ws_pull)
        self.server.add_route("GET", f"{self.prefix}/stream/pull", self._handle_pull)
        return self

    def push_url(self, session_id: str, message_id: str) -> str:
        base = self.server.heartbeat_url.replace("http", "ws", 1) + self.prefix
        return f"{base}/stream/push?session_id={session_id}&message_id={message_id}"

    def pull_url(self, session_id: str, message_id: str) -> str:
        return f"{self.server.heartbeat_url}{self.prefix}/stream/pull?session_id={session_id}&message_id={message_id}"

    def register(self, session_id: str, message_id: str, sender: str, receivers: List[str],
                 content_type: str) -> FakeStream:
        """Allocate a stream (called for ``session_create_stream_req``)."""
        stream = FakeStream(session_id, message_id, sender, tuple(receivers), content_type or "text/event-stream")
        with self._cond:
            self._streams[(session_id, message_id)] = stream
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
            self.counters["streams"] += 1
            self._cond.notify_all()
        return stream

    # ------------------------------------------------------------------------------------------------ views
    def streams(self) -> List[FakeStream]:
        with self._cond:
            return list(self._streams.values())

    def get(self, session_id: str, message_id: str) -> Optional[FakeStream]:
        with self._cond:
            return self._streams.get((session_id, message_id))

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> Any:
        """Block until ``predicate()`` (evaluated under the stream lock) is truthy; return it. ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s")
                self._cond.wait(left)

    # ------------------------------------------------------------------------------------------------ faults
    def drop_all(self) -> int:
        """Cut every push socket (no close frame); returns how many were cut."""
        with self._cond:
            socks = list(self._push_socks)
            self.counters["drops"] += 1
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def stop_pongs(self, stop: bool = True) -> None:
        """``True``: ignore pings on push sockets (they look half-open: chunks arrive, nothing comes back)."""
        with self._cond:
            self._no_pongs = bool(stop)

    def refuse(self, refuse: bool = True) -> None:
        """``True``: answer new push handshakes with 503 (open ones stay)."""
        with self._cond:
            self._refuse = bool(refuse)

    # ------------------------------------------------------------------------------------------------ helpers
    def _lookup(self, request: HttpRequest) -> Tuple[Optional[FakeStream], str, str]:
        def q(name: str) -> str:
            return (request.query.get(name) or [""])[0]

        with self._cond:
            stream = self._streams.get((q("session_id"), q("message_id")))
        return stream, q("agent_id"), q("signature")

    def _token_owner(self, token: str) -> Optional[str]:
        try:
            return self.messages._auth._authorised({"signature": token})
        except Exception:  # HttpError 401: unknown or expired token
            return None

    @staticmethod
    def _reply(sock: socket.socket, status: int, text: str) -> None:
        body = json.dumps({"error": text}).encode("utf-8")
        reasons = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 410: "Gone", 503: "Service Unavailable"}
        try:
            sock.sendall((f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body)
        except OSError:
            pass

    @staticmethod
    def _accept(request: HttpRequest, sock: socket.socket) -> bool:
        from .message_server import accept_key

        key = request.header("sec-websocket-key") or ""
        if not key:
            StreamServer._reply(sock, 400, "bad WebSocket handshake")
            return False
        accept = accept_key(key)
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode("ascii"))
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------------------------------------ push
    def _handle_push(self, request: HttpRequest, sock: socket.socket, rfile: Any) -> None:
        from .message_server import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, _Closed, encode_frame, \
            read_frame

        stream, agent_id, token = self._lookup(request)
        with self._cond:
            refuse = self._refuse
        status, why = 0, ""
        if refuse:
            status, why = 503, "stream server refuses connections (fault control)"
        elif stream is None:
            status, why = 404, "no such stream"
        elif not agent_id or (token and self._token_owner(token) != agent_id):
            # As on the real network, the push URL (session + message id from the sender's own create-stream ack)
            # is the capability: 0.1.99 opens it with ``&agent_id=`` only. A signature, when sent, must be valid.
            status, why = 401, "unknown or expired signature"
        elif not token and self.require_push_signature:
            status, why = 401, "a signature is required (require_push_signature)"
        elif agent_id != stream.sender:
            status, why = 403, "only the stream's sender may push"
        elif stream.closed:
            status, why = 410, "stream already closed"
        if status:
            with self._cond:
                self.counters["push_rejected"] += 1
            self._reply(sock, status, why)
            return
        assert stream is not None
        if not self._accept(request, sock):
            return
        send_lock = threading.Lock()

        def send(opcode: int, payload: bytes) -> None:
            with send_lock:
                sock.sendall(encode_frame(opcode, payload))

        with self._cond:
            self._push_socks.add(sock)
            stream.push_connections += 1
            self.counters["pushes"] += 1
            self._cond.notify_all()
        fragments: List[bytes] = []
        try:
            while True:
                try:
                    fin, opcode, payload = read_frame(rfile)
                except (_Closed, OSError, ValueError):
                    return
                if opcode == OP_PING:
                    with self._cond:
                        withhold = self._no_pongs
                    if not withhold:
                        send(OP_PONG, payload)  # in order: every frame before this ping is stored
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode == OP_CLOSE:
                    try:
                        send(OP_CLOSE, payload[:2])
                    except OSError:
                        pass
                    return
                if opcode in (OP_TEXT, OP_BINARY):
                    fragments, first = [payload], opcode
                elif opcode == OP_CONT and fragments:
                    fragments.append(payload)
                else:
                    return
                if not fin:
                    continue
                data, fragments = b"".join(fragments), []
                if first == OP_BINARY:
                    self._store_binary(stream, data)
                else:
                    self._store_text(stream, data)
        except OSError:
            return
        finally:
            with self._cond:
                self._push_socks.discard(sock)
                self._cond.notify_all()

    def _store_text(self, stream: FakeStream, data: bytes) -> None:
        try:
            frame = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            logger.debug("stream server: non-JSON text frame ignored")
            return
        cmd = frame.get("cmd") if isinstance(frame, dict) else None
        with self._cond:
            if cmd == "push_text_stream_req" and isinstance(frame.get("data"), dict):
                if not stream.closed:
                    stream.frames.append(("text", str(frame["data"].get("chunk", ""))))
                    self.counters["chunks"] += 1
            elif cmd == "close_stream_req":
                if not stream.closed:
                    stream.closed = True
                    self.counters["closed"] += 1
            else:
                logger.debug("stream server: unknown cmd %r ignored", cmd)
            self._cond.notify_all()

    def _store_binary(self, stream: FakeStream, data: bytes) -> None:
        from agentcp.msg.wss_binary_message import MalformedFrame, decode_wss_binary_buffer

        try:
            decode_wss_binary_buffer(data)  # validated like a real server would; stored as sent
        except MalformedFrame as exc:
            logger.debug("stream server: malformed binary frame ignored: %s", exc)
            return
        with self._cond:
            if not stream.closed:
                stream.frames.append(("file", data))
                self.counters["file_chunks"] += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------------ pull
    def _pull_check(self, stream: Optional[FakeStream], agent_id: str, token: str) -> Tuple[int, str]:
        if stream is None:
            return 404, "no such stream"
        if not agent_id or (agent_id not in stream.receivers and agent_id != stream.sender):
            return 403, "not a receiver of this stream"
        if token and self._token_owner(token) != agent_id:
            return 401, "unknown or expired signature"
        return 0, ""

    def _frames(self, stream: FakeStream) -> Iterator[Optional[Tuple[str, Any]]]:
        """Every frame of ``stream`` as it arrives; None while idle (every KEEPALIVE s); ends when it is closed."""
        index = 0
        while True:
            with self._cond:
                if index >= len(stream.frames) and not stream.closed:
                    self._cond.wait(KEEPALIVE)
                new = stream.frames[index:]
                index += len(new)
                done = stream.closed and index >= len(stream.frames)
            yield from new
            if done:
                return
            if not new:
                if not getattr(self.server, "running", True):
                    return
                yield None

    def _handle_pull(self, request: HttpRequest) -> HttpResponse:
        stream, agent_id, token = self._lookup(request)
        status, why = self._pull_check(stream, agent_id, token)
        if status:
            with self._cond:
                self.counters["pull_rejected"] += 1
            return HttpResponse(status, {"error": why})
        assert stream is not None
        with self._cond:
            self.counters["pulls"] += 1
            self._cond.notify_all()

        def events() -> Iterator[bytes]:
            for item in self._frames(stream):
                if item is None:
                    yield b": keep-alive\n\n"
                elif item[0] == "text":
                    yield f"data: {item[1]}\n\n".encode()
            yield b"event: done\n\n"

        return HttpResponse(200, stream=events(), content_type="text/event-stream; charset=utf-8")

    def _handle_ws_pull(self, request: HttpRequest, sock: socket.socket, rfile: Any) -> None:
        from .message_server import OP_BINARY, OP_CLOSE, OP_TEXT, encode_frame

        stream, agent_id, token = self._lookup(request)
        status, why = self._pull_check(stream, agent_id, token)
        if status:
            with self._cond:
                self.counters["pull_rejected"] += 1
            self._reply(sock, status, why)
            return
        assert stream is not None
        if not self._accept(request, sock):
            return
        with self._cond:
            self.counters["pulls"] += 1
            self._cond.notify_all()
        try:
            for item in self._frames(stream):
                if item is None:
                    continue
                kind, value = item
                if kind == "file":
                    sock.sendall(encode_frame(OP_BINARY, value))
                else:
                    text = json.dumps({"cmd": "push_text_stream_req", "data": {"chunk": value}})
                    sock.sendall(encode_frame(OP_TEXT, text.encode("utf-8")))
            if stream.content_type == "file/binary":
                end = {"cmd": "close_file_stream_req", "data": {"session_id": stream.session_id,
                                                                "message_id": stream.message_id}}
            else:
                end = {"cmd": "close_stream_req"}
            sock.sendall(encode_frame(OP_TEXT, json.dumps(end).encode("utf-8")))
            sock.sendall(encode_frame(OP_CLOSE, b"\x03\xe8"))
        except OSError:
            return
