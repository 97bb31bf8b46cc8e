"""The 0.1.99 legacy names (agentcp._legacy and the top-level compatibility homes) really work.

Homes re-export the current classes; Group/GroupManager and the older Session/SessionManager run over the fake
message server on real sockets; the MessageClient on_* entry points feed real events in.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading

import pytest

from agentcp.base.backoff import Backoff
from agentcp.ca.identity_store import hash_seed_password
from agentcp.msg.message_client import MessageClient, MessageClientConfig
from agentcp.testing.message_server import MessageServer
from conftest import delivered

FAST = Backoff(base=0.05, cap=0.2)

HOMES = {
    "agentcp.ap_client": ("agentcp.ap.ap_client", ["ApClient"]),
    "agentcp.auth_client": ("agentcp.base.auth_client", ["AuthClient"]),
    "agentcp.ca_client": ("agentcp.ca.ca_client", ["CAClient"]),
    "agentcp.ca_root": ("agentcp.ca.ca_root", ["CARoot"]),
    "agentcp.client": ("agentcp.base.client", ["IClient"]),
    "agentcp.env": ("agentcp.base.env", ["Environ"]),
    "agentcp.heartbeat_client": ("agentcp.heartbeat.heartbeat_client", ["HeartbeatClient"]),
    "agentcp.html_util": ("agentcp.base.html_util", ["parse_html"]),
    "agentcp.log": ("agentcp.base.log", ["get_logger", "log_info", "log_exception", "set_log_enabled"]),
    "agentcp.message_client": ("agentcp.msg.message_client", ["MessageClient"]),
    "agentcp.message_serialize": ("agentcp.msg.message_serialize", ["InviteMessageReq", "uint64_to_varint"]),
    "agentcp.open_ai_message": ("agentcp.msg.open_ai_message", ["OpenAIMessage", "NOT_GIVEN"]),
    "agentcp.stream_client": ("agentcp.msg.stream_client", ["StreamClient"]),
    "agentcp.wss_binary_message": ("agentcp.msg.wss_binary_message", ["encode_wss_binary_message",
                                                                      "decode_wss_binary_message"]),
}


@pytest.mark.parametrize("home", sorted(HOMES))
def test_homes_re_export_the_current_objects(home):
    canonical, names = HOMES[home]
    old, new = importlib.import_module(home), importlib.import_module(canonical)
    for name in names:
        assert getattr(old, name) is getattr(new, name), f"{home}.{name}"


def test_legacy_log_reads_the_live_state():
    import agentcp.base.log as base
    import agentcp.log as legacy

    try:
        legacy.set_log_enabled(False)
        assert legacy.log_enabled is False and base.log_enabled is False
        legacy.set_log_enabled(True)
        assert legacy.log_enabled is True and legacy.logger is base.logger is not None
    finally:
        base.set_log_enabled(True)


def test_agent_holder():
    from agentcp.agent import Agent

    agent = Agent("helper", "You answer briefly.")
    assert (agent.name, agent.pomp) == ("helper", "You answer briefly.")


def test_db_update_conversation_config_by_row_id_and_save_message_on_the_class(tmp_path, caplog):
    from agentcp.db.db_mananger import DBManager

    with DBManager(str(tmp_path), "alice.example.com") as db:
        row = db.add_conversation_config("42", "bob.example.com", "https://a/x.png", "bob", "")
        other = db.add_conversation_config("42", "carol.example.com")
        assert db.update_conversation_config(row, description="Bob", post_data={"k": 1}) == 1
        assert db.update_conversation_config(row) == 0  # nothing to change
        assert db.update_conversation_config(999) == 0
        with pytest.raises(ValueError):
            db.update_conversation_config("bob.example.com", "x")
        members = {m["aid"]: m for m in db.get_session_member_list("42")}
        assert members["bob.example.com"]["description"] == "Bob"
        assert members["bob.example.com"]["avaurl"] == "https://a/x.png"
        assert members["bob.example.com"]["post_data"] == '{"k": 1}'
        assert members["carol.example.com"]["description"] == "" and other != row
        message = {"session_id": "42", "sender": "bob.example.com", "message": "[]", "message_id": "1"}
        with caplog.at_level(logging.WARNING, "agentcp.legacy"):
            assert DBManager.save_message(message) is False  # 0.1.99's class-level call: nothing stored
        assert "called on the class" in caplog.text
        assert db.get_message_list("alice.example.com", "42") == []
        assert db.save_message(message) is True  # on an instance it stores (0.1.99 raised TypeError)
        assert len(db.get_message_list("alice.example.com", "42")) == 1


# --- over the fake message server ------------------------------------------------------------------------------
@pytest.fixture
def msg_server(acp_server):
    return MessageServer(acp_server).install()


@pytest.fixture
def identity(acp_server, tmp_path):
    """``identity(name)`` -> (aid, certs dir, seed hash) of an agent the fake CA issued."""

    def make(name):
        aid = f"{name}.example.com"
        certs = os.path.join(str(tmp_path), aid)
        if not os.path.exists(certs):
            acp_server.issue_identity(aid, certs, "seed")
        return aid, certs, hash_seed_password("seed")

    return make


def _config():
    return MessageClientConfig(ping_interval=0.3, reconnect_backoff=FAST, immediate_reconnect_gap=0.0)


@pytest.fixture
def managers(identity, msg_server):
    """``make(cls, name)``: a (legacy) session manager of ``name`` on the fake server; all stopped after."""
    made = []

    def make(cls, name):
        aid, certs, seed = identity(name)
        manager = cls(aid, msg_server.url, certs, seed, config=_config())
        manager.start()
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


class Inbox:
    """Callback target: records what it is called with; ``wait(n)`` blocks until n calls arrived."""

    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, data):
        with self.cond:
            self.items.append(data)
            self.cond.notify_all()

    def wait(self, count=1, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= count, timeout), f"only {self.items}"
            return list(self.items)


def _blocks(text):
    return [{"type": "content", "status": "success", "timestamp": 1, "content": text}]


def _contents(items):
    import json

    return [json.loads(d["message"])[0]["content"] for d in items]


def _two(managers, msg_server, cls):
    """alice and bob with managers of ``cls``, bob connected; bob's joined sessions arrive in the returned Inbox."""
    alice, bob = managers(cls, "alice"), managers(cls, "bob")
    msg_server.wait_connected(bob.agent_id)
    joined = Inbox()
    bob.on_invite = joined
    return alice, bob, joined


