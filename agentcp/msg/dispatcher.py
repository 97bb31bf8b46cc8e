"""Runs message handlers off the protocol threads: per-session order, sync and async handlers, clean shutdown.

* Work is queued per key (the session id): one key's items run one after the other, in arrival order; different
  keys run concurrently on up to ``workers`` threads (started on first use).
* Coroutine handlers run on one dedicated asyncio loop thread (not a new loop per message). Work submitted as a
  coroutine (``submit(..., coroutine=True)``) runs there directly, as a task, without a worker thread in between
  (one thread switch less per message); per-key order holds across both kinds (a key's next item starts when its
  previous one, of either kind, has finished). A sync worker that calls a coroutine handler waits for it (bounded
  by ``handler_timeout``).
* A handler that raises is reported (log + :class:`~agentcp.context.ErrorContext`), is called once, and never
  stops dispatching.
* :meth:`Dispatcher.stop`: nothing new starts, queued work is dropped, every thread is joined (by a reaper thread
  when a handler itself calls it, so it never waits for itself).
* The backlog (work queued or running) is bounded by ``backlog_messages`` items and ``backlog_bytes`` (the sizes
  the producer declares). :meth:`submit` never blocks and never drops; the producer asks :meth:`wait_for_room`
  first and stops reading its source while there is none (back-pressure, trust.md rule 4).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Set, Tuple

from agentcp.base.reporting import publish
from agentcp.context.exceptions import SDKError

log = logging.getLogger("agentcp.msg")

__all__ = ["Dispatcher", "HandlerError", "call_arity"]


class HandlerError(SDKError):
    """A message handler raised (reported; the handler is not called again for that message)."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1301) -> None:
        super().__init__(message, trace_id, code)


def call_arity(handler: Callable[..., Any]) -> Optional[int]:
    """Positional parameters the handler takes (bound ``self`` excluded); None if it cannot be told."""
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return None
    count = 0
    for param in sig.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            count += 1
        elif param.kind is param.VAR_POSITIONAL:
            return -1
    return count


def is_coroutine_handler(handler: Callable[..., Any]) -> bool:
    target: Any = handler
    for _ in range(8):  # functools.wraps chains
        if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__):  # async __call__
            return True
        target = getattr(target, "__wrapped__", None)
        if target is None:
            return False
    return False


