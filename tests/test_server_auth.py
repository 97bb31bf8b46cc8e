"""Server authentication (liveness.md §2.4-2.5): challenge signature, chain to a trust anchor, D-S1..D-S5 fixes."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from agentcp.base import server_auth
from agentcp.base.server_auth import (
    AGENTUNION_ROOT_CA_PEM,
    add_trusted_root,
    remove_trusted_root,
    trusted_roots,
    verify_server_response,
)
from agentcp.context.exceptions import ServerAuthError

NOW = dt.datetime.now(dt.timezone.utc)
AID = "alice.example.com"
RID = "0123456789abcdef0123456789abcdef"


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_cert(cn, key, *, issuer=None, issuer_key=None, ca=False, aia=None, path_length=None,
              not_before=None, not_after=None):
    """A certificate for ``key`` named ``cn``, signed by ``issuer_key`` (self-signed if no issuer)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    )
    if aia:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(aia))
        ]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def keypair():
    return ec.generate_private_key(ec.SECP256R1())


def sign_challenge(key, aid=AID, rid=RID) -> str:
    return key.sign((aid + rid).lower().encode(), ec.ECDSA(hashes.SHA256())).hex()


class PKI:
    """root -> intermediate (fetched via AIA at ``INTER_URL``) -> server leaf."""

    INTER_URL = "http://ca.test/intermediate.crt"

    def __init__(self):
        self.root_key, self.inter_key, self.leaf_key = keypair(), keypair(), keypair()
        self.root = make_cert("Test Root", self.root_key, ca=True)
        self.inter = make_cert("Test Intermediate", self.inter_key, issuer=self.root, issuer_key=self.root_key,
                               ca=True)
        self.leaf = make_cert("server.test", self.leaf_key, issuer=self.inter, issuer_key=self.inter_key,
                              aia=self.INTER_URL)
        self.fetches = []
        self.served = {self.INTER_URL: self.inter.public_bytes(serialization.Encoding.DER)}

    def fetch(self, url):
        self.fetches.append(url)
        if url not in self.served:
            raise OSError("404")
        return self.served[url]


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv("AGENTCP_CA_ROOT", raising=False)
    server_auth.reset_trusted_roots()
    server_auth.clear_issuer_cache()
    yield
    server_auth.reset_trusted_roots()
    server_auth.clear_issuer_cache()


@pytest.fixture
def pki():
    p = PKI()
    add_trusted_root(pem(p.root))
    return p


def verify(p, cert_pem=None, sig=None, **kw):
    return verify_server_response(AID, RID, cert_pem or pem(p.leaf), sig or sign_challenge(p.leaf_key),
                                  fetch=kw.pop("fetch", p.fetch), **kw)


# -- trust anchor -----------------------------------------------------------------------------------------------

def test_builtin_root_is_the_agentunion_root():
    root = x509.load_pem_x509_certificate(AGENTUNION_ROOT_CA_PEM.encode())
    der = root.public_bytes(serialization.Encoding.DER)
    spki = root.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(der).hexdigest() == "32b9d974cb7faf5c12e14eb21fe69977dc090cd6c3bf68de34ce487ea2924564"
    assert hashlib.sha256(spki).hexdigest() == "c2a2369f3a9fd32b46b0ea014b8ff518a863eb1ad2aeb3b8dbfc3d3f9e758ea7"
    assert root in trusted_roots()


def test_add_and_remove_trusted_root():
    p = PKI()
    add_trusted_root(pem(p.root).encode())
    assert p.root in trusted_roots()
    remove_trusted_root(pem(p.root))
    assert p.root not in trusted_roots()


