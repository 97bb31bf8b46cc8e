"""The message channel's state machine: every decision of the WebSocket client, and no I/O.

:class:`Channel` never sleeps, reads a clock or touches a socket. The shell
(:class:`~agentcp.msg.message_client.MessageClient`) tells it what happened and when ("connected at t", "a frame
arrived at t", "the handshake was rejected with 401 at t") and asks it what to do next (:meth:`Channel.poll`):
sign in, connect, send a ping, drop a dead connection, or sleep until a given time. Tests drive it with numbers.

Rules:

* **Keepalive.** While connected, a ping goes out every ``ping_interval`` seconds. Any frame received after a ping
  (its pong, or anything else) proves the connection alive. If nothing arrives within ``pong_timeout`` of a ping,
  the connection is declared dead and dropped. A connection that dies right after its last proof of life is thus
  noticed within ``ping_interval + pong_timeout`` (<= 2 ping intervals, as ``pong_timeout <= ping_interval``).
* **Reconnect, for as long as the channel runs.** Any close, error or dead connection leads to a new connection.
  The first attempt after a healthy connection (one that received at least one frame) is immediate; consecutive
  failures back off with the core's capped full-jitter :class:`~agentcp.base.backoff.Backoff`. There is no attempt
  limit: only :meth:`Channel.stop` ends it. Nothing needs to be sent to trigger it.
* **Token refresh.** A handshake rejected as unauthorised (401/403) makes the next step a sign-in. So do
  ``resign_after_failures`` consecutive failed connects (an expired token may also show up as other errors).
* **Outbox.** Outgoing items wait in a bounded FIFO while disconnected and go out in order after the reconnect.
  A full outbox refuses new items (the caller gets an error); nothing is ever dropped silently. Items that expect
  an acknowledgement stay *in flight* after they were written; if the connection is lost before the server acked
  them, they go back to the head of the outbox and are sent again (at least once; receivers drop duplicates).
* **Dedup.** :meth:`Channel.seen` remembers the last ``dedup_window`` incoming message keys, so a message the
  server delivers again after a reconnect reaches the handlers once.
"""
from __future__ import annotations

import enum
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Tuple

from agentcp.base.backoff import PERMANENT_ERROR_BACKOFF, RECONNECT_BACKOFF, Backoff

__all__ = ["ConnectionState", "Action", "Decision", "ChannelConfig", "Channel", "OutItem"]


