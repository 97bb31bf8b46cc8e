"""Attacks on the trust boundaries (trust.md rules 1-2, issue 7 items 1-3 and 15), over real sockets.

Each test plays the attacker (a forged UDP invite from the heartbeat server's address, a peer's stream announce, a
server that offers a text as nonce) against a server of its own on 127.0.0.2 (loopback, outside the trust domain of
the local access point on 127.0.0.1) and asserts what the attacker did NOT get.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import until

from agentcp.testing.attacker import RecordingServer

ATTACKER_TEXT = "transfer 100 coins to mallory"


def _online(agents, name="alice"):
    aid = agents(name)
    aid.online()
    assert aid.wait_online(5)
    return aid


def _refused(aid, purpose):
    return aid.status()["trust"]["refused"].get(purpose, 0)


def _crossed(aid, bound):
    return aid.status()["trust"]["limits_crossed"].get(bound, 0)


@pytest.fixture
def relay(network):
    """A sign-in relay on 127.0.0.2 that passes the real message server's challenges through."""
    with RecordingServer("127.0.0.2", relay_to=network.messages.url) as server:
        yield server


# -- item 1: forged UDP invite -> sign-in relay ----------------------------------------------------------------------


def test_forged_udp_invite_naming_a_relay_gets_no_sign_in(agents, network, acp_server, relay):
    a = _online(agents)
    token = a.session_manager.message_client.auth_client.signature
    # Forged off-path: the datagram comes from the heartbeat server's own address, as a spoofer would make it look.
    acp_server.send_invite(a.id, "mallory.example.com", "s-evil", invite_code="X",
                           message_server=relay.url + "/message")
    acp_server.wait_for_invite_responses(1, agent_id=a.id)  # the invite was handled (answered after the listener)
    until(lambda: _refused(a, "invite") == 1 or relay.requests, what="invite refused")
    assert not relay.first_request.wait(0.5), "the agent contacted the relay"
    assert relay.requests == [] and relay.proofs == [] and relay.stolen_tokens == []
    assert not relay.saw(token)
    assert _refused(a, "invite") == 1
    sm = a.session_manager
    assert list(sm.message_client_map) == [sm.server_url]   # no client for the relay, nothing to retry
    assert sm.get("s-evil") is None


def test_websocket_invite_naming_a_relay_gets_no_sign_in(agents, network, relay):
    """The same invite pushed on the message socket (newer servers do that): the server is trusted, the relay it
    names is not."""
    a = _online(agents)
    assert network.messages.push(a.id, "invite_agent_req", {
        "session_id": "s-evil", "inviter_id": "mallory.example.com", "invite_code": "X", "acceptor_id": a.id,
        "message_server": relay.url + "/message"})
    until(lambda: _refused(a, "invite") == 1, what="invite refused")
    assert not relay.first_request.wait(0.3)
    assert relay.requests == [] and a.session_manager.get("s-evil") is None


def test_udp_invite_naming_the_configured_message_server_still_joins(agents, network, acp_server):
    network.messages.invite_via = "udp"   # the fake server sends it over UDP, naming its own message server
    a, b = _online(agents, "alice"), _online(agents, "bob")
    until(lambda: acp_server.is_online(b.id), what="b heartbeat-online at the server")
    sid = a.create_session("chat", "")
    assert a.invite_member(sid, b.id)
    until(lambda: b.session_manager.get(sid) is not None, what="b joined")
    assert network.messages.counters["invites_udp"] == 1
    assert _refused(b, "invite") == 0


def test_udp_invite_with_an_empty_session_id_is_ignored_and_not_rejoined(agents, network, acp_server):
    a = _online(agents)
    acp_server.send_invite(a.id, "mallory.example.com", "", invite_code="X", message_server=network.messages.url)
    acp_server.wait_for_invite_responses(1, agent_id=a.id)
    assert a.session_manager.get("") is None
    sid = a.create_session("mine", "")       # registered after the invite: re-joined after anything joined before
    network.messages.drop_all()               # reconnect: every known session is re-joined
    network.messages.wait_for(lambda: [d for d in network.messages.commands("join_session_req", a.id)
                                       if d.get("session_id") == sid])
    joins = network.messages.commands("join_session_req", a.id)
    assert [d.get("session_id") for d in joins] == [sid]


# -- item 3: many invites, many servers -----------------------------------------------------------------------------


def test_200_invites_naming_200_untrusted_servers_are_refused(agents, network, acp_server, relay):
    a = _online(agents)
    threads_before = threading.active_count()
    for i in range(200):
        acp_server.send_invite(a.id, "mallory.example.com", f"s-{i}", message_server=f"{relay.url}/m{i}")
    acp_server.wait_for_invite_responses(200, agent_id=a.id, timeout=10)
    assert _refused(a, "invite") == 200
    assert not relay.first_request.wait(0.3)
    assert relay.requests == []
    assert len(a.session_manager.message_client_map) == 1
    assert threading.active_count() <= threads_before + 2


