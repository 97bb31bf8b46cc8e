"""Push side of a stream: the sender's WebSocket to the stream ``push_url`` (messaging.md §4.2, §4.5).

Drop-in for 0.1.99's ``agentcp.msg.stream_client`` (``FileChunk``, ``StreamClient(agent_id, session_id,
server_url, signature)`` with ``set_message_handler``, ``start_websocket_client``, ``send_wss_message``,
``stop_websocket_client``, ``send_msg``, ``send_chunk_to_stream``, ``send_chunk_to_file_stream``, ``close_stream``
and the attributes ``ws_url``, ``ws_is_running``, ``ws``; api.md §8.4). What changed (messaging.md §7):

* The push URL carries ``agent_id`` **and** ``signature`` (``?`` or ``&`` as the URL needs); the signature is
  never logged.
* One driver thread owns the socket: it connects, writes frames in order, pings, and reconnects after any close,
  error or dead connection (no frame within ``pong_timeout`` of a ping) with the core's capped full-jitter
  :class:`~agentcp.base.backoff.Backoff` (first retry immediate). No busy-waits: every wait is an
  ``Event``/``Condition`` wait with a deadline.
* **Nothing is dropped silently.** Frames wait in a bounded queue while disconnected and go out in order after the
  reconnect. A written frame counts as *confirmed* once the server answered a ping sent after it (WebSocket pongs
  come back in order, so the server has read everything before the ping). Frames not confirmed when a connection
  is lost are written again on the next connection (at least once; file chunks carry their offset, so a repeat is
  harmless). If the server stays unreachable for ``give_up_after`` seconds, or refuses the stream (HTTP 404/410),
  every frame still pending is reported as failed and later sends fail.
* Send results are truthful: a :class:`~agentcp.msg.message_client.SendResult` that is ``queued`` (accepted; it
  goes out in order) or ``failed`` (not accepted, with the reason). ``flush()`` and ``close_stream()`` say whether
  the server confirmed everything.
* File back-pressure really replenishes: ``send_chunk_to_file_stream`` waits (bounded) while more than
  ``file_window`` bytes are unconfirmed, and room comes back as the server's pongs confirm chunks.
* ``close_stream`` sends ``{"cmd":"close_stream_req"}``, waits (bounded) for it to be confirmed, closes the socket
  and joins every thread; ``stop_websocket_client`` does the same without the close request.
* Hostile input is bounded (trust.md rules 4 and 7): a frame from the server larger than
  ``limits.stream_chunk_max`` is refused from its header (close 1009, the stream fails, ``on_limit`` is told);
  text that cannot be encoded as UTF-8 is refused at the send call and never queued.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Union

import websocket

from agentcp.base.backoff import RECONNECT_BACKOFF, Backoff
from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from agentcp.base.reporting import FaultReporter
from agentcp.context.exceptions import SDKError
from agentcp.msg.message_client import SendResult, SendStatus, redact
from agentcp.base.http import connect_error_text
from agentcp.msg.ws import BoundedReader, WsConnection as _Conn, notify_limit, sslopt, utf8_error
from agentcp.msg.wss_binary_message import (
    CONTENT_TYPE_FILE,
    MSG_TYPE_FILE,
    WssBinaryMessage,
    encode_wss_binary_buffer,
)

log = logging.getLogger("agentcp.msg")

__all__ = [
    "FileChunk",
    "StreamClient",
    "StreamClientConfig",
    "StreamError",
    "FILE_CHUNK_SIZE",
    "stream_ws_url",
    "signed_url",
]

#: Bytes per file chunk (0.1.99: 16384).
FILE_CHUNK_SIZE = 16384

_TEXT, _BINARY = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY


class StreamError(SDKError):
    """A fault of a stream push socket (connection lost, stream refused, frames that could not be delivered)."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1302) -> None:
        super().__init__(message, trace_id, code)


@dataclass
class FileChunk:
    """One chunk of a file stream (0.1.99 dataclass)."""

    offset: int
    chunk_size: int
    chunk: bytes


