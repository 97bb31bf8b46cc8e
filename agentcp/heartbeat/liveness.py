"""The heartbeat state machine: every liveness decision, and no I/O.

:class:`Liveness` never sleeps, reads a clock or touches a socket, and draws every random number from the
``rand`` it is given (seed it in tests). The I/O shell (:class:`~agentcp.heartbeat.heartbeat_client.HeartbeatClient`)
tells it what happened and when ("a reply with NextBeat 5000 arrived at t", "the socket failed at t") and asks it
what to do next (:meth:`Liveness.poll`): send a beat, sign in again, rebuild the socket, or sleep until a given
time. Tests drive it with plain numbers.

Timing rules (liveness.md §3.7, §4; issues "resilient liveness core" and "liveness under packet loss and herds"):

* Beats. ``interval`` is the server's NextBeat clamped to ``[min_interval, max_interval]``; NextBeat 401 is never
  an interval, it means "sign in again". Each gap between beats is drawn from ``[1 - jitter, 1] * interval`` (never
  later than the server asked; on a lossy path shortened by the loss rate, so lost beats are re-sent in time),
  and the beat after the first reply of a session goes out at a random point of the first interval, so agents in
  one process keep apart phases instead of beating (and re-signing-in) in lock-step.
  With ``beat_grid`` set, each drawn time is rounded down to a multiple of the grid step: agents whose random
  draws fall into the same slot are due at the very same instant, so the shell's shared reactor serves them with
  one wake-up without moving any beat, and the phases stay random and spread. Given ``slot_load`` (how many beats
  of the process are due at an instant), each gap is drawn twice and the emptier slot wins, so no slot fills up.
* Loss versus silence. A reply not received ``reply_timeout`` (or a few smoothed round-trip times, if longer)
  after its beat is a *miss*, and the server is re-probed at once. The machine keeps an estimate of the round-trip
  loss rate (a plain mean at first, then exponentially weighted), folded in when a run of misses ends with a
  reply. The server is declared *silent* only after as many consecutive misses as make it unlikely
  (``false_alarm``) that loss alone produced them: ``max_misses`` (3) on a clean path, up to
  ``max_probe_budget`` on a very lossy one. A silent server is thus still noticed within
  ``interval + max_misses * reply_timeout`` of its last reply on a clean path.
* Recovery from silence starts cheap: rebuild the socket and probe again (same budget). Only if that brings no
  reply does the client sign in over HTTP; while the sign-in is pending it keeps probing the old session by UDP
  every ``blackout_probe`` seconds, and any valid reply cancels the sign-in (the path is back, the session is
  alive). A sign-in that failed for lack of a network while UDP is silent too (a blackout) is retried rarely
  (``blackout_backoff``): the UDP probes notice the network's return, not HTTP.
* Herds. The first sign-in after a 401 or an ICMP "unreachable" waits a random ``[0, reauth_spread]``, so a
  fleet that learns of a server restart at once does not sign in at once. Failed sign-ins retry after
  ``reconnect_backoff`` (a floor and a cap close together: slow on average, but back soon after the server is),
  or later if the server's ``Retry-After`` says so. A first sign-in due while other agents of the process just
  failed to sign in to the same server (``peers_failing``, see :class:`SignInHealth`) is deferred once by
  ``outage_defer``. Sign-in is single-flight: while one is due or running, further 401s and faults change nothing.
"""
from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Tuple

from agentcp.base.backoff import BLACKOUT_BACKOFF, HEARTBEAT_RECONNECT_BACKOFF, PERMANENT_ERROR_BACKOFF, Backoff
from agentcp.msg.message_serialize import NEXT_BEAT_REAUTH

__all__ = ["Action", "Decision", "Liveness", "LivenessConfig", "State", "Event", "Reason", "SignInHealth",
           "probe_budget"]


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


class Decision(NamedTuple):
    """What :meth:`Liveness.poll` asks of the shell (a named tuple: made on every beat and reply, cheaply)."""

    action: Action
    wake_at: Optional[float] = None  # when to poll again if nothing happens first (None: only on an event)


