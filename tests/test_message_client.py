"""MessageClient against the fake message server over real sockets: it heals every fault it can see."""
from __future__ import annotations

import json
import threading
import time

import pytest

from agentcp.msg.message_client import (
    MessageClient,
    OutboxFullError,
    SendStatus,
    redact,
    ws_base_url,
)
from agentcp.testing.message_server import MessageServer
from conftest import MSG_PING as PING


def _until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("agentcp-msg")}


def _session(a: MessageClient, b: MessageClient, msg_server: MessageServer):
    """A session owned by ``a`` that ``b`` joined; returns (session_id, code)."""
    a.send({"cmd": "create_session_req", "data": {"request_id": "r1", "type": "public", "group_name": "g",
                                                  "subject": "", "timestamp": "1"}})
    a.recorder.wait(lambda: a.recorder.cmds("create_session_ack"))
    ack = a.recorder.cmds("create_session_ack")[0]
    sid, code = ack["session_id"], ack["identifying_code"]
    join = {"cmd": "join_session_req", "data": {"session_id": sid, "request_id": "2", "inviter_agent_id": a.agent_id,
                                                "invite_code": code, "last_msg_id": "0"}}
    b.send(join)
    b.recorder.rejoin.append(join)
    a.recorder.rejoin.append({"cmd": "join_session_req", "data": {
        "session_id": sid, "request_id": "3", "inviter_agent_id": "", "invite_code": code, "last_msg_id": "0"}})
    msg_server.wait_for(lambda: b.agent_id in msg_server.members(sid))
    return sid, code


def _message(client: MessageClient, sid: str, mid: str, to: str):
    frame = {"cmd": "session_message", "data": {
        "message_id": mid, "session_id": sid, "ref_msg_id": "", "sender": client.agent_id, "instruction": None,
        "receiver": to, "message": "%5B%5D", "timestamp": "1"}}
    return client.send(frame, ack_key=mid, session_id=sid)


def test_urls_and_redaction():
    assert ws_base_url("https://msg.example.com/api/message/") == "wss://msg.example.com/api/message"
    assert ws_base_url("http://127.0.0.1:9/message") == "ws://127.0.0.1:9/message"
    text = "ws://h/session?agent_id=a&signature=tok123 rejected"
    assert "tok123" not in redact(text, None) and "signature=***" in redact(text, None)


def test_connects_on_start_signs_in_and_url_is_never_logged_with_the_token(make_client, msg_server, caplog):
    before = _threads()
    caplog.set_level("DEBUG", logger="agentcp")
    c = make_client("ann")
    assert c.connection_state.value == "disconnected"
    assert c.start_websocket_client() is True
    assert c.state == "connected" and c.recorder.opens == 1
    assert msg_server.is_connected("ann.example.com")
    token = c.auth_client.signature
    assert token and token not in caplog.text
    assert "signature=***" in caplog.text
    c.stop_websocket_client()
    assert _threads() <= before
    assert c.state == "disconnected"
    with pytest.raises(Exception):
        c.send_msg("{}")


def test_send_is_acked_and_relayed(make_client, msg_server):
    a, b = make_client("ann"), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, _ = _session(a, b, msg_server)
    ticket = _message(a, sid, "m1", b.agent_id)
    assert ticket.wait(5) and ticket.status is SendStatus.DELIVERED and ticket.status_code == 200
    b.recorder.wait(lambda: b.recorder.cmds("session_message"))
    relayed = b.recorder.cmds("session_message")[0]
    assert relayed["message_id"].isdigit() and relayed["sender"] == a.agent_id  # relayed under the server's sequence


