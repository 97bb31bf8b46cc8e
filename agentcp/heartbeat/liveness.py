"""The heartbeat state machine: every liveness decision, and no I/O.

:class:`Liveness` never sleeps, reads a clock or touches a socket. The I/O shell
(:class:`~agentcp.heartbeat.heartbeat_client.HeartbeatClient`) tells it what happened and when ("a reply with
NextBeat 5000 arrived at t", "the socket failed at t") and asks it what to do next (:meth:`Liveness.poll`):
send a beat, sign in again, rebuild the socket, or sleep until a given time. Tests drive it with plain numbers.

Timing rules (liveness.md §3.7, §4, issue "resilient liveness core"):

* A beat is due ``interval`` seconds after the previous one was sent; ``interval`` is the server's NextBeat
  clamped to ``[min_interval, max_interval]``. NextBeat 401 is never an interval: it means "sign in again".
* A reply not received ``reply_timeout`` seconds after its beat is a *miss*. After a miss the server is re-probed
  at once (so probes go out about ``reply_timeout`` apart); after ``max_misses`` consecutive misses the client
  signs in again and rebuilds its socket. A silent server is thus noticed within
  ``interval + max_misses * reply_timeout`` of its last reply.
* Sign-in is single-flight: while one is due or running, further 401s and faults change nothing.
* Consecutive reconnects that do not end in a valid reply back off (capped full jitter), so a server whose HTTP
  works but whose UDP is dead is not hammered; the first reconnect after a healthy period is immediate.
"""
from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

from agentcp.base.backoff import PERMANENT_ERROR_BACKOFF, RECONNECT_BACKOFF, Backoff
from agentcp.msg.message_serialize import NEXT_BEAT_REAUTH

__all__ = ["Action", "Decision", "Liveness", "LivenessConfig", "State", "Event", "Reason"]


class State(str, enum.Enum):
    """What the client is, as an application should see it."""

    OFFLINE = "offline"  # never started
    CONNECTING = "connecting"  # started, no valid reply yet
    ONLINE = "online"  # the server answered our last beats
    RECONNECTING = "reconnecting"  # lost the server after having been online; healing
    STOPPED = "stopped"  # offline() was called

    def __str__(self) -> str:  # so f"{state}" prints "online", not "State.ONLINE"
        return self.value


class Action(str, enum.Enum):
    NONE = "none"  # nothing to do now; call poll() again at Decision.wake_at (or when something happens)
    SEND_BEAT = "send_beat"
    SIGN_IN = "sign_in"  # sign in again, then rebuild the socket aimed at the new address
    REBUILD_SOCKET = "rebuild_socket"  # the socket failed; same address


class Reason(str, enum.Enum):
    """Why a reconnect (or a rebuild) was started. Used as keys of ``stats()["reconnects"]``."""

    INITIAL = "initial"  # first sign-in at online()
    REAUTH_401 = "401"  # the server said NextBeat 401
    SILENT = "silent"  # max_misses replies overdue
    SOCKET_ERROR = "socket_error"  # send/receive failed (e.g. the socket was closed under us)
    UNREACHABLE = "unreachable"  # ICMP port unreachable: nobody listens at the address any more

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    action: Action
    wake_at: Optional[float] = None  # when to poll again if nothing happens first (None: only on an event)


@dataclass(frozen=True)
class Event:
    """One entry of the fault timeline (``HeartbeatClient.history``)."""

    t: float
    kind: str  # "fault", "signed_in", "sign_in_failed", "socket_rebuilt", "recovered", "state"
    detail: str = ""


@dataclass
class LivenessConfig:
    min_interval: float = 5.0
    max_interval: float = 60.0
    reply_timeout: float = 1.0
    max_misses: int = 3
    reconnect_backoff: Backoff = RECONNECT_BACKOFF
    permanent_backoff: Backoff = PERMANENT_ERROR_BACKOFF


@dataclass
class Counters:
    beats_sent: int = 0
    replies: int = 0
    misses: int = 0
    reauth_replies: int = 0
    sign_ins: int = 0
    sign_in_failures: int = 0
    socket_rebuilds: int = 0
    send_failures: int = 0
    reconnects: Dict[str, int] = field(default_factory=dict)


