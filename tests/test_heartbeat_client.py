"""HeartbeatClient against FakeACPServer over real localhost sockets.

One test per field failure of agentcp 0.1.99 (and of the upstream fix), each written so that it fails on the
old behaviour: the comment on each test names the defect id of liveness.md it reproduces.
Intervals are scaled down through the class attributes (a 5 s NextBeat becomes 0.3 s) so the suite stays fast;
the benchmark (benchmarks/fault_matrix.py) measures the real 5 s figures.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from agentcp.base.backoff import Backoff
from agentcp.context import ErrorContext
from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.msg.message_serialize import HeartbeatMessageResp, to_bytes
from agentcp.testing import FakeACPServer

AID = "alice.example.com"
TICK = 0.3  # the scaled-down heartbeat interval (s)


class FastClient(HeartbeatClient):
    MIN_INTERVAL = TICK
    MAX_INTERVAL = 3.0
    REPLY_TIMEOUT = 0.15
    RECONNECT_BACKOFF = Backoff(base=0.05, cap=0.3, floor=0.1)
    PERMANENT_BACKOFF = Backoff(base=30, cap=30, floor=30)


def wait_until(predicate, timeout=5.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def hb_threads():
    return [t for t in threading.enumerate() if t.name.startswith("agentcp-hb-")]


@pytest.fixture
def server():
    with FakeACPServer(next_beat_ms=int(TICK * 1000)) as srv:
        yield srv


def make_client(srv, tmp_path, cls=FastClient, seed="", aid=AID, **kw):
    certs = tmp_path / aid / "private" / "certs"
    srv.issue_identity(aid, str(certs), seed)
    from agentcp.base.credentials import hash_seed

    client = cls(aid, srv.heartbeat_url, str(certs), hash_seed(seed), **kw)
    return client


@pytest.fixture
def client(server, tmp_path):
    c = make_client(server, tmp_path)
    yield c
    c.offline()


def go_online(c):
    c.initialize()
    c.online()
    assert c.wait_online(5), c.stats()


def valid_beats(srv, aid=AID):
    return [b for b in srv.beats if b.agent_id == aid and b.valid]


# --- seed problems -------------------------------------------------------------------------------------------


def test_socket_closed_under_it_is_rebuilt_at_once(server, client):
    """0.1.99 (D-H3): a broken socket was never rebuilt; every later beat failed until a restart."""
    go_online(client)
    old = client.udp_socket
    seq = client.msg_seq
    t0 = time.monotonic()
    old.close()
    # A beat sent after the close (a higher sequence number; one sent before may still be on its way), so from a
    # new socket. The new socket may even get the old port number back from the kernel.
    assert wait_until(lambda: any(b.seq > seq for b in valid_beats(server)), timeout=3)
    assert time.monotonic() - t0 < TICK  # rebuilt and probed at once, not at the next interval
    assert client.udp_socket is not old and old.fileno() == -1
    assert client.stats()["reconnects"].get("socket_error") == 1
    # The server accepted the beat a hair before the client read its reply (failed once under load on 3.9).
    assert wait_until(lambda: client.state == "online", timeout=2), client.state


def test_receive_loop_survives_a_dead_descriptor(server, client):
    """0.1.99 (D-H12, D-H13): the receive loop stalled on a dead socket and replies were never read again."""
    go_online(client)
    os.close(client.udp_socket.fileno())  # the descriptor dies without Python's socket object knowing
    replies = client.stats()["replies"]
    assert wait_until(lambda: client.stats()["replies"] >= replies + 3, timeout=5), client.stats()
    assert client.state == "online"


def test_server_restart_401_heals_with_one_sign_in_and_no_interval_wait(tmp_path):
    """0.1.99 (D-H7): 401 re-sign-in ran on the receive thread; the next beat waited a whole interval."""
    with FakeACPServer(next_beat_ms=5000) as srv:
        c = make_client(srv, tmp_path, cls=HeartbeatClient)
        try:
            go_online(c)
            sign_ins = c.stats()["sign_ins"]
            srv.restart()
            c.udp_socket.close()  # provoke a beat now instead of waiting 5 s for the next one
            assert wait_until(lambda: c.stats()["reauth_replies"] >= 1, timeout=3)
            assert wait_until(lambda: c.state == "online", timeout=3)
            beats = [b for b in srv.beats if b.agent_id == AID]
            rejected = max(i for i, b in enumerate(beats) if not b.valid)
            accepted = beats[rejected + 1]
            assert accepted.valid and accepted.t - beats[rejected].t < 1.0
            assert c.stats()["sign_ins"] == sign_ins + 1
            assert c.heartbeat_interval == 5000
        finally:
            c.offline()


def test_server_moves_to_a_new_udp_port(server, client):
    """0.1.99 and the upstream fix kept beating the old address after the server came back elsewhere."""
    go_online(client)
    old = server.udp_port
    server.restart(move_port=True)
    assert server.udp_port != old
    assert wait_until(lambda: any(b.valid for b in server.beats[-3:]) and client.port == server.udp_port,
                      timeout=5), client.stats()
    assert client.wait_online(5)


def test_offline_joins_every_thread_then_closes(server, client):
    """0.1.99 (D-H13): offline() closed the socket under running threads and joined nothing."""
    go_online(client)
    sock = client.udp_socket
    t0 = time.monotonic()
    client.offline()
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5
    assert hb_threads() == []
    assert sock.fileno() == -1 and client.udp_socket is None
    assert client.state == "stopped" and not client.is_running
    last_seq = client.msg_seq
    time.sleep(TICK * 2)
    # Nothing is sent after offline() returns. (A beat sent just before may still be on its way to the server.)
    assert [b.seq for b in server.beats if b.seq > last_seq] == []
    client.offline()  # idempotent


def test_offline_during_a_slow_sign_in_returns_at_once(server, tmp_path):
    """offline() joined a sign-in worker blocked in HTTP until the server answered (15 s measured with a slow
    server): the in-flight request must be aborted so that offline() stays fast and still joins every thread."""
    c = make_client(server, tmp_path)
    server.set_sign_in("slow", delay=20)
    try:
        c.online()
        assert wait_until(lambda: any(t.name.startswith("agentcp-hb-signin") for t in threading.enumerate()))
        time.sleep(0.3)  # the challenge request is now waiting for the server's answer
    finally:
        t0 = time.monotonic()
        c.offline()
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"offline() took {elapsed:.1f} s"
    assert hb_threads() == []
    server.set_sign_in("ok")
    c.online()  # the aborted client is still usable
    try:
        assert c.wait_online(5), c.stats()
    finally:
        c.offline()


def test_offline_waits_for_the_reactor_thread_to_leave(server, client, monkeypatch):
    """offline() of the last client returned while the reactor thread was still on its way out (it only joined
    the thread if that had already exited), so a thread outlived offline() whenever the scheduler was slow."""
    from agentcp.heartbeat.reactor import HeartbeatReactor

    original = HeartbeatReactor._exit_if_idle

    def slow_exit(self):
        if not self.clients:
            time.sleep(0.2)  # the reactor thread is descheduled between its last command and its exit
        return original(self)

    monkeypatch.setattr(HeartbeatReactor, "_exit_if_idle", slow_exit)
    go_online(client)
    client.offline()
    assert hb_threads() == []


def test_a_client_started_while_the_reactor_exits_keeps_its_timer(server, tmp_path):
    """The exiting reactor thread cleared the timer table after a new thread had started: a client brought online
    by another thread at that moment lost its first timer and never signed in or beat."""
    from agentcp.heartbeat.reactor import HeartbeatReactor

    class SlowClear(dict):
        def clear(self):
            time.sleep(0.3)
            super().clear()

    reactor = HeartbeatReactor(name="agentcp-hb-test-reactor")
    reactor._timers = SlowClear()
    a = make_client(server, tmp_path, reactor=reactor)
    b = make_client(server, tmp_path, aid="bob.example.com", reactor=reactor)
    try:
        a.initialize()
        b.initialize()
        a.online()
        assert a.wait_online(5)
        stopping = threading.Thread(target=a.offline)
        stopping.start()
        assert wait_until(lambda: not reactor.running or not stopping.is_alive(), timeout=3)
        b.online()
        stopping.join(5)
        assert b.wait_online(3), b.stats()
        n = len(valid_beats(server, "bob.example.com"))
        assert wait_until(lambda: len(valid_beats(server, "bob.example.com")) >= n + 2, timeout=3), b.stats()
    finally:
        a.offline()
        b.offline()


def test_online_again_after_offline(server, client):
    go_online(client)
    client.offline()
    client.online()
    assert client.wait_online(5)
    assert [t.name for t in hb_threads()] == ["agentcp-hb-reactor"]  # one I/O thread, whatever the client count


def test_offline_from_a_callback(server, client):
    done = threading.Event()

    def on_change(old, new):
        if new == "online":
            client.offline()
            done.set()

    client.on_state_change = on_change
    client.initialize()
    client.online()  # not go_online(): the callback may take it offline before wait_online() looks (a race)
    assert done.wait(5)
    assert wait_until(lambda: hb_threads() == [], timeout=2)


def test_offline_then_online_from_a_callback_keeps_delivering_callbacks(server, client):
    """offline() from a callback left the stopping callback thread registered: the callbacks of the next online()
    went to its queue behind the stop marker and were lost (no state change, no invite handled or answered)."""
    changes = []
    restarted = threading.Event()

    def on_change(old, new):
        changes.append(new)
        if new == "online" and not restarted.is_set():
            restarted.set()
            client.offline()
            client.online()

    client.on_state_change = on_change
    go_online(client)
    assert restarted.wait(5)
    assert wait_until(lambda: changes.count("online") >= 2, timeout=5), changes
    assert changes.count("connecting") == 2, changes  # the restart's first transition is not lost
    client.offline()
    assert hb_threads() == []


def test_rebuild_socket_while_offline_leaves_no_thread(server, client):
    """_rebuild_socket() on an offline client started the reactor thread and left it unjoined."""
    client.initialize()
    client._rebuild_socket()
    assert client.udp_socket is not None
    assert hb_threads() == []


def test_sign_in_down_then_back(server, tmp_path):
    """0.1.99 (D-S7, D-H2): one failed retry and the client was silently 'online' towards 127.0.0.1:0 forever."""
    server.set_sign_in("503")
    c = make_client(server, tmp_path)
    try:
        assert c.sign_in() is False
        c.online()
        assert wait_until(lambda: c.stats()["sign_in_failures"] >= 3, timeout=5)
        assert c.state == "connecting"
        server.set_sign_in("ok")
        assert c.wait_online(5), c.stats()
    finally:
        c.offline()


def test_sign_in_refused_then_back(server, tmp_path):
    c = make_client(server, tmp_path)
    try:
        server.set_sign_in("refuse")
        c.online()
        assert wait_until(lambda: c.stats()["sign_in_failures"] >= 2, timeout=5)
        server.set_sign_in("ok")
        assert c.wait_online(5), c.stats()
    finally:
        c.offline()


def test_silent_server_is_detected_by_the_watchdog(server, client):
    """0.1.99 (D-H4) had no reply watchdog: a silent server went unnoticed forever."""
    go_online(client)
    server.go_silent()
    assert wait_until(lambda: client.stats()["reconnects"].get("silent", 0) >= 1, timeout=5), client.stats()
    assert client.state == "reconnecting"
    server.resume()
    assert client.wait_online(5)
    assert client.stats()["misses"] >= FastClient.MAX_MISSES


# --- defects -------------------------------------------------------------------------------------------------------


def test_401_is_never_used_as_an_interval(server, client):
    """Upstream U1: NextBeat 401 became a 401 ms interval (beats every poll)."""
    go_online(client)
    server.restart()
    assert wait_until(lambda: client.stats()["reauth_replies"] >= 1, timeout=5)
    assert client.heartbeat_interval >= FastClient.MIN_INTERVAL * 1000
    assert client.wait_online(5)


def test_varint_next_beat_and_401(tmp_path):
    """0.1.99 read a varint 401 (91 03) as 37123 ms and never noticed the restart (liveness.md §3.7)."""
    with FakeACPServer(next_beat_ms=int(TICK * 1000), next_beat_encoding="varint") as srv:
        c = make_client(srv, tmp_path)
        try:
            go_online(c)
            assert c.heartbeat_interval == int(TICK * 1000)
            srv.restart()
            assert wait_until(lambda: c.stats()["reauth_replies"] >= 1, timeout=5)
            assert c.wait_online(5)
        finally:
            c.offline()


def test_spoofed_401_from_another_address_is_ignored(server, client):
    """0.1.99 (D-H9) and upstream U12 acted on datagrams from anyone: spoofed 401s forced re-sign-ins."""
    go_online(client)
    sign_ins = client.stats()["sign_ins"]
    resp = HeartbeatMessageResp()
    resp.NextBeat = 401
    for _ in range(10):
        server.inject(to_bytes(resp), ("127.0.0.1", client.local_port), spoof=True)
    time.sleep(TICK)
    assert client.stats()["sign_ins"] == sign_ins
    assert client.stats()["reauth_replies"] == 0
    assert client.state == "online"


def test_garbage_datagrams_are_counted_and_do_not_stall(server, client):
    """0.1.99 (D-H12): each bad datagram stalled the receiver 1.5 s; a junk flood starved real replies."""
    go_online(client)
    replies = client.stats()["replies"]
    for junk in (b"", b"\x00", b"\x00\x01\x01\x02\x00", b"\xff" * 40, b"\x00\x01\x01\x03\x00\x00\x05AB") * 40:
        server.inject(junk, ("127.0.0.1", client.local_port), spoof=False)
    assert wait_until(lambda: client.stats()["malformed"] >= 150, timeout=3), client.stats()
    assert wait_until(lambda: client.stats()["replies"] >= replies + 2, timeout=3)
    assert client.state == "online"


def test_wall_clock_jumps_do_not_disturb_the_schedule(server, client, monkeypatch):
    """0.1.99 (D-H10) and upstream U7 scheduled with the wall clock: a step back stopped the heartbeat."""
    go_online(client)
    real = time.time
    jumps = iter(range(10**6))
    monkeypatch.setattr(time, "time", lambda: real() + (-1 if next(jumps) % 2 else 1) * 86400 * 365)
    n = len(valid_beats(server))
    time.sleep(TICK * 4)
    assert len(valid_beats(server)) >= n + 3
    assert client.state == "online"


def test_no_secrets_in_logs(server, tmp_path, caplog):
    """0.1.99 (D-H1) logged the sign cookie at INFO; tokens and URLs with tokens were logged too."""
    caplog.set_level(logging.DEBUG, logger="agentcp")
    c = make_client(server, tmp_path, seed="correct horse battery staple")
    try:
        go_online(c)
        token = c.auth_client.signature
        cookie = c.sign_cookie
        server.restart()
        assert wait_until(lambda: c.stats()["reauth_replies"] >= 1, timeout=5)
        assert c.wait_online(5)
        secrets = [token, c.auth_client.signature, str(cookie), str(c.sign_cookie), "correct horse battery staple",
                   c.seed_password, "PRIVATE KEY"]
        c.sign_out()
    finally:
        c.offline()
    # The library's own records (the fake server is the test's peer: it may log whatever it likes).
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("agentcp.testing"))
    assert "heartbeat" in text  # something was logged
    for secret in secrets:
        assert secret and secret not in text, f"secret leaked into the logs: {secret[:6]}..."


def test_wrong_seed_password_is_permanent_and_clear(server, tmp_path):
    """Upstream U9 retried a wrong seed password 10 times per sign-in and reconnected forever every 5 s."""
    certs = tmp_path / AID / "private" / "certs"
    server.issue_identity(AID, str(certs), "right")
    c = FastClient(AID, server.heartbeat_url, str(certs), "wrong")
    try:
        assert c.sign_in() is False
        err = c.auth_client.last_error
        assert err is not None and err.permanent and "seed" in str(err).lower()
        c.online()
        time.sleep(TICK * 3)
        assert c.stats()["sign_in_failures"] == 1  # the next try is PERMANENT_BACKOFF away
        assert "seed" in (c.stats()["last_error"] or "").lower()
    finally:
        c.offline()


def test_invites_run_off_the_receive_thread_and_are_answered(server, client):
    """0.1.99 (D-H5, D-H6, D-H18): the callback ran on the receive thread, a raising one skipped the reply,
    and the reply never carried the SessionId."""
    seen = []
    release = threading.Event()

    def listener(invite):
        seen.append((invite.SessionId, threading.current_thread().name))
        release.wait(2)  # a slow callback must not stop heartbeat replies from being processed
        raise RuntimeError("listener bug")

    client.set_on_recv_invite(listener)
    go_online(client)
    server.send_invite(AID, inviter="bob.example.com", session_id="s-42")
    assert wait_until(lambda: seen, timeout=3)
    replies = client.stats()["replies"]
    assert wait_until(lambda: client.stats()["replies"] >= replies + 2, timeout=3)
    release.set()
    assert wait_until(lambda: server.invite_responses, timeout=3)
    resp = server.invite_responses[-1]
    assert getattr(resp, "SessionId", None) == "s-42" or "s-42" in repr(resp)
    assert seen[0][1].startswith("agentcp-hb-callbacks")
    assert client.stats()["callback_errors"] == 1
    assert client.state == "online"


def test_state_changes_and_stats(server, client):
    changes = []
    client.on_state_change = lambda old, new: changes.append((old, new))
    go_online(client)
    assert wait_until(lambda: ("connecting", "online") in changes, timeout=2)
    s = client.stats()
    assert s["state"] == "online" and s["beats_sent"] >= 1 and s["replies"] >= 1
    assert s["last_rtt"] is not None and s["last_reply_age"] is not None
    client.offline()
    assert client.state == "stopped"


def test_sign_in_failure_publishes_to_error_context(server, tmp_path):
    got = []
    ErrorContext.subscribe(AID, got.append)
    try:
        server.set_sign_in("503")
        c = make_client(server, tmp_path)
        assert c.sign_in() is False
        assert wait_until(lambda: got, timeout=3)
    finally:
        ErrorContext.reset()


def test_get_online_status(server, client):
    go_online(client)
    status = client.get_online_status([AID, "nobody.example.com"])
    online = {item["agent_id"]: item["online"] for item in status}
    assert online == {AID: True, "nobody.example.com": False}


def test_agents_of_one_process_defer_their_first_sign_in_while_peers_fail(server, tmp_path):
    """Issue "liveness under packet loss and herds": a fleet told 401 during a sign-in outage signed in together
    (peak 200/s). Now an agent whose peer just failed to sign in to the same server defers its first attempt."""
    from agentcp.heartbeat.reactor import HeartbeatReactor

    reactor = HeartbeatReactor(name="agentcp-hb-test-reactor")
    a = make_client(server, tmp_path, reactor=reactor)
    b = make_client(server, tmp_path, aid="bob.example.com", reactor=reactor)
    try:
        go_online(a)
        server.set_sign_in("503")
        server.restart()
        assert wait_until(lambda: a.stats()["sign_in_failures"] >= 1, timeout=5)
        b.online()  # its first sign-in comes while its peer's keep failing
        assert wait_until(lambda: any(e.kind == "sign_in_deferred" for e in b.history), timeout=5), b.history
        assert not any(s.agent_id == "bob.example.com" for s in server.sign_ins)  # deferred, not attempted
        server.set_sign_in("ok")
        assert a.wait_online(5) and b.wait_online(5)
    finally:
        a.offline()
        b.offline()


@pytest.mark.parametrize("seq", [1, 127, 128, 300, 16383, 16384, 2**40])
def test_the_prebuilt_beat_datagram_is_the_serialised_request(seq, tmp_path):
    """Beats patch MessageSeq into a datagram serialised once; it must equal the full encoder's bytes."""
    from agentcp.msg.message_serialize import HeartbeatMessageReq

    client = HeartbeatClient(AID, "http://127.0.0.1:9", str(tmp_path), "seed")
    client.sign_cookie = 2**63 + 5
    req = HeartbeatMessageReq()
    req.header.MessageSeq = seq
    req.AgentId = AID
    req.SignCookie = client.sign_cookie
    assert client._beat_bytes(seq) == to_bytes(req)
    client.sign_cookie = 7  # a new session: the template follows the cookie
    req.SignCookie = 7
    assert client._beat_bytes(seq) == to_bytes(req)


def test_the_usual_reply_is_read_in_one_step_and_others_by_the_general_decoder(server, tmp_path):
    """The one-step decode covers the 14-byte u64 reply; the varint form and the 401 still reach the machine."""
    client = make_client(server, tmp_path)
    client.initialize()
    client.online()
    try:
        assert client.wait_online(5)
        assert wait_until(lambda: client.stats()["replies"] >= 2)
        assert client.heartbeat_interval == int(TICK * 1000)
        server.restart()  # every beat now gets NextBeat 401: the client signs in again and comes back
        assert wait_until(lambda: client.stats()["reauth_replies"] >= 1)
        assert wait_until(lambda: client.state == "online" and client.stats()["sign_ins"] >= 1)
    finally:
        client.offline()
