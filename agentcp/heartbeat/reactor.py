"""One I/O thread for every heartbeat client of the process.

Why: a process may run hundreds of agents, and each timed wake-up of a thread costs real CPU (about 150 µs on a
small VM). With two threads per client, 200 idle agents cost ~2 % of a core. The reactor owns a single selector
thread that sends every client's beats and reads every client's replies; timers that fall due within a client's
slack (a few milliseconds) fire together. Timers live in a heap, so a wake-up costs O(log n), not O(n), however
many clients the process runs: with each agent keeping its own beat phase, wake-ups are per beat. Two things keep
a big fleet cheap without moving any beat: clients draw their beat times on a shared grid (``BEAT_GRID`` of
:class:`~agentcp.heartbeat.heartbeat_client.HeartbeatClient`), so agents sharing a slot are due at the same
instant; and replies are read at the next timer's wake-up when that is near (``READ_DEFER``), so they do not
wake the thread on their own. Blocking work (HTTP sign-in) never runs here: clients hand it to a short-lived
worker thread of their own.

The thread starts with the first registered client and stops when the last one leaves; the caller that removed
the last client joins it, so an idle process keeps no heartbeat thread. All selector and timer state is touched
only on the reactor thread; other threads talk to it through :meth:`HeartbeatReactor.call`.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple

log = logging.getLogger("agentcp.heartbeat")

__all__ = ["HeartbeatReactor", "ReactorClient"]


class ReactorClient(Protocol):
    """What the reactor needs from a client (all called on the reactor thread)."""

    def _reactor_timer(self, now: float) -> Optional[float]:
        """Timer due: act, and return the next wake time (None: no timer)."""

    def _reactor_readable(self, sock: socket.socket, now: float) -> Optional[float]:
        """The client's socket is readable: drain it, and return the next wake time."""

    def _timer_slack(self) -> float:
        """How early a timer of this client may fire (so neighbouring timers coalesce)."""


