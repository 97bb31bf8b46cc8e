"""Every message connection of the process on one reactor thread: threads stay flat, TLS works, the socket's
write side is honest (what it never took is sent again; a stalled server is dropped), and a sender faster than
the server is slowed down instead of refused. Real sockets against the fake message server."""
from __future__ import annotations

import json
import threading
import time


from agentcp.ca.identity_store import hash_seed_password
from agentcp.msg.message_client import MessageClient, MessageClientConfig, SendStatus
from agentcp.msg.ws_reactor import WsReactor
from agentcp.msg.ws_reactor import reactor as ws_reactor
from agentcp.testing.message_server import MessageServer

from conftest import MSG_FAST as FAST, MSG_PING as PING, Recorder
from test_message_client import _message, _session, _until


def _agentcp_threads():
    return [t for t in threading.enumerate() if t.name.startswith("agentcp")]


def test_threads_stay_flat_as_clients_are_added(make_client, msg_server):
    """0.1.99 (and 0.2.0) held two threads per connected client; now every connection shares one reactor."""
    from agentcp.msg.message_client import _JOBS

    first = make_client("c0")
    assert first.start_websocket_client()
    _JOBS.join_if_idle()  # the sign-in and lookup threads end when idle
    one = len(_agentcp_threads())
    clients = [make_client(f"c{i}") for i in range(1, 21)]
    for c in clients:
        c.start()
    for c in clients:
        assert c.wait_connected(10)
    _JOBS.join_if_idle()
    assert len(_agentcp_threads()) == one, [t.name for t in _agentcp_threads()]
    assert sum(1 for t in _agentcp_threads() if t.name == "agentcp-ws") == 1
    # ...and every one of them works
    clients[-1].send({"cmd": "create_session_req", "data": {"request_id": "r9", "type": "public",
                                                            "group_name": "g", "subject": "", "timestamp": "1"}})
    clients[-1].recorder.wait(lambda: clients[-1].recorder.cmds("create_session_ack"))


def test_the_reactor_thread_ends_with_its_last_client_and_is_joined():
    r = WsReactor(name="agentcp-ws-test")
    r.acquire()
    r.acquire()
    ran = threading.Event()
    assert r.call_soon(ran.set) and ran.wait(2)
    thread = r._thread
    r.release()
    assert thread.is_alive()
    r.release()
    assert not thread.is_alive()
    assert not r.call_soon(ran.set)  # nothing runs without a holder
    r.acquire()  # a new life
    again = threading.Event()
    assert r.call_soon(again.set) and again.wait(2)
    r.release()


def test_a_failing_callback_is_counted_and_the_reactor_goes_on():
    r = WsReactor(name="agentcp-ws-test")
    r.acquire()
    try:
        r.call_soon(lambda: 1 / 0)
        ok = threading.Event()
        r.call_soon(ok.set)
        assert ok.wait(2)
        assert r.counters["callback_errors"] == 1
    finally:
        r.release()


def test_messages_over_tls_through_the_reactor(acp_server_factory, tmp_path):
    """wss:// on a non-blocking TLS socket: handshake, a big message each way (many TLS records, partial writes)."""
    srv = acp_server_factory(tls=True)
    server = MessageServer(srv).install()
    clients = []
    try:
        for name in ("ann", "bob"):
            aid = f"{name}.example.com"
            certs = str(tmp_path / aid)
            srv.issue_identity(aid, certs, "seed")
            cfg = MessageClientConfig(ping_interval=PING, reconnect_backoff=FAST, immediate_reconnect_gap=0.0,
                                      verify=srv.tls_cert_path)
            from agentcp.base.auth_client import AuthClient

            auth = AuthClient(aid, server.url, certs, hash_seed_password("seed"), verify=srv.tls_cert_path)
            c = MessageClient(aid, server.url, certs, hash_seed_password("seed"), cache_auth_client=auth, config=cfg)
            c.recorder = Recorder()
            c.set_message_handler(c.recorder)
            clients.append(c)
        a, b = clients
        assert server.url.startswith("https://")
        assert a.start_websocket_client() and b.start_websocket_client()
        sid, _ = _session(a, b, server)
        big = "x" * 300_000
        frame = {"cmd": "session_message", "data": {
            "message_id": "m1", "session_id": sid, "ref_msg_id": "", "sender": a.agent_id, "instruction": None,
            "receiver": b.agent_id, "message": big, "timestamp": "1"}}
        ticket = a.send(frame, ack_key="m1", session_id=sid)
        assert ticket.wait(10) and ticket.status is SendStatus.DELIVERED
        b.recorder.wait(lambda: b.recorder.cmds("session_message"), timeout=10)
        assert b.recorder.cmds("session_message")[0]["message"] == big
        time.sleep(PING * 3)  # pings and pongs over TLS keep it alive
        assert a.stats()["dead_connections"] == 0 and a.state == "connected"
    finally:
        for c in clients:
            c.stop_websocket_client()