@dataclass
class StreamClientConfig:
    """Timing and limits of a push socket."""

    #: TCP connect + WebSocket handshake; also how long ``start_websocket_client`` waits for the connection.
    connection_timeout: float = 5.0
    #: Socket write timeout, and how long a send waits for room in the queue before it fails.
    send_timeout: float = 10.0
    #: A ping goes out when the socket was idle this long (and after every burst of writes, to confirm them).
    ping_interval: float = 5.0
    #: A ping not answered (by any frame) within this many seconds means the connection is dead.
    pong_timeout: float = 5.0
    #: Waits between reconnect attempts after the first (immediate) one.
    reconnect_backoff: Backoff = RECONNECT_BACKOFF
    #: Seconds without a connection after which the stream fails (pending frames are reported as failed).
    give_up_after: float = 30.0
    #: Bytes that may wait (queued + unconfirmed) before text sends wait for room.
    max_queue_bytes: int = 8 << 20
    #: Unconfirmed file bytes above which ``send_chunk_to_file_stream`` waits for confirmations.
    file_window: int = 256 << 10
    #: How long ``close_stream`` waits for everything to be confirmed.
    close_timeout: float = 10.0
    #: Write frames again that were not confirmed when a connection was lost (False: report them as failed).
    resend_unconfirmed: bool = True
    #: TLS verification of ``wss://``: None follows AGENTCP_TLS_VERIFY (default on); False or a CA bundle path.
    verify: Any = None


