"""``AgentID``'s local history, friends and public-file members (api.md §3.7/§3.8), as a mixin.

:class:`HistoryMixin` is a base class of :class:`agentcp.agentcp.AgentID`. It needs ``self.id``,
``self.db_manager`` (opened lazily through ``self._db()`` when the host class has it) and, for
:meth:`HistoryMixin.save_public_file`, ``self.public_data_path``.

agentcp 0.1.99 stubbed most of these out or called the database with shifted arguments (messaging.md §7
"Persistence"). Here they read and write the real SQLite history of :class:`agentcp.db.db_mananger.DBManager`:

* ``get_llm_message_list`` no longer raises ``TypeError``; it returns the session as chat-completion messages.
* ``get_conversation_list(page, page_size)`` lists the stored sessions (0.1.99 passed ``page`` as ``main_aid``).
* ``insert_message`` stores ``type="text"``, the status and the message id in their own columns (0.1.99 wrote
  ``type="sent"``, ``status=<message id>``, ``message_id=""``).
* ``add_friend_agent(aid, name, description, avaUrl)`` stores the avatar URL and the description in their own
  columns (0.1.99 swapped them).
* ``get_message_list`` honours ``page_size`` (0.1.99 forced 100).

Reads that fail inside the database (a locked or corrupt file, a closed manager) are logged and give ``[]`` so that
history never breaks an agent; invalid arguments (``page=0``, a non-str id) raise ``ValueError``/``TypeError``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any, Dict, List, Optional

from agentcp.base.names import resolve_inside

_log = logging.getLogger("agentcp.history")

__all__ = ["HistoryMixin", "blocks_text"]

# Block types whose ``content`` is conversation text (api.md §3.3: "content" is the usual one, "text" the old one).
_TEXT_BLOCKS = ("content", "text")


def _unwrap_text(content: Any) -> Optional[str]:
    """The text of one block's ``content``: ``{"text": ...}`` (as an object or JSON text) unwrapped, str kept."""
    if isinstance(content, dict):
        text = content.get("text")
        return text if isinstance(text, str) else None
    if isinstance(content, str):
        try:
            decoded = json.loads(content)
        except ValueError:
            return content
        if isinstance(decoded, dict) and isinstance(decoded.get("text"), str):
            return decoded["text"]
        return content
    return None


def _flatten(blocks: Any) -> List[Any]:
    # 0.1.9x appended a redelivered message as a nested array to the stored content (messaging.md §6.3).
    out: List[Any] = []
    stack = [blocks]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def blocks_text(content: Any) -> str:
    """The conversation text of a stored ``messages.content`` (JSON text of a block list, or the list itself).

    The ``content`` of every ``content``/``text`` block, joined with newlines; other blocks (tool calls, errors,
    streams, files) contribute nothing. Text that is not JSON counts as the text itself.
    """
    if isinstance(content, str):
        try:
            decoded = json.loads(content)
        except ValueError:
            return content
    else:
        decoded = content
    if isinstance(decoded, dict):
        decoded = [decoded]
    if not isinstance(decoded, list):
        return content if isinstance(content, str) else ""
    parts = []
    for block in _flatten(decoded):
        if isinstance(block, dict) and block.get("type") in _TEXT_BLOCKS:
            text = _unwrap_text(block.get("content"))
            if text:
                parts.append(text)
    return "\n".join(parts)


