"""The shared heartbeat reactor's deferred reads (LAZY_READ_WINDOW), with real sockets and a minimal client."""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional, Tuple

import pytest

from agentcp.heartbeat.reactor import HeartbeatReactor


class _Reactor(HeartbeatReactor):
    LAZY_READ_WINDOW = 0.3


class _Client:
    """Records when the reactor calls it; reads one datagram per readiness event, like HeartbeatClient."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.log: List[Tuple[str, float]] = []
        self.read = threading.Event()
        self.fired = threading.Event()
        #: Like HeartbeatClient, every callback returns the client's next wake time (None would drop the timer).
        self.timer_at: Optional[float] = None

    def _timer_slack(self) -> float:
        return 0.0

    def _reactor_timer(self, now: float) -> Optional[float]:
        self.log.append(("timer", time.monotonic()))
        self.fired.set()
        return None

    def _reactor_readable(self, sock: socket.socket, now: float) -> Optional[float]:
        try:
            sock.recv(64)
        except BlockingIOError:
            return self.timer_at
        self.log.append(("read", time.monotonic()))
        self.read.set()
        return self.timer_at


@pytest.fixture
def setup():
    reactor = _Reactor(name="agentcp-hb-test-reactor")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    client = _Client(rx)

    def start() -> None:
        reactor.add_client(client)
        reactor.watch(rx, client)

    reactor.call(start, wait=True)
    yield reactor, client, tx
    reactor.call(lambda: (reactor.unwatch(rx), reactor.remove_client(client)), wait=True)
    reactor.join_stopped()
    rx.close()
    tx.close()


def _set_timer(reactor: HeartbeatReactor, client: _Client, delay: float) -> float:
    at = client.timer_at = time.monotonic() + delay
    reactor.call(lambda: reactor.set_timer(client, at), wait=True)
    return at


def test_a_datagram_waits_for_a_timer_due_within_the_window_and_is_read_before_it(setup):
    """One wake-up for both: the datagram is not read on arrival, but when the timer wakes the loop, and before
    the timer runs (so a reply that arrived before its deadline is never judged a miss)."""
    reactor, client, tx = setup
    at = _set_timer(reactor, client, 0.2)
    sent = time.monotonic()
    tx.send(b"reply")
    assert client.fired.wait(5)
    kinds = [kind for kind, _ in client.log]
    assert kinds == ["read", "timer"]
    read_at = client.log[0][1]
    assert read_at >= at - 0.01, f"read {read_at - sent:.3f} s after arrival: not deferred to the timer"


def test_a_datagram_is_read_at_once_when_no_timer_is_near(setup):
    reactor, client, tx = setup
    _set_timer(reactor, client, 5.0)
    sent = time.monotonic()
    tx.send(b"invite")
    assert client.read.wait(5)
    assert client.log[0][1] - sent < 0.2


def test_a_burst_is_read_in_full_before_the_timer(setup):
    reactor, client, tx = setup
    _set_timer(reactor, client, 0.15)
    for _ in range(20):
        tx.send(b"x")
    assert client.fired.wait(5)
    kinds = [kind for kind, _ in client.log]
    assert kinds == ["read"] * 20 + ["timer"]


def test_commands_are_not_deferred(setup):
    """offline(), a rebuild and a socket closed under a client reach the loop through call(): never delayed."""
    reactor, client, _tx = setup
    _set_timer(reactor, client, 0.25)
    t0 = time.monotonic()
    reactor.call(lambda: None, wait=True)
    assert time.monotonic() - t0 < 0.15
    assert not client.fired.is_set()
