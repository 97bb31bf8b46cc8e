"""WebSocket client of the message server: the thin I/O shell around :class:`~agentcp.msg.channel.Channel`.

Compatible with 0.1.99's ``agentcp.msg.message_client`` (``ConnectionState``, ``MessageClientConfig`` field names,
``MessageClient(agent_id, server_url, aid_path, seed_password, cache_auth_client=None, config=None)``,
``start_websocket_client``, ``stop_websocket_client``, ``send_msg``, ``set_message_handler``,
``connection_state``). What changed (messaging.md §1.6-§1.8, §7):

* No thread of its own: the connection is a non-blocking socket on the process-wide message reactor
  (:mod:`agentcp.msg.ws_reactor`, one thread for every agent's connection, TLS included), framed by
  ``websockets``' sans-I/O protocol (:mod:`agentcp.msg.ws_link`). The reactor obeys the channel machine: sign in
  and look up the address (on a small shared pool: both block), connect, ping, drop a dead connection (no frame
  within ``pong_timeout`` of a ping), reconnect with capped full-jitter backoff **for as long as the client runs**,
  sign in again when the handshake is rejected. A receive-only client reconnects without sending anything.
* Incoming frames feed the machine and the handler (``on_message(ws, text)``) on the reactor.
  Acknowledgements (``session_message_ack``) complete the sender's :class:`SendResult`; a message delivered again
  (same session, sender, id and content, e.g. replayed after a re-join) is dropped before the handler.
* Sending never blocks on a connect or a socket: a frame joins the bounded outbox and the reactor writes it (many
  frames per system call under load), in order, after the handler's ``on_open`` re-joined the sessions. While
  connected, a sender whose window (queued + awaiting an ack, ``max_queue_size``) is full waits up to
  ``send_timeout`` for acks to make room; while disconnected a full outbox fails at once
  (:class:`OutboxFullError`). Session messages not acked when a connection is lost are sent again, and so are
  frames the socket never took.
* ``stop_websocket_client()`` closes the connection; no handler call is running or starts after it returns.
* The signature is never logged: URLs in logs read ``signature=***``.
* Hostile input is bounded (trust.md rules 4 and 7): an incoming message larger than ``limits.ws_message_max``
  (all fragments together, checked from each frame header) closes the connection with 1009, is reported through
  ``on_limit`` and the client reconnects; a frame that cannot be encoded as UTF-8 (e.g. a peer's lone surrogate
  echoed into a reply) fails its send at once and never enters the outbox. With a back-pressure gate
  (``when_room`` or ``backpressure``) the connection is not read while the consumer's backlog is full (it is kept
  alive meanwhile); a write the server takes nothing of for ``send_timeout`` ends the connection.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple, Union

from websockets.exceptions import WebSocketException
from websockets.uri import parse_uri

from agentcp.base.auth_client import AuthClient
from agentcp.base.backoff import PERMANENT_ERROR_BACKOFF, RECONNECT_BACKOFF, Backoff
from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from agentcp.base.client import IClient
from agentcp.base.reporting import FaultReporter
from agentcp.base.serial_pool import Lane, SerialPool
from agentcp.context.exceptions import AuthError, SDKError, SendMsgError
from agentcp.msg.channel import Action, Channel, ChannelConfig, ConnectionState, OutItem
from agentcp.base.http import connect_error_text
from agentcp.msg.ws import notify_limit, ssl_context, utf8_error
from agentcp.msg.ws_link import OP_TEXT, WsLink
from agentcp.msg.ws_reactor import TimerHandle
from agentcp.msg.ws_reactor import reactor as ws_reactor

log = logging.getLogger("agentcp.msg")

_SIGNATURE_QUERY = re.compile(r"signature=[^&\s'\"]*")

__all__ = [
    "ConnectionState",
    "MessageClientConfig",
    "MessageClient",
    "SendStatus",
    "SendResult",
    "OutboxFullError",
    "ClientStoppedError",
    "MessageChannelError",
]


class MessageChannelError(SDKError):
    """A fault of the message channel (connection lost, handshake rejected, ...) reported while it heals."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1300) -> None:
        super().__init__(message, trace_id, code)


class OutboxFullError(SendMsgError):
    """The outbox is full (the server has been unreachable for a while): the message was NOT queued."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1009) -> None:
        super().__init__(message, trace_id, code)


class ClientStoppedError(SendMsgError):
    """The message client was stopped (``offline()``): nothing can be sent through it any more."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1009) -> None:
        super().__init__(message, trace_id, code)


@dataclass
class MessageClientConfig:
    """0.1.99's field names first (some now unused: reconnects never give up), then the new ones.

    ``ping_interval`` (20 s; 0.1.99 pinged every 5 s and never checked the pong) is chosen from what the
    connection needs, not from what idle agents can afford:

    * keep NAT bindings and proxies open: the shortest idle timeouts common on the path are 60 s (nginx
      ``proxy_read_timeout``, cloud load balancers); pinging every 20 s leaves a frame in every 60 s window even
      when one ping is lost (two in a row at 30 s would not), and stays under the 30 s the ACP reference client
      documents for the server;
    * detect a dead peer in bounded time: a ping unanswered for ``pong_timeout`` (default half the interval, at
      most the interval) counts as a dead connection, so a silent peer is noticed within
      ``ping_interval + pong_timeout`` = 30 s by default (the README's bound: at most 2 ping intervals), the
      same 30 s the newest upstream client waits for a pong;
    * cost: one ping frame per agent every 20 s (50 idle agents: 2.5 frames/s instead of 10).

    Lower it for faster detection on networks you know (the tests use 0.3-1 s); keep it under 30 s.
    """

    #: Messages queued or awaiting their ack (0.1.99: 30, the oldest dropped silently). While connected a full
    #: window makes the sender wait for acks (up to ``send_timeout``); while disconnected a full outbox fails.
    max_queue_size: int = 4096
    connection_timeout: float = 5.0  # TCP connect + WebSocket handshake
    retry_interval: float = 4.0  # unused: reconnects follow reconnect_backoff
    max_retry_attempts: int = 3  # unused: reconnects continue while the client runs
    send_retry_attempts: int = 5  # unused: sends never wait for a connection
    send_retry_delay: float = 0.01  # unused
    ping_interval: float = 20.0  # see the class docstring
    # --- new ---
    #: Seconds a ping waits for any frame before the connection counts as dead (None: ping_interval / 2).
    pong_timeout: Optional[float] = None
    #: How long ``send_message`` waits for the server's ack while connected. 0 (the default): it returns as soon
    #: as the message is written or queued, with a live :class:`SendResult` that settles when the ack arrives.
    ack_timeout: float = 0.0
    #: Seconds a write may make no progress before the connection counts as stalled (and is rebuilt); also how
    #: long a sender waits for room when its window of unacknowledged messages is full.
    send_timeout: float = 10.0
    #: Bytes of message text queued or awaiting their ack (the same rule as ``max_queue_size``).
    max_queue_bytes: int = 16 * 1024 * 1024
    reconnect_backoff: Backoff = RECONNECT_BACKOFF
    permanent_backoff: Backoff = PERMANENT_ERROR_BACKOFF
    resign_after_failures: int = 3
    dedup_window: int = 8192
    immediate_reconnect_gap: float = 1.0
    #: TLS verification of ``wss://``: None follows AGENTCP_TLS_VERIFY (default on); False or a CA bundle path.
    verify: Any = None
    #: On stop, how long to wait (while connected) for messages already written or queued to be acknowledged.
    drain_timeout: float = 2.0

    def channel_config(self) -> ChannelConfig:
        return ChannelConfig(
            ping_interval=float(self.ping_interval),
            pong_timeout=self.pong_timeout,
            reconnect_backoff=self.reconnect_backoff,
            permanent_backoff=self.permanent_backoff,
            max_queue_size=int(self.max_queue_size),
            max_queue_bytes=int(self.max_queue_bytes),
            resign_after_failures=int(self.resign_after_failures),
            dedup_window=int(self.dedup_window),
            immediate_reconnect_gap=float(self.immediate_reconnect_gap),
        )


