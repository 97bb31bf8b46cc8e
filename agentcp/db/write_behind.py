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
import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from agentcp.base.shared_timer import SharedTimer, TimerHandle

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
    """Writes buffers whose delay ran out, on a :class:`~agentcp.base.shared_timer.SharedTimer` of its own (one
    thread named ``agentcp-history-writer`` for every database of the process, only while a write is scheduled).

    ``schedule(db, deadline)`` asks for ``db.flush()`` at ``deadline`` (monotonic); a database flushed meanwhile
    just finds its buffer empty. :meth:`stop` (process exit, or the last open database closed) writes what is
    scheduled and joins the thread; :meth:`stop_if_idle` joins it when nothing is scheduled.
    """

    def __init__(self, name: str = "agentcp-history-writer") -> None:
        self._timer = SharedTimer(name=name)
        self._lock = threading.Lock()
        self._scheduled: Dict[int, Tuple[Any, TimerHandle]] = {}  # id(db) -> its earliest pending write
        self._open = 0
        self.errors = 0

    # --- database bookkeeping ------------------------------------------------------------------------------
    def opened(self) -> None:
        with self._lock:
            self._open += 1

    def closed(self) -> None:
        """A database closed (after writing its own buffer); the last one closing joins the thread."""
        with self._lock:
            self._open = max(0, self._open - 1)
            last = self._open == 0
        if last:
            self.stop()

    # --- scheduling -----------------------------------------------------------------------------------------
    def schedule(self, db: Any, deadline: float) -> None:
        with self._lock:
            known = self._scheduled.get(id(db))
            if known is not None and known[1].when <= deadline and not known[1].cancelled:
                return  # an earlier write of this database is due anyway
            handle = self._timer.call_at(deadline, lambda: self._due(db))
            self._scheduled[id(db)] = (db, handle)
        if known is not None:
            self._timer.cancel(known[1])

    def _due(self, db: Any) -> None:
        with self._lock:
            self._scheduled.pop(id(db), None)
        self._flush(db)

    def _flush(self, db: Any) -> None:
        try:
            db.flush()
        except Exception as exc:  # the database reported it (logged, counted, on_flush_error); keep serving others
            with self._lock:
                self.errors += 1
            _log.debug("history writer: flush of %r failed: %s", db, exc)

    def flush_all(self) -> None:
        """Write every scheduled buffer now, on the calling thread."""
        with self._lock:
            due, self._scheduled = list(self._scheduled.values()), {}
        for db, handle in due:
            self._timer.cancel(handle)
            self._flush(db)

    def stop(self) -> None:
        """Write what is scheduled and join the thread (a later schedule starts a new one)."""
        self.flush_all()
        self._timer.join_if_idle()

    def stop_if_idle(self) -> bool:
        """Join the thread if nothing is scheduled (``offline()`` after writing its own buffer: no thread of ours
        outlives it when no other database waits); True if no thread runs now."""
        return self._timer.join_if_idle()

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            scheduled, errors, open_dbs = len(self._scheduled), self.errors, self._open
        return {"scheduled": scheduled, "running": self._timer.stats()["running"], "errors": errors,
                "open_databases": open_dbs}


#: The process-wide flusher every DBManager shares.
FLUSHER = Flusher()
atexit.register(FLUSHER.stop)