def test_group_manager_create_invite_talk_members_and_dismiss(managers, msg_server):
    from agentcp.group_manager import Group, GroupManager

    alice, bob, joined = _two(managers, msg_server, GroupManager)
    group = alice.create_group("team", "planning")
    assert isinstance(group, Group) and group.identifying_code and alice.get(group.session_id) is group
    alice_inbox, acks, member_lists = Inbox(), Inbox(), Inbox()
    group.set_on_message_receive(alice_inbox)
    group.set_on_invite_ack(acks)
    group.set_on_member_list_receive(member_lists)

    assert alice.invite_member(group.session_id, bob.agent_id)
    assert acks.wait()[0]["status_code"] == 200
    bob_group = joined.wait()[0]
    assert isinstance(bob_group, Group) and bob_group.session_id == group.session_id
    bob_inbox, bob_system = Inbox(), Inbox()
    bob_group.set_on_message_receive(bob_inbox)
    bob_group.set_on_system_message(bob_system)
    msg_server.wait_for(lambda: bob.agent_id in msg_server.members(group.session_id))

    assert alice.send_msg(group.session_id, _blocks("hello bob"), bob.agent_id)
    assert _contents(bob_inbox.wait()) == ["hello bob"]
    assert delivered(bob_group.send_msg(_blocks("hi alice"), alice.agent_id))
    assert _contents(alice_inbox.wait()) == ["hi alice"]

    assert group.get_member_list()
    members = member_lists.wait()[0]["member_list"]
    assert {m["agent_id"] for m in members} == {alice.agent_id, bob.agent_id}

    assert alice.close_group(group.session_id) is True
    assert bob_system.wait()[0]["event_type"] == "Session dismissed"
    assert alice.get(group.session_id) is None
    msg_server.wait_for(lambda: group.session_id not in msg_server.sessions())