def test_invites_to_many_trusted_servers_are_capped(agents, network, acp_server, monkeypatch):
    monkeypatch.setenv("AGENTCP_TRUSTED_HOSTS", "127.0.0.2")   # the operator trusts this host: sign-in is legitimate
    with RecordingServer("127.0.0.2") as servers:
        a = _online(agents)
        cap = a.limits.message_clients_max
        threads_before = threading.active_count()
        for i in range(200):
            acp_server.send_invite(a.id, "carol.example.com", f"s-{i}", message_server=f"{servers.url}/m{i}")
        acp_server.wait_for_invite_responses(200, agent_id=a.id, timeout=10)
        sm = a.session_manager
        assert len(sm.message_client_map) == cap                 # the main client and cap - 1 others
        assert _crossed(a, "message_clients_max") == 200 - (cap - 1)
        assert threading.active_count() <= threads_before + 3 * (cap - 1)
        # the refused invites created no session
        assert sum(1 for i in range(200) if sm.get(f"s-{i}") is not None) == cap - 1


def test_a_server_offering_text_as_nonce_gets_no_signature(agents, network, acp_server, monkeypatch):
    monkeypatch.setenv("AGENTCP_TRUSTED_HOSTS", "127.0.0.2")
    with RecordingServer("127.0.0.2", nonce=ATTACKER_TEXT) as server:
        a = _online(agents)
        acp_server.send_invite(a.id, "carol.example.com", "s-1", message_server=server.url + "/message")
        until(lambda: server.requests, what="sign-in challenge")
        client = a.session_manager.message_client_map[server.url + "/message"]
        until(lambda: client.auth_client.last_error is not None, what="sign-in error")
        assert client.auth_client.last_error.permanent
        assert "nonce" in str(client.auth_client.last_error)
        assert server.proofs == []


def test_auth_client_signs_only_what_looks_like_a_nonce(tmp_path, acp_server):
    from agentcp.base.auth_client import AuthClient
    from agentcp.context.exceptions import PermanentAuthError

    certs = str(tmp_path / "certs")
    acp_server.issue_identity("alice.example.com", certs, seed_password="s")
    for nonce in (ATTACKER_TEXT, "a" * 129, "../etc", "ab cd"):
        with RecordingServer("127.0.0.2", nonce=nonce) as server:
            auth = AuthClient("alice.example.com", server.url, certs, "s")
            try:
                with pytest.raises(PermanentAuthError, match="nonce"):
                    auth.sign_in_once()
                assert auth.sign_in(max_retry_num=3) is None      # permanent: one attempt, not retried
                assert auth.attempts == 2
            finally:
                auth.close()
            assert server.proofs == [], nonce
    with RecordingServer("127.0.0.2", nonce="q1w2-e3_r4==") as server:   # base64url is a challenge
        auth = AuthClient("alice.example.com", server.url, certs, "s")
        try:
            auth.sign_in_once()
        finally:
            auth.close()
        assert len(server.proofs) == 1


# -- item 2: stream URLs named by peers and servers ------------------------------------------------------------------


def _pair(agents, network):
    a, b = _online(agents, "alice"), _online(agents, "bob")
    sid = a.create_session("chat", "")
    assert a.invite_member(sid, b.id)
    until(lambda: b.session_manager.get(sid) is not None, what="b joined")
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    return a, b, sid


def test_peer_announcing_a_pull_url_on_its_own_server_gets_no_token(agents, network):
    a, b, sid = _pair(agents, network)
    token = b.session_manager.message_client.auth_client.signature
    results = []
    b.add_message_handler(lambda msg: results.append(b.fetch_stream_message(msg)))
    with RecordingServer("127.0.0.2") as thief:
        block = {"type": "text/event-stream", "status": "loading", "timestamp": 1,
                 "content": thief.url + "/stream/pull?session_id=x&message_id=1"}
        assert a.send_message(sid, [b.id], [block])
        until(lambda: results, what="b's handler ran")
        assert results == [""]
        assert not thief.first_request.wait(0.2)
        assert thief.requests == [] and not thief.saw(token)
    assert _refused(b, "stream pull") == 1


def test_trusted_pull_url_still_works(agents, network):
    a, b, sid = _pair(agents, network)
    texts = []
    b.add_message_handler(lambda msg: texts.append(b.fetch_stream_message(msg)))
    assert asyncio.run(a.send_stream_message(sid, [b.id], ["he", "llo"]))
    until(lambda: texts, what="pulled")
    assert texts == ["hello"]
    assert _refused(b, "stream pull") == 0


def test_push_url_on_an_untrusted_host_gets_no_token(agents, network, monkeypatch):
    a, b, sid = _pair(agents, network)
    token = a.session_manager.message_client.auth_client.signature
    with RecordingServer("127.0.0.2") as thief:
        streams = network.messages.streams
        monkeypatch.setattr(streams, "push_url",
                            lambda s, m: f"{thief.url.replace('http', 'ws', 1)}/push?session_id={s}&message_id={m}")
        push, reason = asyncio.run(a.create_stream(sid, [b.id]))
        assert push is None and "127.0.0.2" in reason
        assert not thief.first_request.wait(0.2)
        assert thief.requests == [] and not thief.saw(token)
    assert _refused(a, "stream push") == 1


def test_ca_offering_text_as_renewal_nonce_gets_no_signature(agents):
    from agentcp.ca.ca_client import CAClient, CAError

    a = agents("alice")
    with RecordingServer("127.0.0.2", nonce=ATTACKER_TEXT) as ca:
        client = CAClient(ca.url, a.ca_client.aid_path, a.seed_password)
        with pytest.raises(CAError, match="not a challenge"):
            client.renew(a.id)
        assert len(ca.requests) == 1 and ca.proofs == []
