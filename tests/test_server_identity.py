"""A server certificate must name the server (trust.md rule 3, issue 7 item 4), over real sockets and as a pure check.

The attacker presents a certificate that chains to a trusted root but is not the server's: an ordinary agent's
certificate (issued by the network's agent CA), or the real server's challenge relayed from another host.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentcp.base.auth_client import AuthClient
from agentcp.base.server_auth import check_server_identity
from agentcp.context.exceptions import ServerAuthError
from agentcp.testing.attacker import RecordingServer

AID = "alice.example.com"
NOW = dt.datetime.now(dt.timezone.utc)


def _cert(cn="server", *, dns=(), ips=(), eku=None):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
               .not_valid_after(NOW + dt.timedelta(days=1)))
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(key, hashes.SHA256())


# -- the pure check --------------------------------------------------------------------------------------------------


def test_identity_by_san_dns_ip_and_wildcard():
    assert check_server_identity(_cert(dns=["msg.agentunion.cn"]), "msg.agentunion.cn") is None
    assert check_server_identity(_cert(dns=["MSG.AgentUnion.cn"]), "msg.agentunion.cn.") is None
    assert check_server_identity(_cert(ips=["127.0.0.1"]), "127.0.0.1") is None
    assert check_server_identity(_cert(dns=["*.agentunion.cn"]), "msg.agentunion.cn", "agentunion.cn") is None
    assert check_server_identity(_cert(cn="msg.agentunion.cn", eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
                                 "msg.agentunion.cn") is None


@pytest.mark.parametrize("cert,host,domain", [
    (_cert(dns=["msg.agentunion.cn"]), "evil.example.org", ""),              # names another host
    (_cert(dns=["*.agentunion.cn"]), "a.b.agentunion.cn", "agentunion.cn"),  # a wildcard covers one label
    (_cert(dns=["*.cn"]), "agentunion.cn", ""),                             # no wildcard over a top-level domain
    (_cert(dns=["*.example.org"]), "x.example.org", "agentunion.cn"),       # wildcard outside the network domain
    (_cert(dns=["127.0.0.1"]), "127.0.0.1", ""),                            # an IP host needs an IP SAN
    (_cert(ips=["127.0.0.2"]), "127.0.0.1", ""),
    (_cert(cn="msg.agentunion.cn"), "msg.agentunion.cn", ""),               # CN alone: an AID can look like a host
    (_cert(dns=["msg.agentunion.cn"], eku=[ExtendedKeyUsageOID.CLIENT_AUTH]), "msg.agentunion.cn", ""),
    (_cert(cn="127.0.0.1", eku=[ExtendedKeyUsageOID.SERVER_AUTH]), "127.0.0.1", ""),
])
def test_certificates_that_do_not_name_the_host(cert, host, domain):
    assert check_server_identity(cert, host, domain) is not None


# -- over sockets ----------------------------------------------------------------------------------------------------


@pytest.fixture
def identity(tmp_path, acp_server):
    certs = str(tmp_path / "certs")
    acp_server.issue_identity(AID, certs, seed_password="s")
    return certs


def _mallory_presents_her_agent_certificate(server):
    """The server signs challenges with an ordinary agent's key and certificate (issued by its own agent CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pki = server.pki
    pki.present_certificate(key, pki.issue_agent_cert("mallory.example.com", key.public_key()), [pki.agent_ca_cert])


@contextlib.contextmanager
def _auth(url, identity, strict):
    auth = AuthClient(AID, url, identity, "s", strict_server_auth=strict)
    try:
        yield auth
    finally:
        auth.close()


def test_strict_mode_accepts_the_devserver_certificate_naming_its_host(acp_server, identity):
    with _auth(acp_server.heartbeat_url, identity, strict=True) as auth:
        auth.sign_in_once()
    assert auth.server_auth_state == "verified"


def test_strict_mode_refuses_an_agent_certificate_as_server_certificate(acp_server, identity):
    _mallory_presents_her_agent_certificate(acp_server)
    before = len(acp_server.sign_ins)
    with _auth(acp_server.heartbeat_url, identity, strict=True) as auth:
        with pytest.raises(ServerAuthError, match="mallory.example.com"):
            auth.sign_in_once()
    assert auth.signature is None and auth.server_auth_state == "host-mismatch"
    # only the challenge was asked for: no proof was sent
    assert [r for r in acp_server.sign_ins[before:] if r.step == 2] == []


def test_outside_strict_mode_the_mismatch_is_a_warning_and_reported(acp_server, identity, caplog):
    _mallory_presents_her_agent_certificate(acp_server)
    with caplog.at_level(logging.WARNING, logger="agentcp.auth"), \
            _auth(acp_server.heartbeat_url, identity, strict=False) as auth:
        auth.sign_in_once()
        auth.sign_in_once()
    assert auth.signature and auth.server_auth_state == "host-mismatch"
    warnings = [r for r in caplog.records if "does not name it" in r.getMessage()]
    assert len(warnings) == 1


def test_strict_mode_refuses_a_relayed_challenge(acp_server, identity):
    """The relay passes the real server's signed challenge through; the certificate names 127.0.0.1, not it."""
    with RecordingServer("127.0.0.2", relay_to=acp_server.heartbeat_url) as relay:
        with _auth(relay.url, identity, strict=True) as auth:
            with pytest.raises(ServerAuthError, match="127.0.0.2"):
                auth.sign_in_once()
        assert relay.proofs == [] and relay.stolen_tokens == []


def test_status_reports_how_each_server_proved_itself(agents, network, acp_server):
    a = agents("alice")
    a.online()
    assert a.wait_online(5)
    states = a.status()["server_auth"]
    assert set(states.values()) == {"verified"}, states
    assert len(states) == 3   # access point, heartbeat, message server


def test_status_reports_a_host_mismatch(agents, network, acp_server):
    _mallory_presents_her_agent_certificate(acp_server)
    a = agents("alice")
    a.online()
    assert a.wait_online(5)
    assert set(a.status()["server_auth"].values()) == {"host-mismatch"}


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys
    from agentcp import AgentCP
    acp = AgentCP(sys.argv[1], seed_password="dev")
    aid = acp.create_aid("example.com", "strictagent")
    aid.online()
    ok = aid.wait_online(5)
    print("ONLINE" if ok else "NOT ONLINE", sorted(set(aid.status()["server_auth"].values())))
    aid.offline()
    """
)


@pytest.mark.skipif(os.name != "posix", reason="uses SIGTERM")
def test_signed_devserver_serves_strict_agents_in_other_processes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "agentcp.testing.devserver", "--port", "0", "--signed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        exports = dict(proc.stdout.readline().strip().split(" ", 1)[1].split("=", 1) for _ in range(2))
        assert set(exports) == {"AGENTCP_AP_URL", "AGENTCP_CA_ROOT"}, exports
        env = dict(os.environ, AGENTCP_STRICT_SERVER_AUTH="1", **exports)
        script = tmp_path / "agent.py"
        script.write_text(AGENT_SCRIPT, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], env=env, capture_output=True,
                             text=True, timeout=30)
        assert "ONLINE ['verified']" in out.stdout, out.stdout + out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
