"""A tiny selector loop on one thread, with a wake-up socket so it stops (and accepts work) instantly."""
from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections import deque
from typing import Any, Callable, Deque, Optional

logger = logging.getLogger("agentcp.testing")

__all__ = ["IOLoop"]


class _Call:
    """A function queued for the loop thread, and its outcome."""

    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class IOLoop:
    """Runs read callbacks for registered sockets on one daemon thread.

    Sockets are registered, unregistered and closed only on the loop thread (through :meth:`call`), so the loop never
    waits on a socket another thread has just closed (the design rule "one owner per socket").
    """

    def __init__(self, name: str) -> None:
        self._name = name
        # Created by start(), so a loop that is never started holds no file descriptors.
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._calls: Deque[_Call] = deque()
        self._calls_lock = threading.Lock()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # -- public ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the selector and the wake-up socket pair, then start the loop thread (call once)."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name}: loop already started")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def in_loop_thread(self) -> bool:
        """True when called from the loop thread itself."""
        return self._thread is not None and threading.current_thread() is self._thread

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the loop thread, wait for it and return its result (or raise its exception).

        When the loop is not running (not started yet, or stopped) ``fn`` runs on the caller's thread instead: then
        nobody else touches the sockets.
        """
        thread = self._thread
        if self.in_loop_thread() or thread is None or not thread.is_alive() or self._stopping:
            return fn()
        item = _Call(fn)
        with self._calls_lock:
            self._calls.append(item)
        self._wake()
        if not item.done.wait(timeout):
            raise TimeoutError(f"{self._name}: loop did not run the call within {timeout} s")
        if item.error is not None:
            raise item.error
        return item.result

    def add_reader(self, sock: socket.socket, callback: Callable[[socket.socket], None]) -> None:
        """Call ``callback(sock)`` on the loop thread whenever ``sock`` is readable (call from the loop thread)."""
        if self._selector is None:
            raise RuntimeError(f"{self._name}: loop not started")
        self._selector.register(sock, selectors.EVENT_READ, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (call from the loop thread); unknown sockets are ignored."""
        if self._selector is None:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and join its thread; idempotent. Registered sockets are NOT closed (their owner does)."""
        self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("%s: loop thread did not stop within %s s", self._name, timeout)
        self._run_pending_calls()  # whoever queued work while we were stopping must not wait forever
        selector, self._selector = self._selector, None
        if selector is not None:
            selector.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            # A full wake-up buffer already guarantees a wake-up; a closed one means we are stopped.
            pass

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_pending_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                item = self._calls.popleft()
            try:
                item.result = item.fn()
            except BaseException as exc:  # handed to the caller of call(), who re-raises it
                item.error = exc
            finally:
                item.done.set()

    def _run(self) -> None:
        logger.debug("%s: loop started", self._name)
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping:
                events = selector.select(None)
                for key, _mask in events:
                    if key.data is None:
                        self._drain_wake()
                        continue
                    if self._stopping:
                        break
                    try:
                        key.data(key.fileobj)
                    except Exception:
                        logger.exception("%s: reader callback failed", self._name)
                self._run_pending_calls()
        except Exception:
            logger.exception("%s: loop crashed", self._name)
        finally:
            logger.debug("%s: loop stopped", self._name)