class Dispatcher:
    """Keyed serial executor for handler calls (see the module docstring)."""

    def __init__(self, name: str, workers: int = 4, handler_timeout: float = 60.0,
                 agent_id: str = "", *, backlog_messages: Optional[int] = None,
                 backlog_bytes: Optional[int] = None) -> None:
        self.name = name
        self.agent_id = agent_id
        self.max_workers = max(1, int(workers))
        self.handler_timeout = handler_timeout
        #: Bounds of the backlog (None: unbounded), see :meth:`wait_for_room`.
        self.backlog_messages = backlog_messages
        self.backlog_bytes = backlog_bytes
        mutex = threading.Lock()
        self._lock = threading.Condition(mutex)  # workers wait on it for work
        self._room = threading.Condition(mutex)  # producers wait on it for room in the backlog
        self._pending = 0  # items queued or running
        self._pending_bytes = 0
        # Per key: (work, size, coroutine) in arrival order; ``coroutine``: ``work()`` returns an awaitable that runs
        # on the loop (no worker thread).
        self._queues: Dict[Hashable, Deque[Tuple[Callable[[], Any], int, bool]]] = {}
        self._async_running = 0  # coroutine items started on the loop and not finished
        self._async_done = threading.Condition(mutex)
        self._ready: Deque[Hashable] = deque()
        self._busy: Set[Hashable] = set()
        self._threads: List[threading.Thread] = []
        self._stopped = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._reaper: Optional[threading.Thread] = None
        self._logged: Set[str] = set()
        self._room_callbacks: List[Callable[[], Any]] = []  # one-shot, see when_room()
        self.counters: Dict[str, int] = {"dispatched": 0, "handler_errors": 0, "timeouts": 0, "dropped": 0,
                                         "backlog_peak": 0, "backlog_full": 0}

    # -- public -------------------------------------------------------------------------------------------------
    def submit(self, key: Hashable, work: Callable[[], Any], size: int = 0, *, coroutine: bool = False) -> bool:
        """Queue ``work`` behind earlier work of ``key``; False once stopped. ``size``: bytes it holds (counted
        in the backlog until it has run). ``coroutine``: ``work()`` returns an awaitable, run on the event loop
        thread (bounded by ``handler_timeout``). Never blocks: bounded producers ask :meth:`wait_for_room` or
        :meth:`when_room` first."""
        if coroutine:
            self._ensure_loop()
        with self._lock:
            if self._stopped:
                return False
            queue_ = self._queues.get(key)
            if queue_ is None:
                queue_ = self._queues[key] = deque()
            queue_.append((work, size, coroutine))
            self._pending += 1
            self._pending_bytes += size
            if self._pending > self.counters["backlog_peak"]:
                self.counters["backlog_peak"] = self._pending
            if key not in self._busy and len(queue_) == 1:
                self._schedule_locked(key)
        return True

    def _schedule_locked(self, key: Hashable) -> None:
        """Lock held; ``key`` is idle and has work: its next item goes to the loop (a coroutine) or a worker."""
        queue_ = self._queues[key]
        work, size, coroutine = queue_[0]
        loop = self._loop
        if coroutine and loop is not None and not loop.is_closed():
            queue_.popleft()
            self._busy.add(key)
            self._async_running += 1
            try:
                loop.call_soon_threadsafe(self._start_async, key, work, size)
                return
            except RuntimeError:  # the loop closed meanwhile (stopping): a worker runs it instead
                self._busy.discard(key)
                self._async_running -= 1
                queue_.appendleft((work, size, False))
        self._ready.append(key)
        if len(self._threads) < self.max_workers and len(self._ready) > self._idle_workers():
            self._start_worker()
        self._lock.notify()

    def _start_async(self, key: Hashable, work: Callable[[], Any], size: int) -> None:
        """On the loop: run one coroutine item of ``key`` as a task, cancelled if it overruns (one task and one
        timer per item: ``asyncio.wait_for`` would add a task of its own)."""
        loop = asyncio.get_running_loop()
        try:
            task = loop.create_task(work())
        except Exception as exc:  # the work could not even start: a bug in the submitter
            log.exception("%s: dispatch failed: %r", self.name, exc)
            self._finished(key, size, coroutine=True)
            return
        timer = loop.call_later(self.handler_timeout, self._overrun, task, key)
        task.add_done_callback(lambda done: self._async_finished(done, timer, key, size))

    def _overrun(self, task: "asyncio.Task[Any]", key: Hashable) -> None:
        if task.done():
            return
        with self._lock:
            self.counters["timeouts"] += 1
        log.warning("%s: work of %r still running after %.0f s; cancelled", self.name, key,
                    self.handler_timeout)
        task.cancel()

    def _async_finished(self, task: "asyncio.Task[Any]", timer: asyncio.TimerHandle, key: Hashable,
                        size: int) -> None:
        timer.cancel()
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:  # the work reports handler errors itself; this is a bug in it
                log.error("%s: dispatch failed: %r", self.name, exc, exc_info=exc)
        self._finished(key, size, coroutine=True)

    def _finished(self, key: Hashable, size: int, coroutine: bool = False) -> None:
        """One item of ``key`` is done (either kind): account for it and start the key's next item."""
        with self._lock:
            self.counters["dispatched"] += 1
            self._pending -= 1
            self._pending_bytes -= size
            self._room.notify_all()
            callbacks = self._take_room_callbacks()
            self._busy.discard(key)
            if coroutine:
                self._async_running -= 1
                self._async_done.notify_all()
            queue_ = self._queues.get(key)
            if queue_ and not self._stopped:
                self._schedule_locked(key)
            elif queue_ is not None and not queue_:
                del self._queues[key]
        if callbacks:
            self._call_room_callbacks(callbacks)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _has_room(self) -> bool:
        if self._stopped:
            return True  # nothing will be queued any more: the producer must not wait for it
        if self.backlog_messages is not None and self._pending >= self.backlog_messages:
            return False
        return self.backlog_bytes is None or self._pending_bytes < self.backlog_bytes

    def wait_for_room(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` until the backlog is below its bounds (or the dispatcher stopped); True if so."""
        with self._room:
            if self._has_room():
                return True
            self.counters["backlog_full"] += 1
            return self._room.wait_for(self._has_room, timeout)

    def when_room(self, callback: Callable[[], Any]) -> bool:
        """True if the backlog has room now. Otherwise False, and ``callback()`` is called once (on the thread
        that frees the room, or at :meth:`halt`) when it has: a producer on an event loop cannot wait, so it
        stops reading and resumes from the callback (which must be quick)."""
        with self._lock:
            if self._has_room():
                return True
            self.counters["backlog_full"] += 1
            self._room_callbacks.append(callback)
            return False

    def _take_room_callbacks(self) -> List[Callable[[], Any]]:
        """Lock held: the waiting callbacks, if there is room now (they are called after the lock is released)."""
        if not self._room_callbacks or not self._has_room():
            return []
        callbacks, self._room_callbacks = self._room_callbacks, []
        return callbacks

    def _call_room_callbacks(self, callbacks: List[Callable[[], Any]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a producer's resume hook failed: logged; other producers still resume
                log.exception("%s: room callback failed", self.name)

    def backlog(self) -> Dict[str, int]:
        """Items and bytes queued or running now."""
        with self._lock:
            return {"messages": self._pending, "bytes": self._pending_bytes}

    def halt(self) -> None:
        """Non-blocking: nothing new starts from now on and queued work is dropped; running handlers finish."""
        with self._lock:
            self._stopped = True
            dropped = sum(len(q) for q in self._queues.values())
            self.counters["dropped"] += dropped
            for queue_ in self._queues.values():
                for _work, size, _coroutine in queue_:
                    self._pending -= 1
                    self._pending_bytes -= size
            self._queues.clear()
            self._ready.clear()
            self._lock.notify_all()
            self._room.notify_all()
            callbacks = self._take_room_callbacks()
        self._call_room_callbacks(callbacks)

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Drop queued work, wait for running handlers, stop the loop and join every thread. Idempotent.

        Called from a handler (one of this dispatcher's threads, or a coroutine on its loop) it must not wait for
        itself: it halts, returns at once and leaves the joins to a short-lived reaper thread (joined by the next
        ``stop()``, or at interpreter exit), which finishes once that handler has returned.
        """
        self.halt()
        current = threading.current_thread()
        with self._lock:
            own = current in self._threads or current is self._loop_thread
            reaper = self._reaper
            if own:
                if reaper is None or not reaper.is_alive():
                    # Not a daemon: the interpreter waits for it (bounded by ``timeout``) at exit.
                    self._reaper = threading.Thread(target=self._join_all, args=(timeout, None),
                                                    name=f"{self.name}-reaper")
                    self._reaper.start()
                return
        if reaper is not None and reaper is not current:
            reaper.join(timeout)
        self._join_all(timeout, current)

    def _join_all(self, timeout: Optional[float], current: Optional[threading.Thread]) -> None:
        with self._lock:
            threads = list(self._threads)
            if current is not self._loop_thread:
                # Running coroutine items finish first (as running sync handlers do), bounded by ``timeout``.
                if not self._async_done.wait_for(lambda: self._async_running <= 0, timeout):
                    log.warning("%s: an async handler is still running after %.0f s; cancelling it", self.name,
                                timeout or 0)
        for thread in threads:
            if thread is not current:
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("%s: a handler is still running after %.0f s; not waiting for it", self.name,
                                timeout or 0)
        loop, loop_thread = self._loop, self._loop_thread
        if loop is not None and loop_thread is not None:
            def shutdown() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.stop()

            try:
                loop.call_soon_threadsafe(shutdown)
            except RuntimeError:  # loop already closed
                pass
            if loop_thread is not current:
                loop_thread.join(timeout)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]

    def call_handler(self, handler: Callable[..., Any], args: List[Any], what: str = "message handler") -> None:
        """Call one handler (sync, or async on the loop thread) and report what it raised; never raises."""
        if self._stopped:
            return
        try:
            if is_coroutine_handler(handler):
                self.run_coroutine(handler(*args), what)
                return
            result = handler(*args)
            if inspect.isawaitable(result):  # e.g. ``lambda msg: coro(msg)``: await it (0.1.99 did not)
                self.run_coroutine(result, what)
        except Exception as exc:  # a handler's bug is reported, never retried, never fatal
            self._report(handler, exc)

    def run_coroutine(self, awaitable: Any, what: str = "message handler") -> None:
        loop = self._ensure_loop()

        async def runner() -> Any:
            return await awaitable

        future = asyncio.run_coroutine_threadsafe(runner(), loop)
        try:
            future.result(self.handler_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            with self._lock:
                self.counters["timeouts"] += 1
            log.warning("%s: %s still running after %.0f s; cancelled", self.name, what, self.handler_timeout)
        except concurrent.futures.CancelledError:
            pass
        except Exception as exc:  # raised inside the coroutine
            self._report(awaitable, exc)

    # -- internals ------------------------------------------------------------------------------------------------
    def _idle_workers(self) -> int:
        return len(self._threads) - (len(self._busy) - self._async_running)  # keys on the loop hold no worker

    def _start_worker(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads) + 1}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                key = self._ready.popleft()
                queue_ = self._queues.get(key)
                if not queue_:
                    continue
                work, size, _coroutine = queue_.popleft()
                self._busy.add(key)
            try:
                result = work()
                if inspect.isawaitable(result):  # a coroutine item whose loop was gone when it was scheduled
                    self.run_coroutine(result)
            except Exception as exc:  # the work wrappers report handler errors; this is a bug in them
                log.exception("%s: dispatch failed: %r", self.name, exc)
            finally:
                self._finished(key, size)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._loop_thread is not None and self._loop_thread.is_alive():
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    try:
                        pending = asyncio.all_tasks(loop)
                        for task in pending:
                            task.cancel()
                        if pending:
                            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        loop.close()

            thread = threading.Thread(target=run, name=f"{self.name}-asyncio", daemon=True)
            self._loop, self._loop_thread = loop, thread
            thread.start()
        ready.wait(5.0)
        return loop

    def _report(self, handler: Any, exc: BaseException) -> None:
        name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None) or repr(handler)
        with self._lock:
            self.counters["handler_errors"] += 1
            first = name not in self._logged
            self._logged.add(name)
        text = f"message handler {name} of {self.agent_id or self.name} raised {type(exc).__name__}: {exc}"
        if first:
            log.warning("%s (further errors of this handler are logged at DEBUG)", text, exc_info=exc)
        else:
            log.debug("%s", text, exc_info=exc)
        publish(HandlerError(text), self.agent_id)
