"""Hostile servers for tests and benchmarks: what a peer's pull URL or a rogue stream server may do.

:class:`HostileServer` listens on ``127.0.0.1`` (a host the devserver's trust domain accepts) and answers every
connection with one attack, chosen at construction::

    with HostileServer("trickle", interval=0.1) as srv:   # HTTP: an SSE reply that sends one byte per interval
        srv.url                                            # http://127.0.0.1:PORT/pull
    HostileServer("endless_line")      # HTTP: an SSE reply that is one line without end, as fast as it is read
    HostileServer("far_offset")        # WebSocket: one file chunk at offset 0xFFFFFFF0, then "stream closed"
    HostileServer("huge_frame")        # WebSocket: a frame header announcing 2**40 bytes, then filler
    HostileServer("endless_message")   # WebSocket: a text message whose fragments never end

Every attack stops when the client goes away, at :meth:`HostileServer.stop` (joins every thread), or after
``max_bytes``. ``served`` counts connections and ``sent`` the bytes written, and ``requests`` keeps each request
line and its headers (to assert what the client did or did not send).
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Callable, Dict, List

from .message_server import OP_BINARY, OP_CONT, OP_TEXT, accept_key, encode_frame

__all__ = ["HostileServer", "FAR_OFFSET"]

#: The file offset of the ``far_offset`` attack (issue 7: it made a 4 GiB sparse file).
FAR_OFFSET = 0xFFFFFFF0

_SSE_HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Connection: close\r\n\r\n")


class HostileServer:
    """A TCP server on 127.0.0.1 that plays one attack per connection (see the module docstring)."""

    def __init__(self, attack: str, *, interval: float = 0.1, piece: int = 64 << 10,
                 max_bytes: int = 1 << 30) -> None:
        self.attack = attack
        self.interval = interval
        self.piece = piece
        self.max_bytes = max_bytes
        self._play: Callable[[socket.socket], None] = getattr(self, f"_{attack}")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self.served = 0
        self.sent = 0
        self.requests: List[Dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"hostile-{attack}", daemon=True)

    @property
    def url(self) -> str:
        scheme = "http" if self.attack in ("trickle", "endless_line") else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/pull?session_id=s&message_id=m"

    def start(self) -> "HostileServer":
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() (close alone does not, on Linux)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
            threads = [self._acceptor] + list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            if thread.ident is not None:
                thread.join(5.0)

    def __enter__(self) -> "HostileServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"hostile-{self.attack}-conn",
                                      daemon=True)
            with self._lock:
                self.served += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            with self._lock:
                self.requests.append({"line": lines[0], "headers": headers})
            self._play_on(conn, headers)
        except OSError:
            pass  # the client went away: the attack is over
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _play_on(self, conn: socket.socket, headers: Dict[str, str]) -> None:
        if self.attack not in ("trickle", "endless_line"):
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept_key(headers.get('sec-websocket-key', ''))}\r\n\r\n")
                         .encode("ascii"))
        self._play(conn)

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        """Write ``data``; False once the attack should end (stopped, byte budget spent)."""
        if self._stop.is_set() or self.sent >= self.max_bytes:
            return False
        conn.sendall(data)
        with self._lock:
            self.sent += len(data)
        return True

    # -- attacks ----------------------------------------------------------------------------------------------------
    def _trickle(self, conn: socket.socket) -> None:
        conn.sendall(_SSE_HEADERS)
        line = b"data: " + b"x" * 10_000 + b"\n"
        while True:
            for i in range(len(line)):
                if not self._send(conn, line[i:i + 1]) or self._stop.wait(self.interval):
                    return

    def _endless_line(self, conn: socket.socket) -> None:
        conn.sendall(_SSE_HEADERS + b"data: ")
        block = b"a" * self.piece
        while self._send(conn, block):
            pass

    def _far_offset(self, conn: socket.socket) -> None:
        from agentcp.msg.wss_binary_message import (CONTENT_TYPE_FILE, MSG_TYPE_FILE, WssBinaryMessage,
                                                    encode_wss_binary_buffer)

        header = WssBinaryMessage(msg_type=MSG_TYPE_FILE, content_type=CONTENT_TYPE_FILE, reserved=FAR_OFFSET)
        self._send(conn, encode_frame(OP_BINARY, encode_wss_binary_buffer(b"0123456789abcdef", header)))
        self._send(conn, encode_frame(OP_TEXT, b'{"cmd":"close_file_stream_req","data":{}}'))
        self._stop.wait(2.0)  # leave the client time to act on it before the socket closes

    def _huge_frame(self, conn: socket.socket) -> None:
        self._send(conn, bytes([0x80 | OP_BINARY, 127]) + struct.pack(">Q", 1 << 40))
        filler = b"\0" * self.piece
        while self._send(conn, filler):
            pass

    def _endless_message(self, conn: socket.socket) -> None:
        filler = b"a" * self.piece
        if not self._send(conn, encode_frame(OP_TEXT, filler, fin=False)):
            return
        while self._send(conn, encode_frame(OP_CONT, filler, fin=False)):
            pass
