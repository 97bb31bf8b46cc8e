"""The trust domain (trust.md §2) and the nonce rule, as a pure value: no sockets."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from agentcp.base.trust import RefusalLog, TrustPolicy, UntrustedHostError, looks_like_nonce, url_host

PROD = TrustPolicy.from_ap_url("https://acp3.agentunion.cn", env={})


@pytest.mark.parametrize("url", [
    "https://acp3.agentunion.cn/api/accesspoint",
    "wss://msg.agentunion.cn/session?x=1",
    "https://agentunion.cn",
    "https://a.b.agentunion.cn:8443/x",
    "https://ACP3.AgentUnion.CN./x",
])
def test_hosts_of_the_network_domain_are_trusted(url):
    assert PROD.is_trusted(url)


@pytest.mark.parametrize("url", [
    "https://evil.example/api",
    "https://agentunion.cn.evil.example/",
    "https://evilagentunion.cn/",
    "http://msg.agentunion.cn/",                 # plain http to a remote host: TLS required
    "ws://msg.agentunion.cn/",
    "https://msg.agentunion.cn@evil.example/",   # user-info trick
    "https://evil.example\\@msg.agentunion.cn/",  # backslash: parsers disagree
    "https://msg.agentunion.cn:99999/",          # invalid port
    "https://msg.agentunion.cn\x00.evil/",
    "ftp://msg.agentunion.cn/",
    "//msg.agentunion.cn/",
    "",
    "not a url",
])
def test_everything_else_is_refused(url):
    assert not PROD.is_trusted(url)
    with pytest.raises(UntrustedHostError):
        PROD.check(url, "test")


def test_check_names_the_host_never_the_query():
    with pytest.raises(UntrustedHostError) as info:
        PROD.check("https://relay.evil.example/pull?signature=SECRET", "stream pull")
    assert "relay.evil.example" in str(info.value) and "SECRET" not in str(info.value)
    assert info.value.host == "relay.evil.example" and info.value.purpose == "stream pull"


def test_an_ip_or_localhost_access_point_trusts_exactly_that_host_any_port():
    dev = TrustPolicy.from_ap_url("http://127.0.0.1:8765", env={})
    assert dev.is_trusted("ws://127.0.0.1:40001/session")
    assert dev.is_trusted("http://127.0.0.1:9/x")
    assert not dev.is_trusted("ws://127.0.0.2:40001/session")
    assert not dev.is_trusted("http://localhost:8765/")
    local = TrustPolicy.from_ap_url("http://localhost:8765", env={})
    assert local.is_trusted("ws://localhost:1/") and not local.is_trusted("ws://127.0.0.1:1/")


def test_a_two_label_access_point_does_not_trust_its_whole_tld():
    p = TrustPolicy.from_ap_url("https://example.com", env={})
    assert p.is_trusted("https://sub.example.com/") and not p.is_trusted("https://other.com/")


def test_config_hosts_and_environment_patterns_add_hosts():
    p = TrustPolicy.from_ap_url("https://acp3.agentunion.cn",
                                config_urls=["https://msg.partner.net/x", "hb.partner.net:5001", "bad host!"],
                                env={"AGENTCP_TRUSTED_HOSTS": "files.cdn.example, *.relay.example, *.com"})
    assert p.is_trusted("wss://msg.partner.net/") and p.is_trusted("https://hb.partner.net/")
    assert p.is_trusted("https://files.cdn.example/") and p.is_trusted("https://a.relay.example/")
    assert not p.is_trusted("https://other.partner.net/")
    assert not p.is_trusted("https://anything.com/")        # "*.com" is ignored
    assert p.is_trusted("https://acp3.agentunion.cn/")      # nothing removes the AP


def test_plain_schemes_follow_the_access_point():
    p = TrustPolicy.from_ap_url("http://ap.lan.example", env={})
    assert p.is_trusted("ws://msg.lan.example/")            # the application chose http
    loop = TrustPolicy.from_ap_url("https://acp3.agentunion.cn", env={"AGENTCP_TRUSTED_HOSTS": "localhost"})
    assert loop.is_trusted("ws://localhost:9/")              # loopback is fine in plain


@pytest.mark.parametrize("nonce,ok", [
    ("0123456789abcdef" * 2, True),
    ("AbC-_9", True),
    ("YWJj==", True),
    ("a" * 128, True),
    ("a" * 129, False),
    ("", False),
    (None, False),
    (12345, False),
    ("transfer 100 coins to mallory", False),
    ("abc\n", False),
    ('{"nonce": "x"}', False),
])
def test_only_challenge_shaped_nonces_are_signed(nonce, ok):
    assert looks_like_nonce(nonce) is ok


def test_url_host_normalises():
    assert url_host("HTTPS://Msg.Example.COM.:443/x") == ("https", "msg.example.com")
    assert url_host("ws://[::1]:80/") == ("ws", "::1")


def test_refusal_log_counts_and_logs_each_host_once(caplog):
    log = RefusalLog()
    err = UntrustedHostError("refused for invite: host 'x.evil' is outside", host="x.evil", purpose="invite")
    with caplog.at_level(logging.WARNING, logger="agentcp.trust"):
        for _ in range(5):
            log.refuse(err)
    assert log.snapshot() == {"invite": 5}
    assert len([r for r in caplog.records if "x.evil" in r.getMessage()]) == 1


def test_limits_are_validated_and_replaceable():
    assert DEFAULT_LIMITS.ws_message_max == 16 * 1024 * 1024
    assert dataclasses.replace(DEFAULT_LIMITS, message_clients_max=2).message_clients_max == 2
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            Limits(announce_workers=bad)
    err = LimitExceeded("ws_message_max", 16, source="message channel", got=17)
    assert "ws_message_max" in str(err) and "dataclasses.replace" in str(err)


def test_an_agent_reports_its_trust_domain_and_counts_refusals(agents):
    aid = agents("alice")
    assert aid.status()["trust"] == {"refused": {}, "limits_crossed": {}}
    assert aid._check_trusted(aid._entry_url() + "/x", "test")
    assert not aid._check_trusted("https://relay.evil.example/x?signature=t", "invite")
    aid._limit_crossed(LimitExceeded("ws_message_max", 16, source="message channel"))
    assert aid.status()["trust"] == {"refused": {"invite": 1}, "limits_crossed": {"ws_message_max": 1}}