class SendStatus(str, enum.Enum):
    DELIVERED = "delivered"  # the server acknowledged it
    SENT = "sent"  # written to the connection; no ack (yet); re-sent after a reconnect if still unacked
    QUEUED = "queued"  # waiting in the outbox for the connection; goes out in order after the reconnect
    FAILED = "failed"  # not sent and not queued (outbox full, client stopped, refused by the server)

    def __str__(self) -> str:
        return self.value


class SendResult:
    """What became of a message. Truthy unless it FAILED; compares equal to ``True``/``False`` accordingly, so
    0.1.99 code testing ``if aid.send_message(...)`` or ``== True`` keeps working.

    A result returned while the message is still on its way is *live*: ``status`` moves from ``queued`` to
    ``sent`` to a final state (``delivered`` when the server acknowledged it, ``failed`` with ``error``; ``sent``
    is final only where the server does not acknowledge). Wait for it with :meth:`wait`, ``await result`` in async
    code, or :meth:`add_done_callback`.
    """

    __slots__ = ("_status", "message_id", "_error", "_status_code", "_offline", "_ticket")

    def __init__(self, status: SendStatus, message_id: str = "", error: Optional[str] = None,
                 status_code: Optional[int] = None, offline_receivers: Optional[List[str]] = None, *,
                 ticket: Optional["Ticket"] = None) -> None:
        self._status = status
        self.message_id = message_id
        self._error = error
        self._status_code = status_code
        self._offline = list(offline_receivers or [])
        self._ticket = ticket

    @classmethod
    def live(cls, ticket: "Ticket") -> "SendResult":
        """A result that follows ``ticket`` until it settles."""
        return cls(ticket.status, ticket.message_id, ticket=ticket)

    @property
    def status(self) -> SendStatus:
        return self._ticket.status if self._ticket is not None else self._status

    @property
    def error(self) -> Optional[str]:
        return self._ticket.error if self._ticket is not None else self._error

    @property
    def status_code(self) -> Optional[int]:
        return self._ticket.status_code if self._ticket is not None else self._status_code

    @property
    def offline_receivers(self) -> List[str]:
        return list(self._ticket.offline_receivers) if self._ticket is not None else self._offline

    @property
    def delivered(self) -> bool:
        return self.status is SendStatus.DELIVERED

    @property
    def queued(self) -> bool:
        return self.status is SendStatus.QUEUED

    @property
    def failed(self) -> bool:
        return self.status is SendStatus.FAILED

    @property
    def done(self) -> bool:
        """True once the result is final (it will not change any more)."""
        return self._ticket is None or self._ticket.done

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the result is final; True if it is (False: ``timeout`` passed first)."""
        return self._ticket is None or self._ticket.wait(timeout)

    def add_done_callback(self, fn: Callable[["SendResult"], Any]) -> None:
        """Call ``fn(result)`` once the result is final: at once if it is, else on the thread that settles it
        (the connection's thread: keep ``fn`` short and never block in it)."""
        if self._ticket is None:
            _call_done(fn, self)
        else:
            self._ticket.add_done_callback(lambda _t: _call_done(fn, self))

    def __await__(self):
        if not self.done:
            import asyncio

            loop = asyncio.get_running_loop()
            future = loop.create_future()

            def settle(_result: "SendResult") -> None:
                def set_result() -> None:
                    if not future.done():
                        future.set_result(None)
                try:
                    loop.call_soon_threadsafe(set_result)
                except RuntimeError:  # the loop was closed meanwhile: nobody is waiting any more
                    pass

            self.add_done_callback(settle)
            yield from future.__await__()
        return self

    def __bool__(self) -> bool:
        return self.status is not SendStatus.FAILED

    def __eq__(self, other: object) -> bool:
        if isinstance(other, bool):
            return bool(self) is other
        if isinstance(other, SendResult):
            return (self.status, self.message_id) == (other.status, other.message_id)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.message_id)  # the status of a live result changes; equal results share their id

    def __repr__(self) -> str:
        extra = f", error={self.error!r}" if self.error else ""
        if self.offline_receivers:
            extra += f", offline_receivers={self.offline_receivers!r}"
        return f"SendResult({self.status.value}, message_id={self.message_id!r}{extra})"


def _call_done(fn: Callable[[SendResult], Any], result: SendResult) -> None:
    try:
        fn(result)
    except Exception:  # a caller's callback bug must not break the connection thread that settled the result
        log.exception("a SendResult done-callback raised")


class Ticket:
    """The sender's handle on one outgoing frame: its status, completed by the writer / the ack."""

    __slots__ = ("message_id", "session_id", "status", "error", "status_code", "offline_receivers", "ack_data",
                 "_done", "_event", "_callbacks")

    def __init__(self, message_id: str = "", session_id: str = "") -> None:
        self.message_id = message_id
        self.session_id = session_id
        self.status = SendStatus.QUEUED
        self.error: Optional[str] = None
        self.status_code: Optional[int] = None
        self.offline_receivers: List[str] = []
        self.ack_data: Optional[Dict[str, Any]] = None
        self._done = False
        # Made only when someone waits: most results are never waited for, and an Event (a Condition and two
        # locks) cost about a tenth of send_message.
        self._event: Optional[threading.Event] = None
        self._callbacks: Optional[List[Callable[["Ticket"], Any]]] = None

    def _finish(self, status: SendStatus, error: Optional[str] = None) -> None:
        with _TICKET_LOCK:
            if self._done:
                return  # settled once: a late ack or a stop after the ack changes nothing
            self.status = status
            self.error = error
            self._done = True
            if self._event is not None:
                self._event.set()
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            fn(self)

    def _mark_sent(self) -> None:
        """Written to the connection, ack pending (unless it was settled meanwhile: the ack may come first)."""
        with _TICKET_LOCK:
            if not self._done:
                self.status = SendStatus.SENT

    def add_done_callback(self, fn: Callable[["Ticket"], Any]) -> None:
        """``fn(ticket)`` once it is finished (at once if it is)."""
        with _TICKET_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: Optional[float]) -> bool:
        """Wait until acked or failed; True if that happened within ``timeout``."""
        with _TICKET_LOCK:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done

    def result(self) -> SendResult:
        """A live :class:`SendResult` that follows this ticket."""
        return SendResult.live(self)


