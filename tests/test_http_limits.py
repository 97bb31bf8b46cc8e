"""Hostile HTTP servers (issue 7, items 10 and 12; trust.md rule 4), over real localhost sockets.

* A trickling access point: one byte per 100 ms never trips a per-read timeout, so a request must end at its total
  deadline (socket aborted, classified transient), and ``offline()`` must abort an access-point request in flight.
* A 300 MB sign-in reply must not be buffered: the body is read with a cap (``Limits.http_reply_max``).
* A heartbeat sign-in reply with a port of ``1.9`` / ``true`` or a server address with a NUL is refused.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import tracemalloc

import pytest

from agentcp import AgentCP
from agentcp.base.auth_client import AuthClient
from agentcp.base.credentials import hash_seed
from agentcp.ca.ca_client import CAClient, CAError
from agentcp.context.exceptions import TransientAuthError
from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.testing.access_point import PREFIX

from conftest import fast_messaging

AID = "alice.example.com"
MB = 1024 * 1024


@pytest.fixture
def identity(acp_server, tmp_path):
    certs = tmp_path / AID / "private" / "certs"
    acp_server.issue_identity(AID, str(certs), "")
    return str(certs)


def _ap_auth(network, certs, **kw) -> AuthClient:
    return AuthClient(AID, network.url + PREFIX, certs, hash_seed(""), **kw)


def _agent_threads():
    return {t for t in threading.enumerate() if t.name.startswith("agentcp-") and t.name != "agentcp-error-context"}


# --- item 10: whole-request deadlines --------------------------------------------------------------------------


def test_a_trickling_sign_in_reply_fails_at_its_total_deadline(network, identity):
    network.set_trickle(0.1)  # a byte every 100 ms: each read succeeds well inside the 0.5 s read timeout
    client = _ap_auth(network, identity, timeout=(0.5, 0.5))
    started = time.monotonic()
    with pytest.raises(TransientAuthError) as info:
        client.sign_in_once()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed  # the deadline is connect + read = 1 s for the whole request
    assert "within 1 s" in str(info.value) and "whole request" in str(info.value)
    assert client.signature is None
    network.set_trickle(None)
    client.timeout = (3.0, 10.0)
    assert client.sign_in_once()["signature"]  # the client is still usable once the server behaves


def test_a_trickling_ca_reply_fails_at_its_total_deadline(network, tmp_path):
    network.set_trickle(0.1, endpoints=("sign_cert",))
    ca = CAClient(network.url, str(tmp_path / "AIDs"), hash_seed(""), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(CAError) as info:
        ca.create_identity("carol.example.com")
    assert time.monotonic() - started < 3.0
    assert info.value.transient and "whole request" in str(info.value)


def test_offline_aborts_an_access_point_sign_in_in_flight(tmp_path, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = fast_messaging(acp.create_aid("example.com", "alice"))
    before = _agent_threads()  # e.g. a process-wide LLM gateway another test started
    network.set_trickle(0.1)  # default timeouts (3 s, 10 s): the sign-in would trickle for 13 s
    aid.ONLINE_WAIT = 0.3  # online() returns while the first attempt is still being trickled
    aid.online()
    assert not aid.is_online_success
    started = time.monotonic()
    aid.offline()
    elapsed = time.monotonic() - started
    assert elapsed <= 1.0, elapsed  # target: ~100 ms for the call itself (38 s before)
    assert _agent_threads() <= before, _agent_threads() - before
    assert aid.status()["access_point"]["last_error"] is None  # the abort is not reported as an AP failure
    network.set_trickle(None)
    aid.online()  # and the agent comes online normally afterwards
    assert aid.is_online_success
    aid.offline()


def test_whole_request_deadline_stays_generous_for_an_honest_slow_server(network, identity):
    """A server that answers within the deadline is not cut short (the deadline is not a per-read timeout)."""
    network.set_trickle(None)
    client = _ap_auth(network, identity, timeout=(3.0, 10.0))
    assert client.sign_in_once()["signature"]


# --- item 12: reply size caps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("declare_length", [False, True])
def test_a_300_mb_sign_in_reply_is_not_buffered(network, identity, declare_length):
    network.set_oversized_reply(300 * MB, declare_length=declare_length)
    client = _ap_auth(network, identity)
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(TransientAuthError) as info:
            client.sign_in_once()
        elapsed = time.monotonic() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MB, peak / MB  # +812 MB before
    assert elapsed < 5.0
    text = str(info.value)
    assert "Limits.http_reply_max = 1048576" in text and f"{network.url}{PREFIX}/sign_in" in text


def test_the_agent_counts_an_oversized_access_point_reply(tmp_path, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = fast_messaging(acp.create_aid("example.com", "alice"))
    aid.limits = dataclasses.replace(aid.limits, http_reply_max=64 * 1024)  # lowered: a few MB suffice
    network.set_oversized_reply(4 * MB)
    aid.ONLINE_WAIT = 2.0
    try:
        aid.online()
        assert not aid.is_online_success
        crossed = aid.status()["trust"]["limits_crossed"]
        assert crossed.get("http_reply_max", 0) >= 1, crossed
        assert "http_reply_max" in aid.status()["access_point"]["last_error"]
    finally:
        aid.offline()
    network.set_oversized_reply(None)


def test_an_oversized_ca_reply_is_refused(network, tmp_path):
    network.set_oversized_reply(8 * MB, endpoints=("sign_cert",))
    ca = CAClient(network.url, str(tmp_path / "AIDs"), hash_seed(""))
    with pytest.raises(CAError) as info:
        ca.create_identity("carol.example.com")
    assert "http_reply_max" in str(info.value)


# --- item 12: port and address of the heartbeat server ---------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("port", 1.9),
    ("port", True),
    ("port", "1.9"),
    ("port", 0),
    ("port", 70000),
    ("server_ip", "127.0.0.1\x00.evil.example"),
    ("server_ip", "127.0.0.1 evil"),
    ("server_ip", "evil.example/path"),
    ("server_ip", 2130706433),
])
def test_a_heartbeat_sign_in_reply_with_a_bad_port_or_address_is_refused(acp_server, identity, field, value,
                                                                          caplog):
    caplog.set_level(logging.DEBUG, logger="agentcp")
    acp_server.set_sign_in_overrides({field: value})
    client = HeartbeatClient(AID, acp_server.heartbeat_url, identity, hash_seed(""))
    try:
        assert client.sign_in() is False
        assert client.server_ip == "127.0.0.1" and client.port == 0  # nothing from the reply was taken
    finally:
        client.offline()
    assert f"heartbeat sign-in reply field '{field}'" in caplog.text


def test_a_port_given_as_a_decimal_string_is_accepted(acp_server, identity):
    acp_server.set_sign_in_overrides({"port": str(acp_server.udp_port)})
    client = HeartbeatClient(AID, acp_server.heartbeat_url, identity, hash_seed(""))
    try:
        assert client.sign_in() is True
        assert client.port == acp_server.udp_port
    finally:
        client.offline()
