"""The shared heartbeat reactor with real sockets and a minimal client: deferred reads and commands."""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional, Tuple

import pytest

from agentcp.heartbeat.reactor import HeartbeatReactor


class Probe:
    """A reactor client that records what the reactor asked of it, and when (monotonic)."""

    def __init__(self, reactor: HeartbeatReactor) -> None:
        self.reactor = reactor
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.log: List[Tuple[str, float, bytes]] = []
        self.fired = threading.Event()
        self.at: Optional[float] = None  # the timer (a callback returns it: the reactor's "when next")

    def _timer_slack(self) -> float:
        return 0.0

    def _reactor_readable(self, sock: socket.socket, now: float) -> Optional[float]:
        try:
            data = sock.recv(2048)  # one datagram per call, like the client's usual-reply path
        except BlockingIOError:
            return self.at
        self.log.append(("read", time.monotonic(), data))
        return self.at

    def _reactor_timer(self, now: float) -> Optional[float]:
        self.log.append(("timer", time.monotonic(), b""))
        self.fired.set()
        self.at = None
        return None

    def start(self, timer_in: float) -> float:
        """Register with the reactor and set a timer ``timer_in`` seconds ahead; returns its due time."""
        at = self.at = time.monotonic() + timer_in

        def setup() -> None:
            self.reactor.add_client(self)
            self.reactor.watch(self.sock, self)
            self.reactor.set_timer(self, at)

        self.reactor.call(setup, wait=True)
        return at

    def stop(self) -> None:
        def teardown() -> None:
            self.reactor.unwatch(self.sock)
            self.reactor.remove_client(self)

        self.reactor.call(teardown, wait=True)
        self.reactor.join_stopped()
        self.sock.close()


@pytest.fixture
def probe():
    p = Probe(HeartbeatReactor(name="agentcp-hb-test-reactor"))
    yield p
    p.stop()


def send(probe: Probe, *payloads: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for payload in payloads:
            s.sendto(payload, probe.sock.getsockname())


def test_a_datagram_waits_for_a_timer_due_soon_and_is_read_before_it(probe):
    """Old reactor: every datagram woke the thread on its own (a second wake-up per reply in a big fleet)."""
    at = probe.start(timer_in=0.6 * HeartbeatReactor.READ_DEFER)
    send(probe, b"reply")
    assert probe.fired.wait(5)
    kinds = [k for k, _, _ in probe.log]
    assert kinds == ["read", "timer"]  # read first: a reply that arrived in time is never judged a miss
    assert probe.log[0][1] >= at - 0.005  # read at the timer's wake-up, not when it arrived


def test_with_no_timer_near_a_datagram_is_read_at_once(probe):
    at = probe.start(timer_in=HeartbeatReactor.READ_DEFER + 2.0)
    send(probe, b"invite")
    deadline = time.monotonic() + 5
    while not probe.log and time.monotonic() < deadline:
        time.sleep(0.005)
    assert probe.log and probe.log[0][0] == "read"
    assert probe.log[0][1] < at - 1.0  # long before the timer


def test_a_burst_is_read_in_full_before_the_timer(probe):
    probe.start(timer_in=0.6 * HeartbeatReactor.READ_DEFER)
    send(probe, *[b"%d" % i for i in range(10)])
    assert probe.fired.wait(5)
    kinds = [k for k, _, _ in probe.log]
    assert kinds == ["read"] * 10 + ["timer"]


def test_commands_are_not_deferred(probe):
    probe.start(timer_in=0.9 * HeartbeatReactor.READ_DEFER)
    time.sleep(0.01)  # the reactor is now asleep, reads deferred until the timer
    t0 = time.monotonic()
    probe.reactor.call(lambda: None, wait=True)
    assert not probe.fired.is_set()  # answered while the timer still waits
    assert time.monotonic() - t0 < 0.9 * HeartbeatReactor.READ_DEFER


class _Slot:
    def _timer_slack(self) -> float:
        return 0.0


def test_the_reactor_counts_the_timers_due_at_each_instant():
    """Agents pick the emptier of two beat-grid slots by asking the reactor how many timers are set to each."""
    r = HeartbeatReactor(name="agentcp-hb-test-reactor")
    a, b, c = _Slot(), _Slot(), _Slot()
    for client in (a, b, c):
        r.add_client(client)
    r.set_timer(a, 10.0)
    r.set_timer(b, 10.0)
    r.set_timer(c, 10.2)
    assert (r.due_at(10.0), r.due_at(10.2), r.due_at(10.1)) == (2, 1, 0)
    r.set_timer(a, 10.2)
    r.set_timer(a, 10.2)  # unchanged: counted once
    assert (r.due_at(10.0), r.due_at(10.2)) == (1, 2)
    assert r._take_due(10.0) == [b]  # fired: no longer due there
    assert r.due_at(10.0) == 0
    r.remove_client(a)
    r.set_timer(c, None)
    assert r.due_at(10.2) == 0 and r._due == {}  # nothing left behind
    r.set_timer(a, 11.0)  # a removed client's timer is not set, nor counted
    assert r.due_at(11.0) == 0


def test_clients_ask_their_reactor_how_crowded_a_slot_is(tmp_path):
    from agentcp.heartbeat.heartbeat_client import HeartbeatClient

    reactor = HeartbeatReactor(name="agentcp-hb-test-reactor")
    client = HeartbeatClient("alice.example.com", "http://127.0.0.1:9", str(tmp_path), "seed", reactor=reactor)
    assert client._machine.slot_load == reactor.due_at


def test_replies_of_a_grid_slot_wait_for_the_next_slot_not_longer():
    """With the beat grid, a batch's replies are read at the next slot's wake-up only if READ_DEFER spans a slot;
    a smaller READ_DEFER would let every batch of replies wake the reactor once more."""
    from agentcp.heartbeat.heartbeat_client import HeartbeatClient

    assert HeartbeatReactor.READ_DEFER >= HeartbeatClient.BEAT_GRID
