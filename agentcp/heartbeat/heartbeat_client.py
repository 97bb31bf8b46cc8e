"""UDP heartbeat client: the thin I/O shell around :class:`~agentcp.heartbeat.liveness.Liveness`.

Each client owns one UDP socket, connected to the heartbeat server (so the kernel drops datagrams from anywhere
else and reports ICMP "port unreachable" when the server has moved). Its beats and replies are handled on the
process-wide :class:`~agentcp.heartbeat.reactor.HeartbeatReactor` thread, which does whatever the state machine
decides (beat, rebuild the socket) and never blocks. Re-sign-in, the only blocking step, runs on a short-lived
worker thread of the client (the "send side"), never on the receive path. User callbacks (invites, state
changes) run on a third, lazily started thread of the client.

The public surface is agentcp 0.1.99's (constructor, ``initialize``, ``sign_in``, ``online``, ``offline``, ...);
``state``, ``stats()``, ``history``, ``on_state_change`` and ``wait_online()`` are new.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from agentcp.base.auth_client import AuthClient
from agentcp.base.backoff import BLACKOUT_BACKOFF, PERMANENT_ERROR_BACKOFF, Backoff
from agentcp.base.names import InvalidNameError, check_host, check_port
from agentcp.base.reporting import FaultReporter
from agentcp.base.serial_pool import Lane, SerialPool
from agentcp.context.exceptions import AuthError, HeartbeatError, SDKError, TransientAuthError
from agentcp.heartbeat.liveness import Action, Event, Liveness, LivenessConfig, SignInHealth, State
from agentcp.heartbeat.reactor import HeartbeatReactor
from agentcp.msg.message_serialize import *  # noqa: F401,F403  (0.1.99 re-exported these names here)
from agentcp.msg.message_serialize import (
    MSG_HEARTBEAT_RESP,
    MSG_INVITE_REQ,
    HeartbeatMessageReq,
    HeartbeatMessageResp,
    InviteMessageReq,
    InviteMessageResp,
    MalformedDatagram,
    peek_message_type,
    to_bytes,
    uint64_to_varint,
)

log = logging.getLogger("agentcp.heartbeat")

#: LivenessConfig objects by their repr (see HeartbeatClient._new_machine). Never mutated once made.
_SHARED_CONFIGS: Dict[str, LivenessConfig] = {}

#: The usual HeartbeatResp: one-byte MessageMask and MessageSeq uvarints, u16 type, u16 payload size and an
#: 8-byte big-endian NextBeat (14 bytes). Decoded in one step; every other datagram takes the general decoder.
_USUAL_REPLY = struct.Struct(">BBHHQ")
#: One-byte uvarints 0..127, the MessageSeq of a client's first 128 beats.
_SMALL_VARINT = [bytes((i,)) for i in range(128)]

__all__ = ["HeartbeatClient"]

#: Callbacks (invites, state changes) of every heartbeat client of the process: up to 4 shared threads that exist
#: only while callbacks are queued or running (an idle agent holds none); each client's run in order.
CALLBACKS = SerialPool("agentcp-hb-callbacks", max_workers=4)


class _OwnedSocket(socket.socket):
    """A UDP socket that tells its owner when someone else closes it, so the owner heals at once.

    It also remembers which kernel object its descriptor named: if the descriptor was closed behind Python's
    back, the number may already belong to a newer socket (often our own replacement), and closing it would kill
    that one. ``owner_close`` then only forgets the number.
    """

    _on_foreign_close: Optional[Callable[["_OwnedSocket"], None]] = None
    _owner_closing = False
    _inode: Optional[int] = None
    #: The address the socket is connected to (the kernel delivers datagrams from nobody else), or None.
    peer: Optional[Tuple[str, int]] = None

    def remember_identity(self) -> None:
        try:
            self._inode = os.fstat(self.fileno()).st_ino
        except (OSError, ValueError):
            self._inode = None  # platforms where fstat() does not work on sockets: close normally

    def still_ours(self) -> bool:
        if self._inode is None or self.fileno() < 0:
            return True
        try:
            return os.fstat(self.fileno()).st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        callback = None if self._owner_closing else self._on_foreign_close
        self._on_foreign_close = None
        super().close()
        if callback is not None:
            callback(self)

    def owner_close(self) -> None:
        self._owner_closing = True
        if not self.still_ours():
            self.detach()  # the number is someone else's now: forget it, never close it
            return
        self.close()


class HeartbeatClient:
    """Keeps an agent "online" with the heartbeat server, and heals every fault without a restart.

    ``aid_path`` is the agent's certificate directory and ``seed_password`` the hashed seed, as in 0.1.99.
    """

    #: Bounds applied to the server's NextBeat (seconds). Class attributes so tests may lower them.
    MIN_INTERVAL: float = 5.0
    MAX_INTERVAL: float = 60.0
    #: A reply later than this after its beat counts as missed; misses are re-probed right away.
    REPLY_TIMEOUT: float = 1.0
    #: Consecutive misses that mean "the server is gone" on a clean path. On a lossy path the count grows with
    #: the measured loss (up to MAX_PROBE_BUDGET), so that loss alone makes a false verdict about FALSE_ALARM likely.
    MAX_MISSES: int = 3
    MAX_PROBE_BUDGET: int = 10
    FALSE_ALARM: float = 1e-5
    #: Waits between sign-in attempts while the server's sign-in fails. None: [1.4, 1.9] x MIN_INTERVAL
    #: (7-9.5 s): slow on average, back within 10 s of the server's return.
    RECONNECT_BACKOFF: Optional[Backoff] = None
    #: Sign-in retries while neither HTTP nor the UDP probes get an answer (a blackout).
    BLACKOUT_BACKOFF: Backoff = BLACKOUT_BACKOFF
    PERMANENT_BACKOFF: Backoff = PERMANENT_ERROR_BACKOFF
    #: Each gap between beats is drawn from [1 - JITTER, 1] x interval, and the beat after a session's first reply
    #: from [FIRST_BEAT_MIN, 1] x interval: agents keep their own phases.
    JITTER: float = 0.1
    FIRST_BEAT_MIN: float = 0.1
    #: The first sign-in after a 401 waits a random [0, min(REAUTH_SPREAD, MIN_INTERVAL / 10)] seconds; if other
    #: agents of the process just failed to sign in to the same server, [0.2, 1.85] x MIN_INTERVAL instead.
    REAUTH_SPREAD: float = 0.4
    #: Beats due within this fraction of the interval (at most MAX_BEAT_SLACK seconds) share a wake-up. A few
    #: milliseconds at most: grouping must never move a beat noticeably, or phases would collapse together.
    BEAT_SLACK: float = 0.001
    MAX_BEAT_SLACK: float = 0.005
    #: The beat grid (seconds of the monotonic clock; 0: off). Each agent still draws its own random beat times
    #: (JITTER on every gap, the FIRST_BEAT_MIN offset), but every draw is rounded down to a multiple of BEAT_GRID.
    #: Why: on a small VM a timed wake-up of the shared reactor costs more CPU than the beats it sends (the first
    #: datagram after a sleep runs on cold caches), and agents with truly independent phases need one wake-up per
    #: beat. On the grid, the agents whose draws land in the same slot are due at the same instant and go out in
    #: one wake-up, and no beat is moved to get there. Each beat time is drawn twice and the emptier slot wins
    #: (the reactor counts the timers due at each instant), so slots stay near the mean: 200 agents on a 5 s
    #: interval fill 25 slots of 200 ms with about 8 each, at most 12-13 (with one draw some slot gets 17-19;
    #: before phases were kept apart, all 200 beat within 1 ms). The per-gap jitter (500 ms, 2.5 slots) keeps
    #: reshuffling who shares a slot. A gap is shortened by less than one step, never lengthened. The step is at
    #: most 4 % of the interval (``liveness.GRID_MAX_FRACTION``). Keep ``HeartbeatReactor.READ_DEFER`` at least
    #: this large, or each batch's replies wake the reactor again. Measured on a 2-core VM, 200 idle agents: no
    #: grid 34 wake-ups/s and ~1.4 % of a core, 100 ms 10/s and ~0.53 %, 200 ms 5/s and ~0.35 %
    #: (benchmarks/fault_matrix.py --idle-only).
    BEAT_GRID: float = 0.2
    RECV_BUFFER: int = 1536
    #: Datagrams read per readiness event before other clients get their turn.
    RECV_BATCH: int = 64

    def __init__(
        self,
        agent_id: str,
        server_url: str,
        aid_path: str,
        seed_password: str,
        *,
        auth_client: Optional[AuthClient] = None,
        reactor: Optional[HeartbeatReactor] = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Optional[Callable[[], float]] = None,
    ) -> None:
        """``rand``: the source of the client's jitter (``random.random`` by default; pass a seeded one to
        replay a run)."""
        self.agent_id = agent_id
        self.server_url = server_url.rstrip("/") if isinstance(server_url, str) else server_url
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.auth_client = auth_client or AuthClient(agent_id, self.server_url, aid_path, seed_password)
        # 0.1.99 attributes
        self.port = 0
        self.sign_cookie = 0
        self.udp_socket: Optional[socket.socket] = None
        self.local_ip = "0.0.0.0"
        self.local_port = 0
        self.server_ip = "127.0.0.1"
        self.heartbeat_interval = int(self.MIN_INTERVAL * 1000)
        self.is_running = False
        self.is_sending_heartbeat = False
        #: 0.1.99 had a send and a receive thread per client; both jobs now run on the shared reactor thread.
        self.send_thread: Optional[threading.Thread] = None
        self.receive_thread: Optional[threading.Thread] = None
        self.msg_seq = 0
        self.last_hb = 0
        self.message_listener: Optional[Callable[[InviteMessageReq], Any]] = None
        self.on_recv_invite: Optional[Callable[[InviteMessageReq], Any]] = None
        # new
        self.on_state_change: Optional[Callable[[str, str], Any]] = None
        #: Called with each :class:`~agentcp.heartbeat.liveness.Event` of the fault timeline (off-thread).
        self.on_event: Optional[Callable[[Event], Any]] = None
        self._clock = clock
        self._rand = rand or random.random
        #: (agent_id, sign_cookie, bytes before MessageSeq, bytes after it) of the HeartbeatReq datagram.
        self._beat_template: Optional[Tuple[str, int, bytes, bytes]] = None
        self._slack_for, self._slack = -1.0, 0.0
        self._reactor = reactor or HeartbeatReactor.shared()
        self._lock = threading.RLock()
        self._machine = self._new_machine()
        self._stop = threading.Event()
        self._halted_running = False  # halt() stopped a running client: offline() still has to leave the reactor
        self._online_event = threading.Event()
        self._server_addr: Optional[Tuple[str, int]] = None
        self._have_session = False
        self._sock_gen = 0
        self._worker: Optional[threading.Thread] = None
        self._callback_lane: Optional[Lane] = None  # this client's callbacks on the shared CALLBACKS threads
        self._extra = {"malformed": 0, "foreign": 0, "unknown_type": 0, "invites": 0, "callback_errors": 0,
                       "internal_errors": 0}
        self._report = FaultReporter(log, agent_id, HeartbeatError)

    # ------------------------------------------------------------------------------------------------------------
    # 0.1.99 API
    # ------------------------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Sign in to the heartbeat server (one attempt; ``online()`` keeps trying if it failed)."""
        self.sign_in()

    def sign_in(self) -> bool:
        """One HTTP sign-in; True if the server gave an address and a cookie (kept for the UDP beats)."""
        try:
            self._do_sign_in()
            return True
        except AuthError as exc:
            self._report.note("sign_in", f"heartbeat sign-in to {self.server_url} failed: {exc}", exc)
            return False

    def sign_out(self) -> None:
        """End the heartbeat session on the server (the next ``online()`` signs in again)."""
        with self._lock:
            self._have_session = False
        try:
            self.auth_client.sign_out()
        except Exception as exc:  # sign-out is best effort; a failure must not break shutdown
            log.warning("heartbeat sign-out for %s failed: %s", self.agent_id, exc)

    def set_on_recv_invite(self, listener: Optional[Callable[[InviteMessageReq], Any]]) -> None:
        """Call ``listener(InviteMessageReq)`` for each invite (on a callback thread, not the I/O thread)."""
        self.on_recv_invite = listener
        self.message_listener = listener

    def online(self) -> None:
        """Start heartbeating (returns at once; no-op if already running).

        If the client has no session yet (or ``initialize()`` failed) it signs in first, retrying with capped
        full-jitter backoff for as long as the client is online.
        """
        with self._lock:
            if self.is_running:
                return
            self._stop.clear()
            self._online_event.clear()
            self._machine = self._new_machine(self._machine)
            self.is_running = True
            self.is_sending_heartbeat = True
        try:
            self._reactor.call(self._reactor_start, wait=True)
        except OSError as exc:
            with self._lock:
                self.is_running = False
                self.is_sending_heartbeat = False
            self._reactor.call(self._reactor_stop, wait=True)
            self._reactor.join_stopped()
            raise HeartbeatError(f"cannot open the heartbeat UDP socket: {exc}") from exc

    def offline(self) -> None:
        """Stop: leave the I/O thread, join this client's threads, then close the socket. Idempotent.

        Safe to call from any thread, including a callback. No callback runs after it returns (unless it was
        called from that callback itself).
        """
        self.halt()
        with self._lock:
            was_running, self._halted_running = self._halted_running, False
        if was_running:
            self._reactor.call(self._reactor_stop, wait=True)
        current = threading.current_thread()
        with self._lock:
            worker = self._worker
        if worker is not None and worker is not current:
            if worker.is_alive():
                abort = getattr(self.auth_client, "abort", None)
                if abort is not None:
                    abort()  # wake a sign-in blocked on a slow server; it then sees the stop flag and changes nothing
            worker.join()
        self._stop_callback_thread(current)
        with self._lock:
            sock, self.udp_socket = self.udp_socket, None
            self._sock_gen += 1
        if sock is not None:
            self._close_socket(sock)
        self._reactor.join_stopped()
        if was_running:
            log.info("heartbeat for %s stopped", self.agent_id)

    def halt(self) -> None:
        """The non-blocking first half of :meth:`offline`: from now on no beat is sent and no queued callback
        runs (one already running finishes). :meth:`offline` completes the stop and joins the threads."""
        with self._lock:
            self._halted_running = self._halted_running or self.is_running
            self.is_running = False
            self.is_sending_heartbeat = False
            self._stop.set()
            self._machine.stop(self._clock())
            self._flush_state_changes()

    def get_online_status(self, aids) -> list:
        """Ask the heartbeat server which of ``aids`` are online; ``[]`` if that cannot be known (logged)."""
        try:
            reply = self.auth_client.post_json("/query_online_state", {"agents": aids})
        except SDKError as exc:
            self._report.note("online_status", f"query_online_state failed: {exc}", exc)
            return []
        data = reply.get("data") if isinstance(reply, dict) else None
        return data if isinstance(data, list) else []

    # ------------------------------------------------------------------------------------------------------------
    # New API
    # ------------------------------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``offline``, ``connecting``, ``online``, ``reconnecting`` or ``stopped``."""
        return self._machine.state.value

    def stats(self) -> Dict[str, Any]:
        """A consistent snapshot of counters and timings (seconds)."""
        with self._lock:
            snap = self._machine.snapshot(self._clock())
            snap.update(self._extra)
            snap["server_address"] = self._server_addr
            snap["local_port"] = self.local_port
            snap["server_auth"] = getattr(self.auth_client, "server_auth_state", None)
        return snap

    @property
    def history(self) -> List[Event]:
        """The recent fault timeline (faults, sign-ins, rebuilds, recoveries), oldest first."""
        with self._lock:
            return list(self._machine.history)

    def wait_online(self, timeout: Optional[float] = None) -> bool:
        """Block until the server has answered a beat (True) or ``timeout`` passes (False)."""
        return self._online_event.wait(timeout)

    def _rebuild_socket(self) -> None:
        """Close the current socket and bind a fresh one aimed at the current server address."""
        self._reactor.call(lambda: self._install_socket(self._make_socket(self._server_addr)), wait=True)
        self._reactor.join_stopped()  # called while offline, the call started a reactor thread that leaves at once

    # ------------------------------------------------------------------------------------------------------------
    # Reactor thread: everything below until "Sign-in worker" runs there
    # ------------------------------------------------------------------------------------------------------------
    def _timer_slack(self) -> float:
        interval = self._machine.interval
        if interval != self._slack_for:  # cached: the reactor asks on every wake-up near this client's timer
            self._slack_for, self._slack = interval, min(self.MAX_BEAT_SLACK, self.BEAT_SLACK * interval)
        return self._slack

    def _sign_in_health(self) -> SignInHealth:
        """Reactor thread: the process-wide record of sign-ins to this client's server URL (shared by agents)."""
        registry = self._reactor.sign_in_health
        health = registry.get(self.server_url)
        if health is None:
            if len(registry) >= 1024:  # bounded: forget the oldest server URL
                registry.pop(next(iter(registry)))
            health = registry[self.server_url] = SignInHealth(memory=2 * self.MIN_INTERVAL)
        return health

    def _peers_failing(self, now: float) -> bool:
        """Other agents' sign-ins to this server just failed (asked only while this one is due to sign in)."""
        return self._sign_in_health().failing(now)

    def _reactor_start(self) -> None:
        self._reactor.add_client(self)
        with self._lock:
            self._install_socket(self._make_socket(self._server_addr if self._have_session else None))
            self._machine.start(self._clock(), have_session=self._have_session)
            self._flush_state_changes()
        self._reactor.set_timer(self, self._clock())

    def _reactor_stop(self) -> None:
        with self._lock:
            if self.udp_socket is not None:
                self._reactor.unwatch(self.udp_socket)
        self._reactor.remove_client(self)

    def _reactor_timer(self, now: float) -> Optional[float]:
        """Carry out the machine's decisions until it says "wait"; return when to be called again."""
        with self._lock:
            return self._act(now)

    def _act(self, now: float) -> Optional[float]:
        """Lock held: :meth:`_reactor_timer`."""
        if not self.is_running:  # offline() began (set and cleared with _stop, under the lock)
            return None
        machine = self._machine
        slack = self._timer_slack()
        for _ in range(16):  # each action changes the machine; a handful always suffices
            decision = machine.poll(now, slack, machine.signing_in and self._peers_failing(now))
            action = decision.action
            if action is Action.NONE:
                if machine.has_news():
                    self._flush_state_changes()
                return decision.wake_at
            if action is Action.SEND_BEAT:
                wake = self._send_beat(now)
                if wake is not None:  # the machine only waits for the reply now
                    if machine.has_news():  # e.g. the miss that made this beat a re-probe
                        self._flush_state_changes()
                    return wake
            elif action is Action.REBUILD_SOCKET:
                machine.repair_started(now)
                self._repair_socket(now)
            else:
                machine.repair_started(now)
                self._start_sign_in_worker()
            now = self._clock()
        self._flush_state_changes()
        return now + 0.05  # never spin on a confused machine: look again shortly

    def _reactor_readable(self, sock: socket.socket, now: float) -> Optional[float]:
        """Read what arrived; return when to be called again.

        The usual datagram, a 14-byte HeartbeatResp from the server, ends the read: the selector is level
        triggered, so anything still queued wakes the loop again at once, and the common case costs one read
        instead of two (the second would only raise "would block"). ``now`` is the wake-up time.
        """
        # Connected to the current server address: the sender is known, so skip building an address per datagram.
        peer = getattr(sock, "peer", None)
        if peer is not None and peer != self._server_addr:
            peer = None
        for _ in range(self.RECV_BATCH):
            try:
                if peer is not None:
                    data, addr = sock.recv(self.RECV_BUFFER), peer
                else:
                    data, addr = sock.recvfrom(self.RECV_BUFFER)
            except BlockingIOError:
                break
            except OSError as exc:
                self._socket_error(sock, exc, "receive")
                break
            if len(data) == 14 and addr == self._server_addr:
                mask, seq, msg_type, _size, next_beat = _USUAL_REPLY.unpack(data)
                if msg_type == MSG_HEARTBEAT_RESP and mask < 0x80 and seq < 0x80:
                    with self._lock:
                        if sock is self.udp_socket and self.is_running:
                            wake = self._accept_reply(now, next_beat)
                            if wake is not None:
                                return wake  # nothing changed but the next beat's time: no need to ask again
                        return self._act(now)
            self._handle_datagram(data, addr, sock)
        return self._reactor_timer(self._clock())

    def _reactor_socket_dead(self, now: float, sock: Optional[socket.socket] = None) -> Optional[float]:
        """Our socket died (closed under us): rebuild now instead of at the next beat."""
        with self._lock:
            if sock is None or sock is self.udp_socket:
                self._machine.socket_failed(now)
        return self._reactor_timer(now)

    def _send_beat(self, now: float) -> Optional[float]:
        """Lock held. Returns the machine's next wake time if it needs no further question (else None)."""
        self.msg_seq += 1
        # Recorded before the send, so a reply can never be processed before its beat is known.
        wake = self._machine.beat_sent(now)
        self.last_hb = int(now * 1000)
        if not self._send(self._beat_bytes(self.msg_seq)):
            return None  # the send failed and the machine was told: ask it again
        return wake

    def _beat_bytes(self, seq: int) -> bytes:
        """The HeartbeatReq datagram. It is serialised once per (AID, cookie), split around MessageSeq (the
        second field, after the one-byte MessageMask 0): a beat only joins the two parts around its sequence."""
        template = self._beat_template
        if template is None or template[0] != self.agent_id or template[1] != self.sign_cookie:
            req = HeartbeatMessageReq()
            req.header.MessageSeq = 0
            req.AgentId = self.agent_id
            req.SignCookie = self.sign_cookie
            wire = to_bytes(req)
            template = self._beat_template = (self.agent_id, self.sign_cookie, wire[:1], wire[2:])
        if seq < 128:
            varint = _SMALL_VARINT[seq]
        elif seq < 16384:  # two uvarint bytes (the first 22 hours at one beat per 5 s)
            varint = bytes((0x80 | (seq & 0x7F), seq >> 7))
        else:
            varint = uint64_to_varint(seq)
        return template[2] + varint + template[3]

    def _send(self, data: bytes) -> bool:
        """Send on the current socket; False if that failed (and was reported to the machine)."""
        sock = self.udp_socket
        try:
            if sock is None:
                raise OSError(errno.EBADF, "no socket")
            sock.send(data)
        except BlockingIOError:
            pass  # the kernel buffer is full: this datagram is lost and the reply watchdog copes
        except OSError as exc:
            self._socket_error(sock, exc, "send")
            return False
        return True

    def _repair_socket(self, now: float) -> None:
        """Lock held: the socket failed; replace it (same server address) and probe at once."""
        try:
            self._install_socket(self._make_socket(self._server_addr))
        except OSError as exc:
            self._machine.rebuild_failed(now, str(exc))
            self._report.note("rebuild", f"cannot open a heartbeat socket for {self.agent_id}: {exc}", exc)
            return
        self._machine.socket_rebuilt(now)

    def _socket_error(self, sock: Optional[socket.socket], exc: OSError, where: str) -> None:
        unreachable = isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED
        with self._lock:
            if sock is not self.udp_socket or self._stop.is_set():
                return  # an error of a socket we already replaced
            self._machine.socket_failed(self._clock(), unreachable=unreachable)
        if not self._reactor.in_reactor_thread():  # e.g. an invite reply from the callback thread
            self._reactor.call(lambda: self._reactor.set_timer(self, self._reactor_timer(self._clock())))
        if unreachable:
            self._report.log_once("unreachable", logging.WARNING,
                           "heartbeat server %s:%s of %s is unreachable; signing in again",
                           self.server_ip, self.port, self.agent_id)
        else:
            self._report.note("socket", f"heartbeat {where} failed for {self.agent_id}: {exc}; rebuilding the socket",
                             exc)

    def _accept_reply(self, now: float, next_beat: int) -> Optional[float]:
        """Lock held: a HeartbeatResp arrived on the current socket from the server. Returns what
        :meth:`Liveness.reply` returns (the next beat's time, or None: ask the machine)."""
        machine = self._machine
        wake = machine.reply(now, next_beat)
        self.heartbeat_interval = int(machine.interval * 1000)
        return wake

    def _handle_datagram(self, data: bytes, addr: Tuple[str, int], sock: socket.socket) -> None:
        now = self._clock()
        expected = self._server_addr
        if expected is None or (addr[0], addr[1]) != expected:
            with self._lock:
                self._extra["foreign"] += 1
            self._report.log_once("foreign", logging.WARNING, "dropping datagram from %s:%s (not the heartbeat server)",
                           addr[0], addr[1])
            return
        try:
            msg_type = peek_message_type(data)
            if msg_type == MSG_HEARTBEAT_RESP:
                resp, _ = HeartbeatMessageResp.deserialize(data, 0)
                with self._lock:
                    if sock is not self.udp_socket:
                        return
                    self._accept_reply(now, resp.NextBeat)
                    self._flush_state_changes()
            elif msg_type == MSG_INVITE_REQ:
                invite, _ = InviteMessageReq.deserialize(data, 0)
                with self._lock:
                    self._extra["invites"] += 1
                self._dispatch(self._handle_invite, invite)
            else:
                with self._lock:
                    self._extra["unknown_type"] += 1
        except MalformedDatagram as exc:
            with self._lock:
                self._extra["malformed"] += 1
            self._report.log_once("malformed", logging.WARNING, "dropping malformed heartbeat datagram (%d bytes): %s "
                           "(further ones are only counted)", len(data), exc)

    # ------------------------------------------------------------------------------------------------------------
    # Sockets
    # ------------------------------------------------------------------------------------------------------------
    def _new_machine(self, previous: Optional[Liveness] = None) -> Liveness:
        floor = self.MIN_INTERVAL
        reconnect = self.RECONNECT_BACKOFF or Backoff(base=0.5 * floor, cap=1.9 * floor, floor=1.4 * floor)
        config = LivenessConfig(
            min_interval=floor,
            max_interval=self.MAX_INTERVAL,
            reply_timeout=self.REPLY_TIMEOUT,
            max_reply_timeout=max(self.REPLY_TIMEOUT, 3 * self.REPLY_TIMEOUT),
            max_misses=self.MAX_MISSES,
            max_probe_budget=self.MAX_PROBE_BUDGET,
            false_alarm=self.FALSE_ALARM,
            jitter=self.JITTER,
            first_beat_min=self.FIRST_BEAT_MIN,
            beat_grid=self.BEAT_GRID,
            reauth_spread=min(self.REAUTH_SPREAD, 0.1 * floor),
            blackout_probe=(0.3 * floor, 0.5 * floor),
            outage_defer=(0.2 * floor, 1.85 * floor),
            reconnect_backoff=reconnect,
            blackout_backoff=self.BLACKOUT_BACKOFF,
            permanent_backoff=self.PERMANENT_BACKOFF,
        )
        # One config object for all clients with the same settings: read on every beat and reply, a shared one
        # stays in the CPU cache (200 agents would each bring their own).
        shared = _SHARED_CONFIGS.get(repr(config))
        if shared is None:
            if len(_SHARED_CONFIGS) >= 64:  # bounded: settings changed many times (tests)
                _SHARED_CONFIGS.clear()
            shared = _SHARED_CONFIGS[repr(config)] = config
        # The reactor knows how many agents' timers are set to each grid instant: beats go to the emptier slots.
        machine = Liveness(shared, rand=self._rand, slot_load=self._reactor.due_at)
        if previous is not None:  # counters, the timeline and what was learnt of the path survive online() cycles
            machine.counters = previous.counters
            machine.loss, machine.srtt, machine.rttvar = previous.loss, previous.srtt, previous.rttvar
            machine.loss_samples = previous.loss_samples
            machine.history = previous.history
            machine.state = previous.state
        return machine

    def _make_socket(self, addr: Optional[Tuple[str, int]]) -> _OwnedSocket:
        sock = _OwnedSocket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.remember_identity()
            sock.bind((self.local_ip, 0))
            if addr is not None:
                # Connected: the kernel filters other senders and reports ICMP errors (server gone) to us.
                sock.connect(addr)
                sock.peer = addr
            sock.setblocking(False)
        except OSError:
            sock.owner_close()
            raise
        return sock

    def _install_socket(self, new: _OwnedSocket) -> None:
        """Reactor thread: swap in ``new``, watch it, and close the old one (in that order, so a reused
        descriptor number never confuses the selector)."""
        with self._lock:
            old = self.udp_socket
            if old is not None:
                self._reactor.unwatch(old)
            self._sock_gen += 1
            new._on_foreign_close = self._socket_closed_externally
            self.udp_socket = new
            self.local_port = new.getsockname()[1]
            self._reactor.watch(new, self)
        if old is not None:
            self._close_socket(old)

    @staticmethod
    def _close_socket(sock: socket.socket) -> None:
        try:
            if isinstance(sock, _OwnedSocket):
                sock.owner_close()
            else:
                sock.close()
        except OSError:
            pass  # the descriptor was already dead (closed behind Python's back): nothing left to release

    def _socket_closed_externally(self, sock: _OwnedSocket) -> None:
        """Any thread: somebody closed our socket under us. Heal on the reactor thread, at once."""
        if self._stop.is_set():
            return
        self._report.log_once("foreign_close", logging.WARNING,
                       "heartbeat socket of %s was closed by someone else; rebuilding", self.agent_id)

        def heal() -> None:
            self._reactor.unwatch(sock)
            self._reactor.set_timer(self, self._reactor_socket_dead(self._clock(), sock))

        self._reactor.call(heal)

    # ------------------------------------------------------------------------------------------------------------
    # Sign-in worker (the "send side" of a reconnect; never the I/O thread)
    # ------------------------------------------------------------------------------------------------------------
    def _start_sign_in_worker(self) -> None:
        """Lock held, reactor thread."""
        if self._worker is not None and self._worker.is_alive():
            return  # single flight
        if self._worker is not None:
            self._worker.join()  # finished: reap it before starting the next one
        self._worker = threading.Thread(target=self._sign_in_worker, name=f"agentcp-hb-signin-{self.agent_id}",
                                        daemon=True)
        self._worker.start()

    def _sign_in_worker(self) -> None:
        error: Optional[BaseException] = None
        try:
            self._do_sign_in()
        except AuthError as exc:
            error = exc
        except Exception as exc:  # an unexpected bug must not leave the client waiting forever
            error = exc
            with self._lock:
                self._extra["internal_errors"] += 1
            log.exception("unexpected error while signing %s in to the heartbeat server", self.agent_id)
        if self._stop.is_set():
            return
        self._reactor.call(lambda: self._reactor_sign_in_done(error))

    def _reactor_sign_in_done(self, error: Optional[BaseException]) -> None:
        now = self._clock()
        with self._lock:
            if self._stop.is_set():
                return
            if error is None:
                try:
                    self._install_socket(self._make_socket(self._server_addr))
                except OSError as exc:
                    self._machine.rebuild_failed(now, str(exc))
                    error = exc
                else:
                    self._machine.signed_in(now)
                    self._sign_in_health().record(now, ok=True)
            else:
                if not getattr(error, "permanent", False):
                    self._sign_in_health().record(now, ok=False)
                self._machine.sign_in_failed(
                    now, str(error), permanent=getattr(error, "permanent", False),
                    retry_after=getattr(error, "retry_after", 0.0) or 0.0,
                    # No HTTP status: the request got no answer at all (timeout, refused, unreachable).
                    network=isinstance(error, AuthError) and not getattr(error, "status", 0),
                )
            self._flush_state_changes()
        if error is not None:
            self._report.note("reconnect", f"heartbeat sign-in for {self.agent_id} failed (will retry): {error}",
                             error)
        self._reactor.set_timer(self, self._reactor_timer(now))

    def _do_sign_in(self) -> Tuple[str, int]:
        """One sign-in attempt; on success stores the new address and cookie. Raises AuthError."""
        reply = self.auth_client.sign_in_once()
        server_ip, port, cookie = self._parse_sign_in_reply(reply)
        try:
            infos = socket.getaddrinfo(server_ip, port, socket.AF_INET, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise TransientAuthError(f"cannot resolve heartbeat server address {server_ip!r}: {exc}") from exc
        addr = (str(infos[0][4][0]), int(infos[0][4][1]))
        with self._lock:
            self.server_ip, self.port, self.sign_cookie = server_ip, port, cookie
            self._server_addr = addr
            self._have_session = True
        log.info("heartbeat sign-in for %s ok: beating %s:%d", self.agent_id, addr[0], addr[1])
        return addr

    @staticmethod
    def _parse_sign_in_reply(reply: Any) -> Tuple[str, int, int]:
        """``(server_ip, port, sign_cookie)`` of a sign-in reply, strictly typed: a port of ``1.9`` or ``true``,
        or a server address with a NUL or other junk, is refused with an error naming the field."""
        if not isinstance(reply, dict):
            raise TransientAuthError("heartbeat sign-in reply is not a JSON object")
        try:
            server_ip = check_host(reply.get("server_ip"), field="heartbeat sign-in reply field 'server_ip'")
            port = check_port(reply.get("port"), field="heartbeat sign-in reply field 'port'")
        except InvalidNameError as exc:
            raise TransientAuthError(str(exc)) from None
        cookie = reply.get("sign_cookie")
        if isinstance(cookie, str) and cookie.isdigit() and cookie.isascii():
            cookie = int(cookie)
        if isinstance(cookie, bool) or not isinstance(cookie, int) or not 0 <= cookie < 2**64:
            raise TransientAuthError("heartbeat sign-in reply field 'sign_cookie' must be an integer 0..2^64-1")
        return server_ip, port, cookie

    # ------------------------------------------------------------------------------------------------------------
    # Callbacks, off the protocol threads
    # ------------------------------------------------------------------------------------------------------------
    def _dispatch(self, fn: Callable, *args: Any) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if self._callback_lane is None:
                self._callback_lane = CALLBACKS.lane()
            self._callback_lane.submit(self._run_callback, fn, args)

    def _run_callback(self, fn: Callable, args: Tuple[Any, ...]) -> None:
        """On a shared callback thread (this client's callbacks one at a time, in order)."""
        if self._stop.is_set():
            return  # offline(): drop what is queued, run no callback after it returns
        try:
            fn(*args)
        except Exception as exc:  # a user callback's bug must not kill the callback thread
            with self._lock:
                self._extra["callback_errors"] += 1
            self._report.note("callback", f"heartbeat callback {getattr(fn, '__name__', fn)!r} raised: {exc!r}",
                             exc, exc_info=True)

    def _stop_callback_thread(self, current: threading.Thread) -> None:
        with self._lock:
            # Detached at once: if offline() runs in a callback that then calls online(), the new callbacks go to a
            # new lane.
            lane, self._callback_lane = self._callback_lane, None
        if lane is not None:
            lane.close()  # waits for a running callback, unless offline() was called from it
        CALLBACKS.join_if_idle()  # no callback thread outlives the last client that had work for it

    def _handle_invite(self, invite: InviteMessageReq) -> None:
        listener = self.on_recv_invite
        try:
            if listener is not None:
                listener(invite)
        finally:
            self._send_invite_response(invite)  # always answered, even when the listener raised (D-H6)

    def _send_invite_response(self, invite: InviteMessageReq) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.msg_seq += 1
            resp = InviteMessageResp()
            resp.header.MessageSeq = self.msg_seq
            resp.AgentId = self.agent_id
            resp.InviterAgentId = invite.InviterAgentId
            resp.SessionId = invite.SessionId  # 0.1.99 left this empty (D-H18)
            resp.SignCookie = self.sign_cookie
            self._send(to_bytes(resp))

    def _flush_state_changes(self) -> None:
        """Lock held: turn the machine's state transitions and events into logs and callbacks."""
        for old, new in self._machine.take_state_changes():
            log.info("heartbeat %s: %s -> %s", self.agent_id, old.value, new.value)
            if new is State.ONLINE:  # only a reply makes the machine online
                self._online_event.set()
            else:
                self._online_event.clear()
            callback = self.on_state_change
            if callback is not None:
                self._dispatch(callback, old.value, new.value)  # dropped once offline() began
        events = self._machine.take_events()
        if self.on_event is not None:
            for event in events:
                self._dispatch(self.on_event, event)

    def __repr__(self) -> str:
        return f"HeartbeatClient({self.agent_id!r}, state={self.state})"