class HeartbeatReactor:
    """A selector loop with per-client timers, shared by all :class:`HeartbeatClient` objects."""

    _shared: Optional["HeartbeatReactor"] = None
    #: Upper bound of any client's timer slack (seconds).
    MAX_SLACK: float = 0.05
    #: Reads wait for a timer due within this many seconds (0: never). Why: in a process with many agents the
    #: replies of one batch of beats would each wake the thread again (a cold wake-up costs several times the
    #: work of the reply); read at the next timer's wake-up instead, they share it with that batch's beats.
    #: Every datagram that arrived is read before any timer runs (so a reply in time is never a miss), commands
    #: (offline, rebuild, a socket closed under a client) never wait, and with no timer that close (a process
    #: with few agents) sockets wake the thread at once. The cost: an invite or a reply may be read up to this
    #: late, and a round-trip time measured from it is that much longer (far below the 1 s reply timeout).
    READ_DEFER: float = 0.2
    #: Passes over the ready sockets when the deferred reads are done (each pass reads one datagram per socket).
    DRAIN_PASSES: int = 16
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "HeartbeatReactor":
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "agentcp-hb-reactor") -> None:
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        #: Notified when the thread leaves, a command is queued or a client is added (see :meth:`join_stopped`).
        self._changed = threading.Condition(self._lock)
        self._commands: Deque[Tuple[Callable[[], Any], Optional[threading.Event], list]] = deque()
        self._thread: Optional[threading.Thread] = None
        self._stopped_threads: list = []
        self._wake_w: Optional[socket.socket] = None
        # Reactor-thread state:
        self._selector: Optional[selectors.BaseSelector] = None
        self._quiet: Optional[selectors.BaseSelector] = None  # the wake socket only: sleeps that defer reads
        self._wake_r: Optional[socket.socket] = None
        self._timers: Dict[Any, float] = {}  # client -> its one timer
        self._due: Dict[float, int] = {}  # timer instant -> how many clients' timers are set to it
        self._heap: List[Tuple[float, int, Any]] = []  # (at, tie-breaker, client); stale entries skipped lazily
        self._seq = itertools.count()
        self.clients: set = set()
        #: Server URL -> SignInHealth shared by this reactor's clients (reactor thread only; see HeartbeatClient).
        self.sign_in_health: Dict[str, Any] = {}
        self.wakeups = 0
        self.errors = 0

    # ----------------------------------------------------------------------------------------------------------
    # Any thread
    # ----------------------------------------------------------------------------------------------------------
    def in_reactor_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], Any], wait: bool = False) -> Any:
        """Run ``fn()`` on the reactor thread (starting it if needed); with ``wait`` block for its result."""
        if self.in_reactor_thread():
            return fn()
        done = threading.Event() if wait else None
        box: list = []
        with self._lock:
            self._commands.append((fn, done, box))
            self._changed.notify_all()
            if self._thread is None:
                self._start_locked()
            else:
                self._poke_locked()
        if done is None:
            return None
        done.wait()
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def join_stopped(self) -> None:
        """Join the reactor thread if no client is left: it leaves no thread behind.

        The thread leaves right after running its last client's removal, so this waits for that unless another
        client or command keeps it busy (then it is not idle and stays).
        """
        current = threading.current_thread()
        with self._lock:
            while (self._thread is not None and self._thread is not current
                   and not self.clients and not self._commands):
                self._changed.wait()
            threads, self._stopped_threads = self._stopped_threads, []
        for thread in threads:
            if thread is not current:
                thread.join()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def _start_locked(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._quiet = selectors.DefaultSelector()
        self._quiet.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _poke_locked(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # already poked (pipe full) or closing: the loop will look at its commands anyway

    # ----------------------------------------------------------------------------------------------------------
    # Reactor thread only (called from commands and client callbacks)
    # ----------------------------------------------------------------------------------------------------------
    def watch(self, sock: socket.socket, client: Any) -> None:
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, client)

    def unwatch(self, sock: Any) -> None:
        if self._selector is None:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass  # never registered, or already gone with its descriptor

    def set_timer(self, client: Any, at: Optional[float]) -> None:
        timers = self._timers
        old = timers.get(client)
        if at is None or client not in self.clients:
            if old is not None:
                del timers[client]
                self._uncount(old)
        elif old != at:
            timers[client] = at
            if old is not None:
                self._uncount(old)
            due = self._due
            due[at] = due.get(at, 0) + 1
            heapq.heappush(self._heap, (at, next(self._seq), client))

    def due_at(self, at: float) -> int:
        """How many clients' timers are set to exactly ``at`` (a beat-grid instant: how crowded that slot is)."""
        return self._due.get(at, 0)

    def _uncount(self, at: float) -> None:
        due = self._due
        left = due[at] - 1
        if left:
            due[at] = left
        else:
            del due[at]

    def _earliest_timer(self) -> Optional[float]:
        """The earliest live timer (stale heap entries, of timers since changed or removed, are dropped)."""
        heap, timers = self._heap, self._timers
        while heap:
            at, _, client = heap[0]
            if timers.get(client) == at:
                return at
            heapq.heappop(heap)
        return None

    def _take_due(self, now: float) -> List[Any]:
        """Remove and return the clients whose timer is due, each allowed its own (small) slack."""
        heap, timers = self._heap, self._timers
        due: List[Any] = []
        keep: List[Tuple[float, int, Any]] = []
        horizon = now + self.MAX_SLACK
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            at, _, client = entry
            if timers.get(client) != at:
                continue  # stale
            if at <= now + min(self.MAX_SLACK, client._timer_slack()):
                del timers[client]
                self._uncount(at)
                due.append(client)
            else:
                keep.append(entry)
        for entry in keep:
            heapq.heappush(heap, entry)
        return due

    def add_client(self, client: Any) -> None:
        with self._lock:
            self.clients.add(client)
            self._changed.notify_all()

    def remove_client(self, client: Any) -> None:
        self.clients.discard(client)
        at = self._timers.pop(client, None)
        if at is not None:
            self._uncount(at)

    # ----------------------------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------------------------
    def _run_commands(self) -> None:
        if not self._commands:
            return  # fast path, unlocked: a command queued meanwhile also pokes the wake socket, so it is not missed
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn, done, box = self._commands.popleft()
            try:
                box.append(fn())
            except Exception as exc:  # reported to a waiting caller; logged otherwise
                box.append(exc)
                if done is None:
                    self.errors += 1
                    log.exception("heartbeat reactor command failed")
            finally:
                if done is not None:
                    done.set()

    def _exit_if_idle(self) -> bool:
        if self.clients:
            return False  # fast path, unlocked: only this thread removes clients, so a busy reactor stays busy
        with self._lock:
            if self.clients or self._commands:
                return False
            # Last client gone: release everything; the next call() starts a fresh thread.
            # Cleared under the lock: once it is released a new thread may start and set timers of its own.
            self._timers.clear()
            self._due.clear()
            self._heap.clear()
            self._stopped_threads.append(self._thread)
            self._thread = None
            selector, quiet, wake_r, wake_w = self._selector, self._quiet, self._wake_r, self._wake_w
            self._selector = self._quiet = self._wake_r = self._wake_w = None
            self._changed.notify_all()
        for sel in (selector, quiet):
            if sel is not None:
                sel.close()
        for s in (wake_r, wake_w):
            if s is not None:
                s.close()
        return True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r is not None and self._wake_r.recv(512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        clock, heap = self._clock, self._heap
        while True:
            self._run_commands()
            if self._exit_if_idle():
                return
            timeout = None
            earliest = self._earliest_timer()
            if earliest is not None:
                timeout = max(0.0, earliest - clock())
            selector = self._selector
            assert selector is not None and self._quiet is not None
            try:
                if timeout is not None and 0.0 < timeout <= self.READ_DEFER:
                    self._quiet.select(timeout)  # only a command wakes us early: reads wait for the timer
                    self.wakeups += 1
                    self._drain(selector, clock())
                else:
                    events = selector.select(timeout)
                    self.wakeups += 1
                    if events:
                        self._dispatch(events, clock())
            except (OSError, ValueError) as exc:
                # A watched descriptor died behind our back; drop dead keys and carry on.
                self._prune_dead(exc)
                continue
            now = clock()
            if heap and heap[0][0] <= now + self.MAX_SLACK:
                for client in self._take_due(now):
                    self._guard(client, client._reactor_timer, now)

    def _dispatch(self, events: List[Tuple[selectors.SelectorKey, int]], now: float) -> None:
        """Hand each ready socket to its client (one datagram at least; the usual reply alone)."""
        guard = self._guard
        for key, _mask in events:
            client = key.data
            if client is None:
                self._drain_wake()
            else:
                guard(client, client._reactor_readable, key.fileobj, now)

    def _drain(self, selector: selectors.BaseSelector, now: float) -> None:
        """Deferred reads: read what is ready, pass after pass, until nothing is (bounded by DRAIN_PASSES)."""
        for _ in range(self.DRAIN_PASSES):
            events = selector.select(0)
            if not events:
                return
            self._dispatch(events, now)

    def _guard(self, client: Any, fn: Callable[..., Optional[float]], *args: Any) -> None:
        """Run a client callback, ``fn(*args)``; a bug in one client must not stop the others."""
        if client not in self.clients:
            return
        try:
            self.set_timer(client, fn(*args))
        except Exception:
            self.errors += 1
            log.exception("heartbeat client %r failed in the reactor; retrying in 1 s", client)
            self.set_timer(client, self._clock() + 1.0)

    def _prune_dead(self, exc: BaseException) -> None:
        if self._selector is None:
            return
        for key in list(self._selector.get_map().values()):
            sock = key.fileobj
            if getattr(sock, "fileno", lambda: -1)() < 0:
                self.unwatch(sock)
                client = key.data
                if client is not None and client in self.clients:
                    self._guard(client, client._reactor_socket_dead, self._clock())
        log.debug("heartbeat reactor select failed (%s); pruned dead sockets", exc)
