"""One process-wide timer thread for the per-agent chores that are due now and then (certificate renewal checks).

Every agent used to keep a thread of its own for these, asleep nearly always. :class:`SharedTimer` runs them all on
one thread: ``call_at(when, fn)`` runs ``fn()`` at monotonic time ``when`` (a :class:`TimerHandle` cancels it). The
thread starts with the first entry and ends when none is left; :meth:`SharedTimer.join_if_idle` (``offline()`` of
the last agent) joins it, so no thread of ours outlives the agents.

Callbacks run one after the other on that thread: they must be short (a slow one delays the others, never loses
them); an exception is logged and counted, the thread goes on.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["SharedTimer", "TimerHandle", "TIMER"]

_log = logging.getLogger("agentcp.timer")


class TimerHandle:
    """One scheduled call; :meth:`cancel` it (idempotent) to drop it if it has not run yet."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], Any]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SharedTimer:
    """A heap of ``(when, fn)`` served by one thread that exists only while something is scheduled."""

    def __init__(self, name: str = "agentcp-timer", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._live = 0  # entries not cancelled
        self._thread: Optional[threading.Thread] = None
        self._finished: List[threading.Thread] = []
        self.errors = 0
        self.calls = 0

    def call_at(self, when: float, fn: Callable[[], Any]) -> TimerHandle:
        """Run ``fn()`` on the timer thread at monotonic time ``when``."""
        handle = TimerHandle(when, fn)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        return handle

    def call_later(self, delay: float, fn: Callable[[], Any]) -> TimerHandle:
        return self.call_at(self._clock() + delay, fn)

    def cancel(self, handle: Optional[TimerHandle]) -> None:
        """Drop ``handle`` if it has not run; the thread ends once no live entry is left."""
        if handle is None:
            return
        with self._cond:
            if not handle.cancelled:
                handle.cancelled = True
                self._live -= 1
                self._cond.notify()

    def _next(self, me: threading.Thread) -> Optional[TimerHandle]:
        """Lock held: the next due entry (waiting for it); None when nothing is scheduled (the thread ends)."""
        while True:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if not self._heap:
                self._thread = None
                self._finished.append(me)
                self._cond.notify_all()
                return None
            when, _, handle = self._heap[0]
            now = self._clock()
            if when <= now:
                heapq.heappop(self._heap)
                handle.cancelled = True  # ran (or runs now): a later cancel() must not count it again
                self._live -= 1
                return handle
            self._cond.wait(min(when - now, 3600.0))  # capped: a far or infinite time is not a valid timeout

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    handle = self._next(me)
                if handle is None:
                    return
                try:
                    handle.fn()
                except Exception:  # one agent's chore must not stop the others'
                    with self._cond:
                        self.errors += 1
                    _log.exception("scheduled call %r failed", handle.fn)
                with self._cond:
                    self.calls += 1
        finally:
            with self._cond:  # also when a call ended the thread (SystemExit): the next call_at starts a new one
                if self._thread is me:
                    self._thread = None
                    self._finished.append(me)
                    self._cond.notify_all()

    def join_if_idle(self) -> bool:
        """Join the thread if nothing live is scheduled (it then ends at once); True if no thread runs now."""
        current = threading.current_thread()
        with self._cond:
            if self._live > 0:
                return False
            self._cond.notify_all()
            while self._thread is not None and self._thread is not current:
                self._cond.wait(1.0)
            finished, self._finished = self._finished, []
        for thread in finished:
            if thread is not current:
                thread.join()
        return True

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            return {"scheduled": self._live, "running": self._thread is not None, "calls": self.calls,
                    "errors": self.errors}


#: The process-wide timer.
TIMER = SharedTimer()