def test_dead_connection_detected_within_two_ping_intervals(make_client, msg_server):
    c = make_client("ann")
    assert c.start_websocket_client()
    time.sleep(PING * 1.5)  # a few pongs: healthy
    msg_server.stop_pongs(True)
    t0 = time.monotonic()
    deadline = t0 + 5
    while c.stats()["dead_connections"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    detected = time.monotonic() - t0
    assert c.stats()["dead_connections"] >= 1
    assert detected <= 2 * PING + 0.1, detected
    msg_server.stop_pongs(False)
    assert c.wait_connected(3)
    c.recorder.wait(lambda: c.recorder.opens >= 2)


def test_dropped_connection_resumes_and_delivers_again_fast(make_client, msg_server):
    a, b = make_client("ann"), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, code = _session(a, b, msg_server)
    assert _message(a, sid, "m1", b.agent_id).wait(5)
    msg_server.drop_all()
    t0 = time.monotonic()
    ticket = _message(a, sid, "m2", b.agent_id)  # sent into the outage: queued or re-sent, never lost

    def m2_arrived():  # the server relays under its own sequence number, which its ack tells the sender
        server_id = (ticket.ack_data or {}).get("server_msg_id")
        return server_id and any(d["message_id"] == server_id for d in b.recorder.cmds("session_message"))

    assert ticket.wait(5)  # (the ack says which id b gets; b's recorder is not woken by a's ack)
    b.recorder.wait(m2_arrived)
    resume = time.monotonic() - t0
    assert resume <= 2.0, resume
    assert ticket.wait(5) and ticket.status is SendStatus.DELIVERED
    assert a.stats()["losses"] == 1 and a.resume_times


def test_receive_only_client_reconnects_without_sending(make_client, msg_server):
    a, b = make_client("ann"), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, code = _session(a, b, msg_server)
    for i in range(3):
        msg_server.drop_all()
        # b never sends anything: it notices the loss and reconnects on its own.
        _until(lambda i=i: b.stats()["losses"] == i + 1 and b.stats()["connects"] >= i + 2 and b.state == "connected")
        msg_server.wait_connected("bob.example.com", timeout=3)
    # It re-joined from on_open on every new connection (what the session manager does), so it receives:
    assert _message(a, sid, "x1", b.agent_id).wait(5)
    b.recorder.wait(lambda: b.recorder.cmds("session_message"))


def test_outbox_full_is_an_error_and_queued_messages_go_out_in_order(make_client, msg_server):
    a, b = make_client("ann", max_queue_size=5), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, _ = _session(a, b, msg_server)
    msg_server.refuse(True)
    msg_server.drop_all()
    msg_server.wait_for(lambda: not msg_server.is_connected("ann.example.com"))
    time.sleep(0.05)
    tickets = [_message(a, sid, f"q{i}", b.agent_id) for i in range(5)]
    assert all(t.status is SendStatus.QUEUED for t in tickets)
    with pytest.raises(OutboxFullError):
        a.send_msg({"cmd": "noop", "data": {}})
    full = _message(a, sid, "q5", b.agent_id)
    assert full.status is SendStatus.FAILED and "outbox full" in full.error
    assert a.stats()["refused_full"] >= 1
    msg_server.refuse(False)
    assert all(t.wait(5) and t.status is SendStatus.DELIVERED for t in tickets)
    b.recorder.wait(lambda: len(b.recorder.cmds("session_message")) >= 5)
    # b may have been dropped too; the fake server replays on join, here we only check a's order on the wire
    sent = [d["message_id"] for d in msg_server.commands("session_message", "ann.example.com")]
    assert sent == [f"q{i}" for i in range(5)]


def test_restart_forgets_tokens_and_the_client_signs_in_again(make_client, msg_server, acp_server):
    c = make_client("ann")
    assert c.start_websocket_client()
    old = c.auth_client.signature
    sign_ins = c.stats()["sign_ins"]
    msg_server.restart()
    msg_server.wait_for(lambda: not msg_server.is_connected("ann.example.com"))
    msg_server.wait_connected("ann.example.com", timeout=5)
    st = c.stats()
    assert st["auth_rejections"] >= 1 and st["sign_ins"] == sign_ins + 1
    assert c.auth_client.signature != old


def test_unreachable_server_keeps_retrying_and_send_never_blocks(make_client, msg_server):
    msg_server.refuse(True)
    c = make_client("ann")
    t0 = time.monotonic()
    c.start()
    ticket = c.send({"cmd": "noop", "data": {}})
    assert time.monotonic() - t0 < c.config.connection_timeout + 1
    assert ticket.status is SendStatus.QUEUED
    time.sleep(0.5)
    assert c.stats()["connect_failures"] >= 2
    msg_server.refuse(False)
    assert c.wait_connected(3)
    deadline = time.monotonic() + 3
    while ticket.status is SendStatus.QUEUED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ticket.status is SendStatus.SENT  # written after the reconnect (no ack expected for it)


def test_duplicate_incoming_messages_reach_the_handler_once(make_client, msg_server):
    c = make_client("ann")
    assert c.start_websocket_client()
    data = {"session_id": "s", "message_id": "7", "sender": "x", "receiver": c.agent_id, "ref_msg_id": "",
            "message": "%5B%5D", "timestamp": "1"}
    for _ in range(3):
        msg_server.push(c.agent_id, "session_message", data)
    msg_server.push(c.agent_id, "session_message", dict(data, message_id="8"))
    c.recorder.wait(lambda: any(d["message_id"] == "8" for d in c.recorder.cmds("session_message")))
    assert [d["message_id"] for d in c.recorder.cmds("session_message")] == ["7", "8"]
    assert c.stats()["duplicates"] == 2


def test_stop_fails_pending_sends_and_joins_threads(make_client, msg_server):
    before = _threads()
    msg_server.refuse(True)
    c = make_client("ann")
    c.start()
    ticket = c.send({"cmd": "noop", "data": {}})
    c.stop_websocket_client()
    assert ticket.status is SendStatus.FAILED and "stopped" in ticket.error
    assert _threads() <= before
    c.stop_websocket_client()  # idempotent


def test_a_server_that_never_acks_stops_costing_an_ack_wait_per_send(make_client, msg_server):
    from agentcp.msg.session_manager import Session

    a, b = make_client("ann", ack_timeout=0.05, drain_timeout=0.1), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, _ = _session(a, b, msg_server)
    msg_server._message = lambda conn, data: None  # an old server: relays nothing, acks nothing
    session = Session(a.agent_id, a)
    session.session_id = sid
    results = [session.send_msg([{"type": "content", "content": str(i)}], b.agent_id) for i in range(5)]
    # The first ACK_PROBES waited in vain (and say 'sent'); the rest did not wait: 'queued' until the reactor
    # wrote them, then 'sent' (never 'delivered': nothing acks them).
    assert [r.status.value for r in results[:a.ACK_PROBES]] == ["sent"] * a.ACK_PROBES
    _until(lambda: [r.status.value for r in results] == ["sent"] * 5)
    assert a.stats()["ack_timeouts"] == a.ACK_PROBES and not a.acks_expected


def test_a_message_read_from_a_superseded_socket_is_not_marked_seen(make_client, msg_server):
    """A frame the reader had in hand when its connection was dropped is not delivered; it must not count as seen
    either, or the server's replay after the re-join would be dropped as a duplicate (lost silently)."""
    c = make_client("ann")
    assert c.start_websocket_client()
    text = json.dumps({"cmd": "session_message", "data": {
        "message_id": "m1", "session_id": "s1", "ref_msg_id": "", "sender": "bob.example.com",
        "receiver": c.agent_id, "message": "%5B%5D", "timestamp": "1"}})
    stale = object()  # a connection that is no longer the current one
    c._on_text(stale, text)
    assert c.recorder.cmds("session_message") == []
    c._on_text(c._conn, text)  # the replay on the new connection
    assert [d["message_id"] for d in c.recorder.cmds("session_message")] == ["m1"]


def test_a_queued_frame_that_cannot_be_encoded_fails_alone_and_the_rest_goes_out(make_client, msg_server):
    """Defence in depth behind the send-boundary check: an item that fails to encode in the outbox writer fails by
    itself, is forgotten (not in flight, never resent) and the items queued behind it still go out."""
    from agentcp.msg.channel import OutItem
    from agentcp.msg.message_client import Ticket

    c = make_client("ann")
    assert c.start_websocket_client()
    msg_server.refuse(True)
    msg_server.drop_all()
    _until(lambda: c.state == "reconnecting")
    bad = Ticket("bad")
    with c._lock:  # as if it had slipped past send(): a lone surrogate in the frame text
        assert c._machine.submit(OutItem('{"cmd":"x","data":{"v":"\ud800"}}', ack_key="bad", token=bad))
    good = c.send({"cmd": "create_session_req", "data": {"request_id": "r1", "type": "public", "group_name": "g",
                                                          "subject": "", "timestamp": "1"}})
    assert good.status is SendStatus.QUEUED
    msg_server.refuse(False)
    c.recorder.wait(lambda: c.recorder.cmds("create_session_ack"))
    assert bad.wait(5) and bad.status is SendStatus.FAILED and "could not be encoded" in bad.error
    stats = c.stats()
    assert stats["inflight"] == 0 and stats["queued"] == 0 and stats["unencodable"] == 1


def test_a_text_frame_with_invalid_utf8_is_dropped_and_counted_the_connection_stays(make_client, msg_server):
    """UTF-8 is checked by the reader's own decode (websocket-client's pure-Python check cost ~0.3 ms a frame)."""
    from agentcp.testing.message_server import OP_TEXT

    a = make_client("alice")
    a.start()
    assert a.wait_connected(5)
    msg_server.wait_connected(a.agent_id)
    with msg_server._lock:
        conn = msg_server._conns[a.agent_id]
    connects = a.stats()["connects"]
    conn.send_frame(OP_TEXT, b'{"cmd": "x", "data": {"t": "\xff\xfe"}\xc3')  # invalid UTF-8, and not JSON
    msg_server.push(a.agent_id, "after", {"n": 1})
    a.recorder.wait(lambda: a.recorder.cmds("after"))
    assert a.stats()["malformed"] == 1
    assert a.stats()["connects"] == connects and a.state == "connected"
