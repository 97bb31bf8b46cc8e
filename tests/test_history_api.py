"""AgentID history, friends and profile members (api.md §3.7/§3.8) over a real DBManager, 0.1.99 defects fixed.

The agents are loaded with ``AgentCP.load_aid`` from identities the fake server issued (or written in the 0.1.99
layout by ``tests/legacy_identity.py``); nothing here goes online.
"""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

from agentcp import AgentCP, AgentID
from agentcp.history import HistoryMixin, blocks_text
from agentcp.message import AssistantMessageBlock

ME = "alice.example.com"
BOB = "bob.example.com"
NOWHERE = "http://127.0.0.1:9"  # a valid stored certificate loads without the network


@pytest.fixture
def acp(tmp_path):
    return AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=NOWHERE)


@pytest.fixture
def agent(acp, acp_server) -> AgentID:
    acp_server.issue_identity(ME, os.path.join(acp.aid_path, ME, "private", "certs"), "s")
    aid = acp.load_aid(ME)
    assert aid is not None
    yield aid
    if aid.db_manager is not None:
        aid.db_manager.close()


def _rows(agent, sql, params=()):
    con = sqlite3.connect(os.path.join(agent.private_data_path, "data", "agentid_data.db"))
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_agentid_is_a_history_mixin_and_every_member_exists(agent):
    assert isinstance(agent, HistoryMixin)
    for name in ("get_message_list", "get_llm_message_list", "get_conversation_list", "insert_message",
                 "add_friend_agent", "set_friend_name", "get_friend_agent_list", "delete_friend_agent",
                 "delete_session", "get_session_member_list", "update_aid_info", "get_aid_info", "get_app_path",
                 "get_my_profile_data", "save_public_file", "get_agent_public_path", "get_agent_private_path",
                 "get_publisher_info", "create_agent_profile"):
        assert callable(getattr(agent, name)), name


def test_insert_message_stores_type_status_and_id_in_their_columns(agent):
    agent.insert_message("user", ME, "s1", [BOB], "hello", "", "m1")
    assert agent.insert_message("assistant", BOB, "s1", ME, [{"type": "content", "content": "hi back"}],
                                "m1", "m2") is None
    agent.insert_message("user", ME, "s1", [BOB],
                         AssistantMessageBlock(type="content", status="success", timestamp=1, content="block"))
    rows = _rows(agent, "SELECT message_id, session_id, role, message_aid, parent_message_id, to_aids, type, "
                        "status, content FROM messages ORDER BY id")
    assert [r[:8] for r in rows] == [
        ("m1", "s1", "user", ME, "", BOB, "text", "sent"),  # 0.1.99: type "sent", status "m1", message_id ""
        ("m2", "s1", "assistant", BOB, "m1", ME, "text", "success"),
        ("", "s1", "user", ME, "", BOB, "text", "sent"),
    ]
    first = json.loads(rows[0][8])
    assert first[0]["type"] == "content" and first[0]["content"] == "hello"  # a str becomes one content block
    assert json.loads(rows[1][8]) == [{"type": "content", "content": "hi back"}]
    assert json.loads(rows[2][8])[0]["content"] == "block"
    with pytest.raises(TypeError):
        agent.insert_message("user", ME, "s1", [BOB], 42)


def test_get_message_list_pages_oldest_first_and_honours_page_size(agent):
    for i in range(25):
        agent.insert_message("user", ME, "s1", [BOB], f"m{i}", "", f"id{i}")
    agent.insert_message("user", ME, "other", [BOB], "elsewhere", "", "x")
    page1 = agent.get_message_list("s1")  # default page_size 10 (0.1.99 forced 100)
    assert [r["message_id"] for r in page1] == [f"id{i}" for i in range(10)]
    assert [r["message_id"] for r in agent.get_message_list("s1", 3, 10)] == [f"id{i}" for i in range(20, 25)]
    assert len(agent.get_message_list("s1", 1, 100)) == 25
    row = page1[0]
    assert set(row) == {"id", "message_id", "session_id", "role", "message_aid", "parent_message_id", "to_aids",
                        "content", "instruction", "type", "status", "timestamp"}
    assert agent.get_message_list("unknown") == []
    with pytest.raises(ValueError):
        agent.get_message_list("s1", 0)


