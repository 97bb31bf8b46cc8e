"""History write-behind: batched writes that reads always see, flushed at offline(), never dropped when full."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from agentcp.db import DBManager
from agentcp.db.write_behind import Flusher, WriteBehindPolicy
from conftest import until

ME = "alice.agentunion.cn"
BOB = "bob.agentunion.cn"
SID = "1831173476580327424"


def _msg(i: int, sender: str = BOB, mid: str = "") -> dict:
    return {"session_id": SID, "sender": sender, "receiver": ME, "message_id": mid or f"m{i}",
            "message": [{"type": "content", "content": f"text {i}"}]}


def _on_disk(db: DBManager) -> int:
    """Rows another connection sees (what survives this process)."""
    conn = sqlite3.connect(db.db_path)
    try:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path):
    d = DBManager(str(tmp_path), ME)
    d.write_behind = WriteBehindPolicy(max_rows=5, max_delay=60.0)  # only size, reads and flush() write
    yield d
    d.close()


def test_rows_are_written_in_batches_not_one_transaction_each(db):
    commits = []
    db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    for i in range(4):
        db.save_message_later(_msg(i))
    assert commits == [] and _on_disk(db) == 0  # buffered
    assert db.flush() == 4
    assert len(commits) == 1 and _on_disk(db) == 4
    assert db.write_behind_stats()["batches"] == 1


def test_reads_see_buffered_rows_in_order(db):
    for i in range(3):
        db.save_message_later(_msg(i))
    rows = db.get_message_list(ME, SID, 1, 10)
    assert [r["message_id"] for r in rows] == ["m0", "m1", "m2"]
    # another write goes after the buffered rows
    db.save_message_later(_msg(3))
    assert db.save_message(_msg(4)) is True
    assert [r["message_id"] for r in db.get_conversation_messages(SID)] == ["m0", "m1", "m2", "m3", "m4"]


def test_full_buffer_writes_through_and_loses_nothing(db):
    for i in range(12):
        db.save_message_later(_msg(i))
    # max_rows=5: the 5th and the 10th save wrote the buffer themselves, without a read or a timer
    assert _on_disk(db) == 10
    stats = db.write_behind_stats()
    assert stats["write_through"] == 2 and stats["pending"] == 2 and stats["lost"] == 0
    db.close()
    assert _on_disk(db) == 12  # close writes the rest


def test_duplicates_in_one_batch_are_stored_once(db):
    db.save_message_later(_msg(1))
    db.save_message_later(_msg(1))
    db.save_message_later(_msg(2, sender=ME))
    assert db.flush() == 2
    assert db.write_behind_stats()["duplicates"] == 1


def test_invalid_message_raises_at_once_and_buffers_nothing(db):
    with pytest.raises(ValueError):
        db.save_message_later({"session_id": SID, "sender": BOB})
    assert db.write_behind_stats()["pending"] == 0


def test_failed_batch_is_reported_not_silent(db):
    errors = []
    db.on_flush_error = lambda exc, rows: errors.append(rows)
    db.save_message_later(_msg(1))
    db.save_message_later(_msg(2))
    db.conn.close()  # the file becomes unusable under the buffer
    with pytest.raises(sqlite3.Error):
        db.flush()
    assert errors == [2]
    stats = db.write_behind_stats()
    assert stats["lost"] == 2 and stats["flush_errors"] == 1


def test_the_shared_writer_flushes_after_the_delay(tmp_path):
    db = DBManager(str(tmp_path), ME)
    db.write_behind = WriteBehindPolicy(max_rows=1000, max_delay=0.05)
    try:
        db.save_message_later(_msg(1))
        until(lambda: _on_disk(db) == 1, timeout=5, what="the delayed write")
    finally:
        db.close()


class _FakeDB:
    def __init__(self) -> None:
        self.flushes = 0
        self.flushed = threading.Event()

    def flush(self) -> int:
        self.flushes += 1
        self.flushed.set()
        return 0


def test_one_writer_thread_for_all_databases_and_it_is_joined():
    flusher = Flusher(name="agentcp-test-writer")
    dbs = [_FakeDB() for _ in range(20)]
    before = set(threading.enumerate())
    for d in dbs:
        flusher.schedule(d, 0.0)
    for d in dbs:
        assert d.flushed.wait(5)
    assert len(set(threading.enumerate()) - before) <= 1  # one thread, not one per database
    assert flusher.stop_if_idle()
    assert set(threading.enumerate()) - before == set()


def test_writer_thread_exits_when_idle_and_restarts_on_demand():
    flusher = Flusher(name="agentcp-test-writer")
    d = _FakeDB()
    flusher.schedule(d, 0.0)
    assert d.flushed.wait(5)
    until(lambda: not flusher.stats()["running"], timeout=5, what="idle exit")
    d.flushed.clear()
    flusher.schedule(d, 0.0)
    assert d.flushed.wait(5)
    flusher.stop()
    assert not flusher.stats()["running"]


def test_stop_writes_what_is_scheduled():
    flusher = Flusher(name="agentcp-test-writer")
    d = _FakeDB()
    flusher.schedule(d, float("inf"))  # not due for ever
    flusher.stop()
    assert d.flushes == 1


def test_message_sent_is_in_history_at_once_and_on_disk_after_offline(agents, network):
    a, b = agents("alice"), agents("bob")
    a.online()
    b.online()
    sid = a.create_session("chat", "")
    assert a.invite_member(sid, b.id)
    a.db_manager.write_behind = WriteBehindPolicy(max_rows=10_000, max_delay=3600.0)  # only reads/offline write
    results = [a.send_message_content(sid, [b.id], f"hello {i}") for i in range(5)]
    assert all(results)
    assert a.db_manager.write_behind_stats()["pending"] == 5
    # read-your-writes: the history shows what was just sent
    texts = [r["content"] for r in a.get_message_list(sid, 1, 10)]
    assert len(texts) == 5 and "hello 4" in texts[-1]
    results.append(a.send_message_content(sid, [b.id], "last"))
    a.offline()
    assert _on_disk(a.db_manager) == 6  # offline() wrote the buffer
    assert a.db_manager.write_behind_stats()["pending"] == 0


def test_a_bad_row_found_at_write_time_is_counted_and_the_others_are_stored(db):
    db.save_message_later(_msg(1))
    db.save_message_later(dict(_msg(2), session_id=["not", "an", "id"]))  # wrong type: only the writer sees it
    db.save_message_later(_msg(3))
    assert db.flush() == 2
    stats = db.write_behind_stats()
    assert stats["invalid"] == 1 and stats["lost"] == 0
    assert [r["message_id"] for r in db.get_conversation_messages(SID)] == ["m1", "m3"]


def test_an_idle_online_agent_opens_no_history_database(agents):
    a = agents("idle")
    a.online()
    assert a.is_online_success
    assert a.db_manager is None  # no SQLite connection (and its memory) until the history is used
    assert a.get_message_list("123", 1, 10) == []
    assert a.db_manager is not None


def test_a_burst_has_the_writer_thread_write_early_not_the_sender(tmp_path):
    db = DBManager(str(tmp_path), ME)
    db.write_behind = WriteBehindPolicy(max_rows=1000, max_delay=3600.0, soon_rows=10)
    try:
        for i in range(10):
            db.save_message_later(_msg(i))
        until(lambda: _on_disk(db) == 10, timeout=5, what="the early write")  # long before the delay
        assert db.write_behind_stats()["write_through"] == 0
    finally:
        db.close()


def test_rows_buffered_when_the_process_exits_are_written(tmp_path):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        from agentcp.db import DBManager
        from agentcp.db.write_behind import WriteBehindPolicy
        db = DBManager({str(tmp_path)!r}, {ME!r})
        db.write_behind = WriteBehindPolicy(max_rows=1000, max_delay=3600.0)
        for i in range(3):
            db.save_message_later({{"session_id": {SID!r}, "sender": {BOB!r}, "message_id": "m%d" % i,
                                    "message": "[]"}})
        # no flush, no close: the interpreter's exit writes them
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    conn = sqlite3.connect(str(tmp_path / "data" / "agentid_data.db"))
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 3
    finally:
        conn.close()
