"""Local SQLite history of one agent: sessions, messages, members and friends (messaging.md §6).

The file is ``<aid_path>/data/agentid_data.db`` where ``aid_path`` is the agent's *private* directory
(``<data>/agentcp/AIDs/<aid>/private``), and the four tables ``conversation``, ``messages``, ``chat_config`` and
``friend`` have exactly the columns and types of agentcp 0.1.99, so a database written by 0.1.90-0.1.99 stays
readable and 0.1.99 can read what we write.

Unlike 0.1.99 (which stubbed every write out) messages and sessions are really stored:

* :meth:`DBManager.save_message` takes a message dict in the ``session_message`` shape (see its docstring) and is
  idempotent on ``(session_id, message_id, sender)``, so redelivery after a reconnect never double-inserts.
* :meth:`DBManager.create_session` / :meth:`DBManager.load_session_history` keep a session's ``identifying_code``
  (owner secret) across restarts.
* The argument-shift defects of 0.1.99 are fixed (``get_conversation_list`` filters correctly, ``page_size`` is
  honoured, conversation lookups use ``session_id``).

Concurrency and durability: one connection shared by all threads behind a re-entrant lock, WAL journal, every
write in its own ``BEGIN IMMEDIATE`` transaction (also serialises against other processes), ``busy_timeout`` for
concurrent writers. A crash mid-write rolls that transaction back; committed rows survive a process crash.
The agent stores the messages it sends and receives with :meth:`DBManager.save_message_later` (write-behind, see
:mod:`agentcp.db.write_behind`): rows are written in batches within 0.1 s, and before any other read or write of
the database, so reads always see them; ``save_message`` itself still writes at once.

Reading rules for old files (§6.3): columns are selected by name, the 0.1.30 per-agent tables
(``messages_<md5(aid)>`` and friends, no ``instruction`` column) are read too, and INTEGER-affinity ids come back
as ``str``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from agentcp._legacy.signatures import selfless
from agentcp.db.write_behind import FLUSHER, WriteBehindPolicy

__all__ = ["DBManager", "DB_FILE_NAME", "SCHEMA_SQL"]

_log = logging.getLogger("agentcp.db")

#: File name inside ``<aid_path>/data/``.
DB_FILE_NAME = "agentid_data.db"

#: The DDL of 0.1.99 (messaging.md §6.2), verbatim in tables, columns, types and defaults.
SCHEMA_SQL: Tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS conversation (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL,
  identifying_code TEXT NOT NULL,
  main_aid TEXT NOT NULL,
  name TEXT NOT NULL,
  type TEXT NOT NULL,
  timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')))""",
    """CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id TEXT,
  session_id INTEGER,
  role TEXT NOT NULL,
  message_aid TEXT NOT NULL,
  parent_message_id INTEGER,
  to_aids TEXT NOT NULL,
  content TEXT NOT NULL,
  instruction TEXT,
  type TEXT NOT NULL,
  status TEXT NOT NULL,
  timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')))""",
    """CREATE TABLE IF NOT EXISTS chat_config (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id INTEGER NOT NULL,
  aid TEXT NOT NULL,
  avaurl TEXT,
  description TEXT,
  post_data TEXT)""",
    """CREATE TABLE IF NOT EXISTS friend (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  aid TEXT NOT NULL,
  name TEXT,
  avaurl TEXT,
  description TEXT)""",
)

# Indexes are not part of the 0.1.99 schema but are invisible to it: they only make the dedupe check and the
# per-session reads O(log n).
_INDEX_SQL: Tuple[str, ...] = (
    "CREATE INDEX IF NOT EXISTS idx_messages_session_msg ON messages(session_id, message_id)",
    "CREATE INDEX IF NOT EXISTS idx_conversation_session ON conversation(session_id)",
    "CREATE INDEX IF NOT EXISTS idx_chat_config_session ON chat_config(session_id)",
)

# The aid table of 0.1.99's `_create_table()`; 0.1.99 never calls it, we create it lazily on first aid-table use.
_AGENTIDS_SQL = """CREATE TABLE IF NOT EXISTS agentids (
  aid TEXT PRIMARY KEY,
  ep_aid TEXT,
  ep_url TEXT,
  avaUrl TEXT,
  name TEXT,
  description TEXT)"""

MESSAGE_COLUMNS: Tuple[str, ...] = (
    "id", "message_id", "session_id", "role", "message_aid", "parent_message_id", "to_aids", "content",
    "instruction", "type", "status", "timestamp",
)
CONVERSATION_COLUMNS: Tuple[str, ...] = ("id", "session_id", "identifying_code", "main_aid", "name", "type",
                                         "timestamp")