def test_get_llm_message_list_no_longer_raises_and_gives_chat_messages(agent):
    agent.insert_message("assistant", BOB, "s1", [ME], json.dumps([
        {"type": "content", "status": "success", "content": json.dumps({"text": "what is 2+2?", "files": []})}]))
    agent.insert_message("user", ME, "s1", [BOB], "4")
    agent.insert_message("assistant", BOB, "s1", [ME], [{"type": "error", "content": "provider offline"}])
    agent.insert_message("assistant", BOB, "s1", [ME], [{"type": "tool_call", "content": {"k": 1}},
                                                        {"type": "text", "content": "thanks"}])
    assert agent.get_llm_message_list("s1") == [
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},
    ]
    assert agent.get_llm_message_list("s1", 1, 2) == [{"role": "user", "content": "what is 2+2?"},
                                                      {"role": "assistant", "content": "4"}]
    assert agent.get_llm_message_list("nothing") == []


def test_blocks_text_tolerates_old_rows():
    nested = json.dumps([[{"type": "content", "content": "a"}], [{"type": "content", "content": "b"}]])
    assert blocks_text(nested) == "a\nb"  # 0.1.9x appended a redelivery as a nested array
    assert blocks_text("plain words") == "plain words"
    assert blocks_text(json.dumps({"type": "text", "content": {"text": "obj"}})) == "obj"
    assert blocks_text("") == "" and blocks_text(json.dumps(7)) == "7"


def test_get_conversation_list_takes_page_and_page_size(agent):
    db = agent._db()
    for i in range(12):
        db.create_session(ME, f"s{i}", "code" if i == 3 else "", f"chat {i}", "public")
    page1 = agent.get_conversation_list(1, 10)  # 0.1.99 passed page=1 as main_aid and found nothing
    assert [r["session_id"] for r in page1] == [f"s{i}" for i in range(11, 1, -1)]
    assert [r["session_id"] for r in agent.get_conversation_list(2, 10)] == ["s1", "s0"]
    assert next(r for r in page1 if r["session_id"] == "s3")["identifying_code"] == "code"
    assert agent.get_conversation_list() == page1


def test_friends_crud_with_avaurl_and_description_not_swapped(agent):
    assert agent.get_friend_agent_list() == []
    assert agent.add_friend_agent(BOB, "Bob", "a helpful bot", "https://img/bob.png") is True
    friends = agent.get_friend_agent_list()
    assert [(f["aid"], f["name"], f["avaurl"], f["description"]) for f in friends] == [
        (BOB, "Bob", "https://img/bob.png", "a helpful bot")]
    assert set(friends[0]) == {"id", "aid", "name", "avaurl", "description"}
    assert agent.add_friend_agent(BOB, "Bobby", "updated", "https://img/b2.png")  # upsert, no duplicate
    assert agent.set_friend_name(BOB, "Robert") is True
    assert agent.set_friend_name("ghost.example.com", "x") is False
    friends = agent.get_friend_agent_list()
    assert [(f["name"], f["avaurl"], f["description"]) for f in friends] == [
        ("Robert", "https://img/b2.png", "updated")]
    assert _rows(agent, "SELECT avaurl, description FROM friend") == [("https://img/b2.png", "updated")]
    assert agent.delete_friend_agent(BOB) is True
    assert agent.delete_friend_agent(BOB) is False
    assert agent.get_friend_agent_list() == []


def test_delete_session_offline_removes_the_local_history(agent):
    db = agent._db()
    db.create_session(ME, "s1", "code", "chat", "public")
    db.invite_member(ME, "s1", BOB)
    agent.insert_message("user", ME, "s1", [BOB], "bye")
    agent.insert_message("user", ME, "s2", [BOB], "kept")
    assert agent.delete_session("s1") is True
    assert agent.get_message_list("s1") == [] and agent.get_session_member_list("s1") == []
    assert [r["session_id"] for r in agent.get_conversation_list(1, 10)] == []
    assert len(agent.get_message_list("s2")) == 1


def test_history_reads_survive_a_broken_database(agent, caplog):
    agent.insert_message("user", ME, "s1", [BOB], "x")
    agent.db_manager.close()  # e.g. the file became unusable: reads give [] and writes are dropped, logged
    assert agent.get_message_list("s1") == []
    assert agent.get_friend_agent_list() == []
    assert agent.add_friend_agent(BOB, "b", "", "") is False
    assert agent.insert_message("user", ME, "s1", [BOB], "y") is None
    assert agent.status()["messaging"] is None
    assert agent._msg_counters["history_errors"] >= 3