class ConnectionState(enum.Enum):
    """0.1.99's connection states (same names and values)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"

    def __str__(self) -> str:
        return self.value


class Action(str, enum.Enum):
    NONE = "none"  # nothing now; poll again at Decision.wake_at or after any input
    SIGN_IN = "sign_in"  # sign in to the message server (new token), then connect
    CONNECT = "connect"  # open the WebSocket with the current token
    PING = "ping"  # send a WebSocket ping
    DROP = "drop"  # the connection is dead (no frame after a ping): close it; connection_lost() follows


@dataclass(frozen=True)
class Decision:
    action: Action
    wake_at: Optional[float] = None


@dataclass
class ChannelConfig:
    ping_interval: float = 5.0
    #: Seconds a ping may wait for any frame; ``None``: half the ping interval.
    pong_timeout: Optional[float] = None
    reconnect_backoff: Backoff = RECONNECT_BACKOFF
    permanent_backoff: Backoff = PERMANENT_ERROR_BACKOFF
    #: Largest number of outgoing items waiting (queued + in flight) before new ones are refused (or wait).
    max_queue_size: int = 4096
    #: Largest number of bytes of outgoing text waiting (queued + in flight); one item always fits.
    max_queue_bytes: int = 16 * 1024 * 1024
    #: Consecutive failed connects after which the next attempt signs in first.
    resign_after_failures: int = 3
    #: Incoming message keys remembered for duplicate detection.
    dedup_window: int = 8192
    #: After a healthy connection the reconnect is immediate, but not twice within this many seconds.
    immediate_reconnect_gap: float = 1.0

    def effective_pong_timeout(self) -> float:
        if self.pong_timeout is not None:
            return min(float(self.pong_timeout), float(self.ping_interval))
        return float(self.ping_interval) / 2.0


@dataclass
class OutItem:
    """One outgoing frame. ``ack_key``: an acknowledgement is expected for it (e.g. a session message id)."""

    text: str
    ack_key: Optional[Hashable] = None
    token: Any = None  # the shell's handle (a ticket); opaque to the machine
    attempts: int = 0


@dataclass
class Counters:
    connects: int = 0
    connect_failures: int = 0
    sign_ins: int = 0
    sign_in_failures: int = 0
    auth_rejections: int = 0
    pings: int = 0
    dead_connections: int = 0
    losses: int = 0
    frames_in: int = 0
    sent: int = 0
    resent: int = 0
    acked: int = 0
    refused_full: int = 0
    duplicates: int = 0
    unconfirmed: int = 0
    reconnects: Dict[str, int] = field(default_factory=dict)


class Channel:
    """Pure decisions of the message channel. Not thread safe: the shell serialises calls with its lock."""

    def __init__(self, config: Optional[ChannelConfig] = None, rand: Callable[[], float] = random.random) -> None:
        self.config = config or ChannelConfig()
        self.rand = rand
        self.counters = Counters()
        self.state = ConnectionState.DISCONNECTED
        self.stopped = False
        self.running = False
        self.last_error: Optional[str] = None
        self.connected_at: Optional[float] = None
        self.last_frame_at: Optional[float] = None
        self.lost_at: Optional[float] = None
        self.last_loss_reason: Optional[str] = None
        self._have_token = False
        self._need_sign_in = False
        self._need_connect = False
        self._busy = False  # a sign-in or connect is being carried out
        self._repair_at = 0.0
        self._failures = 0  # consecutive connects that did not lead to a healthy connection
        self._sign_in_failures = 0
        self._healthy = False  # the current connection received at least one frame
        self._opening = False  # connected, but the shell is still re-joining sessions (outbox held back)
        self._last_immediate: Optional[float] = None
        self._ping_outstanding = False
        self._ping_deadline = 0.0
        self._next_ping_at = 0.0
        self._outbox: Deque[OutItem] = deque()
        self._held_bytes = 0  # text of the items queued or in flight (for max_queue_bytes)
        # Written items awaiting their ack, oldest first (keyed by the item: several may share an ack key, e.g. a
        # 0.1.99-style burst whose ids are one millisecond stamp), and per ack key the items in write order.
        self._inflight: "OrderedDict[int, OutItem]" = OrderedDict()
        self._by_ack_key: Dict[Hashable, Deque[OutItem]] = {}
        self._seen: "OrderedDict[Hashable, None]" = OrderedDict()
        self._state_changes: List[Tuple[ConnectionState, ConnectionState]] = []

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def _set_state(self, new: ConnectionState) -> None:
        if new is not self.state:
            self._state_changes.append((self.state, new))
            self.state = new

    def take_state_changes(self) -> List[Tuple[ConnectionState, ConnectionState]]:
        changes, self._state_changes = self._state_changes, []
        return changes

    def _schedule_repair(self, now: float, reason: str) -> None:
        """Plan the next connect (or sign-in) after a failure or a loss."""
        self.counters.reconnects[reason] = self.counters.reconnects.get(reason, 0) + 1
        if self._failures == 0:
            gap = self.config.immediate_reconnect_gap
            if self._last_immediate is None or now - self._last_immediate >= gap:
                self._last_immediate = now
                self._repair_at = now
                return
            self._repair_at = now + self.config.reconnect_backoff.delay(0, self.rand)
            return
        self._repair_at = now + self.config.reconnect_backoff.delay(self._failures - 1, self.rand)

    # -- inputs: lifecycle --------------------------------------------------------------------------------------
    def start(self, now: float, have_token: bool = False) -> None:
        """Begin: connect at once (sign in first unless a token is at hand)."""
        self.stopped = False
        self.running = True
        self._have_token = bool(have_token)
        self._need_sign_in = not have_token
        self._need_connect = True
        self._busy = False
        self._repair_at = now
        self._failures = 0
        self._sign_in_failures = 0
        self._set_state(ConnectionState.CONNECTING)

    def stop(self, now: float) -> List[OutItem]:
        """Stop for good; returns the items that were never confirmed (the shell fails their tickets)."""
        self.stopped = True
        self.running = False
        self._need_sign_in = self._need_connect = False
        self._ping_outstanding = False
        left = list(self._inflight.values()) + list(self._outbox)
        self._inflight.clear()
        self._by_ack_key.clear()
        self._outbox.clear()
        self._held_bytes = 0
        self._set_state(ConnectionState.DISCONNECTED)
        return left

    def repair_started(self, now: float) -> None:
        """The shell is signing in or connecting now (poll() will not ask again meanwhile)."""
        self._busy = True

    # -- inputs: sign-in ----------------------------------------------------------------------------------------
    def signed_in(self, now: float) -> None:
        self._busy = False
        if self.stopped:
            return
        self.counters.sign_ins += 1
        self._have_token = True
        self._need_sign_in = False
        self._sign_in_failures = 0
        self._need_connect = True
        self._repair_at = now

    def sign_in_failed(self, now: float, error: str, permanent: bool = False, retry_after: float = 0.0) -> None:
        self._busy = False
        if self.stopped:
            return
        self.counters.sign_in_failures += 1
        self.last_error = error
        policy = self.config.permanent_backoff if permanent else self.config.reconnect_backoff
        self._need_sign_in = True
        self._repair_at = now + policy.delay(self._sign_in_failures, self.rand, retry_after)
        self._sign_in_failures += 1

    # -- inputs: connection -------------------------------------------------------------------------------------
    def connected(self, now: float) -> None:
        """The handshake succeeded: the shell re-joins sessions, then the outbox drains."""
        self._busy = False
        if self.stopped:
            return
        self.counters.connects += 1
        self._need_connect = False
        self._healthy = False
        self._opening = True
        self.connected_at = now
        self.last_frame_at = now
        self._ping_outstanding = False
        self._next_ping_at = now + self.config.ping_interval
        self.last_error = None
        self._set_state(ConnectionState.CONNECTED)

    def opened(self, now: Optional[float] = None) -> None:
        """The shell finished its after-connect work (re-joins): queued items may go out now."""
        self._opening = False

    def connect_failed(self, now: float, error: str, auth_rejected: bool = False) -> None:
        self._busy = False
        if self.stopped:
            return
        self.counters.connect_failures += 1
        self.last_error = error
        self._failures += 1
        first_rejection = auth_rejected and self._failures == 1
        if auth_rejected:
            self.counters.auth_rejections += 1
            self._have_token = False
        if auth_rejected or self._failures % max(1, self.config.resign_after_failures) == 0:
            self._need_sign_in = True
        self._need_connect = True
        self._schedule_repair(now, "auth" if auth_rejected else "connect_failed")
        if first_rejection:
            self._repair_at = now  # an expired token is fixed by signing in, at once; a second rejection backs off

    def frame_received(self, now: float) -> None:
        """Any frame (pong, message, ack) arrived on the current connection: it is alive."""
        self.counters.frames_in += 1
        self.last_frame_at = now
        self._ping_outstanding = False
        if not self._healthy:
            self._healthy = True
            self._failures = 0

    def ping_sent(self, now: float) -> None:
        self.counters.pings += 1
        if not self._ping_outstanding:
            self._ping_outstanding = True
            self._ping_deadline = now + self.config.effective_pong_timeout()
        self._next_ping_at = now + self.config.ping_interval

    def connection_lost(self, now: float, reason: str = "closed") -> None:
        """The current connection ended (closed by either side, error, or dropped as dead)."""
        if self.stopped or self.state is not ConnectionState.CONNECTED:
            return
        self.counters.losses += 1
        self.lost_at = now
        self.last_loss_reason = reason
        self._ping_outstanding = False
        self._opening = False
        if not self._healthy:
            self._failures += 1
        self._healthy = False
        # Unconfirmed items go back to the head of the outbox, in their original order.
        if self._inflight:
            items = list(self._inflight.values())
            self._inflight.clear()
            self._by_ack_key.clear()
            self._outbox.extendleft(reversed(items))
        self._need_connect = True
        self._set_state(ConnectionState.RECONNECTING)
        self._schedule_repair(now, reason)

    # -- the one question ---------------------------------------------------------------------------------------
    def poll(self, now: float) -> Decision:
        """What should the shell do at ``now``? Call again at ``wake_at`` or after any input."""
        if self.stopped or not self.running:
            return Decision(Action.NONE, None)
        if self.state is ConnectionState.CONNECTED:
            if self._ping_outstanding:
                if now >= self._ping_deadline:
                    self.counters.dead_connections += 1
                    self._ping_outstanding = False
                    return Decision(Action.DROP)
                return Decision(Action.NONE, min(self._ping_deadline, self._next_ping_at))
            if now >= self._next_ping_at:
                return Decision(Action.PING)
            return Decision(Action.NONE, self._next_ping_at)
        if self._busy:
            return Decision(Action.NONE, None)
        if self._need_sign_in or self._need_connect:
            if now >= self._repair_at:
                return Decision(Action.SIGN_IN if self._need_sign_in else Action.CONNECT)
            return Decision(Action.NONE, self._repair_at)
        return Decision(Action.NONE, None)

    # -- outbox -------------------------------------------------------------------------------------------------
    def submit(self, item: OutItem) -> bool:
        """Queue ``item``; False if the channel is stopped or the outbox is full (the caller must be told)."""
        if self.stopped:
            return False
        if not self.has_room():
            self.counters.refused_full += 1
            return False
        self._outbox.append(item)
        self._held_bytes += len(item.text)
        return True

    def has_room(self) -> bool:
        """True while the outbox takes another item (queued + in flight below ``max_queue_size`` items and
        ``max_queue_bytes`` bytes)."""
        return (not self.stopped and len(self._outbox) + len(self._inflight) < self.config.max_queue_size
                and self._held_bytes < self.config.max_queue_bytes)

    def evict_oldest_inflight(self) -> Optional[OutItem]:
        """Stop tracking the oldest written item still awaiting its ack (counted as ``unconfirmed``), to make
        room when the server evidently does not ack; None if nothing is in flight."""
        if not self._inflight:
            return None
        _, oldest = self._inflight.popitem(last=False)
        self._held_bytes -= len(oldest.text)
        self._forget_key(oldest)
        return oldest

    def can_send_direct(self) -> bool:
        """True when a new item may be written at once (connected and nobody is waiting before it)."""
        return (self.state is ConnectionState.CONNECTED and not self._opening and not self._outbox
                and not self.stopped)

    def next_item(self) -> Optional[OutItem]:
        """The next item to write (removed from the outbox), or None. Only while connected."""
        if self.state is not ConnectionState.CONNECTED or self._opening or not self._outbox:
            return None
        item = self._outbox.popleft()
        self._held_bytes -= len(item.text)  # back in if it goes in flight (written)
        return item

    def requeue_front(self, item: OutItem) -> None:
        """Writing ``item`` failed (the connection is going away): it goes out first after the reconnect."""
        self._outbox.appendleft(item)
        self._held_bytes += len(item.text)

    def written(self, item: OutItem) -> None:
        """``item`` was written to the socket; it stays in flight until acked if it expects an ack."""
        item.attempts += 1
        self.counters.sent += 1
        if item.attempts > 1:
            self.counters.resent += 1
        if item.ack_key is None:
            return
        if id(item) not in self._inflight:
            self._by_ack_key.setdefault(item.ack_key, deque()).append(item)
            self._held_bytes += len(item.text)
        self._inflight[id(item)] = item
        self._inflight.move_to_end(id(item))
        while len(self._inflight) > self.config.max_queue_size:
            # A server that never acks must not make the channel grow without bound: stop tracking the oldest.
            _, oldest = self._inflight.popitem(last=False)
            self._held_bytes -= len(oldest.text)
            self._forget_key(oldest)

    def _forget_key(self, item: OutItem) -> None:
        same = self._by_ack_key.get(item.ack_key)
        if same is not None:
            try:
                same.remove(item)
            except ValueError:
                pass
            if not same:
                del self._by_ack_key[item.ack_key]
            self.counters.unconfirmed += 1

    def acked(self, ack_key: Hashable) -> Optional[OutItem]:
        """The server acknowledged ``ack_key``; the item (if it was in flight or still queued) or None."""
        same = self._by_ack_key.get(ack_key)
        item = same.popleft() if same else None
        if item is not None:
            if not same:
                del self._by_ack_key[ack_key]
            if self._inflight.pop(id(item), None) is not None:
                self._held_bytes -= len(item.text)
        if item is None:
            for queued in self._outbox:  # an ack for a copy written before the loss; no need to resend it
                if queued.ack_key == ack_key:
                    self._outbox.remove(queued)
                    self._held_bytes -= len(queued.text)
                    item = queued
                    break
        if item is not None:
            self.counters.acked += 1
        return item

    def discard(self, item: OutItem) -> None:
        """``item`` can never be written (e.g. it cannot be encoded): forget it, wherever it waits."""
        if self._inflight.pop(id(item), None) is not None:
            self._held_bytes -= len(item.text)
            same = self._by_ack_key.get(item.ack_key)
            if same is not None and item in same:
                same.remove(item)
                if not same:
                    del self._by_ack_key[item.ack_key]
        try:
            self._outbox.remove(item)
            self._held_bytes -= len(item.text)
        except ValueError:
            pass  # not queued (the usual case: it was being written)

    def reading_paused(self, now: float) -> None:
        """The shell does not read the socket on purpose (the consumer's backlog is full): frames may be
        waiting unread, so silence is not death. Treated like a frame: no ping is outstanding."""
        self.last_frame_at = now
        self._ping_outstanding = False

    def oldest_inflight(self, predicate: Callable[[OutItem], bool]) -> Optional[Hashable]:
        """The ack key of the oldest in-flight item matching ``predicate`` (for acks that carry no id)."""
        for item in self._inflight.values():
            if predicate(item):
                return item.ack_key
        return None

    @property
    def queued(self) -> int:
        return len(self._outbox)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- dedup --------------------------------------------------------------------------------------------------
    def seen(self, key: Hashable) -> bool:
        """True if ``key`` was seen before (a duplicate); otherwise remember it and return False."""
        if key in self._seen:
            self._seen.move_to_end(key)
            self.counters.duplicates += 1
            return True
        self._seen[key] = None
        while len(self._seen) > self.config.dedup_window:
            self._seen.popitem(last=False)
        return False

    # -- views --------------------------------------------------------------------------------------------------
    @property
    def signing_in(self) -> bool:
        return self._need_sign_in

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def snapshot(self, now: float) -> Dict[str, Any]:
        c = self.counters
        return {
            "state": self.state.value,
            "connects": c.connects,
            "connect_failures": c.connect_failures,
            "consecutive_failures": self._failures,
            "sign_ins": c.sign_ins,
            "sign_in_failures": c.sign_in_failures,
            "auth_rejections": c.auth_rejections,
            "pings": c.pings,
            "dead_connections": c.dead_connections,
            "losses": c.losses,
            "frames_in": c.frames_in,
            "sent": c.sent,
            "resent": c.resent,
            "acked": c.acked,
            "queued": len(self._outbox),
            "inflight": len(self._inflight),
            "held_bytes": self._held_bytes,
            "refused_full": c.refused_full,
            "duplicates": c.duplicates,
            "unconfirmed": c.unconfirmed,
            "reconnects": dict(c.reconnects),
            "last_error": self.last_error,
            "last_loss_reason": self.last_loss_reason,
            "last_frame_age": None if self.last_frame_at is None else max(0.0, now - self.last_frame_at),
            "next_attempt_in": (max(0.0, self._repair_at - now)
                                if self.running and self.state is not ConnectionState.CONNECTED else None),
        }
