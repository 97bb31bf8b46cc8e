"""One I/O thread for every message connection of the process (:class:`WsReactor`).

0.1.99 held two threads per agent for its message connection (a reader and a writer), and so did we. Here every
agent's message connection is a non-blocking socket registered with one selector on one thread
(``agentcp-ws``); timers (pings, reconnects, deadlines) live in one heap on the same thread. Threads per process
stay flat as agents are added.

Rules:

* The thread exists while at least one client holds the reactor (:meth:`WsReactor.acquire`); the last
  :meth:`WsReactor.release` ends and joins it (a release on the reactor thread itself cannot join it: the next
  acquire or release does).
* :meth:`call_soon` is the only entry from other threads. Everything else (:meth:`call_at`, :meth:`register`,
  ...) runs on the reactor thread. A wake-up byte is written only when the loop is not already due to run the
  queued calls, so a burst of sends costs one system call, not one each.
* A callback that raises is counted and logged once with context and handed to its handler's ``fail`` (when it
  has one); the loop never dies with it.
"""
from __future__ import annotations

import heapq
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from agentcp.base.shared_timer import TimerHandle  # the same handle as the shared timer's (cancel: skipped when due)

__all__ = ["WsReactor", "TimerHandle", "reactor"]

log = logging.getLogger("agentcp.msg")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class _Run:
    """What one life of the reactor thread owns: its selector and its wake-up socket pair."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, EVENT_READ, None)

    def close(self) -> None:
        try:
            self.selector.close()
        finally:
            self.wake_r.close()
            self.wake_w.close()


class WsReactor:
    """The per-process reactor of the message connections (see the module docstring)."""

    def __init__(self, name: str = "agentcp-ws", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._timers: List[Tuple[float, int, TimerHandle]] = []
        self._seq = 0
        self._users = 0
        self._thread: Optional[threading.Thread] = None
        self._ended: List[threading.Thread] = []  # threads that ended on their own, joined later
        self._run: Optional[_Run] = None
        self._woken = False  # a wake-up byte is pending, or the loop is about to run the calls anyway
        self.counters: Dict[str, int] = {"wakeups": 0, "callback_errors": 0, "threads_started": 0}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the reactor (its thread runs while anyone holds it)."""
        with self._lock:
            self._users += 1
            ended, self._ended = self._ended, []
            if self._thread is None:
                self._run = _Run()
                self._woken = False
                self._thread = threading.Thread(target=self._loop, args=(self._run,), name=self.name, daemon=True)
                self.counters["threads_started"] += 1
                self._thread.start()
        self._join(ended)

    def release(self) -> None:
        """Let go of the reactor; the last one ends its thread (and joins it, unless on it)."""
        with self._lock:
            self._users = max(0, self._users - 1)
            thread = self._thread if self._users == 0 else None
            ended, self._ended = self._ended, []
            self._wake_locked()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._join(ended)

    @staticmethod
    def _join(threads: List[threading.Thread]) -> None:
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join()

    def in_reactor(self) -> bool:
        """True on the reactor thread."""
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def users(self) -> int:
        return self._users

    # -- calls from any thread ---------------------------------------------------------------------------------
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the reactor thread soon (in order); False if no thread runs (nothing queued)."""
        with self._lock:
            if self._thread is None:
                return False
            self._calls.append((fn, args))
            self._wake_locked()
        return True

    def _wake_locked(self) -> None:
        if self._woken or self._run is None:
            return
        self._woken = True
        try:
            self._run.wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full of wake-ups already: the loop will wake
        except OSError:
            log.debug("reactor wake-up failed", exc_info=True)

    # -- reactor thread only -----------------------------------------------------------------------------------
    def call_at(self, when: float, fn: Callable[[], Any]) -> TimerHandle:
        """Run ``fn()`` on the reactor thread at monotonic time ``when`` (reactor thread only)."""
        handle = TimerHandle(when, fn)
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, handle))
        return handle

    def register(self, sock: Any, events: int, handler: Any) -> None:
        """Watch ``sock``; ``handler.on_readable()`` / ``handler.on_writable()`` are called when it is ready."""
        run = self._run
        assert run is not None
        run.selector.register(sock, events, handler)

    def modify(self, sock: Any, events: int, handler: Any) -> None:
        run = self._run
        assert run is not None
        run.selector.modify(sock, events, handler)

    def unregister(self, sock: Any) -> None:
        run = self._run
        if run is None:
            return
        try:
            run.selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass  # not registered (or already closed): nothing to undo

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self, run: _Run) -> None:
        selector = run.selector
        try:
            while True:
                with self._lock:
                    calls = self._calls
                    self._calls = deque()
                    self._woken = False
                    if not calls and self._users == 0:
                        self._finish_locked()
                        return
                for fn, args in calls:
                    self._guarded(fn, args, None)
                timeout = self._run_timers()
                with self._lock:
                    if self._calls or self._users == 0:
                        continue  # queued meanwhile (or time to end): no sleep
                try:
                    events = selector.select(timeout)
                except (OSError, ValueError) as exc:
                    # A socket closed while still registered (a bug somewhere): forget it, never spin on it.
                    self.counters["callback_errors"] += 1
                    log.error("message reactor: select failed (%r); dropping closed sockets", exc)
                    self._purge_closed(selector)
                    continue
                self.counters["wakeups"] += 1
                for key, mask in events:
                    handler = key.data
                    if handler is None:
                        self._drain_wake(run)
                        continue
                    if mask & EVENT_READ:
                        self._guarded(handler.on_readable, (), handler)
                    # Only if the read side did not close or re-register it meanwhile.
                    if mask & EVENT_WRITE and getattr(handler, "watching", EVENT_WRITE) & EVENT_WRITE:
                        self._guarded(handler.on_writable, (), handler)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._finish_locked()
            run.close()

    def _finish_locked(self) -> None:
        thread = self._thread
        self._thread = None
        self._run = None
        self._timers = []
        if thread is not None:
            self._ended.append(thread)  # joined by the next acquire/release (never by itself)

    def _run_timers(self) -> Optional[float]:
        timers = self._timers
        now = self.clock()
        while timers:
            when, _seq, handle = timers[0]
            if handle.cancelled:
                heapq.heappop(timers)
                continue
            if when > now:
                return when - now
            heapq.heappop(timers)
            self._guarded(handle.fn, (), None)
            now = self.clock()
        return None

    @staticmethod
    def _purge_closed(selector: selectors.BaseSelector) -> None:
        for key in list(selector.get_map().values()):
            try:
                closed = key.fileobj.fileno() < 0  # type: ignore[union-attr]
            except (OSError, ValueError, AttributeError):
                closed = True
            if closed:
                try:
                    selector.unregister(key.fd)
                except (KeyError, ValueError, OSError):
                    pass  # gone already
                fail = getattr(key.data, "fail", None)
                if fail is not None:
                    fail("internal error: socket closed while registered")

    @staticmethod
    def _drain_wake(run: _Run) -> None:
        try:
            while run.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _guarded(self, fn: Callable[..., Any], args: Tuple[Any, ...], handler: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # one connection's bug must not stop every agent's messaging
            self.counters["callback_errors"] += 1
            log.error("message reactor: %r failed: %r", fn, exc, exc_info=True)
            fail = getattr(handler, "fail", None)
            if fail is not None:
                try:
                    fail(f"internal error: {type(exc).__name__}")
                except Exception:  # the handler's own recovery failed: logged, the loop goes on
                    log.exception("message reactor: recovery after %r failed", fn)


_REACTOR: Optional[WsReactor] = None
_REACTOR_LOCK = threading.Lock()


def reactor() -> WsReactor:
    """The process-wide reactor of the message connections."""
    global _REACTOR
    with _REACTOR_LOCK:
        if _REACTOR is None:
            _REACTOR = WsReactor()
        return _REACTOR
