"""``offline()`` called from inside a callback of the SDK (issue 7, item 11), over real sockets.

Before: ``offline()`` from an async message handler waited 30 s for itself (``Dispatcher.stop`` joined the worker
that was waiting for that very coroutine) while the event loop was frozen. Now, from any callback, it returns at
once (≤ 100 ms is the target; the assertions allow for a loaded machine), completes the shutdown after the
callback returns, and no callback fires after that.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.testing.fake_server import FakeACPServer

from conftest import FAST, pair_in_session, until

#: What the tests accept for the call itself (the target is 100 ms; shared CI cores need slack).
QUICK = 0.5


def _threads_of(aid):
    return [t for t in threading.enumerate() if t.is_alive() and aid.id in t.name]


def _finish_and_check_quiet(aid, calls, poke):
    """Join the shutdown left to the reaper (an application thread's offline()), then check that nothing of the
    agent is left running and that no callback fires any more, even when the network pokes it."""
    aid.offline()
    assert not _threads_of(aid), _threads_of(aid)
    seen = len(calls)
    poke()
    time.sleep(0.3)
    assert len(calls) == seen, "a callback fired after the shutdown completed"
    assert aid.status()["state"] == "offline"


def _offline_timed(aid, box):
    started = time.monotonic()
    aid.offline()
    box.append(time.monotonic() - started)


def _offline_on_first_call(aid, calls, durations, where):
    """A sync callback (any arguments) that records its calls and calls ``aid.offline()`` the first time."""
    def callback(*args):
        calls.append(args)
        if len(calls) == 1:
            where.append(threading.current_thread().name)
            _offline_timed(aid, durations)

    return callback


def test_offline_from_an_async_handler_returns_at_once(agents, network):
    a, b, sid = pair_in_session(agents, network)
    durations, calls, after = [], [], []

    async def handler(msg):
        calls.append(msg)
        if len(calls) == 1:
            _offline_timed(b, durations)
            await asyncio.sleep(0.05)  # the loop is not frozen, and the handler may go on after offline()
            after.append("done")

    b.add_message_handler(handler)
    assert a.send_message_content(sid, [b.id], "stop please")
    until(lambda: after, what="async handler finished")
    assert durations[0] < QUICK, durations
    _finish_and_check_quiet(b, calls, lambda: a.send_message_content(sid, [b.id], "anyone?"))


@pytest.mark.parametrize("kind", ["message", "stream"])
def test_offline_from_a_sync_or_stream_handler_returns_at_once(agents, network, kind):
    a, b, sid = pair_in_session(agents, network)
    durations, calls, where = [], [], []
    b.add_message_handler(_offline_on_first_call(b, calls, durations, where))
    if kind == "message":
        assert a.send_message_content(sid, [b.id], "stop please")
    else:  # a stream announce: its handlers run on a stream-handler thread
        _push, pull = asyncio.run(a.create_stream(sid, [b.id]))
        assert a.send_message(sid, [b.id], [{"type": "text/event-stream", "status": "loading", "timestamp": 1,
                                             "content": pull}])
    until(lambda: durations, what=f"{kind} handler called offline()")
    assert durations[0] < QUICK, durations
    assert where[0].startswith("agentcp-stream-handler" if kind == "stream" else "agentcp-handlers")
    _finish_and_check_quiet(b, calls, lambda: a.send_message_content(sid, [b.id], "anyone?"))


@pytest.fixture
def fast_heartbeat(monkeypatch):
    """Heartbeat intervals scaled down (with a server announcing 300 ms beats) so silence is noticed quickly."""
    monkeypatch.setattr(HeartbeatClient, "MIN_INTERVAL", 0.3)
    monkeypatch.setattr(HeartbeatClient, "MAX_INTERVAL", 3.0)
    monkeypatch.setattr(HeartbeatClient, "REPLY_TIMEOUT", 0.15)
    monkeypatch.setattr(HeartbeatClient, "RECONNECT_BACKOFF", FAST)


@pytest.mark.acp_server(next_beat_ms=300)
@pytest.mark.parametrize("kind", ["on_state_change", "on_event"])
def test_offline_from_a_heartbeat_callback_returns_at_once(kind, fast_heartbeat, acp_server: FakeACPServer,
                                                           agents, network):
    b = agents("bob")
    b.online()
    assert b.wait_online(5)
    durations, calls, where = [], [], []
    callback = _offline_on_first_call(b, calls, durations, where)
    if kind == "on_state_change":
        b.on_state_change = callback
    else:
        b.heartbeat_client.on_event = callback
    acp_server.go_silent()  # the heartbeat notices: a state change and timeline events follow
    until(lambda: durations, what=f"{kind} called offline()")
    assert durations[0] < QUICK, durations
    acp_server.resume()
    _finish_and_check_quiet(b, calls, acp_server.go_silent)


def test_offline_then_online_from_a_handler_restarts_the_agent(agents, network):
    """A handler may restart its agent: offline() then online() from the handler neither waits for itself nor
    leaves the agent stopped."""
    a, b, sid = pair_in_session(agents, network)
    durations, calls = [], []

    def handler(msg):
        calls.append(msg)
        if len(calls) == 1:
            _offline_timed(b, durations)
            b.online()

    b.add_message_handler(handler)
    assert a.send_message_content(sid, [b.id], "restart")
    until(lambda: durations, what="restart")
    assert durations[0] < QUICK
    assert b.wait_online(5)
    b.offline()
    assert not _threads_of(b), _threads_of(b)


def test_dispatcher_stop_from_its_own_async_handler_does_not_wait_for_itself():
    """The root of item 11: Dispatcher.stop joined the worker that waited for the coroutine calling stop()."""
    from agentcp.msg.dispatcher import Dispatcher

    dispatcher = Dispatcher("agentcp-handlers-unit", workers=2, handler_timeout=30)
    took, done = [], threading.Event()

    async def handler():
        started = time.monotonic()
        dispatcher.stop(30)
        took.append(time.monotonic() - started)
        await asyncio.sleep(0.01)  # the loop still runs the handler to its end
        done.set()

    assert dispatcher.submit("s", lambda: dispatcher.call_handler(handler, []))
    assert done.wait(5)
    assert took[0] < QUICK, took
    dispatcher.stop(5)  # from this thread: joins the reaper, the worker and the loop
    assert not [t for t in threading.enumerate() if t.name.startswith("agentcp-handlers-unit")]
    assert dispatcher.submit("s", lambda: None) is False
