"""AuthClient against real localhost servers: two-step sign-in, classified errors, retries, TLS, server auth.

Each behaviour checked here fails against agentcp 0.1.99 (liveness.md §2, §7 D-S1..D-S11).
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import agentcp
from agentcp.base import server_auth
from agentcp.base.auth_client import AuthClient
from agentcp.base.backoff import Backoff
from agentcp.base.credentials import hash_seed
from agentcp.context import ErrorContext
from agentcp.context.exceptions import (
    CredentialError,
    PermanentAuthError,
    ServerAuthError,
    TLSVerificationError,
    TransientAuthError,
)

AID = "alice.example.com"
SEED = "s3cret seed for tests"
NOW = dt.datetime.now(dt.timezone.utc)


# -- PKI helpers ------------------------------------------------------------------------------------------------

def _cert(cn, key, *, issuer=None, issuer_key=None, ca=False, san_ip=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san_ip:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _pem(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def server_pki():
    """A test root CA and a server certificate it signed directly (no AIA), naming the server's host."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Fake Test Root", root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("fake-server", leaf_key, issuer=root, issuer_key=root_key, san_ip="127.0.0.1")
    return {"root": root, "leaf": leaf, "leaf_key": leaf_key}


@pytest.fixture
def identity(tmp_path):
    """An agent identity in the §5.2 format: P-384 key, PKCS#8 encrypted with the hashed seed, and its cert."""
    key = ec.generate_private_key(ec.SECP384R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(hash_seed(SEED).encode("ascii")))
    cert = _cert(AID, key)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / f"{AID}.key").write_bytes(key_pem)
    (certs / f"{AID}.crt").write_text(_pem(cert))
    return {"dir": str(certs), "key_pem": key_pem.decode(), "cert": cert}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("AGENTCP_TLS_VERIFY", "AGENTCP_STRICT_SERVER_AUTH", "AGENTCP_CA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    server_auth.reset_trusted_roots()
    server_auth.clear_issuer_cache()
    yield
    server_auth.reset_trusted_roots()
    server_auth.clear_issuer_cache()


@pytest.fixture
def published(monkeypatch):
    errors = []
    monkeypatch.setattr(ErrorContext, "publish", lambda e: errors.append(e))
    return errors


# -- a scriptable two-step sign-in server ------------------------------------------------------------------------

class FakeSignInServer:
    """Implements liveness.md §2.3-2.8 on 127.0.0.1; ``script`` holds canned replies used first, in order.

    A scripted reply is ``(status, body, headers)`` where ``body`` is a dict (sent as JSON) or bytes.
    """

    def __init__(self, tls_context=None):
        self.script = collections.deque()
        self.always = None  # a reply used for every request while set
        self.requests = []  # (path, body, headers)
        self.nonces = {}
        self.tokens = set()
        self.issued_tokens = []
        self.proof_signatures = []
        self.signer = None  # (key, cert_pem) to sign step 1
        self.step1_delay = 0.0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                status, reply, headers = outer.handle(self.path, body, dict(self.headers))
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self):
        return [p for p, _, _ in self.requests]

    def handle(self, path, body, headers):
        with self.lock:
            self.requests.append((path, body, headers))
            if self.always is not None:
                return self.always
            if self.script:
                return self.script.popleft()
        if path == "/sign_in":
            return self._sign_in(body)
        if path == "/sign_out":
            with self.lock:
                self.tokens.discard(body.get("signature"))
            return 200, {}, None
        if path == "/query_online_state":
            if body.get("signature") not in self.tokens:
                return 401, {"error": "UNAUTHORIZED"}, None
            return 200, {"data": [{"agent_id": "bob.example.com", "online": True}]}, None
        return 404, {"error": "no such endpoint"}, None

    def _sign_in(self, body):
        rid = body.get("request_id", "")
        if "nonce" not in body:
            if self.step1_delay:
                time.sleep(self.step1_delay)
            nonce = secrets.token_hex(16)
            with self.lock:
                self.nonces[rid] = nonce
            reply = {"nonce": nonce}
            if self.signer is not None:
                key, cert_pem = self.signer
                reply["cert"] = cert_pem
                reply["signature"] = key.sign((body["agent_id"] + rid).lower().encode(),
                                              ec.ECDSA(hashes.SHA256())).hex()
            return 200, reply, None
        with self.lock:
            expected = self.nonces.pop(rid, None)
        if expected is None or body["nonce"] != expected:
            return 401, {"error": "INVALID_NONCE"}, None
        cert = x509.load_pem_x509_certificate(body["cert"].encode())
        spki = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        if body["public_key"] != spki:
            return 401, {"error": "PUBLIC_KEY_MISMATCH"}, None
        try:
            cert.public_key().verify(bytes.fromhex(body["signature"]), expected.encode(),
                                     ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return 401, {"error": "INVALID_SIGNATURE"}, None
        token = "tok-" + secrets.token_hex(24)
        with self.lock:
            self.tokens.add(token)
            self.issued_tokens.append(token)
            self.proof_signatures.append(body["signature"])
        return 200, {"signature": token, "server_ip": "127.0.0.1", "port": 4242, "sign_cookie": 42}, None


@pytest.fixture
def server():
    srv = FakeSignInServer()
    yield srv
    srv.close()


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def make_client(server, identity, **kw):
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("rand", lambda: 1.0)
    seed = kw.pop("seed", hash_seed(SEED))
    return AuthClient(AID, server.url + "/", identity["dir"], seed, **kw)


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- happy path and compatibility -------------------------------------------------------------------------------

def test_two_step_sign_in_stores_token_and_returns_reply(server, identity):
    client = make_client(server, identity)
    assert client.server_url == server.url and client.signature is None and client.is_retry is False
    assert AuthClient.success_crt_list == []
    reply = client.sign_in()
    assert reply["signature"] == client.signature == server.issued_tokens[0]
    assert reply["sign_cookie"] == 42 and reply["port"] == 4242
    assert server.paths() == ["/sign_in", "/sign_in"]
    step1, step2 = server.requests[0][1], server.requests[1][1]
    assert set(step1) == {"agent_id", "request_id"}
    assert len(step1["request_id"]) == 32 and step1["request_id"] == step1["request_id"].lower()
    assert step2["request_id"] == step1["request_id"]
    assert step2["cert"] == _pem(identity["cert"]) and step2["public_key"].endswith("\n")
    ua = server.requests[0][2]["User-Agent"]
    assert ua == f"AgentCP/{agentcp.__version__} (AuthClient; {AID})"
    assert client.get_headers() == {"User-Agent": ua}
    assert client.last_error is None and client.attempts == 1


def test_unsigned_challenge_works_with_one_warning(server, identity, caplog):
    caplog.set_level(logging.WARNING, logger="agentcp.auth")
    client = make_client(server, identity)
    assert client.sign_in() and client.sign_in_once()
    assert client.server_auth_state == "unauthenticated"
    warnings = [r for r in caplog.records if "did not prove its identity" in r.getMessage()]
    assert len(warnings) == 1 and "AGENTCP_STRICT_SERVER_AUTH" in warnings[0].getMessage()


def test_signed_challenge_verified(server, identity, server_pki):
    server_auth.add_trusted_root(_pem(server_pki["root"]))
    server.signer = (server_pki["leaf_key"], _pem(server_pki["leaf"]))
    client = make_client(server, identity)
    assert client.sign_in_once()["signature"]
    assert client.server_auth_state == "verified"


def test_bad_server_signature_refused_before_signing_the_nonce(server, identity, server_pki, published):
    server_auth.add_trusted_root(_pem(server_pki["root"]))
    server.signer = (ec.generate_private_key(ec.SECP256R1()), _pem(server_pki["leaf"]))
    client = make_client(server, identity)
    with pytest.raises(ServerAuthError, match="signature"):
        client.sign_in_once()
    assert client.sign_in() is None
    assert server.paths() == ["/sign_in", "/sign_in"]  # two challenges, no proof ever sent
    assert isinstance(client.last_error, ServerAuthError) and published == [client.last_error]


def test_untrusted_server_chain_refused(server, identity, server_pki):
    server.signer = (server_pki["leaf_key"], _pem(server_pki["leaf"]))  # root not added to the trust store
    with pytest.raises(ServerAuthError, match="trusted root"):
        make_client(server, identity).sign_in_once()


@pytest.mark.parametrize("how", ["kwarg", "env"])
def test_strict_mode_refuses_unsigned_challenge(server, identity, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("AGENTCP_STRICT_SERVER_AUTH", "1")
        client = make_client(server, identity)
    else:
        client = make_client(server, identity, strict_server_auth=True)
    with pytest.raises(ServerAuthError, match="strict"):
        client.sign_in_once()
    assert server.paths() == ["/sign_in"] and client.signature is None


# -- transient errors and backoff -------------------------------------------------------------------------------

def test_transient_errors_retried_with_backoff(server, identity):
    server.script.extend([(503, {"error": "busy"}, None), (502, b"", None)])
    client = make_client(server, identity)
    reply = client.sign_in()
    assert reply and reply["signature"] == client.signature
    assert client._sleep == [0.5, 1.0]  # full jitter with rand=1.0: base * 2**n
    assert client.attempts == 3 and client.last_error is None


def test_backoff_is_capped_and_failure_returns_none(server, identity, published):
    server.always = (503, {"error": "down"}, None)
    client = make_client(server, identity, backoff=Backoff(base=0.5, cap=2.0))
    assert client.sign_in(max_retry_num=5) is None  # never ""
    assert client._sleep == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert len(server.requests) == 6 and client.attempts == 6
    assert isinstance(client.last_error, TransientAuthError) and client.last_error.status == 503
    assert "503" in str(client.last_error) and published == [client.last_error]
    assert published[0].agent_id == AID


def test_retry_count_beyond_max_returns_none_not_empty_string(server, identity):
    client = make_client(server, identity)
    assert client.sign_in(retry_count=11, max_retry_num=10) is None
    assert server.requests == []
    assert make_client(server, identity).sign_in(retry_count=3, max_retry_num=3) is not None  # one attempt


@pytest.mark.parametrize("header,expected", [("7", 7.0), ("120", 30.0)])
def test_429_retry_after_honoured_up_to_cap(server, identity, header, expected):
    server.script.append((429, {"error": "RATE_LIMIT_EXCEEDED"}, {"Retry-After": header}))
    client = make_client(server, identity, rand=lambda: 0.0)
    assert client.sign_in()
    assert client._sleep == [expected]


def test_429_retry_after_http_date(server, identity):
    server.script.append((429, {}, {"Retry-After": formatdate(time.time() + 5, usegmt=True)}))
    client = make_client(server, identity, rand=lambda: 0.0)
    with pytest.raises(TransientAuthError) as info:
        client.sign_in_once()
    assert 3.0 <= info.value.retry_after <= 5.0 and info.value.status == 429


def test_garbage_json_is_transient(server, identity):
    server.script.append((200, b"<html>proxy error</html>", None))
    with pytest.raises(TransientAuthError, match="not JSON"):
        make_client(server, identity).sign_in_once()


def test_missing_nonce_is_transient_with_clear_message(server, identity):
    server.script.append((200, {"nonce": ""}, None))
    client = make_client(server, identity)
    with pytest.raises(TransientAuthError, match="server returned no nonce"):
        client.sign_in_once()
    assert isinstance(client.last_error, TransientAuthError)


def test_connection_refused_is_transient(identity):
    client = AuthClient(AID, f"http://127.0.0.1:{_closed_port()}", identity["dir"], hash_seed(SEED))
    with pytest.raises(TransientAuthError, match="cannot reach"):
        client.sign_in_once()


def test_cancel_aborts_the_wait(server, identity):
    server.always = (503, {}, None)
    client = AuthClient(AID, server.url, identity["dir"], hash_seed(SEED), backoff=Backoff(base=20, cap=20),
                        rand=lambda: 1.0)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    assert client.sign_in(cancel=cancel) is None
    assert time.monotonic() - started < 3


# -- permanent errors -------------------------------------------------------------------------------------------

def test_permanent_error_fails_at_once(server, identity, published, caplog):
    caplog.set_level(logging.WARNING, logger="agentcp.auth")
    server.script.append((403, {"error": "AGENT_NOT_FOUND"}, None))
    client = make_client(server, identity)
    assert client.sign_in() is None
    assert len(server.requests) == 1 and client._sleep == []
    err = client.last_error
    assert isinstance(err, PermanentAuthError) and err.status == 403
    assert "403" in str(err) and "AGENT_NOT_FOUND" in str(err) and "registered" in str(err)
    assert published == [err]
    assert len([r for r in caplog.records if "failed after 1 attempt" in r.getMessage()]) == 1


def test_structured_error_body(server, identity):
    server.script.append((404, {"error": {"code": "NOT_FOUND", "message": "no route"}}, None))
    with pytest.raises(PermanentAuthError, match="404.*NOT_FOUND: no route.*server URL"):
        make_client(server, identity).sign_in_once()


def test_wrong_seed_password_is_a_credential_error(server, identity):
    client = make_client(server, identity, seed="not the seed")
    with pytest.raises(CredentialError, match="could not be decrypted with the seed password"):
        client.sign_in_once()
    assert client.sign_in() is None and client.attempts == 2  # no retries
    assert isinstance(client.last_error, CredentialError)
    assert "seed_password given to AgentCP" in str(client.last_error)
    assert server.requests == []  # the key is checked before any traffic


def test_raw_seed_also_accepted(server, identity):
    assert make_client(server, identity, seed=SEED).sign_in()


def test_missing_cert_file(server, identity):
    os.remove(os.path.join(identity["dir"], f"{AID}.crt"))
    client = make_client(server, identity)
    assert client.sign_in() is None
    assert isinstance(client.last_error, CredentialError)
    assert os.path.join(identity["dir"], f"{AID}.crt") in str(client.last_error)


# -- timeouts and TLS -------------------------------------------------------------------------------------------

def test_server_that_never_answers_times_out(identity):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections in the kernel, never reads or answers
    try:
        client = AuthClient(AID, f"http://127.0.0.1:{silent.getsockname()[1]}", identity["dir"],
                            hash_seed(SEED), timeout=(1.0, 0.3))
        started = time.monotonic()
        with pytest.raises(TransientAuthError, match="did not answer in time"):
            client.sign_in_once()
        assert time.monotonic() - started < 2.0
    finally:
        silent.close()


class RecordingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.calls = []

    def request(self, method, url, **kwargs):
        self.calls.append((method, url, kwargs.get("timeout"), kwargs.get("verify")))
        return super().request(method, url, **kwargs)


def test_timeout_and_verify_passed_on_every_request(server, identity):
    session = RecordingSession()
    client = make_client(server, identity, session=session, timeout=(2.0, 5.0))
    client.sign_in()
    client.post_json("query_online_state", {"agents": ["bob.example.com"]})
    client.sign_out()
    assert [c[1].rsplit("/", 1)[1] for c in session.calls] == ["sign_in", "sign_in", "query_online_state",
                                                                "sign_out"]
    assert all(c[2] == (2.0, 5.0) and c[3] is True for c in session.calls)
    assert AuthClient(AID, "http://x", "d", "s").timeout == (3.0, 10.0)


@pytest.fixture
def tls_server(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", key, san_ip="127.0.0.1")
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "tls.crt").write_text(_pem(cert))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    srv = FakeSignInServer(tls_context=ctx)
    yield srv
    srv.close()


def test_tls_verified_by_default(tls_server, identity):
    client = make_client(tls_server, identity)
    with pytest.raises(TLSVerificationError) as info:
        client.sign_in_once()
    assert "AGENTCP_TLS_VERIFY=0" in str(info.value) and "verify=False" in str(info.value)
    assert client.sign_in() is None and client._sleep == []  # permanent: not retried


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_can_be_turned_off(tls_server, identity, monkeypatch):
    assert make_client(tls_server, identity, verify=False).sign_in_once()["signature"]
    monkeypatch.setenv("AGENTCP_TLS_VERIFY", "0")
    assert make_client(tls_server, identity).sign_in_once()["signature"]


def test_tls_with_ca_bundle_path(tls_server, identity, tmp_path):
    assert make_client(tls_server, identity, verify=str(tmp_path / "tls.crt")).sign_in_once()["signature"]


# -- sign-out, authorised calls, concurrency --------------------------------------------------------------------

def test_sign_out_clears_token(server, identity):
    client = make_client(server, identity)
    client.sign_in()
    token = client.signature
    client.sign_out()
    assert client.signature is None
    assert server.requests[-1][0] == "/sign_out" and server.requests[-1][1] == {"agent_id": AID,
                                                                                "signature": token}
    assert "User-Agent" in server.requests[-1][2]
    count = len(server.requests)
    client.sign_out()  # no token: nothing sent
    assert len(server.requests) == count


def test_sign_out_never_raises_and_clears_token_when_server_is_down(identity):
    client = AuthClient(AID, f"http://127.0.0.1:{_closed_port()}", identity["dir"], hash_seed(SEED))
    client.signature = "tok-stale"
    client.sign_out()
    assert client.signature is None


def test_post_json_reauths_once_with_a_fresh_copy(server, identity):
    client = make_client(server, identity)
    client.sign_in()
    old = client.signature
    server.tokens.clear()  # the server forgot the session (e.g. restarted)
    payload = {"agents": ";bob.example.com"}
    reply = client.post_json("query_online_state", payload)
    assert reply["data"][0]["online"] is True
    assert payload == {"agents": ";bob.example.com"}  # caller's dict untouched
    calls = [b for p, b, _ in server.requests if p == "/query_online_state"]
    assert [c["signature"] for c in calls] == [old, client.signature] and client.signature != old
    assert all(c["agent_id"] == AID for c in calls)


def test_concurrent_401s_share_one_re_sign_in(server, identity):
    client = make_client(server, identity)
    client.sign_in()
    server.tokens.clear()
    server.step1_delay = 0.2
    barrier = threading.Barrier(3)
    results = []

    def run():
        barrier.wait()
        results.append(client.post_json("query_online_state", {"agents": []}))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 3
    assert server.paths().count("/sign_in") == 4  # the first sign-in plus exactly one re-sign-in


def test_post_json_without_reauth_raises_401(server, identity):
    client = make_client(server, identity)
    client.sign_in()
    server.tokens.clear()
    with pytest.raises(PermanentAuthError) as info:
        client.post_json("/query_online_state", {"agents": []}, reauth_on_401=False)
    assert info.value.status == 401


def test_concurrent_sign_ins_are_single_flight(server, identity):
    server.step1_delay = 0.3
    client = make_client(server, identity)
    barrier = threading.Barrier(3)
    results = []

    def run():
        barrier.wait()
        results.append(client.sign_in_once())

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 3 and len({r["signature"] for r in results}) == 1
    assert server.paths() == ["/sign_in", "/sign_in"] and client.attempts == 1


# -- no secrets in logs -----------------------------------------------------------------------------------------

def test_no_secret_is_logged(server, identity, server_pki, caplog, published):
    caplog.set_level(logging.DEBUG)
    server_auth.add_trusted_root(_pem(server_pki["root"]))
    server.signer = (server_pki["leaf_key"], _pem(server_pki["leaf"]))
    client = make_client(server, identity)
    client.sign_in()
    server.tokens.clear()
    client.post_json("query_online_state", {"agents": []})
    server.script.append((503, {"error": "busy"}, None))
    client.sign_in(max_retry_num=1)
    client.sign_out()
    make_client(server, identity, seed="wrong " + SEED).sign_in()
    server.always = (500, {}, None)
    client.sign_in(max_retry_num=1)

    text = caplog.text + "\n".join(str(e) for e in published) + repr(client)
    secrets_seen = (server.issued_tokens + server.proof_signatures
                    + [SEED, hash_seed(SEED), "wrong " + SEED, hash_seed("wrong " + SEED)]
                    + [line for line in identity["key_pem"].splitlines() if "-----" not in line])
    assert len(server.issued_tokens) >= 3 and len(server.proof_signatures) >= 3
    leaked = [s for s in secrets_seen if s in text]
    assert leaked == []
    assert "signed in as" in caplog.text  # the logs do say what happened