def test_group_on_a_bare_message_client_creates_and_receives(identity, msg_server, managers):
    """0.1.99 style: Group(agent_id, message_client).initialize(...) without a manager."""
    from agentcp.group_manager import Group, GroupManager

    aid, certs, seed = identity("alice")
    client = MessageClient(aid, msg_server.url, certs, seed, config=_config())
    try:
        group = Group(aid, client)
        session_id = group.initialize("solo", "subject")
        assert session_id and session_id in msg_server.sessions() and group.identifying_code
        inbox = Inbox()
        group.set_on_message_receive(inbox)
        bob = managers(GroupManager, "bob")
        msg_server.wait_connected(bob.agent_id)
        joined = Inbox()
        bob.on_invite = joined
        assert group.invite_member(bob.agent_id)
        bob_group = joined.wait()[0]
        msg_server.wait_for(lambda: bob.agent_id in msg_server.members(session_id))
        assert bob_group.send_msg(_blocks("to the bare client"), aid)
        assert _contents(inbox.wait()) == ["to the bare client"]
        # After a dropped connection the group is re-joined and still receives.
        msg_server.drop_all()
        msg_server.wait_for(lambda: msg_server.is_connected(aid) and aid in msg_server.members(session_id))
        assert bob_group.send_msg(_blocks("after the drop"), aid)
        assert _contents(inbox.wait(2))[-1] == "after the drop"
        second = Group(aid, client)  # a second group on the same client shares its manager
        assert second.initialize("two", "") and second.manager is group.manager
        group.leave_group()
        msg_server.wait_for(lambda: aid not in msg_server.members(session_id))
    finally:
        client.stop_websocket_client()


def test_legacy_session_manager_and_session_callbacks(managers, msg_server):
    from agentcp.session_manager import Session, SessionManager

    alice, bob, joined = _two(managers, msg_server, SessionManager)
    session = alice.create_session("s", "")
    assert isinstance(session, Session)
    acks = Inbox()
    session.set_on_session_message_ack(acks)
    alice.invite_member(session.session_id, bob.agent_id)
    bob_session = joined.wait()[0]
    inbox = Inbox()
    bob_session.set_on_message_receive(inbox)
    msg_server.wait_for(lambda: bob.agent_id in msg_server.members(session.session_id))
    assert delivered(session.send_msg(_blocks("one"), bob.agent_id))
    assert _contents(inbox.wait()) == ["one"]
    assert acks.wait()[0]["session_id"] == session.session_id
    # initialize() with an id adopts that session under the manager
    other = Session(alice.agent_id, alice.message_client)
    other.manager = alice
    assert other.initialize("n", "s", session_id="777") == "777" and alice.get("777") is other


# --- MessageClient.on_* --------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.frames = Inbox()
        self.opens = Inbox()

    def on_open(self, ws):
        self.opens(ws)

    def on_message(self, ws, text):
        self.frames(text)


def test_message_client_on_callbacks_feed_real_events(identity, msg_server):
    aid, certs, seed = identity("alice")
    config = MessageClientConfig(ping_interval=30, reconnect_backoff=FAST, immediate_reconnect_gap=0.0)
    client = MessageClient(aid, msg_server.url, certs, seed, config=config)  # no pings: frames_in is ours
    recorder = Recorder()
    client.set_message_handler(recorder)
    try:
        assert client.start_websocket_client()
        first = recorder.opens.wait()[0]
        client.on_message(first, '{"cmd": "system_message", "data": {"session_id": "1", "event_type": "x"}}')
        assert '"event_type": "x"' in recorder.frames.wait()[0]
        client.on_message(object(), '{"cmd": "system_message", "data": {}}')  # not the current connection
        client.on_open(first.ws)  # the socket works as well as the connection
        assert len(recorder.opens.wait(2)) == 2 and len(recorder.frames.items) == 1
        before = client.stats()["frames_in"]
        client.on_pong(first, b"")
        client.on_ping(first.ws, b"")
        client.on_ping(object(), b"")
        assert client.stats()["frames_in"] == before + 2
        client.on_close(first, 1000, "bye")
        third = recorder.opens.wait(3)[-1]  # reconnected and re-opened
        assert third is not first and client.wait_connected(5)
        assert client.resume_times
        client.on_error(third, ConnectionResetError("reset"))
        assert recorder.opens.wait(4)[-1] is not third and client.wait_connected(5)
    finally:
        client.stop_websocket_client()