def _plain(value: Any) -> Any:
    """Dataclass blocks (``AssistantMessageBlock``), also nested, as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in value.__dict__.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _content_json(message: Any) -> str:
    """``message`` as the stored block-list JSON: a str that already is a JSON block list is kept; any other str
    becomes one ``content`` block (as ``send_message`` sends it); a block or a list of blocks is serialised."""
    if message is None:
        return "[]"
    if isinstance(message, str):
        try:
            decoded = json.loads(message)
        except ValueError:
            decoded = None
        if isinstance(decoded, list):
            return message
        return json.dumps([{"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                            "content": message}])
    plain = _plain(message)
    if isinstance(plain, dict):
        plain = [plain]
    if not isinstance(plain, list):
        raise TypeError(f"message must be a str, a block or a list of blocks, got {type(message).__name__}")
    try:
        return json.dumps(plain)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message is not JSON-serialisable: {exc}") from None


class HistoryMixin:
    """History, friends and public-file members of ``AgentID`` (api.md §3.7/§3.8) over ``self.db_manager``."""

    id: str
    db_manager: Any
    public_data_path: str

    # --- plumbing -------------------------------------------------------------------------------------------
    def _history_db(self):
        """The agent's ``DBManager`` (opened on first use by the host's ``_db()``), or None if unavailable."""
        opener = getattr(self, "_db", None)
        if callable(opener):
            return opener()
        return self.db_manager

    def _history_failed(self, what: str, exc: BaseException) -> None:
        counter = getattr(self, "_count_history_error", None)
        if callable(counter):
            counter(what, exc)  # AgentID logs the first failure of each kind and counts the rest
        else:
            _log.warning("%s: history %s failed: %s", getattr(self, "id", "?"), what, exc)

    def _history_read(self, what: str, call) -> List[Dict[str, Any]]:
        """``[dict(row) for row in call(db)]``; ``[]`` when the database is unavailable or fails."""
        db = self._history_db()
        if db is None:
            return []
        try:
            rows = call(db)
        except (sqlite3.Error, RuntimeError, OSError) as exc:  # the file, not the caller: history never breaks
            self._history_failed(what, exc)
            return []
        return [dict(row) for row in rows or []]

    def _history_write(self, what: str, call) -> Any:
        """``call(db)``; None when the database is unavailable or fails (logged)."""
        db = self._history_db()
        if db is None:
            return None
        try:
            return call(db)
        except (sqlite3.Error, RuntimeError, OSError) as exc:
            self._history_failed(what, exc)
            return None

    # --- messages -------------------------------------------------------------------------------------------
    def get_message_list(self, session_id, page=1, page_size=10):
        """Stored messages of ``session_id``, oldest first, ``page_size`` per page (``page`` from 1).

        Each item is a dict with the ``messages`` columns: ``id, message_id, session_id, role, message_aid,
        parent_message_id, to_aids, content, instruction, type, status, timestamp`` (``content`` is the JSON text
        of the block list). ``[]`` for an unknown session.
        """
        return self._history_read("get_message_list",
                                  lambda db: db.get_message_list(self.id, session_id, page, page_size))

    def get_llm_message_list(self, session_id, page=1, page_size=10):
        """The session's messages as chat-completion messages, oldest first: ``[{"role", "content"}]``.

        The role is seen from this agent (an LLM answering as it): messages it wrote are ``assistant``, messages
        from anyone else are ``user``. ``content`` is the text of the message's ``content``/``text`` blocks;
        messages without text (tool calls, error notices, stream announcements) are left out. Paging is that of
        :meth:`get_message_list` (over stored messages). 0.1.99 always raised ``TypeError`` here.
        """
        out = []
        for row in self.get_message_list(session_id, page, page_size):
            text = blocks_text(row.get("content", ""))
            if not text:
                continue
            role = "assistant" if row.get("message_aid") == self.id else "user"
            out.append({"role": role, "content": text})
        return out

    def insert_message(self, role, aid, session_id, to_aids, message, parent_message_id="", message_id: str = ""):
        """Store one message row: ``role`` (``user``/``assistant``), author ``aid``, ``to_aids`` (list or str),
        ``message`` (a str, a block or a list of blocks; stored as the JSON block list). Returns None (as 0.1.99).

        The row gets ``type="text"`` and ``status`` ``sent`` when this agent is the author, else ``success``
        (0.1.99 shifted these: ``type="sent"``, ``status=<message id>``, ``message_id=""``).
        """
        content = _content_json(message)
        status = "sent" if aid == self.id else "success"
        self._history_write("insert_message", lambda db: db.insert_message(
            role, self.id, session_id, aid, parent_message_id or "", to_aids if to_aids is not None else "", "",
            content, "text", status, message_id or ""))
        return None

    def get_conversation_list(self, page=1, page_size=10):
        """Stored sessions, newest first, ``page_size`` per page: dicts with ``id, session_id, identifying_code,
        main_aid, name, type, timestamp``. (0.1.99 passed ``page`` as ``main_aid`` and found nothing.)"""
        return self._history_read("get_conversation_list",
                                  lambda db: db.get_conversation_list(self.id, "", page, page_size))

    # --- friends --------------------------------------------------------------------------------------------
    def add_friend_agent(self, aid, name, description, avaUrl):  # noqa: N803 (0.1.99 name)
        """Add or update the friend ``aid``; True on success. (0.1.99 stored description and avaUrl swapped.)"""
        return bool(self._history_write("add_friend_agent",
                                        lambda db: db.add_friend_agent(aid, name, avaUrl, description)))

    def set_friend_name(self, aid, name):
        """Rename the friend ``aid``; True if it exists."""
        return bool(self._history_write("set_friend_name", lambda db: db.set_friend_agent(aid, name)))

    def get_friend_agent_list(self):
        """``[{"id", "aid", "name", "avaurl", "description"}, ...]``, one entry per friend."""
        return self._history_read("get_friend_agent_list", lambda db: db.get_friend_agent_list(self.id))

    def delete_friend_agent(self, aid):
        """Remove the friend ``aid``; True if it was a friend."""
        return bool(self._history_write("delete_friend_agent", lambda db: db.delete_friend_agent(aid)))

    # --- public files ---------------------------------------------------------------------------------------
    def save_public_file(self, file_path: str, filename: str):
        """Copy ``file_path`` into the public directory as ``filename`` (atomically) and, when the access point
        client exists, publish it with ``sync_public_files``. True on success, False (logged) otherwise.

        ``filename`` may name a subdirectory but must stay inside the public directory. (0.1.99 always raised
        ``AttributeError`` here.)
        """
        target = resolve_inside(self.public_data_path, filename, field="public file name")
        if not os.path.isfile(file_path):
            _log.error("%s: save_public_file: %s is not a file", self.id, file_path)
            return False
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Copy to a temporary file next to the target, then rename: a reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "wb") as out, open(file_path, "rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, target)
        except OSError as exc:
            _log.error("%s: save_public_file %s -> %s failed: %s", self.id, file_path, target, exc)
            try:
                os.remove(tmp)
            except OSError:
                pass
            return False
        if getattr(self, "ap_client", None) is not None:
            sync = getattr(self, "sync_public_files", None)
            if callable(sync):
                return bool(sync())
        return True