def stream_ws_url(url: str) -> str:
    """``https://`` -> ``wss://`` and ``http://`` -> ``ws://`` (other URLs unchanged)."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


def signed_url(url: str, agent_id: str, signature: Optional[str]) -> str:
    """``url`` plus ``agent_id`` (and ``signature`` when known), joined with ``?`` or ``&`` as the URL needs."""
    params = {"agent_id": agent_id}
    if signature:
        params["signature"] = signature
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    if "?" not in url:
        return f"{url}?{query}"
    return url + ("" if url.endswith(("?", "&")) else "&") + query


class _Frame:
    __slots__ = ("opcode", "payload", "size", "after_ping", "kind")

    def __init__(self, opcode: int, payload: Union[str, bytes], kind: str) -> None:
        self.opcode = opcode
        self.payload = payload
        self.size = len(payload)
        self.after_ping = 0  # pings sent before this frame was written: a pong for a later ping confirms it
        self.kind = kind  # "text" | "file" | "close" | "raw"


class StreamClient:
    """The push WebSocket of one stream (``server_url`` is the ``push_url`` of ``session_create_stream_ack``)."""

    def __init__(self, agent_id: str, session_id, server_url: str, signature: Optional[str], *,
                 config: Optional[StreamClientConfig] = None,
                 signature_provider: Optional[Callable[[], Optional[str]]] = None,
                 clock: Callable[[], float] = time.monotonic, limits: Limits = DEFAULT_LIMITS,
                 on_limit: Optional[Callable[[LimitExceeded], Any]] = None) -> None:
        self.agent_id = agent_id
        #: Bounds on what the server may send on this socket; ``on_limit(err)`` is told of a crossing.
        self.limits = limits
        self.on_limit = on_limit
        self.session_id = session_id
        self.server_url = server_url
        self.signature = signature
        self.config = config or StreamClientConfig()
        #: Called for a fresh signature when the handshake is rejected as unauthorised (401/403).
        self.signature_provider = signature_provider
        #: The push URL with ``agent_id`` (no signature: safe to log).
        self.ws_url = signed_url(stream_ws_url(server_url), agent_id, None)
        self.message_handler: Any = None
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._outbox: Deque[_Frame] = deque()
        self._inflight: Deque[_Frame] = deque()
        self._bytes = 0  # queued + unconfirmed
        self._file_bytes = 0  # unconfirmed + queued file bytes
        self._conn: Optional[_Conn] = None
        self._gen = 0
        self._driver: Optional[threading.Thread] = None
        self._readers: List[threading.Thread] = []
        self._started = False
        self._stop = False  # hard stop: the driver exits
        self._closing = False  # close_stream_req queued: finish once everything is confirmed
        self._close_written = False  # close_stream_req written at least once (a later 410 then means "got it")
        self._finished = threading.Event()
        self._connected = threading.Event()
        self._failed_reason: Optional[str] = None
        self._failures = 0  # consecutive failed connects
        self._next_attempt = 0.0
        self._down_since: Optional[float] = None
        self._ping_seq = 0
        self._ping_outstanding: Optional[int] = None
        self._ping_sent_at = 0.0
        self._last_io = 0.0
        self._report = FaultReporter(log, agent_id, StreamError,
                                     redact=lambda text: redact(text, self.signature))
        self.counters: Dict[str, int] = {"frames": 0, "written": 0, "confirmed": 0, "resent": 0, "failed": 0,
                                         "connects": 0, "connect_failures": 0, "losses": 0, "pings": 0,
                                         "dead": 0, "bytes_written": 0}

    # ------------------------------------------------------------------------------------------------------------
    # 0.1.99 API
    # ------------------------------------------------------------------------------------------------------------
    @property
    def ws(self) -> Optional[websocket.WebSocket]:
        """The current WebSocket (None while disconnected)."""
        conn = self._conn
        return conn.ws if conn is not None else None

    @property
    def ws_is_running(self) -> bool:
        """True while the driver runs (connected or reconnecting)."""
        driver = self._driver
        return driver is not None and driver.is_alive() and not self._finished.is_set()

    def set_message_handler(self, message_handler: Any) -> None:
        """Frames the server sends on the push socket go to ``handler.on_message(ws, data)`` or ``handler(data)``
        (``data``: str for text, bytes for binary). Without a handler they are only logged."""
        self.message_handler = message_handler

    def start_websocket_client(self) -> bool:
        """Start the driver (if needed) and wait up to ``connection_timeout`` for the connection; True if connected
        (also when it already was). If not, it keeps trying in the background until ``give_up_after``."""
        with self._cond:
            if self._finished.is_set():
                return False
            if not self._started:
                self._started = True
                self._down_since = self._clock()
                self._driver = threading.Thread(target=self._drive, name=f"agentcp-stream-{self.agent_id}",
                                                daemon=True)
                self._driver.start()
        return self._connected.wait(self.config.connection_timeout)

    def stop_websocket_client(self, timeout: Optional[float] = None) -> bool:
        """Stop at once (no close request): frames still pending are reported as failed; joins every thread.
        True if nothing was pending. Idempotent."""
        with self._cond:
            pending = len(self._outbox) + len(self._inflight)
            if not self._finished.is_set():
                self._fail_pending("the stream client was stopped", fatal=False)
            self._stop = True
            conn = self._conn
            self._cond.notify_all()
        if conn is not None:
            conn.abort()
        self.join(timeout)
        return pending == 0

    def send_wss_message(self, msg: Union[str, bytes, dict]) -> SendResult:
        """Queue one raw frame (str/dict: text, bytes: binary)."""
        if isinstance(msg, dict):
            msg = json.dumps(msg, ensure_ascii=False)
        if isinstance(msg, (bytes, bytearray)):
            frame = _Frame(_BINARY, bytes(msg), "raw")
        else:
            text = str(msg)
            problem = utf8_error(text)
            if problem is not None:
                return self._unencodable(problem)
            frame = _Frame(_TEXT, text, "raw")
        return self._enqueue(frame, self.config.max_queue_bytes)

    def send_msg(self, msg: Union[str, bytes, dict]) -> SendResult:
        """Alias of :meth:`send_wss_message` (0.1.99 name)."""
        return self.send_wss_message(msg)

    def send_chunk_to_stream(self, chunk: Any, type: str = "text/event-stream") -> SendResult:
        """Queue one text chunk as ``{"cmd":"push_text_stream_req","data":{"chunk":<form-encoded chunk>}}``.

        ``chunk`` is the chunk's text (usually the JSON of an OpenAI ``ChatCompletionChunk``); other objects are
        JSON-encoded first. The result is ``queued`` or ``failed`` (never a silent drop).
        """
        text = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False, default=_plain)
        problem = utf8_error(text)
        if problem is not None:
            return self._unencodable(problem)
        frame = json.dumps({"cmd": "push_text_stream_req", "data": {"chunk": urllib.parse.quote_plus(text)}},
                           ensure_ascii=False)
        return self._enqueue(_Frame(_TEXT, frame, "text"), self.config.max_queue_bytes)

    def send_chunk_to_file_stream(self, offset: int, chunk: bytes) -> SendResult:
        """Queue one file chunk (binary frame: msg_type 5, content_type 5, reserved = ``offset``).

        Waits (up to ``send_timeout``) while more than ``file_window`` bytes are unconfirmed; ``failed`` if no room
        came (the chunk is then NOT sent: send it again) or the stream failed.
        """
        header = WssBinaryMessage(msg_type=MSG_TYPE_FILE, content_type=CONTENT_TYPE_FILE, reserved=int(offset))
        try:
            frame = encode_wss_binary_buffer(bytes(chunk), header)
        except (TypeError, ValueError) as exc:  # offset beyond 4 GiB, not bytes
            return SendResult(SendStatus.FAILED, error=f"cannot encode the file chunk at {offset}: {exc}")
        return self._enqueue(_Frame(_BINARY, frame, "file"), self.config.file_window, file=True)

    def _unencodable(self, problem: str) -> SendResult:
        with self._cond:
            self.counters["failed"] += 1
            self.counters["unencodable"] = self.counters.get("unencodable", 0) + 1
        return SendResult(SendStatus.FAILED, error=problem)

    def close_stream(self, stream_url: str = "", timeout: Optional[float] = None) -> bool:
        """End the stream: send ``{"cmd":"close_stream_req"}`` after every queued chunk, wait (up to
        ``close_timeout``) until the server confirmed everything, close the socket and join every thread.

        True if every frame was confirmed by the server; False otherwise (the shortfall is logged and published).
        """
        wait = self.config.close_timeout if timeout is None else timeout
        with self._cond:
            if not self._finished.is_set() and not self._closing:
                if not self._started:
                    self._fail_pending("the stream was closed before it was started", fatal=False)
                    self._stop = True
                else:
                    self._closing = True
                    close = _Frame(_TEXT, json.dumps({"cmd": "close_stream_req"}), "close")
                    self._outbox.append(close)
                    self._bytes += close.size
                    self.counters["frames"] += 1
                    self._cond.notify_all()
            ok = self._cond.wait_for(lambda: self._finished.is_set() or self._stop, wait)
            if not ok:
                self._fail_pending(f"the stream server did not confirm the stream within {wait:.0f} s of its close")
                self._stop = True
            ok = self._failed_reason is None
            conn = self._conn
            self._cond.notify_all()
        if conn is not None:
            conn.abort()
        self.join()
        return ok

    # ------------------------------------------------------------------------------------------------------------
    # New API
    # ------------------------------------------------------------------------------------------------------------
    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every frame so far was confirmed by the server; False on timeout or failure."""
        with self._cond:
            self._cond.notify_all()
            self._cond.wait_for(lambda: (not self._outbox and not self._inflight) or self._finished.is_set(),
                                timeout)
            return not self._outbox and not self._inflight and self._failed_reason is None

    def join(self, timeout: Optional[float] = None) -> bool:
        """Join the driver and reader threads (bounded; by default by the socket timeouts). True if all ended."""
        if timeout is None:
            timeout = self.config.connection_timeout + self.config.send_timeout + 2.0
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        driver = self._driver
        if driver is not None and driver is not current and driver.ident is not None:
            driver.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            readers = list(self._readers)
        for reader in readers:
            if reader is not current:
                reader.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in ([driver] if driver is not None else []) + readers
                 if t is not current and t.is_alive()]
        if alive:
            log.warning("stream client of %s: threads still running after %.1f s: %s", self.agent_id, timeout,
                        ", ".join(alive))
            return False
        return True

    @property
    def failed(self) -> Optional[str]:
        """Why the stream failed (None while it is healthy or after a clean close)."""
        return self._failed_reason

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            snap: Dict[str, Any] = dict(self.counters)
            snap.update(queued=len(self._outbox), unconfirmed=len(self._inflight), pending_bytes=self._bytes,
                        connected=self._conn is not None, finished=self._finished.is_set(),
                        failed_reason=self._failed_reason)
        return snap

    # ------------------------------------------------------------------------------------------------------------
    # Internals: queue
    # ------------------------------------------------------------------------------------------------------------
    def _enqueue(self, frame: _Frame, limit: int, file: bool = False) -> SendResult:
        def room() -> bool:
            if self._finished.is_set() or self._stop or self._closing:
                return True
            used = self._file_bytes if file else self._bytes
            return used == 0 or used + frame.size <= limit

        with self._cond:
            if not self._cond.wait_for(room, self.config.send_timeout):
                self.counters["failed"] += 1
                return SendResult(SendStatus.FAILED, error=f"no room for the chunk within "
                                  f"{self.config.send_timeout:.0f} s ({self._bytes} bytes wait for the stream server)")
            if self._failed_reason is not None:
                return SendResult(SendStatus.FAILED, error=f"stream failed: {self._failed_reason}")
            if self._finished.is_set() or self._stop:
                return SendResult(SendStatus.FAILED, error="stream client stopped")
            if self._closing:
                return SendResult(SendStatus.FAILED, error="stream is closing: no more chunks")
            if not self._started:
                return SendResult(SendStatus.FAILED, error="stream client not started")
            self._outbox.append(frame)
            self._bytes += frame.size
            if file:
                self._file_bytes += frame.size
            self.counters["frames"] += 1
            self._cond.notify_all()
        return SendResult(SendStatus.QUEUED)

    def _release(self, frame: _Frame) -> None:
        """Lock held: ``frame`` left the pipeline (confirmed or failed)."""
        self._bytes -= frame.size
        if frame.kind == "file":
            self._file_bytes -= frame.size

    def _fail_pending(self, reason: str, fatal: bool = True) -> None:
        """Lock held: the stream ends; every frame not confirmed is reported as failed.

        ``fatal=False`` (a stop asked for by the caller): the stream counts as failed only if frames were pending.
        """
        pending = list(self._inflight) + list(self._outbox)
        self._inflight.clear()
        self._outbox.clear()
        for frame in pending:
            self._release(frame)
        if pending:
            chunks = sum(1 for f in pending if f.kind != "close")
            self.counters["failed"] += len(pending)
            self._failed_reason = f"{reason}; {chunks} chunk(s) not confirmed by the stream server"
            self._report.note("failed", f"stream {self.ws_url} of {self.agent_id}: {self._failed_reason}",
                              StreamError(self._failed_reason))
        elif fatal and self._failed_reason is None:
            self._failed_reason = reason
            self._report.note("failed", f"stream {self.ws_url} of {self.agent_id}: {reason}", StreamError(reason))
        self._finished.set()
        self._cond.notify_all()

    def _confirm_all(self) -> None:
        """Lock held: the server is known to have every pending frame; the stream ends cleanly."""
        frames = list(self._inflight) + list(self._outbox)
        self._inflight.clear()
        self._outbox.clear()
        for frame in frames:
            self._release(frame)
        self.counters["confirmed"] += len(frames)
        self._finished.set()
        self._cond.notify_all()

    def _closing_done(self) -> bool:
        return self._closing and not self._outbox and not self._inflight

    # ------------------------------------------------------------------------------------------------------------
    # Internals: the driver thread
    # ------------------------------------------------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            while True:
                with self._cond:
                    step = self._decide()
                kind = step[0]
                if kind == "exit":
                    break
                if kind == "connect":
                    self._do_connect()
                elif kind == "write":
                    self._do_write(step[1], step[2])
                elif kind == "ping":
                    self._do_ping(step[1], step[2])
                elif kind == "drop":
                    self.counters["dead"] += 1
                    self._lost(step[1], "no answer to a ping (dead connection)")
        except Exception as exc:  # the driver must not die silently: pending frames are failed truthfully
            self._report.note("internal", f"stream driver of {self.agent_id} crashed: {exc!r}", exc, exc_info=True)
            with self._cond:
                self._fail_pending(f"internal error: {exc!r}")
        finally:
            with self._cond:
                conn, self._conn = self._conn, None
                self._connected.clear()
                self._finished.set()
                self._cond.notify_all()
            if conn is not None:
                self._goodbye(conn)

    def _decide(self) -> tuple:
        """Lock held: the next step, or wait until something changes."""
        cfg = self.config
        while True:
            if self._stop or self._finished.is_set():
                return ("exit",)
            now = self._clock()
            conn = self._conn
            if conn is None:
                if self._down_since is not None and now - self._down_since > cfg.give_up_after:
                    self._fail_pending(f"no connection to the stream server for {cfg.give_up_after:.0f} s")
                    return ("exit",)
                if now >= self._next_attempt:
                    return ("connect",)
                wake = self._next_attempt
                if self._down_since is not None:
                    wake = min(wake, self._down_since + cfg.give_up_after + 0.01)
                self._cond.wait(max(0.0, wake - now))
                continue
            if self._ping_outstanding is not None and now - self._ping_sent_at > cfg.pong_timeout:
                return ("drop", conn)
            if self._outbox:
                frame = self._outbox.popleft()
                frame.after_ping = self._ping_seq
                self._inflight.append(frame)
                return ("write", conn, frame)
            if self._inflight and self._ping_outstanding is None:
                return self._ping_step(conn, now)
            if self._closing_done():
                self._finished.set()
                self._cond.notify_all()
                return ("exit",)
            if self._ping_outstanding is None and now - self._last_io >= cfg.ping_interval:
                return self._ping_step(conn, now)
            if self._ping_outstanding is not None:
                wake = self._ping_sent_at + cfg.pong_timeout + 0.001
            else:
                wake = self._last_io + cfg.ping_interval
            self._cond.wait(max(0.0, wake - now))

    def _ping_step(self, conn: _Conn, now: float) -> tuple:
        self._ping_seq += 1
        self._ping_outstanding = self._ping_seq
        self._ping_sent_at = now
        self._last_io = now
        self.counters["pings"] += 1
        return ("ping", conn, self._ping_seq)

    def _current_signature(self, refresh: bool) -> Optional[str]:
        if refresh and self.signature_provider is not None:
            try:
                fresh = self.signature_provider()
            except Exception as exc:  # a provider bug must not kill the driver; keep the old token
                log.debug("signature provider failed: %r", exc)
                fresh = None
            if fresh:
                self.signature = fresh
        return self.signature

    def _do_connect(self, refresh: bool = False) -> None:
        cfg = self.config
        signature = self._current_signature(refresh or self._failures > 0)
        url = signed_url(stream_ws_url(self.server_url), self.agent_id, signature)
        try:
            ws = websocket.create_connection(url, timeout=cfg.connection_timeout, sslopt=self._sslopt(),
                                             enable_multithread=True, suppress_origin=True)
        except websocket.WebSocketBadStatusException as exc:
            status = int(getattr(exc, "status_code", 0) or 0)
            if status in (404, 410):
                with self._cond:
                    self.counters["connect_failures"] += 1
                    if status == 410 and self._close_written:
                        # Gone after our close request went out: the server processed it, and frames are processed
                        # in order, so everything before it arrived too (only the pong was lost with the socket).
                        self._confirm_all()
                    else:
                        self._fail_pending(f"the stream server refused the stream (HTTP {status})")
                return
            self._connect_failed(f"handshake rejected with HTTP {status}")
            return
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            self._connect_failed(redact(connect_error_text(exc, stream_ws_url(self.server_url)), signature))
            return
        try:
            ws.settimeout(cfg.send_timeout)
            sock = getattr(ws, "sock", None)
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._cond:
            if self._stop or self._finished.is_set():
                stale = _Conn(ws, 0)
            else:
                stale = None
                self._gen += 1
                conn = _Conn(ws, self._gen)
                self._conn = conn
                self._failures = 0
                self._down_since = None
                self._ping_outstanding = None
                self._last_io = self._clock()
                self.counters["connects"] += 1
                self._readers = [t for t in self._readers if t.is_alive()]
                conn.reader = threading.Thread(target=self._read_loop, args=(conn,),
                                               name=f"agentcp-stream-recv-{self.agent_id}", daemon=True)
                self._readers.append(conn.reader)
                conn.reader.start()
                self._connected.set()
                self._cond.notify_all()
        if stale is not None:
            self._goodbye(stale)
            return
        if self.counters["connects"] > 1:
            log.info("stream %s of %s reconnected", self.ws_url, self.agent_id)
        self._report.forget("connect", "lost")

    def _connect_failed(self, reason: str) -> None:
        with self._cond:
            self.counters["connect_failures"] += 1
            delay = self.config.reconnect_backoff.delay(self._failures)
            self._failures += 1
            self._next_attempt = self._clock() + delay
            self._cond.notify_all()
        self._report.note("connect", f"cannot connect the stream {self.ws_url} of {self.agent_id} ({reason}); "
                                     f"retrying", StreamError(f"stream connect failed: {reason}"))

    def _do_write(self, conn: _Conn, frame: _Frame) -> None:
        try:
            if isinstance(frame.payload, bytes):
                conn.ws.send_binary(frame.payload)
            else:
                conn.ws.send(frame.payload)
        except (UnicodeError, TypeError, ValueError) as exc:
            # Nothing was written: this frame fails alone (the stream is then incomplete); the rest goes on.
            with self._cond:
                if frame in self._inflight:
                    self._inflight.remove(frame)
                    self._release(frame)
                self.counters["failed"] += 1
                if self._failed_reason is None:
                    self._failed_reason = f"a frame could not be encoded ({type(exc).__name__}) and was not sent"
                self._cond.notify_all()
            self._report.note("unencodable", f"stream {self.ws_url} of {self.agent_id}: a frame could not be "
                                             f"encoded ({exc!r}); it was dropped", exc)
            return
        except (websocket.WebSocketException, OSError) as exc:
            self._lost(conn, f"write failed: {type(exc).__name__}")
            return
        with self._cond:
            self.counters["written"] += 1
            self.counters["bytes_written"] += frame.size
            self._last_io = self._clock()
            if frame.kind == "close":
                self._close_written = True

    def _do_ping(self, conn: _Conn, seq: int) -> None:
        try:
            conn.ws.ping(str(seq))
        except (websocket.WebSocketException, OSError) as exc:
            self._lost(conn, f"ping failed: {type(exc).__name__}")

    def _lost(self, conn: _Conn, reason: str) -> None:
        """``conn`` failed: unconfirmed frames go back to the head of the queue (or fail), then reconnect."""
        with self._cond:
            if self._conn is not conn:
                return
            self._conn = None
            self._connected.clear()
            now = self._clock()
            self._down_since = now
            self._ping_outstanding = None
            self.counters["losses"] += 1
            unconfirmed = list(self._inflight)
            self._inflight.clear()
            if self.config.resend_unconfirmed:
                self.counters["resent"] += len(unconfirmed)
                self._outbox.extendleft(reversed(unconfirmed))
            elif unconfirmed:
                for frame in unconfirmed:
                    self._release(frame)
                self.counters["failed"] += len(unconfirmed)
                self._failed_reason = (f"{len(unconfirmed)} chunk(s) were written but not confirmed when the "
                                       "connection was lost")
            # The first attempt after a working connection is immediate; failures back off (_connect_failed).
            self._next_attempt = now
            self._cond.notify_all()
            stopping = self._stop or self._finished.is_set()
        conn.abort()
        if not stopping:
            self._report.note("lost", f"stream {self.ws_url} of {self.agent_id} lost its connection ({reason}); "
                                      f"reconnecting, {len(unconfirmed)} unconfirmed frame(s) will be resent",
                              StreamError(f"stream connection lost: {reason}"))

    def _goodbye(self, conn: _Conn) -> None:
        """Close politely (close frame), then cut: the reader wakes and ends."""
        try:
            conn.ws.send_close()
        except (websocket.WebSocketException, OSError):
            pass
        conn.abort()

    # ------------------------------------------------------------------------------------------------------------
    # Internals: the reader thread
    # ------------------------------------------------------------------------------------------------------------
    def _read_loop(self, conn: _Conn) -> None:
        reason = "closed"
        frames = BoundedReader(conn.ws, self.limits.stream_chunk_max, "stream_chunk_max",
                               f"stream {self.ws_url}")
        try:
            while True:
                with self._cond:
                    if self._conn is not conn:
                        break
                try:
                    opcode, data = frames.recv()
                except websocket.WebSocketTimeoutException:
                    continue  # idle: the driver's pings decide whether the connection is dead
                except websocket.WebSocketConnectionClosedException:
                    reason = "closed by the server"
                    break
                except LimitExceeded as exc:
                    self._too_big(exc)  # counted before the peer sees the close
                    frames.close_too_big()
                    reason = "frame too big (closed with 1009)"
                    break
                except (websocket.WebSocketException, OSError, ValueError, AttributeError) as exc:
                    reason = f"receive failed: {type(exc).__name__}"
                    break
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    reason = "closed by the server"
                    break
                self._on_frame(conn, opcode, data)
        finally:
            self._lost(conn, reason)
            try:
                conn.ws.shutdown()
            except Exception:  # best effort: the descriptor is released either way
                log.debug("closing the stream socket failed", exc_info=True)

    def _too_big(self, err: LimitExceeded) -> None:
        """The server crossed a bound: the stream fails truthfully (a server that misbehaves once is not
        reconnected to), and the crossing is reported."""
        with self._cond:
            self.counters["too_big"] = self.counters.get("too_big", 0) + 1
            self._fail_pending(str(err))
            self._stop = True
        notify_limit(self.on_limit, err, self.agent_id)  # without one, _fail_pending reported it

    def _on_frame(self, conn: _Conn, opcode: int, data: Any) -> None:
        with self._cond:
            if self._conn is not conn:
                return
            if self._ping_outstanding is not None:
                # Any frame proves the connection alive; a pong confirms every frame written before its ping.
                if opcode == websocket.ABNF.OPCODE_PONG:
                    seq = self._ping_outstanding
                    self._ping_outstanding = None
                    while self._inflight and self._inflight[0].after_ping < seq:
                        frame = self._inflight.popleft()
                        self._release(frame)
                        self.counters["confirmed"] += 1
                else:
                    self._ping_sent_at = self._clock()
                self._cond.notify_all()
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            if opcode == websocket.ABNF.OPCODE_TEXT and isinstance(data, (bytes, bytearray)):
                data = data.decode("utf-8", "replace")
            handler = self.message_handler
            if handler is None:
                log.debug("stream %s: frame from the server (%d bytes) ignored", self.ws_url, len(data))
                return
            try:
                on_message = getattr(handler, "on_message", None)
                if on_message is not None:
                    on_message(conn.ws, data)
                else:
                    handler(data)
            except Exception as exc:  # a handler bug must not kill the reader
                self._report.note("handler", f"stream message handler of {self.agent_id} raised: {exc!r}", exc)

    def _sslopt(self) -> Dict[str, Any]:
        return sslopt(self.config.verify)


def _plain(obj: Any) -> Any:
    """JSON fallback for chunk objects: pydantic models dump themselves, other objects give their ``vars()``."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        try:
            return dump()
        except Exception:  # not a pydantic model after all; fall back to vars()
            pass
    try:
        return vars(obj)
    except TypeError:
        return str(obj)