CHAT_CONFIG_COLUMNS: Tuple[str, ...] = ("id", "session_id", "aid", "avaurl", "description", "post_data")
FRIEND_COLUMNS: Tuple[str, ...] = ("id", "aid", "name", "avaurl", "description")
AGENTIDS_COLUMNS: Tuple[str, ...] = ("aid", "ep_aid", "ep_url", "avaUrl", "name", "description")

# Columns whose INTEGER affinity turns numeric text into numbers (§6.3 "Data quirks").
_ID_COLUMNS = frozenset({"session_id", "parent_message_id"})

_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]{0,18})\Z")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

Row = Dict[str, Any]


def _as_text(value: Any) -> str:
    """An id read back from an INTEGER-affinity column, as the string it was written as."""
    if value is None:
        return ""
    if isinstance(value, bytes):  # stored as BLOB by _id_param to avoid a lossy numeric conversion
        return value.decode("utf-8", "replace")
    return str(value)


def _require_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """Validate a text argument; ints are accepted for ids (callers pass the INTEGER form back)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    text = str(value)
    if not allow_empty and not text:
        raise ValueError(f"{name} must not be empty")
    return text


def _opt_str(name: str, value: Any) -> str:
    """None → ""; str/int kept; anything else is a TypeError."""
    if value is None:
        return ""
    return _require_str(name, value, allow_empty=True)


def _json_text(name: str, value: Any) -> str:
    """Message content / instruction as stored: JSON text (lists and dicts are serialised like 0.1.99 did)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        try:
            return json.dumps(value)  # default settings, as 0.1.99 serialised blocks
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} is not JSON-serialisable: {exc}") from None
    raise TypeError(f"{name} must be a str (JSON text), list or dict, got {type(value).__name__}")