def test_a_sender_faster_than_the_server_is_slowed_down_not_refused(make_client, msg_server):
    """The outbox (queued + in flight) holds 20 here; 400 sends in a tight loop all go through: the sender waits
    for acks to make room while the connection is live (0.2.0 refused them: 'outbox full')."""
    a, b = make_client("ann", max_queue_size=20), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, _ = _session(a, b, msg_server)
    tickets = [_message(a, sid, f"m{i}", b.agent_id) for i in range(400)]
    assert not [t for t in tickets if t.status is SendStatus.FAILED]
    for t in tickets:
        assert t.wait(10) and t.status is SendStatus.DELIVERED
    b.recorder.wait(lambda: len(b.recorder.cmds("session_message")) == 400, timeout=10)
    assert a.stats()["refused_full"] == 0


def test_a_full_window_on_a_server_that_never_acks_does_not_stall_sends(make_client, msg_server):
    """One full window waits ``send_timeout`` for an ack that never comes; then the client stops waiting for
    this server's acks (and says so): the next 80 sends do not wait at all."""
    a, b = make_client("ann", max_queue_size=20, send_timeout=0.5, drain_timeout=0.1), make_client("bob")
    assert a.start_websocket_client() and b.start_websocket_client()
    sid, _ = _session(a, b, msg_server)
    msg_server._message = lambda conn, data: None  # an old server: acks nothing
    t0 = time.monotonic()
    tickets = [_message(a, sid, f"m{i}", b.agent_id) for i in range(100)]
    assert time.monotonic() - t0 < 0.5 + 1.0  # one wait of send_timeout, not one per window
    assert not [t for t in tickets if t.status is SendStatus.FAILED]
    _until(lambda: all(t.status is SendStatus.SENT for t in tickets))
    assert a.stats()["unconfirmed"] == 20 and not a.acks_expected


def _full_socket(link):
    """Make ``link``'s real socket behave as if the kernel's send buffer were full (takes nothing)."""
    real = link.sock

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def send(self, data):
            raise BlockingIOError

    link.sock = Full()
    return real


def test_frames_the_socket_never_took_go_out_after_the_reconnect(make_client, msg_server):
    """A command (no ack expected) written into a connection whose socket took none of it before the connection
    was lost is sent again on the next one, and its ticket says 'sent' only then (0.2.0's test of this patched
    a direct write; writes are now the reactor's)."""
    c = make_client("ann", send_timeout=30.0)
    assert c.start_websocket_client()
    link = c._conn
    done = threading.Event()
    ws_reactor().call_soon(lambda: (_full_socket(link), done.set()))
    assert done.wait(2)
    ticket = c.send({"cmd": "create_session_req", "data": {"request_id": "r1", "type": "public",
                                                           "group_name": "g", "subject": "", "timestamp": "1"}})
    _until(lambda: link.buffered > 0)
    assert ticket.status is SendStatus.QUEUED  # written into the connection, not taken by the socket
    assert not c.recorder.cmds("create_session_ack")
    link.abort("test: connection lost")
    c.recorder.wait(lambda: c.recorder.cmds("create_session_ack"))
    assert ticket.wait(5) and ticket.status is SendStatus.SENT
    assert len(msg_server.commands("create_session_req")) == 1


def test_a_server_that_takes_nothing_for_send_timeout_is_dropped_and_the_client_reconnects(make_client, msg_server):
    c = make_client("ann", send_timeout=0.3, ping_interval=30)
    assert c.start_websocket_client()
    link = c._conn
    done = threading.Event()
    ws_reactor().call_soon(lambda: (_full_socket(link), done.set()))
    assert done.wait(2)
    c.send(json.dumps({"cmd": "get_member_list", "data": {"session_id": "s", "request_id": "1"}}))
    _until(lambda: c._conn is not None and c._conn is not link, timeout=5)
    assert "send stalled" in (c.stats()["last_loss_reason"] or "")
    assert c.wait_connected(5)
