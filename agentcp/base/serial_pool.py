"""Callbacks of many clients on a few shared threads, each client's in order (a "lane" per client).

The heartbeat client used to keep one thread per agent to run its callbacks (invites, state changes) off the
protocol thread, asleep nearly always. :class:`SerialPool` runs every lane's callbacks on up to ``max_workers``
shared threads that exist only while there is work (they end after ``linger`` idle seconds, or when
:meth:`SerialPool.join_if_idle` joins them): 50 idle agents hold no callback thread at all.

Guarantees, per :class:`Lane`: callbacks run one at a time in submission order; after :meth:`Lane.close` returns
none of its callbacks runs any more (it waits for one that is running, unless it is called from that callback);
a slow callback holds one worker, the other lanes go on on the others.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple

__all__ = ["SerialPool", "Lane"]

_log = logging.getLogger("agentcp.callbacks")


class Lane:
    """One client's queue of callbacks in a :class:`SerialPool`."""

    def __init__(self, pool: "SerialPool") -> None:
        self._pool = pool
        self._items: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = collections.deque()
        self._ready = False  # waiting in the pool's ready queue
        self._running: Optional[threading.Thread] = None
        self.closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)``; False (dropped) once the lane is closed."""
        return self._pool._submit(self, fn, args)

    def close(self) -> None:
        """Drop what is queued; wait for a running callback to return (unless called from it)."""
        self._pool._close(self)


class SerialPool:
    """Up to ``max_workers`` threads named ``<name>-<n>`` serving lanes round-robin, one callback at a time."""

    def __init__(self, name: str, max_workers: int = 4, linger: float = 1.0) -> None:
        self.name = name
        self.max_workers = max_workers
        self.linger = linger
        self._cond = threading.Condition()
        self._ready: Deque[Lane] = collections.deque()
        self._workers: List[threading.Thread] = []
        self._idle = 0
        self._running = 0
        self._finished: List[threading.Thread] = []
        self._leave_when_idle = 0
        self._seq = 0
        self.errors = 0

    def lane(self) -> Lane:
        return Lane(self)

    # --- lanes --------------------------------------------------------------------------------------------
    def _submit(self, lane: Lane, fn: Callable[..., Any], args: Tuple[Any, ...]) -> bool:
        with self._cond:
            if lane.closed:
                return False
            lane._items.append((fn, args))
            if not lane._ready and lane._running is None:
                lane._ready = True
                self._ready.append(lane)
                self._wake_worker_locked()
        return True

    def _close(self, lane: Lane) -> None:
        current = threading.current_thread()
        with self._cond:
            lane.closed = True
            lane._items.clear()
            while lane._running is not None and lane._running is not current:
                self._cond.wait()

    def _wake_worker_locked(self) -> None:
        if self._idle > 0:
            self._cond.notify_all()
        elif len(self._workers) < self.max_workers:
            self._seq += 1
            worker = threading.Thread(target=self._work, name=f"{self.name}-{self._seq}", daemon=True)
            self._workers.append(worker)
            worker.start()

    # --- workers ------------------------------------------------------------------------------------------
    def _take(self, me: threading.Thread) -> Optional[Tuple[Lane, Callable[..., Any], Tuple[Any, ...]]]:
        """Lock held: the next callback to run; None when this worker should end (idle)."""
        waited = False
        while True:
            while self._ready:
                lane = self._ready.popleft()
                lane._ready = False
                if lane.closed or not lane._items:
                    continue
                fn, args = lane._items.popleft()
                lane._running = me
                self._running += 1
                return lane, fn, args
            if waited or self._leave_when_idle:
                self._workers.remove(me)
                self._finished.append(me)
                self._cond.notify_all()
                return None
            self._idle += 1
            try:
                waited = not self._cond.wait(self.linger)
            finally:
                self._idle -= 1

    def _work(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    job = self._take(me)
                if job is None:
                    return
                self._run_job(*job)
        finally:
            with self._cond:  # also when a callback ended the thread (SystemExit): the pool starts another
                if me in self._workers:
                    self._workers.remove(me)
                    self._finished.append(me)
                    if self._ready:
                        self._wake_worker_locked()
                self._cond.notify_all()

    def _run_job(self, lane: Lane, fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        try:
            if not lane.closed:
                fn(*args)
        except Exception:  # the submitter reports its own errors; this is a last resort
            with self._cond:
                self.errors += 1
            _log.exception("callback %r failed", fn)
        finally:
            with self._cond:
                lane._running = None
                self._running -= 1
                if lane._items and not lane.closed:  # round-robin: the lane queues up again behind the others
                    lane._ready = True
                    self._ready.append(lane)
                self._cond.notify_all()

    def join_if_idle(self) -> bool:
        """End and join the workers if no callback is queued or running (other than the caller's own); True if
        no worker other than the caller is left."""
        current = threading.current_thread()
        with self._cond:
            others_running = self._running - (1 if current in self._workers else 0)
            if others_running > 0 or any(lane._items and not lane.closed for lane in self._ready):
                return False
            self._leave_when_idle += 1
            self._cond.notify_all()
            while any(w is not current for w in self._workers):
                if not self._cond.wait(5.0):
                    break
            self._leave_when_idle -= 1
            left = any(w is not current for w in self._workers)
            finished, self._finished = self._finished, []
        for worker in finished:
            if worker is not current:
                worker.join()
        return not left

    @property
    def workers(self) -> int:
        with self._cond:
            return len(self._workers)