#: The decisions without a wake time, made once (poll() runs on every beat and reply of every agent).
_SEND_BEAT = Decision(Action.SEND_BEAT)
_SIGN_IN = Decision(Action.SIGN_IN)
_REBUILD = Decision(Action.REBUILD_SOCKET)
_WAIT = Decision(Action.NONE, None)


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
    #: Misses that mean "silent" on a clean path; the budget grows with the measured loss up to max_probe_budget.
    max_misses: int = 3
    max_probe_budget: int = 10
    #: Acceptable chance that loss alone makes a run of misses as long as the budget (per beat).
    false_alarm: float = 1e-5
    #: Weight of one beat's outcome in the loss estimate (about 1/alpha beats of memory).
    loss_alpha: float = 0.05
    #: Upper bound of the adaptive reply timeout (a few smoothed round-trip times on a slow path).
    max_reply_timeout: float = 3.0
    #: Each gap between beats is drawn from [1 - jitter, 1] * interval, then shortened by the estimated round-trip
    #: loss rate, at most by loss_early (30 %).
    jitter: float = 0.1
    loss_early: float = 0.3
    #: The beat after a session's first reply goes out after a random [first_beat_min, 1] * interval.
    first_beat_min: float = 0.1
    #: Beat grid (seconds; 0: off). Every randomly drawn beat time (jittered gap, first-beat offset, blackout probe
    #: gap) is rounded down to a multiple of ``beat_grid`` on the shell's clock, so the agents of one process whose
    #: draws fall into the same slot are due at the same instant and share one wake-up, while phases stay random
    #: and spread (200 agents over a 5 s interval with a 200 ms grid: 25 slots, ~8 agents each). Rounding down
    #: only shortens a gap, by less than one step: never later than the server asked. The step is at most
    #: ``GRID_MAX_FRACTION`` of the interval (short test intervals get a finer grid).
    beat_grid: float = 0.0
    #: The first sign-in after a 401 / ICMP unreachable waits a random [0, reauth_spread] seconds.
    reauth_spread: float = 0.4
    #: While a sign-in after silence is pending, the old session is probed every [lo, hi] seconds.
    blackout_probe: Tuple[float, float] = (2.0, 3.0)
    #: A first sign-in due while other agents of this process just failed to sign in to the same server (an
    #: outage) is deferred by a random [lo, hi] seconds instead: the fleet's first wave is spread thin.
    outage_defer: Tuple[float, float] = (1.0, 9.25)
    reconnect_backoff: Backoff = HEARTBEAT_RECONNECT_BACKOFF
    #: Sign-in retries when the network itself failed (no HTTP answer) while UDP is silent too.
    blackout_backoff: Backoff = BLACKOUT_BACKOFF
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
    #: Silence verdicts healed by the cheap step (socket rebuild and probe) without an HTTP sign-in.
    silence_healed_by_probe: int = 0
    reconnects: Dict[str, int] = field(default_factory=dict)


#: The beat grid's step is at most this fraction of the interval (a 5 s interval: at most 200 ms).
GRID_MAX_FRACTION = 0.04


def probe_budget(loss: float, false_alarm: float, minimum: int, maximum: int) -> int:
    """Consecutive misses to wait for before calling the server silent, given the round-trip loss estimate.

    The smallest ``k`` with ``p**k <= false_alarm``, where ``p`` is the estimate raised by a safety margin (the
    estimate itself is noisy), bounded to ``[minimum, maximum]``.
    """
    p = min(0.95, max(0.0, loss) * 1.25 + 0.02)
    k = math.ceil(math.log(false_alarm) / math.log(p))
    return max(minimum, min(maximum, k))