# One lock for every ticket's settle-or-subscribe step (held for a few instructions; a lock per message would cost
# more than it saves).
_TICKET_LOCK = threading.Lock()


#: Server answers that carry the ``request_id`` of the request they answer (messaging.md §2).
REPLY_CMDS = frozenset({"create_session_ack", "session_create_stream_ack", "invite_agent_ack",
                        "get_member_list_ack", "get_member_list_resp", "member_list"})


def reply_key(request_id: str) -> Tuple[str, str]:
    """The ``ack_key`` of a request answered by one of :data:`REPLY_CMDS`: such a request stays in flight until
    its answer arrives, and is sent again after a reconnect if the connection was lost first (a request written
    into a connection the server had already cut is otherwise lost, and its caller waits in vain)."""
    return ("reply", request_id)


def replay_key(data: Dict[str, Any]) -> Tuple[str, str, str, bytes]:
    """What identifies one incoming message, so that only a *replay* of it (the same message delivered again
    after a re-join) counts as a duplicate: session, sender, message id and a digest of what it says.

    The id alone is not enough: 0.1.99 senders use the millisecond clock as ``message_id`` (a burst shares one),
    applications may pass their own ids again, and servers may relay the sender's id unchanged.
    """
    body = "\x1f".join(str(data.get(k) or "") for k in ("message", "ref_msg_id", "receiver", "timestamp"))
    digest = hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=12).digest()
    return (str(data.get("session_id") or ""), str(data.get("sender") or ""), str(data.get("message_id") or ""),
            digest)


def ws_base_url(server_url: str) -> str:
    """``https://host/api/message`` -> ``wss://host/api/message`` (``http`` -> ``ws``), trailing ``/`` removed."""
    url = (server_url or "").rstrip("/")
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


def redact(text: str, secret: Optional[str]) -> str:
    """``text`` with ``secret`` (and any ``signature=`` query value) replaced by ``***``."""
    if secret:
        text = text.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
    return _SIGNATURE_QUERY.sub("signature=***", text)


