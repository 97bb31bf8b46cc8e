"""Exactly what was sent arrives, and every result tells the truth (issue: messaging interop and truthful results).

Each test reproduces a fault of 0.2.0 over real sockets: bursts sharing a message id (0.1.99 uses the millisecond
clock as its id) lost to the duplicate filter, a 0.1.99-style push refused, messages acknowledged and then lost
across a server restart, a 404 "no such session" reported as delivered, and results that never settled.
"""
from __future__ import annotations

import asyncio
import threading
import time

import websocket

from conftest import delivered, pair_in_session, until as _until


_pair = pair_in_session


def _collect(aid):
    got = []
    aid.add_message_handler(lambda msg: got.append(aid.get_content_from_message(msg)))
    return got


def test_a_burst_sharing_one_millisecond_id_arrives_whole(agents, network):
    """0.1.99 stamps message_id with the millisecond clock: ten messages sent within one millisecond share it."""
    a, b, sid = _pair(agents, network)
    got = _collect(b)
    results = [a.send_message_content(sid, [b.id], f"burst {i}", message_id="1746343146261") for i in range(10)]
    assert all(delivered(r) for r in results)
    _until(lambda: len(got) == 10, what="all ten of the burst")
    time.sleep(0.1)
    assert got == [f"burst {i}" for i in range(10)]


def test_an_application_reusing_its_own_ids_loses_nothing(agents, network):
    a, b, sid = _pair(agents, network)
    got = _collect(b)
    for i, mid in enumerate(["x", "y", "x", "y"]):
        assert delivered(a.send_message_content(sid, [b.id], f"m{i}", message_id=mid))
    _until(lambda: len(got) == 4, what="four messages with two ids")
    assert got == ["m0", "m1", "m2", "m3"]


def test_a_0199_client_may_push_a_stream_without_a_signature(agents, network):
    a, b, sid = _pair(agents, network)
    push_url, pull_url = asyncio.run(a.create_stream(sid, [b.id]))
    assert push_url and pull_url
    # What 0.1.99 opens (messaging.md §4.2): the push URL plus its agent id, no signature.
    ws = websocket.create_connection(push_url + "&agent_id=" + a.id, timeout=5)
    try:
        assert ws.connected
    finally:
        ws.close()
    # Someone else's agent id is still refused.
    try:
        websocket.create_connection(push_url + "&agent_id=" + b.id, timeout=5).close()
        raise AssertionError("a push as somebody else was accepted")
    except websocket.WebSocketBadStatusException as exc:
        assert exc.status_code in (401, 403)


def test_a_server_restart_loses_nothing_it_acknowledged(agents, network):
    a, b, sid = _pair(agents, network)
    got = _collect(b)
    b.offline()                       # b is away while the server restarts and a keeps talking
    network.messages.restart()
    results = [a.send_message_content(sid, [b.id], f"while away {i}") for i in range(5)]
    assert all(delivered(r) for r in results)
    b.online()
    _until(lambda: len(got) == 5, what="everything acknowledged while b was away")
    assert got == [f"while away {i}" for i in range(5)]


def test_a_restart_that_forgets_sessions_still_loses_nothing_it_acknowledged(agents, network):
    a, b, sid = _pair(agents, network)
    got = _collect(b)
    b.offline()
    network.messages.restart(forget_sessions=True)
    results = [a.send_message_content(sid, [b.id], f"after {i}") for i in range(5)]
    assert all(r.wait(5) for r in results)
    b.online()
    if all(r.status == "delivered" for r in results):
        _until(lambda: len(got) == 5, what="what the server acknowledged")
    assert len(got) == sum(r.status == "delivered" for r in results)


def test_no_such_session_is_a_failure_not_a_delivery(agents, network):
    a = agents("alice")
    a.online()
    result = a.send_message_content("1234567890", ["bob.example.com"], "into the void")
    assert result.wait(5) and result.failed, result
    assert result.status_code == 404 and "no such session" in (result.error or "")


def test_results_are_live_and_settle_when_offline_fails_them(agents, network):
    a, b, sid = _pair(agents, network)
    network.messages.refuse(True)
    network.messages.drop_all()
    _until(lambda: a.status()["messaging"]["state"] != "connected", what="a disconnected")
    results = [a.send_message_content(sid, [b.id], f"q{i}") for i in range(3)]
    assert all(r.status == "queued" and r for r in results)
    called = []
    results[0].add_done_callback(called.append)
    a.offline()
    for r in results:
        assert r.wait(1) and r.done and r.failed and not r, r
        assert "stopped" in r.error
    assert called == [results[0]]
    network.messages.refuse(False)


def test_await_and_callbacks_on_a_result(agents, network):
    a, b, sid = _pair(agents, network)
    seen = []
    done = threading.Event()

    async def main():
        r = a.send_message_content(sid, [b.id], "awaited")
        r.add_done_callback(lambda res: (seen.append(res.status), done.set()))
        settled = await asyncio.wait_for(r, 5)
        return settled

    settled = asyncio.run(main())
    assert settled.status == "delivered"
    assert done.wait(5) and seen == ["delivered"]
    # A result that is already final runs the callback at once.
    late = []
    settled.add_done_callback(late.append)
    assert late == [settled]
