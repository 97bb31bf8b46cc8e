"""Write-behind for the message history: rows buffered per database, written in one transaction.

Storing every sent and received message in its own ``BEGIN IMMEDIATE … COMMIT`` cost more than half of the time of
``send_message``. :class:`agentcp.db.db_mananger.DBManager` instead buffers the rows given to
``save_message_later`` and writes them together. The guarantees:

* **read-your-writes**: every read and every other write of that database first writes the buffer (same lock), so
  ``get_message_list`` right after ``send_message`` sees the message, and rows keep their order;
* **bounded**: at :attr:`WriteBehindPolicy.soon_rows` the writer thread is asked to write at once; a buffer
  that still reaches :attr:`WriteBehindPolicy.max_rows` is written by the thread that filled it (write-through,
  back-pressure): rows are never dropped and memory stays bounded;
* **bounded delay**: a buffered row is written within :attr:`WriteBehindPolicy.max_delay` seconds by the one
  process-wide :class:`Flusher` thread (started on demand, it exits after a second without work and is joined when
  the last database closes or the process exits), and at once at ``offline()``/``close()``/process exit.

No thread per agent: all databases of a process share the one flusher. A failed batch write is logged, counted in
``DBManager.write_behind_stats()`` and reported through the database's ``on_flush_error`` callback.
"""
from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["WriteBehindPolicy", "Flusher", "FLUSHER"]

_log = logging.getLogger("agentcp.db")


@dataclass(frozen=True)
class WriteBehindPolicy:
    """When a buffer of history rows is written (pure decisions; time is an argument)."""

    #: Rows buffered per database at which the sender that adds one writes them all itself (back-pressure: the
    #: writer thread cannot keep up; bounds memory).
    max_rows: int = 2048
    #: Seconds the oldest buffered row may wait for the flusher thread.
    max_delay: float = 0.1
    #: Rows at which the flusher thread is asked to write at once instead of at the delay (a burst of sends).
    soon_rows: int = 256

    def write_through(self, pending: int) -> bool:
        """True if a buffer holding ``pending`` rows must be written now, by the caller."""
        return pending >= self.max_rows

    def flush_soon(self, pending: int) -> bool:
        """True if the row that made ``pending`` should have the flusher write now (not at the delay)."""
        return pending == self.soon_rows

    def deadline(self, first_buffered_at: float) -> float:
        """The monotonic time by which a buffer whose oldest row came at ``first_buffered_at`` is written."""
        return first_buffered_at + self.max_delay


class Flusher:
    """The one process-wide thread that writes buffers whose delay ran out.

    ``schedule(db, deadline)`` asks for ``db.flush()`` at ``deadline`` (monotonic); a database flushed meanwhile
    just finds its buffer empty. The thread starts on the first schedule, exits after ``linger`` seconds without
    work, and :meth:`stop` (process exit, or the last open database closed) writes what is scheduled and joins it.
    """

    def __init__(self, linger: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.linger = linger
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._open = 0
        self.errors = 0

    # --- database bookkeeping ------------------------------------------------------------------------------
    def opened(self) -> None:
        with self._cond:
            self._open += 1

    def closed(self) -> None:
        """A database closed (after writing its own buffer); the last one closing joins the thread."""
        with self._cond:
            self._open = max(0, self._open - 1)
            last = self._open == 0
        if last:
            self.stop()

    # --- scheduling -----------------------------------------------------------------------------------------
    def schedule(self, db: Any, deadline: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), db))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentcp-history-writer", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is db:  # the new deadline is the earliest: wake the thread to re-time its wait
                self._cond.notify()

    def _take_due(self, me: threading.Thread) -> Optional[List[Any]]:
        """Lock held: the databases due now; None when the thread should exit (idle, or replaced by stop())."""
        idle_since = self._clock()
        while True:
            if self._thread is not me:
                return None
            now = self._clock()
            if self._heap:
                deadline = self._heap[0][0]
                if deadline <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[2])
                    return due
                self._cond.wait(deadline - now)
                idle_since = self._clock()
                continue
            if now - idle_since >= self.linger:
                return None
            self._cond.wait(self.linger - (now - idle_since))

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                due = self._take_due(me)
                if due is None:
                    if self._thread is me:
                        self._thread = None
                    return
            for db in due:
                self._flush(db)

    def _flush(self, db: Any) -> None:
        try:
            db.flush()
        except Exception as exc:  # the database reported it (logged, counted, on_flush_error); keep serving others
            with self._cond:
                self.errors += 1
            _log.debug("history writer: flush of %r failed: %s", db, exc)

    def flush_all(self) -> None:
        """Write every scheduled buffer now, on the calling thread."""
        with self._cond:
            due = [entry[2] for entry in self._heap]
            self._heap.clear()
        for db in due:
            self._flush(db)

    def stop(self) -> None:
        """Write what is scheduled and join the thread (it exits once idle; a later schedule starts a new one)."""
        self.flush_all()
        with self._cond:
            thread = self._thread
            self._thread = None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)  # it wakes on the notify, sees it was replaced and returns (a flush ends in seconds)

    def stop_if_idle(self) -> bool:
        """Join the thread if nothing is scheduled (``offline()`` after writing its own buffer: no thread of ours
        outlives it when no other database waits); True if no thread runs now."""
        with self._cond:
            if self._heap:
                return False
            thread = self._thread
            self._thread = None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)
        return True

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            return {"scheduled": len(self._heap), "running": self._thread is not None, "errors": self.errors,
                    "open_databases": self._open}


#: The process-wide flusher every DBManager shares.
FLUSHER = Flusher()
atexit.register(FLUSHER.stop)
