"""agentcp.testing.LossyRelay: a seeded lossy, delaying path (UDP and TCP), and a heartbeat client across it."""
from __future__ import annotations

import socket
import time

import pytest
import requests

from agentcp.base.credentials import hash_seed
from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.testing import FakeACPServer, LossyRelay


def _echo_server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    return sock


def _pump(echo, rounds=1):
    """Echo whatever arrived at the UDP echo server."""
    for _ in range(rounds):
        try:
            data, addr = echo.recvfrom(2048)
        except socket.timeout:
            return
        echo.sendto(data, addr)


def _exchange(relay, echo, n, timeout=0.3):
    """Send n numbered datagrams through the relay to the echo server; return the numbers echoed back."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(0.01)
    got = set()
    try:
        for i in range(n):
            client.sendto(str(i).encode(), relay.udp_address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _pump(echo, rounds=n)
            try:
                while True:
                    got.add(int(client.recv(64)))
            except socket.timeout:
                pass
    finally:
        client.close()
    return got


def test_udp_loss_rate_and_seeded_repeatability():
    echo = _echo_server()
    try:
        with LossyRelay(echo.getsockname(), loss_up=0.3, loss_down=0.0, seed=7) as relay:
            got = _exchange(relay, echo, 200)
            stats = relay.stats()
        # About 30 % dropped on the way up, none on the way down.
        assert 0.2 < stats["udp_up_dropped"] / 200 < 0.4, stats
        assert stats["udp_down_dropped"] == 0
        assert len(got) == stats["udp_up"]
        with LossyRelay(echo.getsockname(), loss_up=0.3, seed=7) as again:
            assert _exchange(again, echo, 200) == got  # same seed, same datagrams lost
    finally:
        echo.close()


def test_udp_delay_and_blackout():
    echo = _echo_server()
    try:
        with LossyRelay(echo.getsockname(), delay=0.05, jitter=0.01, seed=1) as relay:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(1.0)
            t0 = time.monotonic()
            client.sendto(b"x", relay.udp_address)
            echo.settimeout(1.0)
            _pump(echo)
            assert client.recv(16) == b"x"
            rtt = time.monotonic() - t0
            assert 0.08 <= rtt < 0.5  # two one-way delays of 40-60 ms
            relay.blackout()
            assert _exchange(relay, echo, 20) == set()
            relay.blackout(False)
            assert len(_exchange(relay, echo, 20, timeout=0.5)) == 20
            client.close()
    finally:
        echo.close()


def test_tcp_is_relayed_delayed_and_held_in_a_blackout(acp_server):
    with LossyRelay(tcp_target=("127.0.0.1", acp_server.http_port), delay=0.02, seed=3) as relay:
        r = requests.post(relay.url + "/query_online_state", json={}, timeout=5)
        assert r.status_code == 400  # the server answered through the relay
        relay.blackout()
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(relay.url + "/query_online_state", json={}, timeout=(1, 0.3))
        stats = relay.stats()
        assert stats["tcp_connections"] == 2 and stats["tcp_connections_in_blackout"] == 1
        relay.blackout(False)
        assert requests.post(relay.url + "/query_online_state", json={}, timeout=5).status_code == 400


def test_probabilities_are_checked():
    with pytest.raises(ValueError):
        LossyRelay(("127.0.0.1", 9), loss=1.5)


class LossyClient(HeartbeatClient):
    MIN_INTERVAL = 0.3
    REPLY_TIMEOUT = 0.1


@pytest.mark.timeout(60)
def test_heartbeat_stays_online_through_loss_and_comes_back_after_a_blackout(tmp_path):
    """A client signs in and beats through the relay; 20 % loss each way causes no re-sign-in, and after a
    blackout the UDP probes bring it back without a flood of HTTP sign-ins."""
    aid = "lossy.example.com"
    with FakeACPServer(next_beat_ms=300) as server, \
            LossyRelay.for_server(server, delay=0.005, jitter=0.003, seed=11) as path:
        certs = tmp_path / aid
        server.issue_identity(aid, str(certs), "s")
        client = LossyClient(aid, path.url, str(certs), hash_seed("s"))
        try:
            client.online()
            assert client.wait_online(15), client.stats()
            assert client.server_ip == "127.0.0.1" and client.port == path.udp_address[1]
            path.set(loss=0.2)
            time.sleep(3.5)  # ~12 beats at 20 % loss each way
            assert client.stats()["sign_ins"] == 1, client.stats()
            path.set(loss=0.0)
            path.blackout()
            time.sleep(2.5)
            during = path.stats()["tcp_connections_in_blackout"]
            path.blackout(False)
            t0 = time.monotonic()
            assert client.wait_online(5)
            assert time.monotonic() - t0 < 1.5
            assert during <= 1, path.stats()
        finally:
            client.offline()