class Liveness:
    """Pure heartbeat decisions. Not thread safe: the shell serialises calls with its own lock."""

    def __init__(
        self,
        config: Optional[LivenessConfig] = None,
        rand: Callable[[], float] = random.random,
        history: int = 256,
    ) -> None:
        self.config = config or LivenessConfig()
        self.rand = rand
        self.counters = Counters()
        self.history: Deque[Event] = deque(maxlen=history)
        self.state = State.OFFLINE
        self.interval = self.config.min_interval
        self.last_rtt: Optional[float] = None
        self.last_reply_at: Optional[float] = None
        self.last_sent_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self._pending_events: List[Event] = []
        self._reset_session_fields()

    # -- internal bookkeeping ------------------------------------------------------------------------------
    def _reset_session_fields(self) -> None:
        self._have_session = False
        self._need_sign_in = False
        self._repair_at = 0.0  # when the pending sign-in or rebuild may run
        self._sign_in_failures = 0  # consecutive failed sign-in attempts (backoff exponent)
        self._repairs_without_reply: Dict[str, int] = {}  # per repair kind, consecutive ones with no valid reply
        self._need_rebuild = False
        self._outstanding = False  # a beat is waiting for its reply
        self._reply_deadline = 0.0
        self._next_beat_at = 0.0
        self._misses = 0
        self._fault: Optional[Tuple[Reason, float]] = None  # the fault being healed, and when it was seen
        self._pending_states: List[Tuple[State, State]] = []

    def _set_state(self, new: State, now: float) -> None:
        if new is not self.state:
            old, self.state = self.state, new
            self._pending_states.append((old, new))
            self._record(Event(now, "state", f"{old.value}->{new.value}"))

    def _record(self, event: Event) -> None:
        self.history.append(event)
        self._pending_events.append(event)

    def take_events(self) -> List[Event]:
        """Timeline events since the last call (the shell turns them into ``on_event`` callbacks)."""
        events, self._pending_events = self._pending_events, []
        return events

    def take_state_changes(self) -> List[Tuple[State, State]]:
        """State transitions since the last call (the shell turns them into ``on_state_change`` callbacks)."""
        changes, self._pending_states = self._pending_states, []
        return changes

    def _start_reconnect(self, now: float, reason: Reason, sign_in: bool) -> None:
        """Single entry for every fault: records it once, and asks for a sign-in and/or a socket rebuild."""
        if self.state in (State.STOPPED, State.OFFLINE):
            return
        if self._need_sign_in or (self._need_rebuild and not sign_in):
            return  # single flight: the same repair is already due or running
        self.counters.reconnects[reason.value] = self.counters.reconnects.get(reason.value, 0) + 1
        if self._fault is None:
            self._fault = (reason, now)
        self._record(Event(now, "fault", reason.value))
        self._outstanding = False
        self._misses = 0
        # The first repair of each kind after a healthy period is immediate. Repairs that keep failing to bring a
        # valid reply (the server's HTTP answers but its UDP does not; the network is down so every send fails)
        # back off. Sign-ins and rebuilds are counted apart, so a rebuild that reveals a 401 still re-signs-in at once.
        kind = "sign_in" if sign_in else "rebuild"
        count = self._repairs_without_reply.get(kind, 0)
        if count == 0:
            self._repair_at = now
        else:
            self._repair_at = now + self.config.reconnect_backoff.delay(count - 1, self.rand)
        self._repairs_without_reply[kind] = count + 1
        if sign_in:
            self._need_sign_in = True
            self._need_rebuild = False  # a sign-in always rebuilds the socket
        else:
            self._need_rebuild = True
        if self.state is State.ONLINE:
            self._set_state(State.RECONNECTING, now)

    # -- inputs from the shell ---------------------------------------------------------------------------------
    def start(self, now: float, have_session: bool) -> None:
        """``online()``: begin beating at once if a session exists, else sign in first."""
        self._reset_session_fields()
        self._set_state(State.CONNECTING, now)
        self._have_session = have_session
        if have_session:
            self._next_beat_at = now
        else:
            self._need_sign_in = True
            self._repair_at = now
            self.counters.reconnects[Reason.INITIAL.value] = self.counters.reconnects.get(Reason.INITIAL.value, 0) + 1

    def stop(self, now: float) -> None:
        self._set_state(State.STOPPED, now)
        self._need_sign_in = False
        self._need_rebuild = False
        self._outstanding = False

    def repair_started(self, now: float) -> None:
        """The shell is signing in or rebuilding now (keeps poll() from asking again meanwhile)."""
        self._repair_at = float("inf")

    def signed_in(self, now: float) -> None:
        """Sign-in succeeded and the socket was rebuilt towards the returned address: beat at once."""
        if self.state is State.STOPPED:
            return
        self.counters.sign_ins += 1
        self._have_session = True
        self._need_sign_in = False
        self._need_rebuild = False
        self._sign_in_failures = 0
        self._outstanding = False
        self._misses = 0
        self._next_beat_at = now
        self.last_error = None
        self._record(Event(now, "signed_in"))

    def sign_in_failed(self, now: float, error: str, permanent: bool = False, retry_after: float = 0.0) -> None:
        """Sign-in failed: try again later (capped full jitter; rarely if the error is permanent)."""
        if self.state is State.STOPPED:
            return
        self.counters.sign_in_failures += 1
        self.last_error = error
        policy = self.config.permanent_backoff if permanent else self.config.reconnect_backoff
        self._need_sign_in = True
        self._repair_at = now + policy.delay(self._sign_in_failures, self.rand, retry_after)
        self._sign_in_failures += 1
        self._record(Event(now, "sign_in_failed", error))

    def rebuild_failed(self, now: float, error: str) -> None:
        """The socket could not be rebuilt (no address to bind, descriptor limit): try again later."""
        self.last_error = error
        self._need_rebuild = True
        count = self._repairs_without_reply.get("rebuild", 0)
        self._repair_at = now + self.config.reconnect_backoff.delay(count, self.rand)
        self._repairs_without_reply["rebuild"] = count + 1
        self._record(Event(now, "rebuild_failed", error))

    def socket_rebuilt(self, now: float) -> None:
        """A REBUILD_SOCKET was carried out: probe the server at once."""
        self.counters.socket_rebuilds += 1
        self._need_rebuild = False
        self._outstanding = False
        self._next_beat_at = now
        self._record(Event(now, "socket_rebuilt"))

    def beat_sent(self, now: float) -> None:
        self.counters.beats_sent += 1
        self.last_sent_at = now
        self._outstanding = True
        self._reply_deadline = now + self.config.reply_timeout
        # Until the reply says otherwise, the next beat is one interval away.
        self._next_beat_at = now + self.interval

    def socket_failed(self, now: float, unreachable: bool = False) -> None:
        """Sending or receiving failed. Unreachable (ICMP port unreachable) means the address is stale."""
        self.counters.send_failures += 1
        if unreachable:
            self._start_reconnect(now, Reason.UNREACHABLE, sign_in=True)
        else:
            self._start_reconnect(now, Reason.SOCKET_ERROR, sign_in=not self._have_session)

    def reply(self, now: float, next_beat_ms: int) -> None:
        """A HeartbeatResp from the current server address arrived."""
        if self.state in (State.STOPPED, State.OFFLINE):
            return
        if next_beat_ms == NEXT_BEAT_REAUTH:
            self.counters.reauth_replies += 1
            self._have_session = False
            self._start_reconnect(now, Reason.REAUTH_401, sign_in=True)
            return
        if self._need_sign_in:
            return  # a late reply to a beat of the session we are replacing: ignore it
        self.counters.replies += 1
        self.interval = min(max(next_beat_ms / 1000.0, self.config.min_interval), self.config.max_interval)
        if self.last_sent_at is not None and self._outstanding:
            self.last_rtt = max(0.0, now - self.last_sent_at)
        self.last_reply_at = now
        self._outstanding = False
        self._misses = 0
        self._repairs_without_reply.clear()
        base = self.last_sent_at if self.last_sent_at is not None else now
        self._next_beat_at = base + self.interval
        if self._fault is not None:
            reason, since = self._fault
            self._record(Event(now, "recovered", f"{reason.value} after {1000 * (now - since):.0f} ms"))
            self._fault = None
        self._set_state(State.ONLINE, now)

    # -- the one question ---------------------------------------------------------------------------------------
    def poll(self, now: float, beat_slack: float = 0.0) -> Decision:
        """What should the shell do at ``now``? Call again at ``wake_at`` or after any input.

        A beat due within ``beat_slack`` seconds is sent now, so that the beats of many clients in one process
        coalesce into few wake-ups (reply deadlines and repairs are never advanced).
        """
        if self.state in (State.OFFLINE, State.STOPPED):
            return Decision(Action.NONE, None)
        if self._need_sign_in or self._need_rebuild:
            if now >= self._repair_at:
                return Decision(Action.SIGN_IN if self._need_sign_in else Action.REBUILD_SOCKET)
            return Decision(Action.NONE, self._repair_at if self._repair_at != float("inf") else None)
        if self._outstanding:
            if now < self._reply_deadline:
                return Decision(Action.NONE, self._reply_deadline)
            self._outstanding = False
            self._misses += 1
            self.counters.misses += 1
            self._record(Event(now, "miss", str(self._misses)))
            if self._misses >= self.config.max_misses:
                self._start_reconnect(now, Reason.SILENT, sign_in=True)
                return self.poll(now, beat_slack)
            return Decision(Action.SEND_BEAT)  # re-probe at once
        if now + beat_slack >= self._next_beat_at:
            return Decision(Action.SEND_BEAT)
        return Decision(Action.NONE, self._next_beat_at)

    # -- views ----------------------------------------------------------------------------------------------------
    @property
    def consecutive_misses(self) -> int:
        return self._misses

    @property
    def signing_in(self) -> bool:
        return self._need_sign_in

    def snapshot(self, now: float) -> dict:
        c = self.counters
        return {
            "state": self.state.value,
            "interval": self.interval,
            "beats_sent": c.beats_sent,
            "replies": c.replies,
            "misses": c.misses,
            "consecutive_misses": self._misses,
            "reauth_replies": c.reauth_replies,
            "sign_ins": c.sign_ins,
            "sign_in_failures": c.sign_in_failures,
            "socket_rebuilds": c.socket_rebuilds,
            "send_failures": c.send_failures,
            "reconnects": dict(c.reconnects),
            "last_rtt": self.last_rtt,
            "last_reply_age": None if self.last_reply_at is None else max(0.0, now - self.last_reply_at),
            "last_error": self.last_error,
        }