class Liveness:
    """Pure heartbeat decisions. Not thread safe: the shell serialises calls with its own lock."""

    def __init__(
        self,
        config: Optional[LivenessConfig] = None,
        rand: Callable[[], float] = random.random,
        history: int = 256,
        slot_load: Optional[Callable[[float], int]] = None,
    ) -> None:
        """``slot_load(at)``: how many beats of the process are already due at the grid instant ``at`` (the
        shell's answer; only asked with a beat grid). With it, each jittered beat time is drawn twice and the
        emptier of the two slots wins, so slots stay near the mean instead of some filling up by chance."""
        self.config = config or LivenessConfig()
        self.rand = rand
        self.slot_load = slot_load
        self.counters = Counters()
        self.history: Deque[Event] = deque(maxlen=history)
        self.state = State.OFFLINE
        self.interval = self.config.min_interval
        self._grid_step = self._grid_for(self.interval)
        self.last_rtt: Optional[float] = None
        self.last_reply_at: Optional[float] = None
        self.last_sent_at: Optional[float] = None
        self.last_error: Optional[str] = None
        #: Estimated round-trip loss rate (0..1) and smoothed RTT / deviation (seconds); survive reconnects.
        self.loss = 0.0
        self.loss_samples = 0
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self._pending_events: List[Event] = []
        self._reset_session_fields()

    # -- internal bookkeeping ------------------------------------------------------------------------------
    def _reset_session_fields(self) -> None:
        self._have_session = False
        self._need_sign_in = False
        self._repair_at = 0.0  # when the pending sign-in or rebuild may run
        self._repair_running = False
        self._sign_in_failures = 0  # consecutive failed sign-in attempts (backoff exponent)
        self._repairs_without_reply: Dict[str, int] = {}  # per repair kind, consecutive ones with no valid reply
        self._need_rebuild = False
        self._outstanding = False  # a beat is waiting for its reply
        self._reply_deadline = 0.0
        self._next_beat_at = 0.0
        self._misses = 0
        self._first_reply = True  # the next reply is the first of this session: randomise the phase after it
        self._deferred = False  # this fault's first sign-in was already deferred because peers were failing
        self._silence_stage = 0  # 0: healthy; 1: socket rebuilt after silence, probing; 2: sign-in pending, probing
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

    def has_news(self) -> bool:
        """Are there state changes or events the shell has not taken yet?"""
        return bool(self._pending_states or self._pending_events)

    def take_events(self) -> List[Event]:
        """Timeline events since the last call (the shell turns them into ``on_event`` callbacks)."""
        events, self._pending_events = self._pending_events, []
        return events

    def take_state_changes(self) -> List[Tuple[State, State]]:
        """State transitions since the last call (the shell turns them into ``on_state_change`` callbacks)."""
        changes, self._pending_states = self._pending_states, []
        return changes

    def _spread(self) -> float:
        return self.rand() * self.config.reauth_spread

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
        self._silence_stage = 1 if reason is Reason.SILENT else 0
        # The first repair of each kind after a healthy period is (nearly) immediate: a socket rebuild at once, a
        # sign-in within a short random window so that a fleet told "401" together does not sign in together.
        # Repairs that keep failing to bring a valid reply back off; sign-ins and rebuilds are counted apart, so a
        # rebuild that reveals a 401 still re-signs-in soon.
        kind = "sign_in" if sign_in else "rebuild"
        count = self._repairs_without_reply.get(kind, 0)
        if count > 0:
            self._repair_at = now + self.config.reconnect_backoff.delay(count - 1, self.rand)
        elif sign_in:
            self._repair_at = now + self._spread()
        else:
            self._repair_at = now
        self._repairs_without_reply[kind] = count + 1
        if sign_in:
            self._need_sign_in = True
            self._need_rebuild = False  # a sign-in always rebuilds the socket
        else:
            self._need_rebuild = True
        if self.state is State.ONLINE:
            self._set_state(State.RECONNECTING, now)

    def _escalate_silence(self, now: float) -> None:
        """The rebuilt socket's probes went unanswered too: sign in over HTTP, and keep probing meanwhile."""
        self._silence_stage = 2
        self._outstanding = False
        self._misses = 0
        self._need_sign_in = True
        self._need_rebuild = False
        count = self._repairs_without_reply.get("sign_in", 0)
        if count > 0:
            self._repair_at = now + self.config.reconnect_backoff.delay(count - 1, self.rand)
        else:
            self._repair_at = now + self._spread()
        self._repairs_without_reply["sign_in"] = count + 1
        self._next_beat_at = self._on_grid(now + self._blackout_probe_gap(), now)
        self._record(Event(now, "escalate", "sign_in"))

    def _beat_fraction(self, first: bool) -> float:
        if first:  # a random phase for this session's beats (the first beat of a session goes out at once)
            return self.config.first_beat_min + (1.0 - self.config.first_beat_min) * self.rand()
        return 1.0 - self.config.jitter * self.rand()

    def _draw_next_beat(self, base: float, now: float, first: bool) -> float:
        """The next beat's time, a random fraction of the interval after ``base`` (on the grid, if any)."""
        # On a lossy path beat a little early (by the loss rate, at most loss_early), so that a lost beat can be
        # re-probed several times before the server's wait for it runs out.
        span = self.interval * (1.0 - min(self.config.loss_early, self.loss))
        at = self._on_grid(base + span * self._beat_fraction(first), now)
        load = self.slot_load
        if load is not None and self._grid_step:
            # "Two choices": of two independent draws take the emptier slot. Slots then hold close to the mean
            # (with one draw, the fullest of 25 slots holds about twice the mean), and the phase is still random.
            other = self._on_grid(base + span * self._beat_fraction(first), now)
            if other != at and load(other) < load(at):
                at = other
        return at

    def _blackout_probe_gap(self) -> float:
        lo, hi = self.config.blackout_probe
        return lo + (hi - lo) * self.rand()

    def _grid_for(self, interval: float) -> float:
        """The beat grid's step for ``interval`` (0: no grid)."""
        return max(0.0, min(self.config.beat_grid, GRID_MAX_FRACTION * interval))

    def _on_grid(self, at: float, after: float) -> float:
        """``at`` rounded down to the beat grid, unless that would not be later than ``after`` (a gap shorter
        than one step: keep it as drawn). The same slot is the same float for every machine of the process."""
        step = self._grid_step
        if not step:
            return at
        slot = (at // step) * step
        return slot if slot > after else at

    def _fold_outcome(self, misses: int) -> None:
        """A run of ``misses`` misses ended with a reply: update the loss estimate.

        A plain mean over the first 1/alpha outcomes (so a young estimate is not biased towards zero), an
        exponentially weighted one after that.
        """
        if not misses and self.loss_samples >= 1.0 / self.config.loss_alpha:
            self.loss_samples += 1  # the usual case, a reply with no miss before it: one weighted step
            self.loss -= self.config.loss_alpha * self.loss
            return
        outcomes = [1.0] * min(misses, self.config.max_probe_budget) + [0.0]
        for lost in outcomes:
            self.loss_samples += 1
            a = max(self.config.loss_alpha, 1.0 / self.loss_samples)
            self.loss += a * (lost - self.loss)

    def _reply_timeout(self) -> float:
        """``reply_timeout``, or a few smoothed round-trip times if the path is slower (bounded)."""
        timeout = self.config.reply_timeout
        if self.srtt is not None:
            timeout = max(timeout, min(self.config.max_reply_timeout, 2 * self.srtt + 4 * self.rttvar))
        return timeout

    def _measure_rtt(self, rtt: float) -> None:
        self.last_rtt = rtt
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:  # RFC 6298 smoothing
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    @property
    def budget(self) -> int:
        """Consecutive misses that currently mean "silent" (grows with the measured loss)."""
        c = self.config
        return probe_budget(self.loss, c.false_alarm, c.max_misses, max(c.max_misses, c.max_probe_budget))

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
        self._repair_running = True

    def signed_in(self, now: float) -> None:
        """Sign-in succeeded and the socket was rebuilt towards the returned address: beat at once."""
        if self.state is State.STOPPED:
            return
        self.counters.sign_ins += 1
        self._have_session = True
        self._need_sign_in = False
        self._need_rebuild = False
        self._repair_running = False
        self._sign_in_failures = 0
        self._deferred = False
        self._silence_stage = 0
        self._outstanding = False
        self._misses = 0
        self._first_reply = True
        self._next_beat_at = now
        self.last_error = None
        self._record(Event(now, "signed_in"))

    def sign_in_failed(self, now: float, error: str, permanent: bool = False, retry_after: float = 0.0,
                       network: bool = False) -> None:
        """Sign-in failed: try again later.

        ``network``: no HTTP answer at all (timeout, refused, unreachable). If the UDP session is being probed
        meanwhile (silence), that is a blackout: retry rarely and let the probes notice the network's return.
        """
        if self.state is State.STOPPED:
            return
        self.counters.sign_in_failures += 1
        self.last_error = error
        self._repair_running = False
        if not self._need_sign_in:
            # A reply on the old session cancelled this sign-in while it ran: the session is alive, nothing to retry.
            self._record(Event(now, "sign_in_failed", f"{error} (no longer needed)"))
            return
        if permanent:
            policy = self.config.permanent_backoff
        elif network and self._silence_stage == 2:
            policy = self.config.blackout_backoff
        else:
            policy = self.config.reconnect_backoff
        self._need_sign_in = True
        self._repair_at = now + policy.delay(self._sign_in_failures, self.rand, retry_after)
        self._sign_in_failures += 1
        self._record(Event(now, "sign_in_failed", error))

    def rebuild_failed(self, now: float, error: str) -> None:
        """The socket could not be rebuilt (no address to bind, descriptor limit): try again later."""
        self.last_error = error
        self._need_rebuild = True
        self._repair_running = False
        count = self._repairs_without_reply.get("rebuild", 0)
        self._repair_at = now + self.config.reconnect_backoff.delay(count, self.rand)
        self._repairs_without_reply["rebuild"] = count + 1
        self._record(Event(now, "rebuild_failed", error))

    def socket_rebuilt(self, now: float) -> None:
        """A REBUILD_SOCKET was carried out: probe the server at once."""
        self.counters.socket_rebuilds += 1
        self._need_rebuild = False
        self._repair_running = False
        self._outstanding = False
        self._misses = 0
        self._next_beat_at = now
        self._record(Event(now, "socket_rebuilt"))

    def beat_sent(self, now: float) -> Optional[float]:
        """A beat went out at ``now``.

        Returns the reply deadline when that is all there is to wait for (what :meth:`poll` would answer now),
        so the shell of many agents need not ask again; None when :meth:`poll` must be asked (a repair is due
        or running).
        """
        self.counters.beats_sent += 1
        self.last_sent_at = now
        self._outstanding = True
        self._reply_deadline = now + self._reply_timeout()
        # Until the reply says otherwise, the next beat is one interval away (a probe gap while signing in).
        if self._silence_stage == 2:
            self._next_beat_at = self._on_grid(now + self._blackout_probe_gap(), now)
        else:
            self._next_beat_at = self._on_grid(now + self.interval, now)
        if self._need_sign_in or self._need_rebuild or self.state is State.STOPPED or self.state is State.OFFLINE:
            return None
        return self._reply_deadline

    def socket_failed(self, now: float, unreachable: bool = False) -> None:
        """Sending or receiving failed. Unreachable (ICMP port unreachable) means the address is stale."""
        self.counters.send_failures += 1
        if unreachable:
            self._reauth(now, Reason.UNREACHABLE)
        else:
            self._start_reconnect(now, Reason.SOCKET_ERROR, sign_in=not self._have_session)

    def _reauth(self, now: float, reason: Reason) -> None:
        """The server told us (401, ICMP) that the session or address is gone: sign in soon."""
        self._have_session = False
        if self._need_sign_in and self._silence_stage == 2:
            # A blackout's slow sign-in retry was pending: the server answers again, so sign in now (spread).
            self._silence_stage = 0
            self._sign_in_failures = 0
            self.counters.reconnects[reason.value] = self.counters.reconnects.get(reason.value, 0) + 1
            self._record(Event(now, "fault", reason.value))
            if not self._repair_running:
                self._repair_at = min(self._repair_at, now + self._spread())
            return
        self._start_reconnect(now, reason, sign_in=True)

    def reply(self, now: float, next_beat_ms: int) -> Optional[float]:
        """A HeartbeatResp from the current server address arrived.

        Returns the next beat's time when the reply changed nothing but the beat schedule (the agent was and
        stays online; no event to report): what :meth:`poll` would answer, so the shell need not ask. None
        otherwise: ask :meth:`poll`.
        """
        if self.state in (State.STOPPED, State.OFFLINE):
            return None
        if next_beat_ms == NEXT_BEAT_REAUTH:
            self.counters.reauth_replies += 1
            self._reauth(now, Reason.REAUTH_401)
            return None
        if self._need_sign_in:
            if self._silence_stage != 2:
                return None  # a late reply to a beat of the session we are replacing: ignore it
            # Silence ended and the old session is alive: the pending sign-in is not needed (one already running
            # completes; its new session simply replaces this one).
            self._need_sign_in = False
            self._sign_in_failures = 0
        self.counters.replies += 1
        interval = min(max(next_beat_ms / 1000.0, self.config.min_interval), self.config.max_interval)
        if interval != self.interval:
            self.interval = interval
            self._grid_step = self._grid_for(interval)
        if self.last_sent_at is not None and self._outstanding:
            self._measure_rtt(max(0.0, now - self.last_sent_at))
        self._fold_outcome(self._misses)
        self.last_reply_at = now
        self._outstanding = False
        self._misses = 0
        if self._silence_stage:
            self.counters.silence_healed_by_probe += 1
        self._silence_stage = 0
        self._repairs_without_reply.clear()
        base = self.last_sent_at if self.last_sent_at is not None else now
        self._next_beat_at = self._draw_next_beat(base, now, self._first_reply)
        self._first_reply = False
        if self._fault is not None:
            reason, since = self._fault
            self._record(Event(now, "recovered", f"{reason.value} after {1000 * (now - since):.0f} ms"))
            self._fault = None
            self._set_state(State.ONLINE, now)
            return None
        if self.state is not State.ONLINE:
            self._set_state(State.ONLINE, now)
            return None
        return None if self._need_rebuild else self._next_beat_at

    # -- the one question ---------------------------------------------------------------------------------------
    def poll(self, now: float, beat_slack: float = 0.0, peers_failing: bool = False) -> Decision:
        """What should the shell do at ``now``? Call again at ``wake_at`` or after any input.

        A beat due within ``beat_slack`` seconds is sent now, so that beats of many clients in one process that
        are due at (nearly) the same moment share a wake-up (reply deadlines and repairs are never advanced).
        ``peers_failing``: other agents' sign-ins to this server just failed (see :class:`SignInHealth`); a first
        sign-in attempt is then deferred once by ``outage_defer``.
        """
        if self.state in (State.OFFLINE, State.STOPPED):
            return _WAIT
        if self._need_sign_in or self._need_rebuild:
            if now >= self._repair_at:
                if self._need_sign_in and peers_failing and self._sign_in_failures == 0 and not self._deferred:
                    self._deferred = True
                    lo, hi = self.config.outage_defer
                    self._repair_at = now + lo + (hi - lo) * self.rand()
                    self._record(Event(now, "sign_in_deferred", f"{self._repair_at - now:.1f} s"))
                    return self.poll(now, beat_slack)
                return _SIGN_IN if self._need_sign_in else _REBUILD
            wake = self._repair_at if self._repair_at != float("inf") else None
            if self._silence_stage == 2 and self._need_sign_in and self._have_session:
                # Waiting to sign in after silence: keep probing the old session cheaply by UDP.
                if self._outstanding:
                    if now < self._reply_deadline:
                        return Decision(Action.NONE, _earliest(wake, self._reply_deadline))
                    self._outstanding = False
                    self.counters.misses += 1
                if now + beat_slack >= self._next_beat_at:
                    return _SEND_BEAT
                wake = _earliest(wake, self._next_beat_at)
            return Decision(Action.NONE, wake)
        if self._outstanding:
            if now < self._reply_deadline:
                return Decision(Action.NONE, self._reply_deadline)
            self._outstanding = False
            self._misses += 1
            self.counters.misses += 1
            self._record(Event(now, "miss", str(self._misses)))
            if self._misses >= self.budget:
                if self._silence_stage == 1:
                    self._escalate_silence(now)
                else:
                    self._start_reconnect(now, Reason.SILENT, sign_in=False)
                return self.poll(now, beat_slack)
            return _SEND_BEAT  # re-probe at once
        if now + beat_slack >= self._next_beat_at:
            return _SEND_BEAT
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
            "silence_healed_by_probe": c.silence_healed_by_probe,
            "reconnects": dict(c.reconnects),
            "last_rtt": self.last_rtt,
            "srtt": self.srtt,
            "loss_estimate": round(self.loss, 4),
            "probe_budget": self.budget,
            "last_reply_age": None if self.last_reply_at is None else max(0.0, now - self.last_reply_at),
            "last_error": self.last_error,
        }


class SignInHealth:
    """What the agents of one process learnt about a sign-in server: is it failing right now?

    "Failing" means the latest sign-in outcome was a transient failure (no answer, 5xx, 429) less than ``memory``
    seconds ago. Pure: times are arguments; the shell keeps one per server URL and serialises access.
    """

    def __init__(self, memory: float = 10.0) -> None:
        self.memory = memory
        self._last_failure: Optional[float] = None
        self._last_success: Optional[float] = None

    def record(self, now: float, ok: bool) -> None:
        if ok:
            self._last_success = now
        else:
            self._last_failure = now

    def failing(self, now: float) -> bool:
        f = self._last_failure
        if f is None or now - f > self.memory:
            return False
        return self._last_success is None or self._last_success < f


def _earliest(a: Optional[float], b: float) -> float:
    return b if a is None else min(a, b)
