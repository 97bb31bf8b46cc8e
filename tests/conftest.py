"""Fixtures shared by the tests that run agents on the fake network (FakeACPServer + AccessPoint)."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from agentcp.base.backoff import Backoff
from agentcp.ca.identity_store import hash_seed_password
from agentcp.msg.message_client import MessageClient, MessageClientConfig
from agentcp.testing.message_server import MessageServer

#: Short reconnect waits, so tests of healing run in well under a second per fault.
FAST = Backoff(base=0.05, cap=0.3)
#: The settings of ``make_client`` message clients: quick reconnects and pings.
MSG_FAST = Backoff(base=0.05, cap=0.2)
MSG_PING = 0.2


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


# --- one MessageClient against the fake message server (tests/test_message_client.py, test_ws_reactor.py) -------
class Recorder:
    """A message handler that records frames and counts on_open calls."""

    def __init__(self) -> None:
        self.frames = []
        self.opens = 0
        self.rejoin = []  # frames sent through ws.send() on every (re)connect
        self.cond = threading.Condition()

    def on_open(self, ws) -> None:
        for frame in list(self.rejoin):
            ws.send(json.dumps(frame))
        with self.cond:
            self.opens += 1
            self.cond.notify_all()

    def on_message(self, ws, text) -> None:
        with self.cond:
            self.frames.append(json.loads(text))
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met; frames={self.frames[-3:]}")
                self.cond.wait(left)

    def cmds(self, cmd):
        with self.cond:
            return [f["data"] for f in self.frames if f["cmd"] == cmd]


@pytest.fixture
def msg_server(acp_server):
    return MessageServer(acp_server).install()


@pytest.fixture
def make_client(acp_server, msg_server, tmp_path):
    clients = []

    def make(name: str, **config) -> MessageClient:
        aid = f"{name}.example.com"
        certs = os.path.join(str(tmp_path), aid)
        if not os.path.exists(certs):
            acp_server.issue_identity(aid, certs, "seed")
        settings = {"ping_interval": MSG_PING, "reconnect_backoff": MSG_FAST, "immediate_reconnect_gap": 0.0, **config}
        client = MessageClient(aid, msg_server.url, certs, hash_seed_password("seed"),
                               config=MessageClientConfig(**settings))
        client.recorder = Recorder()
        client.set_message_handler(client.recorder)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop_websocket_client()