def test_env_root_file_and_directory(tmp_path, monkeypatch):
    p = PKI()
    (tmp_path / "root.pem").write_text(pem(p.root))
    monkeypatch.setenv("AGENTCP_CA_ROOT", str(tmp_path / "root.pem"))
    assert verify(p).subject == p.leaf.subject
    monkeypatch.setenv("AGENTCP_CA_ROOT", str(tmp_path))
    assert p.root in trusted_roots()
    monkeypatch.setenv("AGENTCP_CA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(ServerAuthError):
        verify(p)


# -- accepted chains --------------------------------------------------------------------------------------------

def test_good_chain_via_aia_der(pki):
    assert verify(pki) == pki.leaf
    assert pki.fetches == [PKI.INTER_URL]


def test_good_chain_via_aia_pem(pki):
    pki.served[PKI.INTER_URL] = pem(pki.inter).encode()
    assert verify(pki) == pki.leaf


def test_good_chain_via_extra_pem_blocks(pki):
    assert verify(pki, cert_pem=pem(pki.leaf) + pem(pki.inter)) == pki.leaf
    assert pki.fetches == []


def test_leaf_issued_directly_by_root_without_aia(pki):
    leaf = make_cert("direct.test", pki.leaf_key, issuer=pki.root, issuer_key=pki.root_key)
    assert verify(pki, cert_pem=pem(leaf)) == leaf


def test_aia_fetched_over_real_http(pki):
    der = pki.inter.public_bytes(serialization.Encoding.DER)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/pkix-cert")
            self.send_header("Content-Length", str(len(der)))
            self.end_headers()
            self.wfile.write(der)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/inter.crt"
        leaf = make_cert("server.test", pki.leaf_key, issuer=pki.inter, issuer_key=pki.inter_key, aia=url)
        assert verify_server_response(AID, RID, pem(leaf), sign_challenge(pki.leaf_key)) == leaf
    finally:
        srv.shutdown()
        srv.server_close()


def test_signed_message_is_lowercased(pki):
    sig = sign_challenge(pki.leaf_key, aid="alice.example.com", rid=RID)
    assert verify_server_response("Alice.Example.COM", RID.upper(), pem(pki.leaf), sig, fetch=pki.fetch)


# -- rejected ---------------------------------------------------------------------------------------------------

def test_wrong_signature_rejected(pki):
    with pytest.raises(ServerAuthError, match="signature"):
        verify(pki, sig=sign_challenge(keypair()))
    with pytest.raises(ServerAuthError, match="signature"):
        verify(pki, sig=sign_challenge(pki.leaf_key, rid="f" * 32))
    with pytest.raises(ServerAuthError, match="hex"):
        verify(pki, sig="zz")


def test_garbage_certificate_rejected(pki):
    with pytest.raises(ServerAuthError, match="not a valid PEM"):
        verify(pki, cert_pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_expired_leaf_rejected(pki):
    leaf = make_cert("server.test", pki.leaf_key, issuer=pki.inter, issuer_key=pki.inter_key, aia=PKI.INTER_URL,
                     not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
    with pytest.raises(ServerAuthError, match="expired"):
        verify(pki, cert_pem=pem(leaf))


def test_not_yet_valid_and_injected_clock(pki):
    with pytest.raises(ServerAuthError, match="not valid before"):
        verify(pki, now=NOW - dt.timedelta(days=5))
    with pytest.raises(ServerAuthError, match="expired"):
        verify(pki, now=NOW + dt.timedelta(days=365))
    assert verify(pki, now=(NOW + dt.timedelta(days=1)).replace(tzinfo=None)) == pki.leaf  # naive = UTC


def test_expired_intermediate_rejected(pki):
    pki.inter = make_cert("Test Intermediate", pki.inter_key, issuer=pki.root, issuer_key=pki.root_key, ca=True,
                          not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(hours=1))
    pki.served[PKI.INTER_URL] = pem(pki.inter).encode()
    with pytest.raises(ServerAuthError, match="intermediate certificate .* expired"):
        verify(pki)


def test_untrusted_root_rejected(pki):
    remove_trusted_root(pem(pki.root))
    with pytest.raises(ServerAuthError, match="trusted root"):
        verify(pki, cert_pem=pem(pki.leaf) + pem(pki.inter) + pem(pki.root))


def test_self_signed_with_self_referencing_aia_rejected():
    key = keypair()
    url = "http://evil.test/self.crt"
    cert = make_cert("evil", key, ca=True, aia=url)
    fetches = []

    def fetch(u):
        fetches.append(u)
        return cert.public_bytes(serialization.Encoding.DER)

    for _ in range(2):  # 0.1.99 accepted it the second time from its cache
        with pytest.raises(ServerAuthError, match="self-signed"):
            verify_server_response(AID, RID, pem(cert), sign_challenge(key), fetch=fetch)
    assert len(server_auth._issuer_cache) == 0


def test_self_signed_trusted_root_as_leaf_is_accepted():
    key = keypair()
    cert = make_cert("pinned", key, ca=True)
    add_trusted_root(pem(cert))
    assert verify_server_response(AID, RID, pem(cert), sign_challenge(key)) == cert


def test_intermediate_without_ca_flag_rejected(pki):
    pki.inter = make_cert("Test Intermediate", pki.inter_key, issuer=pki.root, issuer_key=pki.root_key, ca=False)
    pki.served[PKI.INTER_URL] = pem(pki.inter).encode()
    with pytest.raises(ServerAuthError, match="not a CA"):
        verify(pki)


def test_issuer_name_must_match(pki):
    # Signed by the intermediate's key but naming another issuer: the name chaining check rejects it.
    other = make_cert("Someone Else", pki.inter_key, ca=True)
    leaf = make_cert("server.test", pki.leaf_key, issuer=other, issuer_key=pki.inter_key, aia=PKI.INTER_URL)
    with pytest.raises(ServerAuthError, match="not signed by the issuer"):
        verify(pki, cert_pem=pem(leaf))


def test_path_length_enforced(pki):
    root = make_cert("Strict Root", pki.root_key, ca=True, path_length=0)
    add_trusted_root(pem(root))
    inter = make_cert("Test Intermediate 2", pki.inter_key, issuer=root, issuer_key=pki.root_key, ca=True)
    leaf = make_cert("server.test", pki.leaf_key, issuer=inter, issuer_key=pki.inter_key)
    remove_trusted_root(pem(pki.root))
    with pytest.raises(ServerAuthError, match="path length"):
        verify(pki, cert_pem=pem(leaf) + pem(inter))


def test_chain_depth_bounded():
    keys = [keypair() for _ in range(8)]
    root = make_cert("R", keys[0], ca=True)
    add_trusted_root(pem(root))
    chain = [root]
    for i in range(1, 8):
        chain.append(make_cert(f"C{i}", keys[i], issuer=chain[-1], issuer_key=keys[i - 1], ca=True))
    leaf = chain[-1]
    bundle = "".join(pem(c) for c in reversed(chain[1:]))
    with pytest.raises(ServerAuthError, match="longer than"):
        verify_server_response(AID, RID, bundle, sign_challenge(keys[-1]), fetch=lambda u: b"")
    assert leaf is not None


def test_unfetchable_issuer_rejected(pki):
    pki.served.clear()
    with pytest.raises(ServerAuthError, match="cannot fetch"):
        verify(pki)
    pki.served[PKI.INTER_URL] = b"garbage"
    with pytest.raises(ServerAuthError, match="not a PEM or DER"):
        verify(pki)


# -- issuer cache (D-S2, D-S3, D-S5) ---------------------------------------------------------------------------

def test_issuer_cached_only_after_full_chain_validates(pki):
    remove_trusted_root(pem(pki.root))
    with pytest.raises(ServerAuthError):
        verify(pki)
    assert PKI.INTER_URL not in server_auth._issuer_cache  # D-S3: no poisoning by a failed chain
    add_trusted_root(pem(pki.root))
    verify(pki)
    verify(pki)
    assert pki.fetches == [PKI.INTER_URL, PKI.INTER_URL]  # the second success came from the cache
    assert PKI.INTER_URL in server_auth._issuer_cache


def test_cached_issuer_is_not_trusted_blindly(pki):
    verify(pki)  # caches the intermediate under INTER_URL
    forger = keypair()
    forged = make_cert("server.test", forger, issuer=pki.inter, issuer_key=forger, aia=PKI.INTER_URL)
    with pytest.raises(ServerAuthError, match="not signed by"):
        verify_server_response(AID, RID, pem(forged), sign_challenge(forger), fetch=pki.fetch)
    # And a cached issuer still has to chain to a root that is trusted now.
    remove_trusted_root(pem(pki.root))
    with pytest.raises(ServerAuthError, match="trusted root"):
        verify(pki)


def test_issuer_cache_is_bounded_and_expires():
    now = [0.0]
    cache = server_auth._IssuerCache(maxsize=3, ttl=10.0, clock=lambda: now[0])
    cert = make_cert("x", keypair(), ca=True)
    for i in range(5):
        cache.put(f"u{i}", cert)
    assert len(cache) == 3 and cache.get("u0") is None and cache.get("u4") is cert
    now[0] = 10.5
    assert cache.get("u4") is None
    assert server_auth._issuer_cache.maxsize == 64 and server_auth._issuer_cache.ttl == 3600.0
