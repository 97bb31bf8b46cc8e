"""Process-wide error collection: the SDK publishes, applications subscribe."""
from __future__ import annotations

import atexit
import collections
import logging
import threading
from typing import Callable, Deque, List, Optional, Tuple

from .exceptions import SDKError

_log = logging.getLogger("agentcp.context")

Subscriber = Callable[[SDKError], None]


class AtomicErrorContext:
    """A bounded error queue delivered to subscribers on one worker thread.

    ``publish`` never blocks and never raises: when the queue is full the oldest error is dropped (and counted).
    Errors published before anyone subscribed are dropped, as in 0.1.99. The first ``subscribe`` starts the
    worker; unlike 0.1.99 later subscribers are added rather than ignored, and the worker waits on a condition
    instead of polling once a second.
    """

    def __init__(self, max_queue_size: int = 1024) -> None:
        self.max_queue_size = max_queue_size
        self.queue: Deque[SDKError] = collections.deque(maxlen=max_queue_size)
        self._cond = threading.Condition()
        self._subscribers: List[Tuple[str, Subscriber]] = []
        self.stop_flag = False
        self.start_flag = False
        self.worker_thread: Optional[threading.Thread] = None
        self.dropped = 0
        self.delivered = 0
        self.subscriber_failures = 0
        self._atexit_registered = False

    # -- public API (0.1.99 names) ------------------------------------------------------------------------
    def subscribe(self, aid: str, func: Subscriber) -> None:
        """Deliver every later SDK error to ``func(error)``; ``error.agent_id`` is set to ``aid`` if empty."""
        with self._cond:
            self._subscribers.append((aid, func))
            if self.worker_thread is None or not self.worker_thread.is_alive():
                self.stop_flag = False
                self.start_flag = True
                self.worker_thread = threading.Thread(
                    target=self._run, name="agentcp-error-context", daemon=True
                )
                self.worker_thread.start()
                if not self._atexit_registered:
                    atexit.register(self.close)
                    self._atexit_registered = True

    def unsubscribe(self, func: Subscriber) -> None:
        with self._cond:
            self._subscribers = [(a, f) for (a, f) in self._subscribers if f is not func]

    def publish(self, e: SDKError) -> None:
        """Queue ``e`` for the subscribers without blocking; dropped if nobody subscribed yet."""
        with self._cond:
            if not self._subscribers or self.stop_flag:
                return
            if not getattr(e, "agent_id", ""):
                try:
                    e.agent_id = self._subscribers[0][0]
                except AttributeError:  # not an SDKError: still deliver it
                    pass
            if len(self.queue) == self.queue.maxlen:
                self.dropped += 1
            self.queue.append(e)
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker after it has delivered what is queued, and join it."""
        with self._cond:
            self.stop_flag = True
            self._cond.notify_all()
            worker = self.worker_thread
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=5.0)
        with self._cond:
            self.worker_thread = None
            self.start_flag = False

    def reset(self) -> None:
        """Forget subscribers and queued errors (for tests)."""
        self.close()
        with self._cond:
            self._subscribers.clear()
            self.queue.clear()
            self.stop_flag = False

    # -- worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.queue and not self.stop_flag:
                    self._cond.wait()
                if not self.queue and self.stop_flag:
                    return
                err = self.queue.popleft()
                subscribers = list(self._subscribers)
            for _aid, func in subscribers:
                try:
                    func(err)
                    self.delivered += 1
                except Exception:  # a subscriber's bug must not stop error delivery to the others
                    self.subscriber_failures += 1
                    if self.subscriber_failures == 1:
                        _log.exception("error subscriber %r raised; later failures are only counted", func)
