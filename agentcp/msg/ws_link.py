"""One WebSocket connection on the message reactor: a non-blocking socket, TLS included, framed by ``websockets``.

:class:`WsLink` is the I/O shell of one connection. The WebSocket protocol itself (opening handshake, framing,
masking, answering pings, closing, the size bound) is ``websockets``' sans-I/O :class:`~websockets.client.
ClientProtocol`: bytes in, events out, bytes to send. The link moves bytes between it and the socket when the
reactor says the socket is ready, and tells its listener (the :class:`~agentcp.msg.message_client.MessageClient`)
what happened:

* ``link_open(link)``: the handshake succeeded.
* ``link_message(link, opcode, payload) -> bool``: a whole text or binary message (all fragments). Returning
  False holds the message (back-pressure): the link stops reading the socket until :meth:`WsLink.resume`, and
  delivers the held message first then.
* ``link_alive(link)``: a ping or pong arrived (the connection is alive).
* ``link_too_big(link)``: an incoming message crossed ``max_size``; the connection closes with 1009 next.
* ``link_flushed(link, items)``: the socket took the bytes of these written items.
* ``link_closed(link, reason, opened, status, error)``: the connection ended, once per link. ``opened`` says
  whether the handshake had succeeded; ``status`` is the HTTP status of a rejected handshake.

Bounds (trust.md rule 4): an incoming message larger than ``max_size`` bytes, all fragments together, is refused
from its frame header before its payload is buffered, and the connection closes with 1009 (``too_big`` is set);
the bytes waiting to be written are bounded by the caller (:attr:`WsLink.buffered`), and a write that makes no
progress for ``send_timeout`` seconds ends the connection; the whole connect (TCP, TLS, handshake) has one
deadline.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
from collections import deque
from typing import Any, Deque, List, Optional, Tuple

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, PayloadTooBig
from websockets.frames import Opcode
from websockets.uri import parse_uri

from agentcp.msg.ws_reactor import EVENT_READ, EVENT_WRITE, TimerHandle, WsReactor

__all__ = ["WsLink", "OP_TEXT", "OP_BINARY"]

log = logging.getLogger("agentcp.msg")
#: The protocol's own log (request lines, frames) at DEBUG; its records pass the secret redaction filter
#: (``agentcp.base.log.REDACTED_LOGGERS``): the handshake's request line carries the session token.
wire_log = logging.getLogger("agentcp.msg.wire")

OP_TEXT = int(Opcode.TEXT)
OP_BINARY = int(Opcode.BINARY)
_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_PING, _PONG, _CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
_IN_PROGRESS = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)
_WANT = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_READ_SIZE = 256 * 1024


class WsLink:
    """One message connection (see the module docstring). All methods run on the reactor thread, except
    :meth:`write`, :meth:`write_now`, :meth:`send` and :meth:`abort`, which any thread may call.

    ``lock`` guards the protocol object and the write buffer: a sender's thread may frame and write a message
    itself (:meth:`write_now`) while the reactor reads; everything else about the socket (the selector, timers,
    reading, closing) stays on the reactor."""

    def __init__(self, reactor: WsReactor, listener: Any, url: str, *, ssl_context: Optional[ssl.SSLContext],
                 max_size: int, send_timeout: float, gen: int = 0) -> None:
        self.reactor = reactor
        self.listener = listener
        self.url = url
        self.uri = parse_uri(url)
        self.ssl_context = ssl_context if self.uri.secure else None
        self.max_size = int(max_size)
        self.send_timeout = float(send_timeout)
        self.gen = gen
        self.sock: Optional[Any] = None
        self.lock = threading.RLock()
        self.phase = "new"  # new -> tcp -> tls -> handshake -> open -> closed
        self.proto: Optional[ClientProtocol] = None
        self.too_big: Optional[PayloadTooBig] = None
        self.paused = False
        self._addrs: List[Tuple[Any, ...]] = []
        self._last_error: Optional[BaseException] = None
        self._deadline: Optional[TimerHandle] = None
        self._events = 0  # what the selector watches for this socket (0: not registered)
        self._wbuf = bytearray()
        self._queued_total = 0  # bytes ever queued / taken by the socket: the marks say which item ends where
        self._sent_total = 0
        self._marks: Deque[Tuple[int, Any]] = deque()
        self._eof_after_flush = False
        self._stall: Optional[TimerHandle] = None
        self._progress_at = 0.0
        self._message_op: Optional[Opcode] = None  # of a fragmented message being assembled
        self._parts = bytearray()
        self._held: Deque[Any] = deque()  # frames (and a held message) not delivered while paused
        #: Items written whose bytes the socket never took (set when the connection ends).
        self.unflushed: List[Any] = []

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def ws(self) -> Any:
        """The socket (0.1.99's callbacks took a socket-like ``ws``)."""
        return self.sock if self.sock is not None else self

    @property
    def open(self) -> bool:
        return self.phase == "open"

    @property
    def closed(self) -> bool:
        return self.phase == "closed"

    @property
    def direct_ok(self) -> bool:
        """True if another thread may write to the socket while the reactor reads it (plain TCP; one TLS
        connection must not be read and written by two threads at once)."""
        return self.ssl_context is None

    @property
    def watching(self) -> int:
        """The selector events this link waits for now (the reactor skips a write event it no longer wants)."""
        return self._events

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return len(self._wbuf)

    # -- connecting ----------------------------------------------------------------------------------------------
    def start(self, addrs: List[Tuple[Any, ...]], deadline: float) -> None:
        """Connect to the first of ``addrs`` (``getaddrinfo`` results) that answers, all before ``deadline``."""
        self._addrs = list(addrs)
        self._deadline = self.reactor.call_at(deadline, self._connect_timed_out)
        self._next_address()

    def _connect_timed_out(self) -> None:
        if self.phase not in ("open", "closed"):
            self.fail(f"timed out during {self._phase_name()}", error=TimeoutError("connect timed out"))

    def _phase_name(self) -> str:
        return {"tcp": "the TCP connect", "tls": "the TLS handshake", "handshake": "the WebSocket handshake"}.get(
            self.phase, self.phase)

    def _next_address(self) -> None:
        while self._addrs:
            family, _type, _proto, _name, sockaddr = self._addrs.pop(0)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex(sockaddr)
            except OSError as exc:
                sock.close()
                self._last_error = exc
                continue
            if code not in _IN_PROGRESS:
                sock.close()
                self._last_error = OSError(code, os.strerror(code))
                continue
            self.sock = sock
            self.phase = "tcp"
            self._watch(EVENT_WRITE)
            return
        error = self._last_error or OSError("no address to connect to")
        self.fail(f"connect failed: {type(error).__name__}", error=error)

    def _tcp_connected(self) -> None:
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            self._unwatch()
            sock.close()
            self.sock = None
            self._last_error = OSError(code, os.strerror(code))
            self._next_address()
            return
        if self.ssl_context is not None:
            self._unwatch()  # the TLS wrapper takes the descriptor over: watch it as the new object
            self.sock = self.ssl_context.wrap_socket(sock, server_hostname=self.uri.host,
                                                     do_handshake_on_connect=False)
            self.phase = "tls"
            self._tls_step()
        else:
            self._send_handshake()

    def _tls_step(self) -> None:
        try:
            self.sock.do_handshake()  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            self._watch(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(EVENT_WRITE)
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self.fail(f"TLS handshake failed: {type(exc).__name__}", error=exc)
            return
        self._send_handshake()

    def _send_handshake(self) -> None:
        proto = ClientProtocol(self.uri, max_size=self.max_size, logger=wire_log)
        request = proto.connect()
        proto.send_request(request)
        with self.lock:
            self.proto = proto
            self.phase = "handshake"
            self._take_output()
        self._flush()
        if self.phase == "handshake" and not self._events & EVENT_READ:
            self._watch(EVENT_READ | (EVENT_WRITE if self._wbuf else 0))

    # -- reactor callbacks ---------------------------------------------------------------------------------------
    def on_writable(self) -> None:
        if self.phase == "tcp":
            self._tcp_connected()
        elif self.phase == "tls":
            self._tls_step()
        else:
            self._flush()

    def on_readable(self) -> None:
        if self.phase == "tls":
            self._tls_step()
            return
        if self.phase not in ("handshake", "open") or self.proto is None:
            return
        sock = self.sock
        try:
            data = sock.recv(_READ_SIZE)  # type: ignore[union-attr]
            if data and self.ssl_context is not None:
                more = sock.pending()  # type: ignore[union-attr]
                while more:  # decrypted bytes the selector cannot see
                    data += sock.recv(more)  # type: ignore[union-attr]
                    more = sock.pending()  # type: ignore[union-attr]
        except _WANT:
            return
        except OSError as exc:
            self.fail(f"receive failed: {type(exc).__name__}", error=exc)
            return
        if not data:
            with self.lock:
                self.proto.receive_eof()
            self.fail("closed by peer")
            return
        with self.lock:
            self.proto.receive_data(data)
            self._take_output()  # pongs, the answer to a close
            events = self.proto.events_received()
        self._after_receive(events)

    def _after_receive(self, events: List[Any]) -> None:
        proto = self.proto
        assert proto is not None
        if self.phase == "handshake":
            if not events:
                if proto.handshake_exc is not None:
                    self._handshake_failed(proto.handshake_exc)
                return
            del events[0]  # the handshake response: accepted unless the protocol says otherwise
            if proto.handshake_exc is not None:
                self._handshake_failed(proto.handshake_exc)
                return
            self.phase = "open"
            if self._deadline is not None:
                self._deadline.cancel()
            self._watch(EVENT_READ | (EVENT_WRITE if self._wbuf else 0))
            self.listener.link_open(self)
            if self.phase != "open":
                return
        for event in events:
            if self.paused:
                self._held.append(event)
            else:
                self._frame(event)
            if self.phase == "closed":
                return
        if proto.parser_exc is not None and self.phase != "closed":
            self._parser_failed(proto.parser_exc)
            return
        self._flush()

    def _handshake_failed(self, exc: BaseException) -> None:
        status = exc.response.status_code if isinstance(exc, InvalidStatus) else None
        what = f"handshake rejected: HTTP {status}" if status else f"handshake failed: {type(exc).__name__}"
        self.fail(what, status=status, error=exc)

    def _parser_failed(self, exc: BaseException) -> None:
        if isinstance(exc, PayloadTooBig):
            self.too_big = exc
            self.listener.link_too_big(self)  # counted before the peer sees the close
        with self.lock:
            self._take_output()  # the close frame (1009 for a message too big, 1002 for a protocol error)
        self._flush()
        if isinstance(exc, PayloadTooBig):
            self.fail("message too big (closed with 1009)", error=exc)
        else:
            self.fail(f"protocol error: {type(exc).__name__}", error=exc)

    def _frame(self, frame: Any) -> None:
        """Deliver one event: a frame, or a message held back earlier (a tuple)."""
        if isinstance(frame, tuple):
            opcode, payload = frame
            self._message(opcode, payload)
            return
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if frame.fin:
                self._message(int(opcode), bytes(frame.data))
            else:
                self._message_op, self._parts = opcode, bytearray(frame.data)
                self.listener.link_alive(self)
        elif opcode is _CONT:
            self._parts += frame.data
            if frame.fin and self._message_op is not None:
                op, whole = self._message_op, bytes(self._parts)
                self._message_op, self._parts = None, bytearray()
                self._message(int(op), whole)
            else:
                self.listener.link_alive(self)
        elif opcode is _CLOSE:
            self.listener.link_alive(self)
            self._flush()
            self.fail("closed by server")
        else:  # ping (answered by the protocol) or pong
            self.listener.link_alive(self)

    def _message(self, opcode: int, payload: bytes) -> None:
        if not self.listener.link_message(self, opcode, payload):
            self.paused = True
            self._held.appendleft((opcode, payload))
            self._watch(EVENT_WRITE if self._wbuf else 0)

    # -- back-pressure ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Deliver what was held and read the socket again (the consumer has room)."""
        if not self.paused or self.phase != "open":
            return
        self.paused = False
        while self._held and not self.paused and self.phase == "open":
            self._frame(self._held.popleft())
        if not self.paused and self.phase == "open":
            self._watch(EVENT_READ | (EVENT_WRITE if self._wbuf else 0))

    # -- writing ---------------------------------------------------------------------------------------------------
    def write(self, text: str, item: Any = None) -> None:
        """Queue one text frame (any thread); ``item`` is reported through ``link_flushed`` once the socket took
        it. Raises ``UnicodeEncodeError`` for text that cannot be encoded (nothing is queued then)."""
        data = text.encode("utf-8")
        with self.lock:
            proto = self.proto
            if proto is None or self.phase != "open":
                raise ConnectionError("the connection is not open")
            proto.send_text(data)
            self._take_output()
            if item is not None:
                self._marks.append((self._queued_total, item))

    def write_now(self, text: str, item: Any = None) -> Optional[List[Any]]:
        """Any thread: frame ``text`` and hand it to the socket at once if nothing waits before it (a lone
        message goes out without a thread switch). Returns the items the socket took (``item`` among them, or
        not yet: the reactor writes the rest), or None if the connection is not open (nothing written)."""
        data = text.encode("utf-8")
        with self.lock:
            proto = self.proto
            if proto is None or self.phase != "open":
                return None
            waiting = bool(self._wbuf)
            proto.send_text(data)
            self._take_output()
            if item is not None:
                self._marks.append((self._queued_total, item))
            if waiting:
                return []  # the reactor is writing what waits, and this after it
            done, error = self._send_locked()
            rest = bool(self._wbuf)
        if error is not None or rest:
            self.reactor.call_soon(self._flush)  # the reactor watches the socket (or reports the error)
        return done

    def ping(self, payload: bytes = b"") -> None:
        with self.lock:
            if self.proto is None or self.phase != "open":
                return
            self.proto.send_ping(payload)
            self._take_output()
        self._flush()

    def send(self, text: str) -> None:
        """Write one frame from any thread (0.1.99's ``ws.send``; e.g. a session's re-join in ``on_open``)."""
        if self.reactor.in_reactor():
            if self.phase == "open":
                self.write(text)
                self._flush()
            return
        self.reactor.call_soon(self._send_later, text)

    def _send_later(self, text: str) -> None:
        if self.phase == "open":
            self.write(text)
            self._flush()

    def _take_output(self) -> None:
        """Lock held: move what the protocol has to send into the write buffer."""
        proto = self.proto
        if proto is None:
            return
        for chunk in proto.data_to_send():
            if chunk:
                self._wbuf += chunk
                self._queued_total += len(chunk)
            else:
                self._eof_after_flush = True  # the protocol is done (after a close): half-close once written

    def flush(self) -> None:
        """Write what the socket takes now; the rest goes when it is writable."""
        self._flush()

    def _send_locked(self) -> Tuple[List[Any], Optional[OSError]]:
        """Lock held: write what the socket takes now; the items it took, and the error that stopped it."""
        sock = self.sock
        wbuf = self._wbuf
        error: Optional[OSError] = None
        sent = 0
        while wbuf:
            try:
                n = sock.send(wbuf)  # type: ignore[union-attr]
            except _WANT:
                break
            except OSError as exc:
                error = exc
                break
            if n <= 0:
                break
            del wbuf[:n]
            sent += n
        done: List[Any] = []
        if sent:
            self._sent_total += sent
            self._progress_at = self.reactor.clock()
            marks = self._marks
            while marks and marks[0][0] <= self._sent_total:
                done.append(marks.popleft()[1])
        return done, error

    def _flush(self) -> None:
        """Reactor: write what the socket takes now; watch for writability (and a stall) if some is left."""
        with self.lock:
            if self.sock is None or self.phase not in ("handshake", "open"):
                return
            before = self._sent_total
            done, error = self._send_locked()
            progressed = self._sent_total != before
            left = bool(self._wbuf)
            eof = not left and self._eof_after_flush
            if eof:
                self._eof_after_flush = False
        if error is not None:
            self.fail(f"send failed: {type(error).__name__}", error=error)
            return
        if done:
            self.listener.link_flushed(self, done)
            if self.phase == "closed":
                return
        if left:
            if self._stall is None:
                if not progressed:
                    self._progress_at = self.reactor.clock()
                self._stall = self.reactor.call_at(self._progress_at + self.send_timeout, self._check_stall)
            self._watch((0 if self.paused else EVENT_READ) | EVENT_WRITE)
            return
        if eof:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already
        if self._events & EVENT_WRITE:
            self._watch(0 if self.paused else EVENT_READ)

    def _check_stall(self) -> None:
        self._stall = None
        if not self._wbuf or self.phase == "closed":
            return
        due = self._progress_at + self.send_timeout
        if self.reactor.clock() >= due:
            self.fail(f"send stalled: the server took nothing for {self.send_timeout:.0f} s",
                      error=TimeoutError("send stalled"))
        else:
            self._stall = self.reactor.call_at(due, self._check_stall)

    # -- selector interest ---------------------------------------------------------------------------------------
    def _watch(self, events: int) -> None:
        if events == self._events or self.sock is None:
            return
        if not events:
            self.reactor.unregister(self.sock)
        elif not self._events:
            self.reactor.register(self.sock, events, self)
        else:
            self.reactor.modify(self.sock, events, self)
        self._events = events

    def _unwatch(self) -> None:
        if self._events and self.sock is not None:
            self.reactor.unregister(self.sock)
        self._events = 0

    # -- ending --------------------------------------------------------------------------------------------------
    def close(self, code: int = 1000) -> None:
        """Close from our side: a close frame if open (best effort, not awaited), then the socket."""
        if self.phase == "open" and self.proto is not None:
            try:
                with self.lock:
                    self.proto.send_close(code)
                    self._take_output()
                self._flush()
            except Exception as exc:  # the socket is being closed anyway; say why at debug level
                log.debug("close frame not sent: %r", exc)
        self.fail("closed by client", notify=False)

    def abort(self, reason: str = "aborted") -> None:
        """End the connection from any thread (the listener hears ``link_closed``)."""
        if self.reactor.in_reactor():
            self.fail(reason)
        else:
            self.reactor.call_soon(self.fail, reason)

    def fail(self, reason: str, *, status: Optional[int] = None, error: Optional[BaseException] = None,
             notify: bool = True) -> None:
        """End the connection now (idempotent) and tell the listener once."""
        with self.lock:  # a sender writing now finishes first; none starts after
            if self.phase == "closed":
                return
            opened = self.phase == "open"
            self.phase = "closed"
            self._wbuf = bytearray()
            unflushed = [item for _end, item in self._marks]
            self._marks.clear()
            self.unflushed = unflushed
        for timer in (self._deadline, self._stall):
            if timer is not None:
                timer.cancel()
        self._deadline = self._stall = None
        self._unwatch()
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass  # closing a broken socket: the descriptor is released either way
        self._held.clear()
        self._parts = bytearray()
        if notify:
            self.listener.link_closed(self, reason, opened, status, error)
