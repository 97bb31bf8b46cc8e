"""Identities on disk: 0.1.99 layout, legacy files, wrong seed, atomic writes, renewal, addressing."""
from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import socket
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcp import AgentCP
from agentcp.ca.ca_client import CAClient
from agentcp.ca.identity_store import IdentityStore, atomic_write, needs_renewal
from agentcp.context.exceptions import CredentialError
from legacy_identity import make_test_ca, seed_hex, write_legacy_identity

UTC = datetime.timezone.utc


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("AGENTCP_AP_URL", raising=False)


@pytest.fixture
def dead_url():
    """An http URL on loopback where nothing listens (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def legacy_ca():
    return make_test_ca()


@pytest.fixture
def network(acp_server):
    from agentcp.testing.access_point import AccessPoint

    return AccessPoint(acp_server).install()


# --- layout ------------------------------------------------------------------------------------------------------


def test_create_aid_writes_0199_layout(tmp_path, network):
    acp = AgentCP(str(tmp_path), seed_password="s3cret", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "alice")
    assert aid is not None and aid.id == "alice.example.com"
    certs = tmp_path / "agentcp" / "AIDs" / "alice.example.com" / "private" / "certs"
    assert sorted(os.listdir(certs)) == ["alice.example.com.crt", "alice.example.com.csr", "alice.example.com.key"]
    key_pem = (certs / "alice.example.com.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, password=seed_hex("s3cret").encode())
    assert isinstance(key.curve, ec.SECP384R1)
    assert stat.S_IMODE(os.stat(certs / "alice.example.com.key").st_mode) == 0o600
    csr = x509.load_pem_x509_csr((certs / "alice.example.com.csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=alice.example.com,O=SomeOrganization,L=SomeCity,ST=SomeState,C=CN"
    bc = csr.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    cert = x509.load_pem_x509_certificate((certs / "alice.example.com.crt").read_bytes())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    # AgentID directories as 0.1.99 creates them
    assert (tmp_path / "agentcp" / "AIDs" / "alice.example.com" / "public").is_dir()
    assert (tmp_path / "agentcp" / "AIDs" / "alice.example.com" / "private" / "data").is_dir()
    assert (tmp_path / "agentcp" / "Certs" / "root").is_dir()
    assert not [n for n in os.listdir(certs) if n.endswith(".tmp")]
    assert acp.get_aid_list() == ["alice.example.com"]
    # creating again loads the existing identity (no second certificate)
    before = network.counters["certs_issued"]
    again = acp.create_aid("example.com", "alice.example.com")
    assert again.id == "alice.example.com" and network.counters["certs_issued"] == before


def test_certificate_path_puts_aids_there(tmp_path, network):
    acp = AgentCP(str(tmp_path / "data"), str(tmp_path / "certs"), "pw", run_proxy=False, ap_url=network.url)
    assert acp.aid_path == os.path.join(str(tmp_path / "certs"), "AIDs")
    aid = acp.create_aid("example.com", "bob")
    assert (tmp_path / "certs" / "AIDs" / "bob.example.com" / "private" / "certs" / "bob.example.com.key").is_file()
    assert aid.get_agent_public_path() == os.path.join(acp.app_path, "AIDs", "bob.example.com", "public")


# --- legacy identities -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("openssl_pbes2", [None, "aes-128-cbc:hmacWithSHA1", "aes-256-cbc:hmacWithSHA256"])
def test_legacy_identity_loads_without_network(tmp_path, legacy_ca, dead_url, openssl_pbes2):
    if openssl_pbes2 and not shutil.which("openssl"):
        pytest.skip("openssl command not available")
    acp = AgentCP(str(tmp_path), seed_password="old seed", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(acp.aid_path, "carol.example.com", "old seed", legacy_ca, openssl_pbes2=openssl_pbes2,
                          stray_key=True)
    aid = acp.load_aid("carol.example.com")
    assert aid is not None and aid.id == "carol.example.com" and str(aid) == "carol.example.com"
    assert repr(aid) == "AgentId(aid=carol.example.com)"
    assert aid.is_online_success is False
    assert acp.get_aid_list() == ["carol.example.com"]


def test_wrong_seed_password_is_a_clear_error(tmp_path, legacy_ca, dead_url):
    acp = AgentCP(str(tmp_path), seed_password="wrong", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(acp.aid_path, "dave.example.com", "right", legacy_ca)
    with pytest.raises(CredentialError, match="wrong seed password"):
        acp.load_aid("dave.example.com")
    assert os.path.isdir(os.path.join(acp.aid_path, "dave.example.com"))
    acp.set_seed_password("right")
    assert acp.load_aid("dave.example.com") is not None


def test_missing_identity_and_bad_aid(tmp_path, dead_url):
    acp = AgentCP(str(tmp_path), run_proxy=False, ap_url=dead_url)
    assert acp.load_aid("nobody.example.com") is None
    with pytest.raises(RuntimeError):
        acp.load_aid("example.com")


def test_due_for_renewal_loads_while_ca_unreachable(tmp_path, legacy_ca, dead_url):
    now = datetime.datetime.now(UTC)
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=dead_url)
    # valid, but in the last 10 % of its lifetime: renewal is due and fails; the identity still loads
    write_legacy_identity(acp.aid_path, "erin.example.com", "s", legacy_ca,
                          not_before=now - datetime.timedelta(days=95), not_after=now + datetime.timedelta(days=5))
    crt = os.path.join(acp.aid_path, "erin.example.com", "private", "certs", "erin.example.com.crt")
    before = open(crt).read()
    assert acp.load_aid("erin.example.com") is not None
    assert open(crt).read() == before


def test_expired_and_ca_unreachable_returns_none_and_keeps_files(tmp_path, legacy_ca, dead_url):
    now = datetime.datetime.now(UTC)
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(acp.aid_path, "frank.example.com", "s", legacy_ca,
                          not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    assert acp.load_aid("frank.example.com") is None
    certs = os.path.join(acp.aid_path, "frank.example.com", "private", "certs")
    assert sorted(os.listdir(certs)) == ["frank.example.com.crt", "frank.example.com.csr", "frank.example.com.key"]


def test_renewal_near_expiry_keeps_key(tmp_path, acp_server, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "gina")
    store = IdentityStore(acp.aid_path)
    key_before = store.read_key_pem(aid.id)
    # Replace the certificate by one from the same CA that is in its last 10 %.
    now = datetime.datetime.now(UTC)
    key = store.load_key(aid.id, acp.seed_password)
    pki = acp_server.pki
    old = pki.issue_agent_cert(aid.id, key.public_key())
    near = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=95)).not_valid_after(now + datetime.timedelta(days=5))
            .sign(pki.agent_ca_key, hashes.SHA256()))
    store.write_cert(aid.id, near.public_bytes(serialization.Encoding.PEM).decode())
    assert needs_renewal(store.load_cert(aid.id))
    assert acp.load_aid(aid.id) is not None
    assert network.counters["renewals"] == 1
    assert not needs_renewal(store.load_cert(aid.id))
    assert store.read_key_pem(aid.id) == key_before


def test_ca_refusal_raises_and_creates_nothing(tmp_path, network):
    network.set_ca_available(False)
    acp = AgentCP(str(tmp_path), run_proxy=False, ap_url=network.url)
    with pytest.raises(RuntimeError, match="unavailable"):
        acp.create_aid("example.com", "henry")
    assert acp.get_aid_list() == []
    network.set_ca_available(True)
    assert acp.create_aid("example.com", "henry") is not None


def test_create_resumes_with_existing_key(tmp_path, network):
    """A crash after the key was written but before the certificate: create_aid certifies the same key."""
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    store = IdentityStore(acp.aid_path)
    key = ec.generate_private_key(ec.SECP384R1())
    store.write_key("ivy.example.com", key, acp.seed_password)
    aid = acp.create_aid("example.com", "ivy")
    cert = store.load_cert(aid.id)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_guest_identity(tmp_path, network):
    acp = AgentCP(str(tmp_path), seed_password="g", run_proxy=False, ap_url=network.url)
    guest = acp.get_guest_aid("example.com")
    assert guest.id.startswith("guest_")
    again = acp.create_aid("example.com", "guest")
    assert again.id == guest.id and network.counters["guests"] == 1
    # "guesthouse" is a normal name (D-A2)
    assert acp.create_aid("example.com", "guesthouse").id == "guesthouse.example.com"


# --- seed password, import/export --------------------------------------------------------------------------------


def test_modify_seed_password_reencrypts_atomically(tmp_path, legacy_ca, dead_url):
    acp = AgentCP(str(tmp_path), seed_password="one", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(acp.aid_path, "jack.example.com", "one", legacy_ca, stray_key=True)
    write_legacy_identity(acp.aid_path, "kate.example.com", "other", legacy_ca)
    aid = acp.load_aid("jack.example.com")
    acp.modify_seed_password("two")
    assert acp.seed_password == hashlib.sha256(b"two").hexdigest() == aid.seed_password
    assert AgentCP(str(tmp_path), seed_password="two", run_proxy=False, ap_url=dead_url).load_aid("jack.example.com")
    with pytest.raises(CredentialError):
        AgentCP(str(tmp_path), seed_password="one", run_proxy=False, ap_url=dead_url).load_aid("jack.example.com")
    # kate's key (another seed) is untouched
    assert AgentCP(str(tmp_path), seed_password="other", run_proxy=False, ap_url=dead_url).load_aid(
        "kate.example.com")
    for name in ("jack.example.com", "kate.example.com"):
        certs = os.path.join(acp.aid_path, name, "private", "certs")
        assert not [n for n in os.listdir(certs) if n.endswith(".tmp")]
    assert stat.S_IMODE(os.stat(os.path.join(acp.aid_path, "jack.example.com", "private", "certs",
                                             "jack.example.com.key")).st_mode) == 0o600


def test_modify_seed_password_with_wrong_current_seed_changes_nothing(tmp_path, legacy_ca, dead_url):
    acp = AgentCP(str(tmp_path), seed_password="not it", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(acp.aid_path, "leo.example.com", "real", legacy_ca)
    with pytest.raises(CredentialError, match="wrong seed password"):
        acp.modify_seed_password("new")
    assert acp.seed_password == hashlib.sha256(b"not it").hexdigest()


def test_read_and_save_aid_info(tmp_path, legacy_ca, dead_url):
    src = AgentCP(str(tmp_path / "a"), seed_password="a", run_proxy=False, ap_url=dead_url)
    write_legacy_identity(src.aid_path, "mia.example.com", "a", legacy_ca)
    key_pem = src.read_private_key("mia.example.com")
    cert_pem = src.read_certificate_pem("mia.example.com")
    assert key_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----") and "CERTIFICATE" in cert_pem
    dst = AgentCP(str(tmp_path / "b"), seed_password="b", run_proxy=False, ap_url=dead_url)
    with pytest.raises(CredentialError):
        dst.save_aid_info("mia.example.com", "wrong", key_pem, cert_pem)
    assert dst.save_aid_info("mia.example.com", "a", key_pem, cert_pem) is None
    assert dst.load_aid("mia.example.com") is not None


def test_get_aid_list_rules(tmp_path, dead_url):
    acp = AgentCP(str(tmp_path), run_proxy=False, ap_url=dead_url)
    for name in ("a.example.com", "x.y.example.com", "example.com", ".hidden.example.com"):
        os.makedirs(os.path.join(acp.aid_path, name))
    open(os.path.join(acp.aid_path, "file.example.com"), "w").close()
    assert acp.get_aid_list() == ["a.example.com", "x.y.example.com"]


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(str(path), "one")
    atomic_write(str(path), b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f.txt"]


# --- addressing --------------------------------------------------------------------------------------------------


def test_default_addressing(tmp_path):
    acp = AgentCP(str(tmp_path), run_proxy=False)
    os.makedirs(os.path.join(acp.aid_path, "n.a.example.com"))
    assert acp.load_aid("n.a.example.com") is None  # no key: logged, None as in 0.1.99
    assert acp.ep_url == "https://acp3.example.com"
    assert acp.ca_client.ca_server == "https://acp3.example.com/api/accesspoint"


def test_env_and_keyword_override(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTCP_AP_URL", "http://127.0.0.1:8765/")
    acp = AgentCP(str(tmp_path), run_proxy=False)
    assert acp.ap_url == "http://127.0.0.1:8765"
    os.makedirs(os.path.join(acp.aid_path, "o.example.org"))
    acp.load_aid("o.example.org")
    assert acp.ca_client.ca_server == "http://127.0.0.1:8765/api/accesspoint"
    acp2 = AgentCP(str(tmp_path), run_proxy=False, ap_url="http://localhost:9")
    acp2.load_aid("o.example.org")
    assert acp2.ep_url == "http://localhost:9"
    with pytest.raises(ValueError):
        AgentCP(str(tmp_path), run_proxy=False, ap_url="ftp://x")


def test_ca_client_requires_http_url(tmp_path):
    with pytest.raises(ValueError):
        CAClient("acp3.example.com", str(tmp_path), "x")
    ca = CAClient("https://acp3.example.com/", str(tmp_path), "x")
    assert ca.ca_server == "https://acp3.example.com/api/accesspoint"
    assert ca.get_aid_certs_path("a.b.c") == os.path.join(str(tmp_path), "a.b.c", "private", "certs")
    assert ca.aid_is_not_exist("a.b.c")


def test_renewal_retried_after_going_online(tmp_path, acp_server, network):
    """CA down at load time: the identity loads; once online, the agent renews in the background."""
    import time as _time

    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "nora")
    store = IdentityStore(acp.aid_path)
    key = store.load_key(aid.id, acp.seed_password)
    now = datetime.datetime.now(UTC)
    pki = acp_server.pki
    subject = store.load_cert(aid.id).subject
    near = (x509.CertificateBuilder().subject_name(subject).issuer_name(pki.agent_ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=95)).not_valid_after(now + datetime.timedelta(days=5))
            .sign(pki.agent_ca_key, hashes.SHA256()))
    store.write_cert(aid.id, near.public_bytes(serialization.Encoding.PEM).decode())
    network.set_ca_available(False)
    loaded = acp.load_aid(aid.id)
    assert loaded is not None and needs_renewal(store.load_cert(aid.id))
    network.set_ca_available(True)
    loaded.online()
    assert loaded.is_online_success
    deadline = _time.monotonic() + 5
    while needs_renewal(store.load_cert(aid.id)) and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert not needs_renewal(store.load_cert(aid.id))
    loaded.offline()
