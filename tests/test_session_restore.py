"""Sessions survive offline/online (re-joined) and a process restart (ownership restored from the history);
wait_online() and offline() wake on events. Over FakeACPServer + AccessPoint + MessageServer (real sockets)."""
from __future__ import annotations

import threading
import time

import pytest

from agentcp import AgentCP
from agentcp.base.backoff import Backoff

from conftest import delivered, fast_messaging, until as _until


@pytest.fixture
def made():
    agents = []
    yield agents
    for aid in agents:
        aid.offline()
        if aid.db_manager is not None:
            aid.db_manager.close()


def _load(tmp_path, network, made, name: str):
    """An AgentCP over ``tmp_path`` (a new one per call: a "process"), and the agent ``name`` in it."""
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = fast_messaging(acp.create_aid("example.com", name))
    made.append(aid)
    return aid


def _joins(network, aid, sid):
    return [d for d in network.messages.commands("join_session_req", aid.id) if d.get("session_id") == sid]


def test_session_survives_offline_online_and_a_process_restart(tmp_path, network, made):
    a, b = _load(tmp_path, network, made, "alice"), _load(tmp_path, network, made, "bob")
    a.online()
    b.online()
    sid = a.create_session("chat", "")
    assert sid and a.invite_member(sid, b.id)
    _until(lambda: b.session_manager.get(sid) is not None, what="b joined")
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    code = a.session_manager.get(sid).identifying_code
    assert code
    at_a, at_b = [], []
    a.add_message_handler(lambda m: at_a.append(a.get_content_from_message(m)))
    b.add_message_handler(lambda m: at_b.append(b.get_content_from_message(m)))

    # 1. offline and online again: the session is carried over and re-joined (with the owner's code)
    a.offline()
    joins_before = len(_joins(network, a, sid))
    a.online()
    network.messages.wait_for(lambda: len(_joins(network, a, sid)) > joins_before)
    assert _joins(network, a, sid)[-1]["invite_code"] == code
    assert a.session_manager.get(sid).identifying_code == code
    assert delivered(a.send_message_content(sid, [b.id], "back again"))
    _until(lambda: at_b == ["back again"], what="b got a's message")
    assert delivered(b.send_message_content(sid, [a.id], "welcome back"))
    _until(lambda: at_a == ["welcome back"], what="a receives in the re-joined session")

    # 2. process restart: a new AgentCP on the same data directory knows nothing in memory ...
    a.offline()
    a2 = _load(tmp_path, network, made, "alice")
    assert a2 is not a
    a2.online()
    assert a2.session_manager.get(sid) is None
    got2 = []
    a2.add_message_handler(lambda m: got2.append(a2.get_content_from_message(m)))
    # ... and restores ownership from the history on first use, re-joining with the stored code
    assert delivered(a2.send_message_content(sid, [b.id], "after restart"))
    session = a2.session_manager.get(sid)
    assert session is not None and session.identifying_code == code
    _until(lambda: "after restart" in at_b, what="b got the message sent after the restart")
    network.messages.wait_for(lambda: _joins(network, a2, sid) and _joins(network, a2, sid)[-1]["invite_code"] == code)
    assert delivered(b.send_message_content(sid, [a2.id], "hi again"))
    _until(lambda: got2 == ["hi again"], what="a2 receives in the restored session")
    assert [c["session_id"] for c in a2.get_conversation_list(1, 10)] == [sid]
    assert any("after restart" in r["content"] for r in a2.get_message_list(sid, 1, 50))
    # still the owner as far as the server is concerned: the dismissal (needs the code) reaches b
    assert a2.session_manager.dismiss_session(sid) is True
    _until(lambda: b.session_manager.get(sid) is None, what="b saw the dismissal")
    assert sid not in network.messages.sessions()


def test_closed_sessions_are_not_carried_over_or_restored(tmp_path, network, made):
    a = _load(tmp_path, network, made, "carol")
    a.online()
    kept, closed, offline_closed = (a.create_session(n, "") for n in ("kept", "closed", "closed offline"))
    assert kept and closed and offline_closed
    assert a.close_session(closed) is None
    a.offline()
    assert a.close_session(offline_closed) is None  # while offline: forgotten, not re-joined later
    assert a.close_session("never-known") is False
    a.online()
    assert a.session_manager.get(kept) is not None
    assert a.session_manager.get(closed) is None and a.session_manager.get(offline_closed) is None
    assert a.session_manager.restore_session(closed) is None  # left on purpose: not resurrected on demand
    network.messages.wait_for(lambda: _joins(network, a, kept))
    assert not _joins(network, a, closed) and not _joins(network, a, offline_closed)


def test_wait_online_wakes_on_events_and_offline_joins_the_connect_thread(tmp_path, acp_server, network, made):
    a = _load(tmp_path, network, made, "dave")
    assert a.wait_online(0) is False
    started = time.monotonic()
    result = []
    waiter = threading.Thread(target=lambda: result.append(a.wait_online(10)))
    waiter.start()  # waits for an online() from another thread
    a.online()
    waiter.join(5)
    assert result == [True] and time.monotonic() - started < 5
    a.offline()
    assert a.wait_online(10) is False  # returns at once once offline

    # An access point that never answers: online() returns after its first attempt, the loop backs off; a
    # wait_online() in progress and the connect thread both end promptly on offline().
    b = _load(tmp_path, network, made, "erin")
    b.ep_url = "http://127.0.0.1:9"  # nothing listens there: every attempt fails fast
    b.RECONNECT_BACKOFF = Backoff(base=30.0, cap=30.0, floor=30.0)  # then the loop sleeps 30 s
    b.online()
    assert b.is_online_success is False
    out = []
    waiter = threading.Thread(target=lambda: out.append(b.wait_online(30)))
    waiter.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    b.offline()  # the connect loop sleeps in a 30 s backoff: it must wake and be joined
    waiter.join(5)
    assert out == [False] and time.monotonic() - t0 < 2.0
    assert not any(t.name == f"agentcp-online-{b.id}" for t in threading.enumerate())