class MessageClient(IClient):
    """The agent's connection to one message server (``server_url`` as in the access point config)."""

    #: Bytes written but not yet taken by the socket above which queued items wait in the outbox (bounded, and
    #: counted there) instead of piling up in the connection's write buffer.
    WRITE_HIGH_WATER: int = 1 << 20
    #: A send that follows the previous one by at least this many seconds is written by the sender's own thread
    #: (no thread switch: lowest latency); sends closer together join the outbox and the reactor writes them in
    #: batches (one system call for many: highest throughput). Like TCP autocorking.
    DIRECT_WRITE_GAP: float = 0.0005

    def __init__(
        self,
        agent_id: str,
        server_url: str,
        aid_path: str,
        seed_password: str,
        cache_auth_client: Optional[AuthClient] = None,
        config: Optional[MessageClientConfig] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits = DEFAULT_LIMITS,
        on_limit: Optional[Callable[[LimitExceeded], Any]] = None,
        backpressure: Optional[Callable[[float], bool]] = None,
        when_room: Optional[Callable[[Callable[[], Any]], bool]] = None,
    ) -> None:
        """``limits``: bounds on incoming messages; ``on_limit(err)`` is told of every crossing (AgentID counts
        it in ``status()``). Back-pressure on incoming messages: ``when_room(callback) -> bool`` says whether the
        consumer's backlog has room and, if not, calls ``callback()`` once when it has; or ``backpressure(timeout)
        -> bool`` waits up to ``timeout`` for room (True: room). While there is none the socket is not read
        (nothing is dropped)."""
        self.agent_id = agent_id
        self.limits = limits
        self.on_limit = on_limit
        self.backpressure = backpressure
        self.when_room = when_room
        self.server_url = (server_url or "").rstrip("/")
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.config = config or MessageClientConfig()
        self.auth_client = cache_auth_client or AuthClient(agent_id, self.server_url, aid_path, seed_password,
                                                           max_reply=limits.http_reply_max, on_limit=on_limit)
        self.timeout = self.auth_client.timeout
        self.verify = self.config.verify
        self.message_handler: Any = None
        self.stream_queue_map: Dict[str, Any] = {}
        #: Called with ``(old_state, new_state)`` strings on every state change (on the thread that caused it).
        self.on_state_change: Optional[Callable[[str, str], Any]] = None
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._connected_event = threading.Event()
        # Set whenever nothing is in flight or queued, or the connection went away (stop() drains on it).
        self._drained = threading.Event()
        # Senders wait on it while the in-flight window is full on a live connection (notified as acks arrive).
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._closed = threading.Event()  # the reactor has let go of this client's connection (after stop)
        self._machine = Channel(self.config.channel_config())
        self._conn: Optional[WsLink] = None  # the open connection
        self._connecting: Optional[WsLink] = None  # a connection being opened
        self._gen = 0
        self._reactor = ws_reactor()
        self._holding_reactor = False
        self._started = False
        self._lane: Optional[Lane] = None
        self._timer: Optional[TimerHandle] = None
        self._kick_pending = False
        self._pump_pending = False
        self._last_send = float("-inf")
        self._report = FaultReporter(log, agent_id, MessageChannelError,
                                     redact=lambda text: redact(text, self.auth_client.signature))
        self._extra: Dict[str, int] = {"malformed": 0, "handler_errors": 0, "acks_unmatched": 0, "ack_timeouts": 0,
                                       "too_big": 0, "unencodable": 0, "backpressure_waits": 0}
        #: True while the client holds a message back because the consumer's backlog is full.
        self.reading_paused = False
        self._lost_at: Optional[float] = None
        #: Seconds from each lost connection to the next successful handshake (the last 32).
        self.resume_times: List[float] = []

    # ------------------------------------------------------------------------------------------------------------
    # 0.1.99 API
    # ------------------------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Sign in (one attempt; the client keeps trying in the background once started)."""
        self.sign_in()

    def sign_in(self) -> bool:
        """One sign-in to the message server; True on success (the token is kept in the auth client)."""
        try:
            self.auth_client.sign_in_once()
            return True
        except AuthError as exc:
            self._report.note("sign_in", f"message server sign-in of {self.agent_id} to {self.server_url} "
                                        f"failed: {exc}", exc)
            return False

    def get_headers(self) -> Dict[str, str]:
        return self.auth_client.get_headers()

    def sign_out(self) -> None:
        try:
            self.auth_client.sign_out()
        except Exception as exc:  # best effort: sign-out must never break shutdown
            log.warning("message server sign-out of %s failed: %s", self.agent_id, type(exc).__name__)

    def current_signature(self) -> Optional[str]:
        return self.auth_client.signature

    def set_message_handler(self, message_handler: Any) -> None:
        """``message_handler.on_message(ws, text)`` for every frame (``on_frame(ws, frame_dict)`` instead when its
        ``on_message`` is marked ``frame_parser``: the frame is parsed once); ``on_open(ws)`` after each connect
        (optional)."""
        self.message_handler = message_handler

    @property
    def connection_state(self) -> ConnectionState:
        return self._machine.state

    def start_websocket_client(self) -> bool:
        """Start the client (if not running) and wait up to ``connection_timeout`` for a connection.

        Returns True if connected. If not, the client keeps connecting in the background; sends are queued.
        """
        self.start()
        return self.wait_connected(self.config.connection_timeout)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` while connected for everything written or queued to be acknowledged;
        True if nothing is left (False: time ran out, or the connection is gone)."""
        if self._reactor.in_reactor():
            # The acks would be read by this very thread: waiting here would only time out.
            with self._lock:
                return not (self._machine.inflight or self._machine.queued)
        deadline = self._clock() + max(0.0, timeout)
        while True:
            with self._lock:
                if not (self._machine.inflight or self._machine.queued):
                    return True
                if self._conn is None or self._stop.is_set():
                    return False
                self._drained.clear()
            left = deadline - self._clock()
            if left <= 0:
                return False
            self._drained.wait(left)

    def stop_websocket_client(self) -> None:
        """Stop: let what was already sent be acknowledged (up to ``drain_timeout`` while connected), then
        settle what is left (written but unconfirmed: ``sent``; never written: ``failed``) and close the
        connection. When it returns no handler call is running or will start (unless it is called from one).
        Idempotent."""
        self.drain(self.config.drain_timeout)
        with self._lock:
            left = self._machine.stop(self._clock())
            self._flush_state_changes()
            first = not self._stop.is_set()
            self._stop.set()
            self._window_opened()
            self._connected_event.clear()
            lane, self._lane = self._lane, None
            holding, self._holding_reactor = self._holding_reactor, False
        for item in left:
            ticket = item.token
            if isinstance(ticket, Ticket) and not ticket.done:
                if item.attempts > 0:
                    # Written to the server at least once: it may well have arrived; the ack never came back.
                    ticket._finish(SendStatus.SENT, "the client stopped before the server acknowledged it")
                else:
                    ticket._finish(SendStatus.FAILED, "message client stopped before it was sent")
        if left:
            log.warning("%s: %d outgoing message(s) not confirmed by the server when the client stopped",
                        self.agent_id, len(left))
        if lane is not None:
            lane.close()  # waits for a sign-in or lookup in progress (each bounded by its timeout)
            _JOBS.join_if_idle()  # no job thread outlives the last client that had work for it
        if holding:
            if self._reactor.in_reactor():
                self._close_links()
            elif self._reactor.call_soon(self._close_links):
                # Serialised with every handler call on the reactor: none runs once this is done.
                self._closed.wait(10.0)
            self._reactor.release()
        elif first:
            self._closed.set()

    def send_msg(self, msg: Union[str, dict]) -> bool:
        """Send one frame: True if written or on its way now, False if queued for a connection.

        Raises :class:`OutboxFullError` if the outbox is full and :class:`ClientStoppedError` after stop.
        """
        ticket = self.send(msg)
        if ticket.status is SendStatus.FAILED:
            if "stopped" in (ticket.error or ""):
                raise ClientStoppedError(ticket.error)
            raise OutboxFullError(ticket.error)
        return self._conn is not None

    # -- 0.1.99's WebSocketApp callbacks. The reactor handles these events itself; these entry points feed the
    #    same events in from outside (a custom transport, a test, code written for 0.1.99). ``ws`` is the
    #    connection (or its socket); an event for a connection that is no longer current is ignored.
    def _current(self, ws: Any) -> Optional[WsLink]:
        with self._lock:
            conn = self._conn
        if conn is not None and (ws is conn or ws is conn.ws):
            return conn
        log.debug("message channel %s: event for a connection that is not current ignored", self.agent_id)
        return None

    def on_open(self, ws: Any) -> None:
        """``ws`` is open: the handler's ``on_open`` re-joins the sessions over it (as after every connect)."""
        conn = self._current(ws)
        on_open = getattr(self.message_handler, "on_open", None)
        if conn is not None and on_open is not None:
            on_open(conn)

    def on_message(self, ws: Any, message: Union[str, bytes]) -> None:
        """A text frame arrived on ``ws``: an ack completes its send, anything else goes to the handler
        (duplicates dropped), as for the frames the reactor reads."""
        conn = self._current(ws)
        if conn is None:
            return
        with self._lock:
            self._machine.frame_received(self._clock())
        text = message.decode("utf-8", "replace") if isinstance(message, (bytes, bytearray)) else str(message)
        self._on_text(conn, text, gate=False)

    def on_ping(self, ws: Any, message: Any = None) -> None:
        """A ping from the server on ``ws``: evidence the connection is alive."""
        conn = self._current(ws)
        if conn is not None:
            with self._lock:
                self._machine.frame_received(self._clock())

    def on_pong(self, ws: Any, message: Any = None) -> None:
        """The answer to our ping on ``ws``: evidence the connection is alive."""
        self.on_ping(ws, message)

    def on_error(self, ws: Any, error: Any) -> None:
        """An error on ``ws``: reported (once per kind) and the connection is rebuilt."""
        conn = self._current(ws)
        text = redact(f"{type(error).__name__}: {error}", self.auth_client.signature)
        self._report.note("on_error", f"message channel of {self.agent_id}: {text}", MessageChannelError(text))
        if conn is not None:
            conn.abort(f"error: {type(error).__name__}")

    def on_close(self, ws: Any, close_status_code: Optional[int] = None, close_msg: Any = None) -> None:
        """``ws`` was closed: the client reconnects (and re-joins) as after any lost connection."""
        conn = self._current(ws)
        if conn is not None:
            conn.abort(f"closed ({close_status_code} {close_msg or ''})".replace(" )", ")"))

    # ------------------------------------------------------------------------------------------------------------
    # New API
    # ------------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting (returns at once; no-op while running). The connection lives on the process-wide
        message reactor; sign-ins and address lookups run on a small shared pool."""
        with self._lock:
            if self._started and not self._stop.is_set():
                return
            if self._stop.is_set() and self._started:
                raise RuntimeError("a stopped MessageClient cannot be restarted; create a new one")
            previous = self._machine
            self._machine = Channel(self.config.channel_config())
            self._machine.counters = previous.counters
            self._machine.start(self._clock(), have_token=bool(self.auth_client.signature))
            self._flush_state_changes()
            self._started = True
            self._lane = _JOBS.lane()
            self._holding_reactor = True
        self._reactor.acquire()
        self._kick()

    def close(self) -> None:
        """Alias of :meth:`stop_websocket_client`."""
        self.stop_websocket_client()

    @property
    def running(self) -> bool:
        return self._started and not self._stop.is_set()

    @property
    def state(self) -> str:
        return self._machine.state.value

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until connected (True) or ``timeout`` passes (False)."""
        return self._connected_event.wait(timeout)

    #: After this many ack waits that timed out without the server ever acking, stop waiting (a server that
    #: does not ack must not make every send block for ``ack_timeout``).
    ACK_PROBES: int = 3

    @property
    def acks_expected(self) -> bool:
        """False once the server has let ``ACK_PROBES`` waits time out without ever acking a message."""
        if self.reading_paused:
            return False  # acks wait in the socket until the backlog drains: waiting for one would only stall
        return self._machine.counters.acked > 0 or self._extra.get("ack_timeouts", 0) < self.ACK_PROBES

    @property
    def _never_acks(self) -> bool:
        """The server let ``ACK_PROBES`` ack waits time out and never acked anything: it does not ack."""
        return self._machine.counters.acked == 0 and self._extra.get("ack_timeouts", 0) >= self.ACK_PROBES

    def note_ack_timeout(self) -> None:
        """A sender waited ``ack_timeout`` for an ack in vain (counted; see :attr:`acks_expected`)."""
        with self._lock:
            self._extra["ack_timeouts"] = self._extra.get("ack_timeouts", 0) + 1
            never = self._machine.counters.acked == 0 and self._extra["ack_timeouts"] == self.ACK_PROBES
        if never:
            log.warning("message server %s does not acknowledge messages; sends no longer wait for acks "
                        "(results say 'sent')", self.server_url)

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            snap = self._machine.snapshot(self._clock())
            snap.update(self._extra)
            snap["resume_times"] = list(self.resume_times)
            snap["server_url"] = self.server_url
            conn = self._conn
            snap["write_buffered"] = conn.buffered if conn is not None else 0
        return snap

    def send(self, msg: Union[str, dict], *, ack_key: Optional[Hashable] = None, message_id: str = "",
             session_id: str = "") -> Ticket:
        """Send one frame (JSON text or a dict); the :class:`Ticket` tells what became of it.

        The frame joins the outbox and the reactor writes it (many frames per system call under load); the caller
        never waits for the socket. ``ack_key``: the frame expects a ``session_message_ack`` for this key (the
        message id), or an answer (:func:`reply_key`); it stays tracked until then and is sent again if the
        connection is lost first.
        """
        text = msg if isinstance(msg, str) else json.dumps(msg, ensure_ascii=False)
        # A str ack key is the message id (session_message); a reply_key() tuple is not one.
        ticket = Ticket(message_id or (ack_key if isinstance(ack_key, str) else ""), session_id)
        problem = utf8_error(text)
        if problem is not None:
            # Refused here, at the boundary: an unencodable frame in the outbox would fail at every reconnect and
            # block everything queued behind it (trust.md rule 7).
            with self._lock:
                self._extra["unencodable"] += 1
            ticket._finish(SendStatus.FAILED, problem)
            return ticket
        evicted: List[OutItem] = []
        with self._lock:
            if isinstance(ack_key, str) and self._never_acks:
                ack_key = None  # an old server that acks nothing: the result says 'sent' once written
            item = OutItem(text, ack_key=ack_key, token=ticket)
            if not self._machine.has_room() and not self._wait_for_window():
                if self._conn is not None and self._machine.counters.acked == 0 and self._machine.inflight:
                    # A whole window waited send_timeout and the server acked none of it, nor anything before:
                    # it does not ack. Stop tracking (and waiting for) acks of this server.
                    self._extra["ack_timeouts"] = max(self._extra.get("ack_timeouts", 0), self.ACK_PROBES)
                    while True:
                        old = self._machine.evict_oldest_inflight()
                        if old is None:
                            break
                        evicted.append(old)
                    log.warning("message server %s acknowledged none of %d messages within %.0f s; sends no "
                                "longer wait for acks (results say 'sent')", self.server_url, len(evicted),
                                self.config.send_timeout)
            if self._stop.is_set() or self._machine.stopped:
                ticket._finish(SendStatus.FAILED, "message client stopped")
                return ticket
            now = self._clock()
            link = self._conn
            direct = (link is not None and link.direct_ok and not self._pump_pending
                      and now - self._last_send >= self.DIRECT_WRITE_GAP and self._machine.can_send_direct())
            self._last_send = now
            pump = False
            if direct:
                self._machine.written(item)  # before the write: the ack may be read before write_now returns
            elif not self._machine.submit(item):
                ticket._finish(SendStatus.FAILED, f"outbox full ({self._machine.queued + self._machine.inflight} "
                                                  "messages wait for the message server; bounds "
                                                  f"{self.config.max_queue_size} messages, "
                                                  f"{self.config.max_queue_bytes} bytes); message not queued")
                return ticket
            else:
                pump = link is not None and not self._pump_pending
                if pump:
                    self._pump_pending = True
        for old in evicted:
            if isinstance(old.token, Ticket):
                old.token._finish(SendStatus.SENT, "the server acknowledges no message; not tracked further")
        if direct:
            assert link is not None
            done = link.write_now(text, item)
            if done is None:  # the connection ended just now: the next one sends it
                self._requeue_unwritten([item])
            else:
                self._settle_written(done)
        elif pump:
            self._reactor.call_soon(self._pump)
        return ticket  # QUEUED: on its way (the reactor writes it, or the next connection does)

    def _wait_for_window(self) -> bool:
        """Lock held, outbox full: on a live connection the sender waits (up to ``send_timeout``) for acks to
        make room: a sender faster than the server is slowed down, not refused. While disconnected (or on the
        reactor thread, which reads the acks) it does not wait: the caller is told at once."""
        if self._conn is None or self._reactor.in_reactor():
            return False
        deadline = self._clock() + float(self.config.send_timeout)
        self._room_waiters += 1
        try:
            while not self._machine.has_room():
                left = deadline - self._clock()
                if left <= 0 or self._conn is None or self._stop.is_set():
                    return False
                self._room.wait(left)
            return True
        finally:
            self._room_waiters -= 1

    def _window_opened(self) -> None:
        """Lock held: acks made room (or the connection went away): waiting senders look again."""
        if self._room_waiters:
            self._room.notify_all()

    # ------------------------------------------------------------------------------------------------------------
    # Internals: URLs and TLS
    # ------------------------------------------------------------------------------------------------------------
    def _ws_url(self, token: str) -> str:
        query = urllib.parse.urlencode({"agent_id": self.agent_id, "signature": token}, quote_via=urllib.parse.quote)
        return f"{ws_base_url(self.server_url)}/session?{query}"

    def _redacted_url(self) -> str:
        return f"{ws_base_url(self.server_url)}/session?agent_id={self.agent_id}&signature=***"

    def _verify(self) -> Any:
        return self.config.verify if self.config.verify is not None else self.auth_client.verify

    # ------------------------------------------------------------------------------------------------------------
    # Internals: the machine's decisions, on the reactor
    # ------------------------------------------------------------------------------------------------------------
    def _flush_state_changes(self) -> None:
        """Lock held: log state changes and call ``on_state_change``."""
        for old, new in self._machine.take_state_changes():
            log.info("message channel %s: %s -> %s", self.agent_id, old.value, new.value)
            if new is not ConnectionState.CONNECTED:
                self._connected_event.clear()  # set once the sessions are re-joined (see link_open)
            callback = self.on_state_change
            if callback is not None:
                try:
                    callback(old.value, new.value)
                except Exception:  # a state callback's bug must not stop the channel
                    log.exception("on_state_change callback of %s raised", self.agent_id)

    def _kick(self) -> None:
        """Any thread: let the machine decide again soon (on the reactor)."""
        with self._lock:
            if self._kick_pending or self._stop.is_set():
                return
            self._kick_pending = True
        if not self._reactor.call_soon(self._tick):
            with self._lock:
                self._kick_pending = False

    def _on_timer(self) -> None:
        self._timer = None
        self._tick()

    def _tick(self) -> None:
        """Reactor: carry out what the machine decides now, and arm the timer for its next decision."""
        with self._lock:
            self._kick_pending = False
        try:
            for _ in range(8):  # each action is followed by a new decision; a few per tick at most
                if self._stop.is_set():
                    return
                with self._lock:
                    now = self._clock()
                    if self.reading_paused:
                        self._machine.reading_paused(now)  # frames wait unread: silence is not death
                    decision = self._machine.poll(now)
                    action = decision.action
                    if action in (Action.SIGN_IN, Action.CONNECT):
                        self._machine.repair_started(now)
                    elif action is Action.PING:
                        self._machine.ping_sent(now)
                    conn = self._conn
                    lane = self._lane
                if action is Action.NONE:
                    self._arm(decision.wake_at)
                    return
                if action is Action.SIGN_IN:
                    if lane is not None:
                        lane.submit(self._job_sign_in)
                elif action is Action.CONNECT:
                    if lane is not None:
                        lane.submit(self._job_lookup)
                elif action is Action.PING:
                    if conn is not None:
                        conn.ping()
                elif action is Action.DROP and conn is not None:
                    log.warning("message channel %s: no frame within %.1f s of a ping; dropping the dead "
                                "connection", self.agent_id, self.config.channel_config().effective_pong_timeout())
                    conn.fail("dead")
        except Exception as exc:  # the decisions must never stop: a stuck channel is a deaf agent
            with self._lock:
                self._extra["internal_errors"] = self._extra.get("internal_errors", 0) + 1
                conn = self._conn
            self._report.note("internal", f"unexpected error in the message channel of {self.agent_id}: {exc!r}; "
                                         "recovering", exc, exc_info=True)
            if conn is not None:
                conn.fail("internal error")
            self._arm(self._clock() + 0.05)
            return
        self._kick()  # still deciding after 8 actions: go on after the other clients had their turn

    def _arm(self, wake_at: Optional[float]) -> None:
        """Reactor: the timer for the machine's next decision (one per client)."""
        timer = self._timer
        if timer is not None:
            if wake_at is not None and timer.when == wake_at:
                return
            timer.cancel()
            self._timer = None
        if wake_at is not None and not self._stop.is_set():
            self._timer = self._reactor.call_at(wake_at, self._on_timer)

    # -- blocking steps, on the shared job pool ------------------------------------------------------------------
    def _job_sign_in(self) -> None:
        try:
            self.auth_client.sign_in_once()
        except AuthError as exc:
            with self._lock:
                self._machine.sign_in_failed(self._clock(), str(exc), permanent=exc.permanent,
                                             retry_after=float(getattr(exc, "retry_after", 0.0) or 0.0))
            self._report.note("sign_in", f"message server sign-in of {self.agent_id} failed (will retry): {exc}", exc)
        else:
            with self._lock:
                self._machine.signed_in(self._clock())
        self._kick()

    def _job_lookup(self) -> None:
        """Resolve the server's address (``getaddrinfo`` blocks), then open the connection on the reactor."""
        url = self._ws_url(self.auth_client.signature or "")
        try:
            uri = parse_uri(url)
            addrs = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
        except (WebSocketException, OSError, ValueError) as exc:
            self._connect_failed(f"cannot connect to the message server {self._redacted_url()} "
                                 f"({type(exc).__name__}: {exc})", exc)
            return
        if not self._reactor.call_soon(self._open_link, url, addrs):
            self._connect_failed("the message reactor is not running", None)

    def _connect_failed(self, text: str, exc: Optional[BaseException], status: Optional[int] = None) -> None:
        rejected = status in (401, 403)
        text = redact(text, self.auth_client.signature)
        with self._lock:
            self._machine.connect_failed(self._clock(), text, auth_rejected=rejected)
        if status:
            what = "token rejected; signing in again" if rejected else "retrying"
            self._report.note(f"handshake_{status}", f"message server {self._redacted_url()} answered the "
                                                    f"WebSocket handshake with HTTP {status} ({what})",
                             MessageChannelError(f"handshake rejected with HTTP {status}"))
        else:
            self._report.note("connect", f"{text}; retrying", MessageChannelError(f"connect failed: {text}"))
        self._kick()

    # -- connections, on the reactor -----------------------------------------------------------------------------
    def _open_link(self, url: str, addrs: List[Any]) -> None:
        with self._lock:
            if self._stop.is_set() or self._machine.stopped:
                return
            self._gen += 1
            link = WsLink(self._reactor, self, url, ssl_context=ssl_context(self._verify()),
                          max_size=self.limits.ws_message_max, send_timeout=self.config.send_timeout,
                          gen=self._gen)
            self._connecting = link
        link.start(addrs, self._reactor.clock() + float(self.config.connection_timeout))

    def _close_links(self) -> None:
        """Reactor, at stop: close the connections, cancel the timer."""
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            with self._lock:
                links = [link for link in (self._conn, self._connecting) if link is not None]
                self._conn = self._connecting = None
            for link in links:
                link.close()
        finally:
            self._closed.set()

    def link_open(self, link: WsLink) -> None:
        """Reactor: ``link``'s handshake succeeded: re-join the sessions, then the outbox drains."""
        with self._lock:
            if link is not self._connecting or self._stop.is_set():
                stale = True
            else:
                stale = False
                self._connecting = None
                self._conn = link
                now = self._clock()
                self._machine.connected(now)
                if self._lost_at is not None:
                    self.resume_times.append(now - self._lost_at)
                    del self.resume_times[:-32]
                    self._lost_at = None
                self._flush_state_changes()
        if stale:
            link.close()
            return
        # A new outage deserves a new warning: forget the once-only keys of the connection faults.
        self._report.forget("connect", "handshake", "sign_in", "lost")
        log.info("message channel %s connected to %s", self.agent_id, self._redacted_url())
        on_open = getattr(self.message_handler, "on_open", None)
        if on_open is not None:
            try:
                on_open(link)  # re-joins sessions through link.send(), ahead of the outbox
            except Exception as exc:  # a handler bug must not stop the channel
                self._report.note("on_open", f"on_open of the message handler raised: {exc!r}", exc, exc_info=True)
        with self._lock:
            if self._conn is not link:
                return
            self._machine.opened()
            self._connected_event.set()
        self._pump()
        self._tick()

    def link_closed(self, link: WsLink, reason: str, opened: bool, status: Optional[int],
                    error: Optional[BaseException]) -> None:
        """Reactor: ``link`` ended (once per link)."""
        with self._lock:
            current = link is self._conn
            connecting = link is self._connecting
            if current:
                self._conn = None
            if connecting:
                self._connecting = None
        self._settle_unflushed(link)
        if connecting and not self._stop.is_set():
            text = reason
            if error is not None and not status:
                text = f"{reason} ({connect_error_text(error, self._redacted_url())})"
            self._connect_failed(f"cannot connect to the message server {self._redacted_url()}: {text}", error,
                                 status=status)
            return
        if not current:
            return
        with self._lock:
            now = self._clock()
            self._machine.connection_lost(now, reason)
            self._window_opened()
            self._drained.set()
            self._lost_at = now
            self.reading_paused = False
            self._flush_state_changes()
        if not self._stop.is_set():
            key = "lost_dead" if reason == "dead" else "lost"
            self._report.note(key, f"message channel of {self.agent_id} lost its connection ({reason}); "
                                  "reconnecting", MessageChannelError(f"connection lost: {reason}"))
        self._tick()

    def _settle_unflushed(self, link: WsLink) -> None:
        """Items written into ``link`` whose bytes the socket never took go out again on the next connection."""
        self._requeue_unwritten(getattr(link, "unflushed", ()))

    def _requeue_unwritten(self, unwritten: Any) -> None:
        """Items never (fully) written: those without an ack go back to the head of the outbox (those with one
        are in flight: the machine puts them back itself when the connection is lost)."""
        items = [item for item in unwritten if item.ack_key is None]
        if not items:
            return
        with self._lock:
            stopped = self._machine.stopped
            if not stopped:
                for item in reversed(items):
                    self._machine.requeue_front(item)
        if stopped:
            for item in items:
                ticket = item.token
                if isinstance(ticket, Ticket) and not ticket.done:
                    ticket._finish(SendStatus.FAILED, "message client stopped before it was sent")

    def _pump(self) -> None:
        """Reactor: write queued items into the connection, in order, then hand the bytes to the socket."""
        with self._lock:
            self._pump_pending = False
        link = self._conn
        if link is None or not link.open:
            return
        high = self.WRITE_HIGH_WATER
        # The link's lock is held from taking each item to writing it: a sender writing directly meanwhile
        # (send() found the outbox empty) waits, so its message cannot overtake one taken before it.
        with link.lock:
            while link.buffered < high:
                with self._lock:
                    if self._conn is not link:
                        return
                    item = self._machine.next_item()
                    if item is None:
                        break
                    self._machine.written(item)  # before the write: the ack may be read in this same turn
                    if item.ack_key is None:
                        self._window_opened()  # it left the outbox for good: room for a waiting sender
                try:
                    link.write(item.text, item)
                except (UnicodeError, TypeError, ValueError) as exc:
                    self._unsendable(item, exc)  # that item fails; the ones behind it still go out
                except (ConnectionError, WebSocketException):
                    with self._lock:
                        if item.ack_key is None and not self._machine.stopped:
                            self._machine.requeue_front(item)
                    return
        link.flush()

    def link_flushed(self, link: WsLink, items: List[Any]) -> None:
        """Reactor: the socket took these items: sent (an ack, if expected, settles them later)."""
        self._settle_written(items)
        if link is self._conn and link.buffered < self.WRITE_HIGH_WATER and self._machine.queued:
            self._pump()

    @staticmethod
    def _settle_written(items: List[Any]) -> None:
        for item in items:
            ticket = item.token
            if isinstance(ticket, Ticket) and not ticket.done:
                if item.ack_key is None:
                    ticket._finish(SendStatus.SENT)
                else:
                    ticket._mark_sent()

    def _unsendable(self, item: OutItem, exc: BaseException) -> None:
        """Encoding ``item`` failed (nothing was written): fail it alone and forget it, never retry it."""
        with self._lock:
            self._extra["unencodable"] += 1
            self._machine.discard(item)
        ticket = item.token
        if isinstance(ticket, Ticket) and not ticket.done:
            ticket._finish(SendStatus.FAILED, f"the frame could not be encoded ({type(exc).__name__}: {exc}); "
                                              "it was not sent")
        self._report.note("unencodable", f"message channel {self.agent_id}: a frame could not be encoded and was "
                                         f"dropped ({type(exc).__name__}); later frames are unaffected", exc)

    # ------------------------------------------------------------------------------------------------------------
    # Internals: incoming frames (reactor)
    # ------------------------------------------------------------------------------------------------------------
    def link_too_big(self, link: WsLink) -> None:
        """Reactor: an incoming message crossed ``ws_message_max`` (the link closes with 1009 next)."""
        err = LimitExceeded("ws_message_max", self.limits.ws_message_max, f"message server {self.server_url}",
                            got=f"more than {self.limits.ws_message_max} bytes")
        with self._lock:
            self._extra["too_big"] += 1
        if not notify_limit(self.on_limit, err, self.agent_id):
            self._report.note("too_big", str(err), err)

    def link_alive(self, link: WsLink) -> None:
        if link is self._conn:
            with self._lock:
                self._machine.frame_received(self._clock())

    def link_message(self, link: WsLink, opcode: int, payload: bytes) -> bool:
        """Reactor: a whole message; False holds it (back-pressure) until :meth:`_resume`."""
        if link is not self._conn:
            return True
        with self._lock:
            self._machine.frame_received(self._clock())
        if opcode == OP_TEXT:
            return self._on_text(link, payload.decode("utf-8", "replace"))
        self._report.log_once("binary", logging.DEBUG, "message channel %s: binary frame ignored", self.agent_id)
        return True

    def _has_room(self, link: WsLink) -> bool:
        """Back-pressure: True if the consumer takes a message now; otherwise reading stops until it has room
        (pongs wait unread meanwhile, so the connection is not declared dead)."""
        if self.when_room is not None:
            if self.when_room(lambda: self._reactor.call_soon(self._resume, link)):
                return True
        elif self.backpressure is None or self.backpressure(0.0):
            return True
        else:
            gate = self.backpressure
            lane = self._lane
            if lane is None or not lane.submit(self._wait_for_room, gate, link):
                return True  # stopping: the message is not held back (the handler call is refused anyway)
        with self._lock:
            self.reading_paused = True
            self._extra["backpressure_waits"] += 1
            self._machine.reading_paused(self._clock())
        self._report.log_once("backpressure", logging.INFO, "message channel %s: handler backlog full; not reading "
                              "until it drains (further pauses are only counted: backpressure_waits)", self.agent_id)
        return False

    def _wait_for_room(self, gate: Callable[[float], bool], link: WsLink) -> None:
        """Job pool, for a ``backpressure`` gate that can only wait: wait (in slices) for room, then resume."""
        slice_ = max(0.05, self.config.channel_config().effective_pong_timeout() / 2)
        while not self._stop.is_set() and link is self._conn and not link.closed:
            if gate(slice_):
                break
        self._reactor.call_soon(self._resume, link)

    def _resume(self, link: WsLink) -> None:
        """Reactor: the consumer has room again: deliver what was held and read again."""
        if link is not self._conn:
            return
        with self._lock:
            self.reading_paused = False
            self._machine.reading_paused(self._clock())
        link.resume()

    def _on_text(self, conn: Any, text: str, gate: bool = True) -> bool:
        """One text frame: acks and answers settle sends; messages go to the handler (duplicates dropped).
        False: the consumer's backlog is full, the frame is held (back-pressure)."""
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or "cmd" not in frame or not isinstance(frame.get("data"), dict):
            with self._lock:
                self._extra["malformed"] += 1
            self._report.log_once("malformed", logging.WARNING, "message channel %s: dropping a frame without cmd/data "
                                                         "(further ones are only counted)", self.agent_id)
            return True
        cmd, data = frame["cmd"], frame["data"]
        if cmd == "session_message_ack":
            self._on_ack(data)
        elif cmd in REPLY_CMDS and data.get("request_id"):
            self._on_reply(str(data["request_id"]))
        handler = self.message_handler
        on_message = getattr(handler, "on_message", None)
        # A handler whose on_message only parses and calls on_frame gets the frame parsed here: no second parse.
        on_frame = getattr(handler, "on_frame", None) if getattr(on_message, "frame_parser", False) else None
        if on_message is None and on_frame is None:
            return True
        # Only messages fill the consumer's backlog; acks and answers before them are not held back.
        if cmd == "session_message" and gate and isinstance(conn, WsLink) and not self._has_room(conn):
            return False
        with self._lock:
            if self._stop.is_set() or self._conn is not conn:
                # Stopped (no handler call starts after stop) or a superseded socket: not delivered, so not
                # remembered as seen either (the server's replay after the re-join must get through).
                return True
            duplicate = False
            message_id = str(data.get("message_id") or "") if cmd == "session_message" else ""
            if message_id:
                duplicate = self._machine.seen(replay_key(data))
        if duplicate:
            log.debug("message channel %s: duplicate message %s in %s dropped", self.agent_id, message_id,
                      data.get("session_id"))
            return True
        try:
            if on_frame is not None:
                on_frame(conn, frame)
            elif on_message is not None:
                on_message(conn, text)
        except Exception as exc:  # a handler bug must not stop the connection
            with self._lock:
                self._extra["handler_errors"] += 1
            self._report.note("handler", f"message handler of {self.agent_id} raised: {exc!r}", exc, exc_info=True)
        return True

    def forget(self, ack_key: Hashable, error: str = "no answer in time") -> None:
        """Stop tracking a frame whose answer the caller no longer waits for (it is not sent again)."""
        with self._lock:
            item = self._machine.acked(ack_key)
            self._window_opened()
            if not (self._machine.inflight or self._machine.queued):
                self._drained.set()
        ticket = item.token if item is not None else None
        if isinstance(ticket, Ticket):
            ticket._finish(SendStatus.FAILED, error)

    def _on_reply(self, request_id: str) -> None:
        """The answer to a request sent with ``ack_key=reply_key(request_id)`` arrived: it is no longer in flight."""
        with self._lock:
            item = self._machine.acked(reply_key(request_id))
            self._window_opened()
            if not (self._machine.inflight or self._machine.queued):
                self._drained.set()
        ticket = item.token if item is not None else None
        if isinstance(ticket, Ticket):
            ticket._finish(SendStatus.DELIVERED)

    def _on_ack(self, data: Dict[str, Any]) -> None:
        key = data.get("message_id") or data.get("request_id")
        session_id = str(data.get("session_id") or "")
        with self._lock:
            item = self._machine.acked(str(key)) if key else None
            if item is None and not key:
                # No id in the ack: it confirms the oldest unconfirmed message of that session.
                oldest = self._machine.oldest_inflight(
                    lambda it: isinstance(it.token, Ticket) and getattr(it.token, "session_id", "") == session_id)
                item = self._machine.acked(oldest) if oldest is not None else None
            self._window_opened()
            if not (self._machine.inflight or self._machine.queued):
                self._drained.set()
            if item is None:
                self._extra["acks_unmatched"] += 1
                return
        ticket = item.token
        if not isinstance(ticket, Ticket) or ticket.done:
            return
        try:
            code = int(data.get("status_code", 200))
        except (TypeError, ValueError):
            code = 0
        ticket.status_code = code
        ticket.ack_data = data
        offline = data.get("offline_receivers")
        if isinstance(offline, list):
            ticket.offline_receivers = [str(a) for a in offline]
        if 200 <= code < 300 or (code == 404 and ticket.offline_receivers):
            # 404 with offline receivers: the server took the message and keeps it for receivers not online.
            ticket._finish(SendStatus.DELIVERED)
        else:
            ticket._finish(SendStatus.FAILED, f"the message server refused the message: {code} "
                                              f"{data.get('message', '')}".strip())


#: Blocking steps of every message client (sign-in over HTTP, address lookups): a few shared threads that exist
#: only while there is such work, each client's steps in order. 8 at once: a fleet re-signing in after a server
#: restart is spread out (gentle on the recovering server) yet back within seconds.
_JOBS = SerialPool("agentcp-msg-jobs", max_workers=8, linger=2.0)