def test_profile_members(agent, tmp_path):
    assert agent.get_app_path() == agent.get_agent_public_path()  # sic (0.1.99)
    assert agent.get_aid_info() == {"aid": ME, "name": "", "description": "", "avaUrl": "", "ep_url": agent.ep_url}
    assert agent.update_aid_info(ME, "https://img/a.png", "Alice", "d") is True
    assert agent.get_my_profile_data() is None
    profile = {
        "publisherInfo": agent.get_publisher_info(), "version": "1", "lastUpdated": "2025-01-01", "name": "A",
        "description": "d", "capabilities": {"core": [], "extended": []}, "llm": {},
        "references": {"knowledgeBases": [], "tools": [], "companyInfo": [], "productInfo": []},
        "authorization": {"modes": [], "fee": {}, "description": "", "sla": {}},
        "input": {"types": [], "formats": [], "examples": [], "semantics": [], "compatibleAids": []},
        "output": {"types": [], "formats": [], "examples": [], "semantics": [], "compatibleAids": []},
        "avaUrl": "", "supportStream": False, "supportAsync": True, "permission": [],
    }
    agent.create_agent_profile(profile)
    assert agent.get_my_profile_data()["name"] == "A"
    src = tmp_path / "logo.bin"
    src.write_bytes(b"\x00\x01logo")
    assert agent.save_public_file(str(src), "img/logo.bin") is True  # offline: copied, published at next sync
    with open(os.path.join(agent.get_agent_public_path(), "img", "logo.bin"), "rb") as fh:
        assert fh.read() == b"\x00\x01logo"
    assert agent.save_public_file(str(tmp_path / "missing"), "x.bin") is False
    with pytest.raises(ValueError):
        agent.save_public_file(str(src), "../escape.bin")


def test_legacy_identity_reads_a_0199_database(acp):
    """A 0.1.99-era agent directory: identity in the old layout, history rows as 0.1.90-0.1.99 wrote them."""
    from legacy_identity import make_test_ca, write_legacy_identity

    write_legacy_identity(acp.aid_path, "old.example.com", "s", make_test_ca())
    data_dir = os.path.join(acp.app_path, "AIDs", "old.example.com", "private", "data")
    os.makedirs(data_dir, exist_ok=True)
    con = sqlite3.connect(os.path.join(data_dir, "agentid_data.db"))
    con.executescript("""
        CREATE TABLE conversation (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
          identifying_code TEXT NOT NULL, main_aid TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
          timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')));
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT, session_id INTEGER,
          role TEXT NOT NULL, message_aid TEXT NOT NULL, parent_message_id INTEGER, to_aids TEXT NOT NULL,
          content TEXT NOT NULL, instruction TEXT, type TEXT NOT NULL, status TEXT NOT NULL,
          timestamp DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%S','now','localtime')));
        CREATE TABLE friend (id INTEGER PRIMARY KEY AUTOINCREMENT, aid TEXT NOT NULL, name TEXT, avaurl TEXT,
          description TEXT);
        INSERT INTO conversation (session_id, identifying_code, main_aid, name, type)
          VALUES ('1831173476580327424', 'c0de', '', 'old chat', 'public');
        INSERT INTO messages (message_id, session_id, role, message_aid, parent_message_id, to_aids, content,
          instruction, type, status)
          VALUES ('', '1831173476580327424', 'user', 'old.example.com', '', 'bob.example.com',
                  '[{"type": "content", "content": "from 0.1.99"}]', '', 'sent', '1720000000000');
        INSERT INTO friend (aid, name, avaurl, description) VALUES ('bob.example.com', 'Bob', 'd', 'u');
    """)
    con.commit()
    con.close()
    old = acp.load_aid("old.example.com")
    assert old is not None
    try:
        sid = "1831173476580327424"
        conv = old.get_conversation_list(1, 10)
        assert [(c["session_id"], c["identifying_code"]) for c in conv] == [(sid, "c0de")]
        rows = old.get_message_list(sid)
        assert rows[0]["session_id"] == sid and rows[0]["status"] == "1720000000000"  # shifted row, read as is
        assert old.get_llm_message_list(sid) == [{"role": "assistant", "content": "from 0.1.99"}]
        assert [f["aid"] for f in old.get_friend_agent_list()] == ["bob.example.com"]
    finally:
        old.db_manager.close()
