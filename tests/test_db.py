"""DBManager: 0.1.99 schema and location, old databases stay readable, real writes, idempotence, threads, crashes."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agentcp.db import DBManager
from agentcp.db.db_mananger import DBManager as DBManagerDirect

ME = "alice.agentunion.cn"
BOB = "bob.agentunion.cn"
SID = "1831173476580327424"  # a server-assigned 19-digit session id (messaging.md §2.1)

# The DDL as messaging.md §6.2 gives it, typed in independently of the implementation.
DDL_0199 = """
CREATE TABLE IF NOT EXISTS conversation (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL,
  identifying_code TEXT NOT NULL,
  main_aid TEXT NOT NULL,
  name TEXT NOT NULL,
  type TEXT NOT NULL,
  timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')));
CREATE TABLE IF NOT EXISTS messages (
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
  timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')));
CREATE TABLE IF NOT EXISTS chat_config (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id INTEGER NOT NULL,
  aid TEXT NOT NULL,
  avaurl TEXT,
  description TEXT,
  post_data TEXT);
CREATE TABLE IF NOT EXISTS friend (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  aid TEXT NOT NULL,
  name TEXT,
  avaurl TEXT,
  description TEXT);
"""


def blocks(text: str) -> str:
    return json.dumps([{"type": "content", "status": "success", "timestamp": 1746343146261, "content": text}])


def incoming(mid: str, text: str = "hi", sid: str = SID, sender: str = BOB, **extra) -> dict:
    msg = {"session_id": sid, "request_id": "", "message_id": mid, "ref_msg_id": "", "sender": sender,
           "receiver": ME, "message": blocks(text), "timestamp": "1746343146265"}
    msg.update(extra)
    return msg


@pytest.fixture
def private(tmp_path):
    path = tmp_path / "agentcp" / "AIDs" / ME / "private"
    return str(path)


@pytest.fixture
def db(private):
    manager = DBManager(private, ME)
    yield manager
    manager.close()


def table_info(path: str):
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"PRAGMA table_info({t})").fetchall()
                for t in ("conversation", "messages", "chat_config", "friend")}
    finally:
        conn.close()


# --- schema and location ------------------------------------------------------------------------------------------
def test_location_schema_and_wal(private, tmp_path, db):
    path = os.path.join(private, "data", "agentid_data.db")
    assert db.db_path == path and os.path.isfile(path)
    assert DBManager is DBManagerDirect

    reference = str(tmp_path / "reference.db")
    conn = sqlite3.connect(reference)
    conn.executescript(DDL_0199)
    conn.close()
    # Same tables, column order, declared types, NOT NULL, defaults and primary keys as 0.1.99.
    assert table_info(path) == table_info(reference)

    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert names - {"sqlite_sequence"} == {"conversation", "messages", "chat_config", "friend"}


def test_reopen_is_idempotent(private):
    with DBManager(private, ME) as first:
        first.save_message(incoming("1"))
    with DBManager(private, ME) as second:
        assert len(second.get_message_list(ME, SID)) == 1


def test_api_names_and_signatures_match_0199():
    expected = {
        "__init__": ["aid_path", "aid"],
        "add_friend_agent": ["friend_aid", "name", "avaUrl", "description"],
        "set_friend_agent": ["friend_aid", "name"],
        "delete_friend_agent": ["friend_aid"],
        "delete_session": ["session_id"],
        "get_friend_agent_list": ["aid"],
        "create_table": [],
        "_create_table": [],
        "load_session_history": ["session_id"],
        "create_session": ["aid", "session_id", "identifying_code", "name", "type"],
        "invite_member": ["aid", "session_id", "invite_aid"],
        "get_message_by_id": ["aid", "session_id", "message_id"],
        "save_message": ["message"],
        "update_message": ["message"],
        "insert_message": ["role", "aid", "conversation_id", "message_aid", "parent_message_id", "to_aids",
                           "instruction", "content", "type", "status", "message_id"],
        "load_aid": ["aid"],
        "create_aid": ["aid", "ep_aid", "ep_url", "avaUrl", "name", "description"],
        "update_aid": ["aid", "ep_aid", "ep_url"],
        "update_aid_info": ["aid", "avaUrl", "name", "description"],
        "get_agentid_list": [],
        "get_conversation_by_id": ["aid", "conversation_id"],
        "get_conversation_list": ["aid", "main_aid", "page", "page_size"],
        "get_conversation_messages": ["conversation_id"],
        "get_conversation_config": ["conversation_id"],
        "add_conversation_config": None,
        "update_conversation_config": None,
        "get_message_list": ["aid", "session_id", "page", "page_size"],
        "get_session_member_list": ["session_id"],
    }
    for name, params in expected.items():
        fn = getattr(DBManager, name)
        got = [p for p in inspect.signature(fn).parameters if p != "self"]
        if params is not None:
            assert got == params, name
    sig = inspect.signature(DBManager.get_message_list).parameters
    assert sig["page"].default == 1 and sig["page_size"].default == 10
    assert inspect.signature(DBManager.insert_message).parameters["message_id"].default == ""


# --- a database written by 0.1.90-0.1.99 stays readable ------------------------------------------------------------
def build_0199_db(private: str) -> str:
    """A DB as an existing agent has it: §6.2 DDL plus rows as 0.1.90/0.1.93/0.1.99 wrote them (§6.3)."""
    data = os.path.join(private, "data")
    os.makedirs(data, exist_ok=True)
    path = os.path.join(data, "agentid_data.db")
    conn = sqlite3.connect(path)
    conn.executescript(DDL_0199)
    conn.execute("INSERT INTO conversation (session_id, identifying_code, main_aid, name, type) "
                 "VALUES (?, ?, '', 'quick session', 'public')", (SID, "owner-secret"))
    cols = "(message_id, session_id, role, message_aid, parent_message_id, to_aids, content, instruction, type, status)"
    rows = [
        # outgoing send_message
        ("1746343146261", SID, "user", ME, "", BOB, blocks("hello"), "", "text", "sent"),
        # incoming
        ("9", SID, "assistant", BOB, "1746343146261", ME, blocks("hi back"), "", "text", "success"),
        # synthetic offline notice: no message id
        ("", SID, "assistant", BOB, "", ME, json.dumps([{"type": "error", "content": "offline"}]), "", "text",
         "success"),
        # written through AgentID.insert_message: shifted by one argument
        ("", SID, "user", ME, "", BOB, blocks("shifted"), "", "sent", "1746343146999"),
        # updated in place by the old get_message_by_id: status overwritten with "text"
        ("10", SID, "assistant", BOB, "", ME, blocks("streamed"), "", "text", "text"),
    ]
    conn.executemany(f"INSERT INTO messages {cols} VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("INSERT INTO chat_config (session_id, aid, avaurl, description, post_data) VALUES (?,?,'','','')",
                 (SID, BOB))
    # add_friend_agent via AgentID: avaurl/description swapped; INSERT OR REPLACE without a key → duplicates
    conn.execute("INSERT OR REPLACE INTO friend (aid, name, avaurl, description) VALUES (?,?,?,?)",
                 (BOB, "Bob", "a helpful agent", "https://x/bob.png"))
    conn.execute("INSERT OR REPLACE INTO friend (aid, name, avaurl, description) VALUES (?,?,?,?)",
                 (BOB, "Bobby", "a helpful agent", "https://x/bob.png"))
    conn.commit()
    conn.close()
    return path


def test_existing_0199_database_is_readable(private):
    path = build_0199_db(private)
    with DBManager(private, ME) as db:
        assert db.db_path == path
        history = db.get_message_list(ME, SID, page=1, page_size=10)
        assert [m["content"] for m in history] == [
            blocks("hello"), blocks("hi back"), json.dumps([{"type": "error", "content": "offline"}]),
            blocks("shifted"), blocks("streamed")]
        first, second = history[0], history[1]
        # INTEGER affinity turned ids into numbers on disk; they come back as the strings they were
        assert first["session_id"] == SID and isinstance(first["session_id"], str)
        assert second["parent_message_id"] == "1746343146261"
        assert first["role"] == "user" and second["role"] == "assistant" and second["message_aid"] == BOB
        assert db.get_message_by_id(ME, SID, "9")[0]["content"] == blocks("hi back")
        # ownership survives: the owner secret of the old session is found again
        assert db.load_session_history(SID)[0]["identifying_code"] == "owner-secret"
        assert db.get_conversation_by_id(ME, SID)["name"] == "quick session"
        assert [c["session_id"] for c in db.get_conversation_list(ME, "", 1, 10)] == [SID]
        assert [m["aid"] for m in db.get_session_member_list(SID)] == [BOB]
        friends = db.get_friend_agent_list(ME)
        assert len(friends) == 1 and friends[0]["name"] == "Bobby"

        # new rows go into the same tables and stay readable the way 0.1.99 reads them
        assert db.save_message(incoming("11", "new one")) is True
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT message_id, session_id, role, message_aid, content FROM messages "
                        "WHERE session_id = ? ORDER BY timestamp ASC, id ASC", (SID,)).fetchall()
    conn.close()
    assert rows[-1] == ("11", int(SID), "assistant", BOB, blocks("new one"))


def test_0130_per_agent_tables_are_read(private):
    data = os.path.join(private, "data")
    os.makedirs(data)
    suffix = hashlib.md5(ME.encode()).hexdigest()
    conn = sqlite3.connect(os.path.join(data, "agentid_data.db"))
    # 0.1.30: per-agent tables, messages_* without the instruction column
    conn.execute(f"CREATE TABLE messages_{suffix} (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT, "
                 "session_id INTEGER, role TEXT NOT NULL, message_aid TEXT NOT NULL, parent_message_id INTEGER, "
                 "to_aids TEXT NOT NULL, content TEXT NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL, "
                 "timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')))")
    conn.execute(f"INSERT INTO messages_{suffix} (message_id, session_id, role, message_aid, parent_message_id, "
                 "to_aids, content, type, status, timestamp) VALUES ('1', ?, 'assistant', ?, '', ?, ?, 'text', "
                 "'success', '2025-05-01 10:00:00')", (SID, BOB, ME, blocks("from may")))
    conn.commit()
    conn.close()
    with DBManager(private, ME) as db:
        db.save_message(incoming("2", "from now"))
        history = db.get_message_list(ME, SID)
        assert [m["content"] for m in history] == [blocks("from may"), blocks("from now")]
        assert history[0]["instruction"] == ""


# --- real writes ------------------------------------------------------------------------------------------------
def test_save_message_incoming_and_outgoing(db):
    db.create_session(ME, SID, "secret", "quick session", "public")
    out = {"session_id": SID, "message_id": "1746343146261", "sender": ME, "receiver": f"{BOB};carol.agentunion.cn",
           "ref_msg_id": "", "message": json.loads(blocks("hello")), "timestamp": "1746343146262",
           "instruction": {"cmd": "weather", "params": None}}
    assert db.save_message(out) is True
    assert db.save_message(incoming("9", "hi", ref_msg_id="1746343146261")) is True
    sent, got = db.get_message_list(ME, SID)
    assert (sent["role"], sent["status"], sent["type"], sent["message_aid"]) == ("user", "sent", "text", ME)
    assert sent["to_aids"] == f"{BOB},carol.agentunion.cn"  # 0.1.90 joined outgoing receivers with ","
    assert json.loads(sent["content"]) == json.loads(blocks("hello"))
    assert json.loads(sent["instruction"]) == {"cmd": "weather", "params": None}
    assert (got["role"], got["status"], got["message_aid"], got["to_aids"]) == ("assistant", "success", BOB, ME)
    assert got["parent_message_id"] == "1746343146261" and got["instruction"] == ""
    assert db.get_conversation_messages(SID) == [sent, got]


def test_save_message_is_idempotent(db):
    assert db.save_message(incoming("9")) is True
    assert db.save_message(incoming("9")) is False  # redelivered after a reconnect
    assert db.save_message(incoming("9", sender="carol.agentunion.cn")) is True  # same id, other author
    assert db.save_message(incoming("9", sid="42")) is True  # same id, other session
    notice = incoming("", "offline notice")
    assert db.save_message(notice) is True and db.save_message(notice) is True  # no id: never deduplicated
    assert len(db.get_message_list(ME, SID, page_size=100)) == 4


def test_insert_message_uses_the_0199_argument_order(db):
    rid = db.insert_message("user", ME, SID, ME, "7", [BOB, "carol.agentunion.cn"], "", blocks("x"), "text",
                            "sent", "1746343146261")
    assert isinstance(rid, int) and rid >= 1
    (row,) = db.get_message_by_id(ME, SID, "1746343146261")
    assert (row["type"], row["status"], row["message_id"], row["parent_message_id"]) == (
        "text", "sent", "1746343146261", "7")
    assert row["to_aids"] == f"{BOB},carol.agentunion.cn"


def test_update_message(db):
    db.save_message(incoming("5", "part"))
    assert db.update_message({"session_id": SID, "message_id": "5", "message": blocks("part and more"),
                              "status": "success"}) == 1
    assert db.get_message_by_id(ME, SID, "5")[0]["content"] == blocks("part and more")
    assert db.update_message({"session_id": SID, "message_id": "nope", "status": "x"}) == 0


def test_sessions_members_and_delete(db):
    assert db.create_session(ME, SID, "secret", "chat", "public") == 1
    assert db.create_session(ME, SID, "", "chat renamed", "public") == 1  # empty code keeps ownership
    (row,) = db.load_session_history(SID)
    assert (row["identifying_code"], row["name"]) == ("secret", "chat renamed")
    assert db.invite_member(ME, SID, BOB) == 1 and db.invite_member(ME, SID, BOB) == 1
    assert [m["aid"] for m in db.get_session_member_list(SID)] == [BOB]
    db.create_session(ME, "2", "", "other", "public")
    assert [c["session_id"] for c in db.get_conversation_list(ME, "", 1, 10)] == ["2", SID]  # newest first
    assert [c["session_id"] for c in db.get_conversation_list(ME, "", 2, 1)] == [SID]
    db.save_message(incoming("1"))
    assert db.delete_session(SID) is True
    assert db.load_session_history(SID) == [] and db.get_message_list(ME, SID) == []
    assert db.get_session_member_list(SID) == [] and db.get_conversation_by_id(ME, SID) is None


def test_page_size_is_honoured_and_order_is_oldest_first(db):
    for i in range(25):
        db.save_message(incoming(str(i), f"m{i}"))
    pages = [db.get_message_list(ME, SID, page, 10) for page in (1, 2, 3, 4)]
    assert [len(p) for p in pages] == [10, 10, 5, 0]
    assert [m["message_id"] for p in pages for m in p] == [str(i) for i in range(25)]


def test_ids_that_integer_affinity_would_mangle_stay_distinct(db):
    odd = ["007", "7", "99999999999999999999", "99999999999999999998", "1e5", " 12", "abc"]
    for sid in odd:
        db.save_message(incoming("1", f"in {sid}", sid=sid))
        db.create_session(ME, sid, "", sid, "public")
    for sid in odd:
        (row,) = db.get_message_list(ME, sid)
        assert row["session_id"] == sid and row["content"] == blocks(f"in {sid}")
        assert db.load_session_history(sid)[0]["session_id"] == sid


def test_friends(db):
    assert db.add_friend_agent(BOB, "Bob", "https://x/b.png", "helper") is True
    assert db.add_friend_agent(BOB, "Bob2", "https://x/b.png", "helper") is True  # update, no duplicate
    assert db.get_friend_agent_list(ME) == [
        {"id": 1, "aid": BOB, "name": "Bob2", "avaurl": "https://x/b.png", "description": "helper"}]
    assert db.set_friend_agent(BOB, "Robert") is True
    assert db.get_friend_agent_list(ME)[0]["name"] == "Robert"
    assert db.delete_friend_agent(BOB) is True and db.delete_friend_agent(BOB) is False
    assert db.get_friend_agent_list(ME) == []


def test_agentids_table_methods_work(db):
    assert db.load_aid(BOB) is None
    db.create_aid(BOB, ep_url="https://acp3.agentunion.cn")
    db.update_aid_info(BOB, "https://x/b.png", "Bob", "helper")
    assert db.update_aid(BOB, "ep.agentunion.cn", "https://ep") == 1
    assert db.load_aid(BOB) == {"aid": BOB, "ep_aid": "ep.agentunion.cn", "ep_url": "https://ep",
                                "avaUrl": "https://x/b.png", "name": "Bob", "description": "helper"}
    assert [a["aid"] for a in db.get_agentid_list()] == [BOB]


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("message, error", [
    ("not a dict", TypeError),
    ({"session_id": SID, "sender": BOB}, ValueError),  # no message
    ({"session_id": "", "sender": BOB, "message": "[]"}, ValueError),
    ({"session_id": SID, "sender": None, "message": "[]"}, TypeError),
    ({"session_id": SID, "sender": BOB, "message": 42}, TypeError),
    ({"session_id": SID, "sender": BOB, "message": [object()]}, TypeError),
    ({"session_id": [SID], "sender": BOB, "message": "[]"}, TypeError),
])
def test_save_message_rejects_bad_input(db, message, error):
    with pytest.raises(error):
        db.save_message(message)
    assert db.get_message_list(ME, SID) == []


def test_other_bad_input_and_closed_db(db, private):
    with pytest.raises(ValueError):
        db.get_message_list(ME, SID, page=0)
    with pytest.raises(ValueError):
        db.get_conversation_list(ME, "", 1, -5)
    with pytest.raises(ValueError):
        db.create_session(ME, "", "", "x", "public")
    with pytest.raises(ValueError):
        db.update_message({"session_id": SID, "message_id": "1"})
    with pytest.raises(TypeError):
        DBManager(private, None)
    db.close()
    db.close()
    with pytest.raises(RuntimeError, match="closed"):
        db.save_message(incoming("1"))


def test_a_failed_write_leaves_nothing_behind(db, monkeypatch):
    def boom(conn, row):
        conn.execute("INSERT INTO messages (message_id, session_id, role, message_aid, to_aids, content, type, "
                     "status) VALUES ('x', 1, 'r', 'a', '', '', 't', 's')")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(DBManager, "_insert_row", staticmethod(boom))
    with pytest.raises(sqlite3.OperationalError):
        db.save_message(incoming("1"))
    monkeypatch.undo()
    assert db._read("SELECT count(*) FROM messages")[0][0] == 0
    assert db.save_message(incoming("1")) is True  # the connection is usable afterwards


# --- concurrency and crashes ---------------------------------------------------------------------------------
def test_concurrent_threads_store_each_message_once(db):
    errors = []

    def worker(start: int) -> None:
        try:
            # every message is saved by two threads (a redelivery racing the original)
            for i in range(start, start + 100):
                db.save_message(incoming(str(i // 2), f"m{i // 2}"))
                db.get_message_list(ME, SID, 1, 5)
        except Exception as exc:  # noqa: BLE001 — surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    rows = db.get_message_list(ME, SID, 1, 1000)
    assert sorted(int(r["message_id"]) for r in rows) == list(range(400))


def test_two_managers_on_one_file(private):
    with DBManager(private, ME) as a, DBManager(private, ME) as b:
        assert a.save_message(incoming("1")) is True
        assert b.save_message(incoming("1")) is False
        assert len(b.get_message_list(ME, SID)) == 1


def test_a_killed_writer_loses_no_committed_message(private):
    script = textwrap.dedent(f"""
        import sys
        from agentcp.db import DBManager
        db = DBManager({private!r}, {ME!r})
        i = 0
        while True:
            db.save_message({{"session_id": {SID!r}, "message_id": str(i), "sender": {BOB!r},
                              "receiver": {ME!r}, "ref_msg_id": "", "message": "[]" * 200}})
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        committed = []
        deadline = time.monotonic() + 15
        while len(committed) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)  # mid-write, without any cleanup
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    assert len(committed) >= 200
    conn = sqlite3.connect(os.path.join(private, "data", "agentid_data.db"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with DBManager(private, ME) as db:
        stored = {int(r["message_id"]) for r in db.get_message_list(ME, SID, 1, 100000)}
    assert set(committed) <= stored
    assert stored == set(range(len(stored)))  # no gaps, no partial rows
