"""Fixtures shared by the tests that run agents on the fake network (FakeACPServer + AccessPoint)."""
from __future__ import annotations

import pytest

from agentcp.base.backoff import Backoff
from agentcp.msg.message_client import MessageClientConfig

#: Short reconnect waits, so tests of healing run in well under a second per fault.
FAST = Backoff(base=0.05, cap=0.3)


def fast_messaging(aid):
    """Speed up an agent's reconnects and message channel (before it goes online); returns it."""
    aid.RECONNECT_BACKOFF = FAST
    aid.message_config = MessageClientConfig(ping_interval=0.5, reconnect_backoff=FAST, immediate_reconnect_gap=0.0)
    return aid


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    """A developer's exported AGENTCP_AP_URL must not redirect the agents of a test."""
    monkeypatch.delenv("AGENTCP_AP_URL", raising=False)


@pytest.fixture
def network(acp_server):
    """The local network: ``acp_server`` with its access point, CA and message server mounted."""
    from agentcp.testing.access_point import AccessPoint

    return AccessPoint(acp_server).install()


@pytest.fixture
def agents(tmp_path, network):
    """``make(name)``: a new agent ``<name>.example.com`` on the network (fast settings); all go offline after."""
    from agentcp import AgentCP

    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    made = []

    def make(name: str):
        aid = fast_messaging(acp.create_aid("example.com", name))
        made.append(aid)
        return aid

    yield make
    for aid in made:
        aid.offline()


def delivered(result, timeout: float = 5.0) -> bool:
    """True if a live ``SendResult`` settles as delivered within ``timeout`` (sends return before the ack)."""
    return result.wait(timeout) and result.status == "delivered"


def until(pred, timeout: float = 5.0, what: str = "condition"):
    """Poll ``pred`` until it returns something truthy (returned); fails the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.005)


def pair_in_session(agents, network):
    """``(alice, bob, session_id)``: two agents online, bob invited into alice's new session and joined."""
    a, b = agents("alice"), agents("bob")
    a.online()
    b.online()
    sid = a.create_session("chat", "")
    assert sid and a.invite_member(sid, b.id)
    until(lambda: b.session_manager.get(sid) is not None, what="b joined")
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    return a, b, sid