def _rowid(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added (sqlite3 sets it for every successful INSERT)."""
    if cur.lastrowid is None:
        raise sqlite3.DatabaseError("INSERT reported no row id")
    return int(cur.lastrowid)


def _page(page: Any, page_size: Any) -> Tuple[int, int]:
    for name, value in (("page", page), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return page_size, (page - 1) * page_size


#: The columns a history row is written with, in the order of :meth:`DBManager._row_values`.
_ROW_COLUMNS = ("message_id", "session_id", "role", "message_aid", "parent_message_id", "to_aids", "content",
                "instruction", "type", "status")
_MID, _SID, _AID = 0, 1, 3
_INSERT_ROW = f"INSERT INTO messages ({', '.join(_ROW_COLUMNS)}) VALUES ({', '.join('?' * len(_ROW_COLUMNS))})"


class DBManager:
    """The agent's history database (0.1.99 name and constructor: ``DBManager(aid_path, aid)``).

    ``aid_path`` is the agent's private directory; the file is ``<aid_path>/data/agentid_data.db`` (created with
    its directory). ``aid`` is the agent's own AID: it tells outgoing from incoming messages in
    :meth:`save_message` and names the 0.1.30 legacy tables.
    """

    def __init__(self, aid_path: str, aid: str) -> None:
        self.aid_path = _require_str("aid_path", aid_path)
        self.aid = _require_str("aid", aid)
        self.db_dir = os.path.join(self.aid_path, "data")
        self.db_path = os.path.join(self.db_dir, DB_FILE_NAME)
        os.makedirs(self.db_dir, exist_ok=True)
        self._lock = threading.RLock()
        self._legacy_suffix = hashlib.md5(self.aid.encode("utf-8")).hexdigest()
        self._agentids_ready = False
        #: When buffered rows are written (see :mod:`agentcp.db.write_behind`).
        self.write_behind = WriteBehindPolicy()
        #: Called as ``on_flush_error(exc, rows_lost)`` when a batch of buffered rows could not be written.
        self.on_flush_error: Optional[Callable[[BaseException, int], None]] = None
        self._pending: List[Any] = []  # row tuples (or a message whose row could not be built: reported later)
        # Guards only ``_pending``: a sender appends without waiting for a batch being written under ``_lock``.
        self._pending_lock = threading.Lock()
        self._wb = {"buffered": 0, "batches": 0, "written": 0, "duplicates": 0, "write_through": 0, "lost": 0,
                    "flush_errors": 0, "invalid": 0}
        self._registered = False
        # One connection for all threads: the lock serialises use, so check_same_thread can be off; autocommit
        # mode (isolation_level=None) so that our explicit BEGIN IMMEDIATE/COMMIT are the only transactions.
        self.conn: Optional[sqlite3.Connection] = sqlite3.connect(
            self.db_path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._configure()
        self.create_table()
        FLUSHER.opened()
        self._registered = True

    # --- connection -----------------------------------------------------------------------------------------
    def _configure(self) -> None:
        conn = self._conn()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                _log.warning("%s: WAL journal not available (got %r)", self.db_path, mode and mode[0])
        except sqlite3.OperationalError as exc:  # e.g. another process holds an exclusive lock
            _log.warning("%s: cannot switch to WAL: %s", self.db_path, exc)
        # NORMAL in WAL mode: a committed transaction survives a process crash; only an OS crash/power loss can
        # roll back the last commits, and never corrupts the file. FULL would fsync on every message.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise RuntimeError(f"DBManager for {self.aid} is closed")
        return self.conn

    def close(self) -> None:
        """Write buffered rows, then close the connection (idempotent). Further calls raise RuntimeError."""
        with self._lock:
            if self.conn is not None:
                try:
                    self._flush_locked(raise_errors=False)
                    self.conn.close()
                finally:
                    self.conn = None
            registered, self._registered = self._registered, False
        if registered:
            FLUSHER.closed()

    def __enter__(self) -> "DBManager":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks between
        processes); any exception rolls everything back, so a failed or interrupted write leaves no partial rows."""
        with self._lock:
            conn = self._conn()
            if self._pending:
                self._flush_locked(raise_errors=False)  # buffered rows first: writes keep their order
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[sqlite3.Row]:
        with self._lock:
            if self._pending:
                self._flush_locked(raise_errors=False)  # read-your-writes
            cur = self._conn().execute(sql, params)
            return cur.fetchall()

    # --- schema ---------------------------------------------------------------------------------------------
    def create_table(self) -> None:
        """Create the four 0.1.99 tables (and our lookup indexes) if they do not exist."""
        with self._write() as conn:
            for ddl in SCHEMA_SQL + _INDEX_SQL:
                conn.execute(ddl)

    def _create_table(self) -> None:
        """Create the ``agentids`` table of 0.1.99 (which defined it but never called this)."""
        with self._write() as conn:
            conn.execute(_AGENTIDS_SQL)
        self._agentids_ready = True

    def _columns(self, table: str) -> List[str]:
        rows = self._read(f'PRAGMA table_info("{table}")')
        return [r[1] for r in rows]

    def _tables(self, base: str) -> List[Tuple[str, List[str]]]:
        """``[(table, columns)]`` to read for ``base``: the 0.1.30 per-agent table first (older), then ours."""
        out = []
        for table in (f"{base}_{self._legacy_suffix}", base):
            cols = self._columns(table)
            if cols:
                out.append((table, cols))
        return out

    def _id_param(self, value: str) -> Any:
        """The parameter to bind for an id stored in an INTEGER-affinity column.

        SQLite turns numeric text into INTEGER/REAL there, which is lossless only for canonical 64-bit integers
        (the server's 19-digit session ids). ``"007"``, 20-digit numbers or ``"1e5"`` would come back changed (and
        collide with other ids), so those are stored as BLOB, which affinity leaves alone. Used for writes and
        lookups alike so both sides agree.
        """
        if _CANONICAL_INT.match(value) and _INT64_MIN <= int(value) <= _INT64_MAX:
            return value
        if not any(ch.isdigit() for ch in value):
            return value  # cannot be a numeric literal: stays TEXT
        # Ask SQLite itself what INTEGER affinity does to this text (its numeric-literal rules have corner cases).
        with self._lock:
            conn = self._conn()
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS _affinity_probe (v INTEGER)")
            conn.execute("INSERT INTO _affinity_probe (v) VALUES (?)", (value,))
            kind, back = conn.execute("SELECT typeof(v), CAST(v AS TEXT) FROM _affinity_probe").fetchone()
            conn.execute("DELETE FROM _affinity_probe")
        lossless = kind == "text" or back == value
        return value if lossless else sqlite3.Binary(value.encode("utf-8"))

    def _select(self, base: str, wanted: Sequence[str], where: str = "", params: Sequence[Any] = (),
                order: str = "", limit: Optional[Tuple[int, int]] = None) -> List[Row]:
        """Rows of ``base`` (and its legacy twin) as dicts with the ``wanted`` keys, selecting columns by name.

        Columns a table lacks (0.1.30 ``messages`` has no ``instruction``) come back as ``""``.
        """
        parts: List[str] = []
        all_params: List[Any] = []
        for rank, (table, cols) in enumerate(self._tables(base)):
            exprs = [f'"{c}"' if c in cols else f"NULL AS \"{c}\"" for c in wanted]
            parts.append(f'SELECT {", ".join(exprs)}, {rank} AS _src FROM "{table}"' + (f" WHERE {where}" if where else ""))
            all_params.extend(params)
        if not parts:
            return []
        sql = " UNION ALL ".join(parts)
        if order:
            sql += f" ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            all_params.extend(limit)
        rows = self._read(sql, all_params)
        out = []
        for row in rows:
            item = {}
            for key, value in zip(wanted, row):
                if key in _ID_COLUMNS:
                    value = _as_text(value)
                elif value is None and key != "id":
                    value = ""
                item[key] = value
            out.append(item)
        return out

    # --- sessions -------------------------------------------------------------------------------------------
    def create_session(self, aid, session_id, identifying_code, name, type) -> int:  # noqa: A002 (0.1.99 name)
        """Record a session (or update the stored one); returns 1 as 0.1.99 did.

        ``identifying_code`` is the owner secret from ``create_session_ack`` (``""`` for sessions we joined); an
        empty code never overwrites a stored one, so ownership survives a later rejoin. ``aid`` is the own AID
        (one database per AID); ``main_aid`` is stored as ``""`` like 0.1.90-0.1.93 did.
        """
        _require_str("aid", aid, allow_empty=True)
        sid = _require_str("session_id", session_id)
        code = _opt_str("identifying_code", identifying_code)
        name = _opt_str("name", name)
        kind = _opt_str("type", type) or "public"
        with self._write() as conn:
            row = conn.execute("SELECT id, identifying_code FROM conversation WHERE session_id = ? "
                               "ORDER BY id DESC LIMIT 1", (sid,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO conversation (session_id, identifying_code, main_aid, name, type) "
                             "VALUES (?, ?, '', ?, ?)", (sid, code, name, kind))
            else:
                conn.execute("UPDATE conversation SET identifying_code = ?, name = ?, type = ? WHERE id = ?",
                             (code or row[1], name, kind, row[0]))
        return 1

    def load_session_history(self, session_id) -> List[Row]:
        """The stored session row(s) for ``session_id`` (``id, session_id, identifying_code, main_aid, name, type,
        timestamp``), newest first; ``[]`` if unknown. Used to restore ownership (``identifying_code``) after a
        restart. (0.1.99 stubbed this to ``[]``.)"""
        sid = _require_str("session_id", session_id)
        return self._select("conversation", CONVERSATION_COLUMNS, "session_id = ?", (sid,),
                            order="_src DESC, id DESC")

    def get_conversation_by_id(self, aid, conversation_id) -> Optional[Row]:
        """The session row whose ``session_id`` is ``conversation_id`` (0.1.99 wrongly matched ``id``), or None."""
        rows = self.load_session_history(conversation_id)
        return rows[0] if rows else None

    def get_conversation_list(self, aid, main_aid, page=1, page_size=10) -> List[Row]:
        """Stored sessions, newest first, ``page_size`` per page (``page`` from 1).

        ``main_aid``: falsy → every session; else only rows with that ``main_aid``. ``aid`` is the own AID and
        is not needed (one database per AID). AgentID should call ``(self.id, "", page, page_size)``.
        """
        limit = _page(page, page_size)
        if main_aid:
            return self._select("conversation", CONVERSATION_COLUMNS, "main_aid = ?",
                                (_require_str("main_aid", main_aid),), order="_src DESC, id DESC", limit=limit)
        return self._select("conversation", CONVERSATION_COLUMNS, order="_src DESC, id DESC", limit=limit)

    def delete_session(self, session_id) -> bool:
        """Delete a session's rows from ``conversation``, ``messages`` and ``chat_config``; True on success."""
        sid = _require_str("session_id", session_id)
        param = self._id_param(sid)
        try:
            with self._write() as conn:
                conn.execute("DELETE FROM conversation WHERE session_id = ?", (sid,))
                conn.execute("DELETE FROM messages WHERE session_id = ?", (param,))
                conn.execute("DELETE FROM chat_config WHERE session_id = ?", (param,))
        except sqlite3.Error as exc:
            _log.error("delete_session %s failed: %s", sid, exc)
            return False
        return True

    # --- members (chat_config) ------------------------------------------------------------------------------
    def invite_member(self, aid, session_id, invite_aid) -> int:
        """Record ``invite_aid`` as a member of ``session_id`` (once); returns 1 as 0.1.99 did."""
        sid = _require_str("session_id", session_id)
        member = _require_str("invite_aid", invite_aid)
        param = self._id_param(sid)
        with self._write() as conn:
            exists = conn.execute("SELECT 1 FROM chat_config WHERE session_id = ? AND aid = ? LIMIT 1",
                                  (param, member)).fetchone()
            if exists is None:
                conn.execute("INSERT INTO chat_config (session_id, aid, avaurl, description, post_data) "
                             "VALUES (?, ?, '', '', '')", (param, member))
        return 1

    def get_session_member_list(self, session_id) -> List[Row]:
        """Member rows of a session: ``[{"id","session_id","aid","avaurl","description","post_data"}]``."""
        sid = _require_str("session_id", session_id)
        return self._select("chat_config", CHAT_CONFIG_COLUMNS, "session_id = ?", (self._id_param(sid),),
                            order="_src, id")

    def get_conversation_config(self, conversation_id) -> List[Row]:
        """Same as :meth:`get_session_member_list` (0.1.99 name)."""
        return self.get_session_member_list(conversation_id)

    def add_conversation_config(self, conversation_id, aid, avaurl="", description="", post_data="") -> int:
        """Insert a ``chat_config`` row; returns its row id."""
        sid = _require_str("conversation_id", conversation_id)
        member = _require_str("aid", aid)
        with self._write() as conn:
            cur = conn.execute("INSERT INTO chat_config (session_id, aid, avaurl, description, post_data) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (self._id_param(sid), member, _opt_str("avaurl", avaurl),
                                _opt_str("description", description), _json_text("post_data", post_data)))
            return _rowid(cur)

    def update_conversation_config(self, config_id, avaurl=None, description=None, post_data=None) -> int:
        """Update the given (non-None) fields of the ``chat_config`` row ``config_id`` (the row id
        :meth:`add_conversation_config` returned); returns the number of rows changed (0 or 1)."""
        if isinstance(config_id, bool) or not isinstance(config_id, (int, str)) or not str(config_id).isdigit():
            raise ValueError(f"config_id must be a row id (int), got {config_id!r}")
        sets, params = [], []
        for col, value in (("avaurl", avaurl), ("description", description)):
            if value is not None:
                sets.append(f"{col} = ?")
                params.append(_opt_str(col, value))
        if post_data is not None:
            sets.append("post_data = ?")
            params.append(_json_text("post_data", post_data))
        if not sets:
            return 0
        with self._write() as conn:
            cur = conn.execute(f"UPDATE chat_config SET {', '.join(sets)} WHERE id = ?", (*params, int(config_id)))
            return cur.rowcount

    # --- messages -------------------------------------------------------------------------------------------
    def insert_message(self, role, aid, conversation_id, message_aid, parent_message_id, to_aids, instruction,
                       content, type, status, message_id="") -> int:  # noqa: A002 (0.1.99 name)
        """Insert one ``messages`` row as given (no dedupe); returns its row id.

        ``conversation_id`` is the session id, ``message_aid`` the author, ``to_aids`` a str or a list (joined
        with ``,`` as 0.1.90 did), ``content``/``instruction`` JSON text or a list/dict (serialised). ``aid`` (own
        AID) is not stored. 0.1.99's AgentID passed these shifted by one; this signature is the 0.1.99 one.
        """
        row = self._message_row(role, conversation_id, message_aid, parent_message_id, to_aids, instruction,
                                content, type, status, message_id)
        with self._write() as conn:
            return self._insert_row(conn, row)

    @selfless  # 0.1.99 declared it without self; DBManager.save_message(message) keeps that signature
    def save_message(self, message: Dict[str, Any]) -> bool:
        """Store a message sent or received; returns True if stored, False if it was already there.

        ``message`` has the ``session_message`` shape (messaging.md §2.6/§3):

        ==============  ========  ====================================================================
        key             required  meaning
        ==============  ========  ====================================================================
        session_id      yes       session (str)
        sender          yes       author AID; equal to the own AID → outgoing (role ``user``, status
                                  ``sent``), else incoming (role ``assistant``, status ``success``)
        message         yes       the block array: decoded JSON text (str) or a list/dict
        message_id      no        id; ``""``/absent (synthetic notices) is always stored
        receiver        no        receivers as on the wire (``;``-joined); outgoing rows store them
                                  ``,``-joined like 0.1.90, or pass a list
        ref_msg_id      no        id replied to → ``parent_message_id``
        instruction     no        dict / JSON text / None
        timestamp       no        not stored: the column keeps 0.1.99's local-time default
        role, status,   no        override the derived values
        type
        ==============  ========  ====================================================================

        Idempotent: a message whose ``(session_id, message_id, sender)`` is already stored is not inserted again
        (duplicates after a reconnect). The check and the insert are one transaction, so concurrent saves of the
        same message store it once.
        """
        row = self._saved_row(message)
        with self._write() as conn:
            if not self._insert_new(conn, row):
                _log.debug("message %s of session %s already stored", row["message_id"], message["session_id"])
                return False
        return True

    def save_message_later(self, message: Dict[str, Any]) -> None:
        """:meth:`save_message` written behind: stored within ``write_behind.max_delay`` seconds together with
        other buffered rows, and before any later read or write of this database (read-your-writes). A full
        buffer is written at once by this call; nothing is dropped.

        The shape is checked now (a non-dict or a missing required field raises as in :meth:`save_message`) and
        the row is built now (a few microseconds): the buffer holds a flat tuple of column values, not the
        message with its nested blocks, so buffered rows cost the garbage collector (and the round trips it
        pauses) next to nothing, and the writer only writes. A field of the wrong type is found when the buffer is
        written: logged and counted (``invalid``); the other rows are stored."""
        self._check_message(message)
        if self.conn is None:
            self._conn()  # raises: closed
        try:
            item: Any = self._row_values(self._saved_row(message))
        except (TypeError, ValueError):
            item = dict(message)  # the writer reports it (invalid), as for any bad row
        with self._pending_lock:
            self._pending.append(item)
            self._wb["buffered"] += 1
            pending = len(self._pending)
        if self.write_behind.write_through(pending):
            with self._lock:
                self._wb["write_through"] += 1
                self._flush_locked(raise_errors=True)
        elif pending == 1:
            FLUSHER.schedule(self, self.write_behind.deadline(time.monotonic()))
        elif self.write_behind.flush_soon(pending):
            FLUSHER.schedule(self, time.monotonic())

    def flush(self) -> int:
        """Write the rows buffered by :meth:`save_message_later` now, in one transaction; how many were new.
        Raises if the write fails (the rows are then lost: logged, counted and passed to ``on_flush_error``)."""
        with self._lock:
            return self._flush_locked(raise_errors=True)

    def write_behind_stats(self) -> Dict[str, int]:
        """Counters of the write-behind buffer: rows ``buffered``, ``pending`` now, ``batches`` written, rows
        ``written``/``duplicates``/``invalid``, ``write_through`` flushes, rows ``lost`` in ``flush_errors`` failed
        batches."""
        with self._lock, self._pending_lock:
            return dict(self._wb, pending=len(self._pending))

    def _flush_locked(self, raise_errors: bool) -> int:
        """Lock held: write the buffer in one transaction; the number of rows inserted (not duplicates)."""
        with self._pending_lock:
            rows, self._pending = self._pending, []
        if not rows:
            return 0
        inserted = invalid = 0
        built: List[Tuple[Any, ...]] = []
        for item in rows:
            if isinstance(item, tuple):  # built by save_message_later
                built.append(item)
                continue
            try:
                built.append(self._row_values(self._saved_row(item)))
            except (TypeError, ValueError) as exc:  # one bad row: counted, the others are written
                invalid += 1
                _log.warning("%s: history row not stored: %s", self.db_path, exc)
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                fresh = self._not_stored(conn, built)
                if fresh:
                    # One statement for the batch: the writer holds the interpreter lock for far less time than
                    # a SELECT and an INSERT per row did (each message's round trip waited behind that).
                    conn.executemany(_INSERT_ROW, fresh)
                inserted = len(fresh)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except (sqlite3.Error, RuntimeError, OSError) as exc:
            self._wb["flush_errors"] += 1
            self._wb["lost"] += len(rows)
            _log.error("%s: writing %d buffered history row(s) failed, they are lost: %s: %s", self.db_path,
                       len(rows), type(exc).__name__, exc)
            callback = self.on_flush_error
            if callback is not None:
                try:
                    callback(exc, len(rows))
                except Exception:  # a reporting callback must not break the writer
                    _log.exception("on_flush_error callback failed")
            if raise_errors:
                raise
            return 0
        self._wb["batches"] += 1
        self._wb["written"] += inserted
        self._wb["invalid"] += invalid
        self._wb["duplicates"] += len(rows) - inserted - invalid
        return inserted

    @staticmethod
    def _row_values(row: Dict[str, Any]) -> Tuple[Any, ...]:
        """A ``messages`` row as the tuple of its values in :data:`_ROW_COLUMNS` order."""
        return tuple(map(row.__getitem__, _ROW_COLUMNS))

    @staticmethod
    def _not_stored(conn: sqlite3.Connection, rows: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
        """Inside a transaction: the rows whose ``(session_id, message_id, sender)`` is neither stored nor earlier
        in ``rows`` (rows without a message id are always new). One query per session and 500 ids."""
        wanted: Dict[Any, Set[str]] = {}
        for row in rows:
            if row[_MID]:
                wanted.setdefault(row[_SID], set()).add(row[_MID])
        seen: Set[Tuple[Any, str, str]] = set()
        for session_id, ids in wanted.items():
            id_list = list(ids)
            for start in range(0, len(id_list), 500):
                chunk = id_list[start:start + 500]
                query = (f"SELECT message_id, message_aid FROM messages WHERE session_id = ? AND message_id IN "
                         f"({', '.join('?' * len(chunk))})")
                for message_id, sender in conn.execute(query, [session_id, *chunk]):
                    seen.add((session_id, str(message_id), str(sender)))
        fresh = []
        for row in rows:
            if row[_MID]:
                key = (row[_SID], row[_MID], row[_AID])
                if key in seen:
                    continue
                seen.add(key)
            fresh.append(row)
        return fresh

    def _insert_new(self, conn: sqlite3.Connection, row: Dict[str, Any]) -> bool:
        """Inside a transaction: insert ``row`` unless its ``(session_id, message_id, sender)`` is stored."""
        if row["message_id"]:
            dup = conn.execute("SELECT 1 FROM messages WHERE session_id = ? AND message_id = ? "
                               "AND message_aid = ? LIMIT 1",
                               (row["session_id"], row["message_id"], row["message_aid"])).fetchone()
            if dup is not None:
                return False
        self._insert_row(conn, row)
        return True

    @staticmethod
    def _check_message(message: Any) -> None:
        """The shape of a ``save_message`` argument: a dict with the required fields."""
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, got {type(message).__name__}")
        missing = [k for k in ("session_id", "sender", "message") if k not in message]
        if missing:
            raise ValueError(f"message lacks required field(s): {', '.join(missing)}")

    def _saved_row(self, message: Dict[str, Any]) -> Dict[str, Any]:
        """The validated ``messages`` row for a ``save_message`` argument."""
        self._check_message(message)
        sender = _require_str("sender", message["sender"])
        outgoing = sender == self.aid
        receiver = message.get("receiver", "")
        if isinstance(receiver, (list, tuple)):
            receiver = ",".join(_require_str("receiver", r) for r in receiver)
        else:
            receiver = _opt_str("receiver", receiver)
            if outgoing:
                receiver = receiver.replace(";", ",")
        return self._message_row(
            message.get("role") or ("user" if outgoing else "assistant"),
            message["session_id"], sender, message.get("ref_msg_id", ""), receiver, message.get("instruction"),
            message["message"], message.get("type") or "text",
            message.get("status") or ("sent" if outgoing else "success"), message.get("message_id", ""),
        )

    def _message_row(self, role, session_id, message_aid, parent_message_id, to_aids, instruction, content,
                     kind, status, message_id) -> Dict[str, Any]:
        sid = _require_str("session_id", session_id)
        parent = _opt_str("parent_message_id", parent_message_id)
        if isinstance(to_aids, (list, tuple)):
            to_text = ",".join(_require_str("to_aids", a) for a in to_aids)
        else:
            to_text = _opt_str("to_aids", to_aids)
        return {
            "message_id": _opt_str("message_id", message_id),
            "session_id": self._id_param(sid),
            "role": _require_str("role", role),
            "message_aid": _require_str("message_aid", message_aid),
            "parent_message_id": self._id_param(parent) if parent else "",
            "to_aids": to_text,
            "content": _json_text("content", content),
            "instruction": _json_text("instruction", instruction),
            "type": _require_str("type", kind),
            "status": _require_str("status", status),
        }

    @staticmethod
    def _insert_row(conn: sqlite3.Connection, row: Dict[str, Any]) -> int:
        cols = list(row)
        cur = conn.execute(f"INSERT INTO messages ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [row[c] for c in cols])
        return _rowid(cur)

    def update_message(self, message: Dict[str, Any]) -> int:
        """Update a stored message in place (e.g. a stream's content filled in progressively).

        ``message`` needs ``session_id`` and ``message_id``; any of ``message``/``content``, ``status``,
        ``type``, ``instruction`` given are written. Returns the number of rows changed (0 if not stored).
        """
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, got {type(message).__name__}")
        sid = _require_str("session_id", message.get("session_id"))
        mid = _require_str("message_id", message.get("message_id"))
        sets, params = [], []
        content = message.get("content", message.get("message"))
        if content is not None:
            sets.append("content = ?")
            params.append(_json_text("content", content))
        for col in ("status", "type"):
            if message.get(col) is not None:
                sets.append(f"{col} = ?")
                params.append(_require_str(col, message[col]))
        if "instruction" in message:
            sets.append("instruction = ?")
            params.append(_json_text("instruction", message["instruction"]))
        if not sets:
            raise ValueError("update_message: nothing to update (give message/content, status, type or instruction)")
        with self._write() as conn:
            cur = conn.execute(f"UPDATE messages SET {', '.join(sets)} WHERE session_id = ? AND message_id = ?",
                               (*params, self._id_param(sid), mid))
            return cur.rowcount

    def get_message_by_id(self, aid, session_id, message_id) -> List[Row]:
        """Rows (dicts with the ``messages`` columns) of that message in that session; ``[]`` if absent."""
        sid = _require_str("session_id", session_id)
        mid = _require_str("message_id", message_id)
        return self._select("messages", MESSAGE_COLUMNS, "session_id = ? AND message_id = ?",
                            (self._id_param(sid), mid), order="_src, id")

    def get_message_list(self, aid, session_id, page=1, page_size=10) -> List[Row]:
        """A session's messages oldest first (0.1.99 order), ``page_size`` per page (honoured, unlike 0.1.99).

        Each row is a dict with the ``messages`` columns: ``id, message_id, session_id, role, message_aid,
        parent_message_id, to_aids, content, instruction, type, status, timestamp`` (ids as str).
        """
        sid = _require_str("session_id", session_id)
        return self._select("messages", MESSAGE_COLUMNS, "session_id = ?", (self._id_param(sid),),
                            order="timestamp, _src, id", limit=_page(page, page_size))

    def get_conversation_messages(self, conversation_id) -> List[Row]:
        """Every message of a session, oldest first."""
        sid = _require_str("conversation_id", conversation_id)
        return self._select("messages", MESSAGE_COLUMNS, "session_id = ?", (self._id_param(sid),),
                            order="timestamp, _src, id")

    # --- friends --------------------------------------------------------------------------------------------
    def add_friend_agent(self, friend_aid, name, avaUrl, description) -> bool:  # noqa: N803 (0.1.99 name)
        """Add or update a friend (one row per AID; 0.1.99 piled up duplicates). True on success."""
        fid = _require_str("friend_aid", friend_aid)
        values = (_opt_str("name", name), _opt_str("avaUrl", avaUrl), _opt_str("description", description))
        try:
            with self._write() as conn:
                cur = conn.execute("UPDATE friend SET name = ?, avaurl = ?, description = ? WHERE aid = ?",
                                   (*values, fid))
                if cur.rowcount == 0:
                    conn.execute("INSERT INTO friend (aid, name, avaurl, description) VALUES (?, ?, ?, ?)",
                                 (fid, *values))
        except sqlite3.Error as exc:
            _log.error("add_friend_agent %s failed: %s", fid, exc)
            return False
        return True

    def set_friend_agent(self, friend_aid, name) -> bool:
        """Rename a friend; True if a row changed."""
        fid = _require_str("friend_aid", friend_aid)
        with self._write() as conn:
            return conn.execute("UPDATE friend SET name = ? WHERE aid = ?",
                                (_opt_str("name", name), fid)).rowcount > 0

    def delete_friend_agent(self, friend_aid) -> bool:
        """Remove a friend (every duplicate row); True if one existed."""
        fid = _require_str("friend_aid", friend_aid)
        try:
            with self._write() as conn:
                return conn.execute("DELETE FROM friend WHERE aid = ?", (fid,)).rowcount > 0
        except sqlite3.Error as exc:
            _log.error("delete_friend_agent %s failed: %s", fid, exc)
            return False

    def get_friend_agent_list(self, aid=None) -> List[Row]:
        """``[{"id","aid","name","avaurl","description"}]``, one per friend AID (the newest row wins)."""
        rows = self._select("friend", FRIEND_COLUMNS, order="_src, id")
        latest: Dict[str, Row] = {}
        for row in rows:
            latest.pop(row["aid"], None)  # re-insert so the order follows the newest row
            latest[row["aid"]] = row
        return list(latest.values())

    # --- agent ids (0.1.99's never-created `agentids` table) ------------------------------------------------
    def _ensure_agentids(self) -> None:
        if not self._agentids_ready:
            self._create_table()

    def create_aid(self, aid, ep_aid="", ep_url="", avaUrl="", name="", description="") -> int:  # noqa: N803
        """Insert or replace an ``agentids`` row; returns 1."""
        key = _require_str("aid", aid)
        self._ensure_agentids()
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO agentids (aid, ep_aid, ep_url, avaUrl, name, description) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (key, _opt_str("ep_aid", ep_aid), _opt_str("ep_url", ep_url), _opt_str("avaUrl", avaUrl),
                          _opt_str("name", name), _opt_str("description", description)))
        return 1

    def update_aid(self, aid, ep_aid, ep_url) -> int:
        """Set an aid's entry point; returns the number of rows changed."""
        key = _require_str("aid", aid)
        self._ensure_agentids()
        with self._write() as conn:
            return conn.execute("UPDATE agentids SET ep_aid = ?, ep_url = ? WHERE aid = ?",
                                (_opt_str("ep_aid", ep_aid), _opt_str("ep_url", ep_url), key)).rowcount

    def update_aid_info(self, aid, avaUrl, name, description) -> int:  # noqa: N803
        """Store an aid's profile fields (creating the row if needed); returns 1 as 0.1.99 did."""
        key = _require_str("aid", aid)
        self._ensure_agentids()
        values = (_opt_str("avaUrl", avaUrl), _opt_str("name", name), _opt_str("description", description))
        with self._write() as conn:
            if conn.execute("UPDATE agentids SET avaUrl = ?, name = ?, description = ? WHERE aid = ?",
                            (*values, key)).rowcount == 0:
                conn.execute("INSERT INTO agentids (aid, ep_aid, ep_url, avaUrl, name, description) "
                             "VALUES (?, '', '', ?, ?, ?)", (key, *values))
        return 1

    def load_aid(self, aid) -> Optional[Row]:
        """The ``agentids`` row of ``aid`` as a dict, or None."""
        key = _require_str("aid", aid)
        self._ensure_agentids()
        rows = self._select("agentids", AGENTIDS_COLUMNS, "aid = ?", (key,))
        return rows[0] if rows else None

    def get_agentid_list(self) -> List[Row]:
        """Every ``agentids`` row."""
        self._ensure_agentids()
        return self._select("agentids", AGENTIDS_COLUMNS, order="aid")
