"""FakeACPServer over real sockets, driven by a minimal client written here (requests + cryptography + raw UDP).

The client below is deliberately independent of agentcp's own AuthClient/HeartbeatClient: these tests pin the
server to liveness.md, so the server can then serve as the reference the real client is tested against.
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcp.testing import Beat, FakeACPServer, HttpRequest, HttpResponse

AID = "alice.example.com"
NO_REPLY_S = 0.3  # how long "no reply" is waited for: loopback replies take well under a millisecond


# ---------------------------------------------------------------------------------------------------- mini client


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return _varint(len(data)) + data


def heartbeat_req(aid: str, cookie: int, seq: int = 1) -> bytes:
    """HeartbeatReq (513) per liveness.md §3.6, encoded by hand."""
    return _varint(0) + _varint(seq) + struct.pack(">HH", 513, 100) + _str(aid) + struct.pack(">Q", cookie)


def invite_resp(aid: str, inviter: str, session_id: str, cookie: int, seq: int = 2) -> bytes:
    """InviteResp (516) per liveness.md §3.9 (SignCookie last)."""
    return (
        _varint(0) + _varint(seq) + struct.pack(">HH", 516, 0)
        + _str(aid) + _str(inviter) + _str(session_id) + struct.pack(">Q", cookie)
    )


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_str(buf: bytes, pos: int) -> Tuple[str, int]:
    length, pos = _read_varint(buf, pos)
    return buf[pos : pos + length].decode("utf-8"), pos + length


def parse_invite_req(buf: bytes) -> Dict[str, Any]:
    """Decode an InviteReq (259) per liveness.md §3.8."""
    _mask, pos = _read_varint(buf, 0)
    seq, pos = _read_varint(buf, pos)
    msg_type, _size = struct.unpack_from(">HH", buf, pos)
    pos += 4
    inviter, pos = _read_str(buf, pos)
    code, pos = _read_str(buf, pos)
    (expire,) = struct.unpack_from(">q", buf, pos)
    pos += 8
    session_id, pos = _read_str(buf, pos)
    server, pos = _read_str(buf, pos)
    return {"type": msg_type, "seq": seq, "inviter": inviter, "code": code, "expire": expire,
            "session_id": session_id, "message_server": server, "rest": buf[pos:]}


class MiniClient:
    """Two-step sign-in (liveness.md §2.3/§2.6) and a raw UDP socket."""

    def __init__(self, base_url: str, aid: str, key_path: str, cert_path: str, seed: str = "",
                 verify: Any = True) -> None:
        self.base_url, self.aid, self.verify = base_url, aid, verify
        password = hashlib.sha256(seed.encode("utf-8")).hexdigest().encode("ascii")
        with open(key_path, "rb") as fh:
            self.key = serialization.load_pem_private_key(fh.read(), password)
        with open(cert_path, encoding="ascii") as fh:
            self.cert_pem = fh.read()
        cert = x509.load_pem_x509_certificate(self.cert_pem.encode("ascii"))
        self.public_key_pem = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(2.0)
        self.seq = 0

    def close(self) -> None:
        self.udp.close()

    def post(self, path: str, body: Dict[str, Any], timeout: float = 5.0) -> requests.Response:
        return requests.post(self.base_url + path, json=body, timeout=timeout, verify=self.verify)

    def step1(self, request_id: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
        request_id = request_id or uuid.uuid4().hex
        resp = self.post("/sign_in", {"agent_id": self.aid, "request_id": request_id})
        assert resp.status_code == 200, resp.text
        return request_id, resp.json()

    def step2(self, request_id: str, nonce: str, *, signed_text: Optional[str] = None,
              **overrides: Any) -> requests.Response:
        text = nonce if signed_text is None else signed_text
        signature = self.key.sign(text.encode("utf-8"), ec.ECDSA(hashes.SHA256())).hex()
        body = {"agent_id": self.aid, "request_id": request_id, "nonce": nonce,
                "public_key": self.public_key_pem, "cert": self.cert_pem, "signature": signature}
        body.update(overrides)
        return self.post("/sign_in", body)

    def sign_in(self) -> Dict[str, Any]:
        request_id, challenge = self.step1()
        resp = self.step2(request_id, challenge["nonce"])
        assert resp.status_code == 200, resp.text
        return resp.json()

    def beat(self, cookie: int, port: int, aid: Optional[str] = None) -> None:
        self.seq += 1
        self.udp.sendto(heartbeat_req(aid or self.aid, cookie, self.seq), ("127.0.0.1", port))

    def recv(self, timeout: float = 2.0) -> Optional[Tuple[bytes, Tuple[str, int]]]:
        self.udp.settimeout(timeout)
        try:
            return self.udp.recvfrom(2048)
        except (socket.timeout, ConnectionRefusedError):
            return None


@pytest.fixture
def ident(tmp_path: Any, acp_server: FakeACPServer) -> Tuple[str, str]:
    return acp_server.issue_identity(AID, str(tmp_path / "certs"))


@pytest.fixture
def client(acp_server: FakeACPServer, ident: Tuple[str, str]) -> Any:
    c = MiniClient(acp_server.heartbeat_url, AID, *ident)
    yield c
    c.close()


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def u64_reply(seq: int, next_beat: int) -> bytes:
    return bytes([0, seq]) + bytes.fromhex("0102 0008") + struct.pack(">Q", next_beat)


# ---------------------------------------------------------------------------------------------------- sign-in


def test_encoder_matches_worked_example() -> None:
    expected = "00 01 02 01 00 64 11 61 6c 69 63 65 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 00 00 00 00 00 00 2a"
    assert heartbeat_req(AID, 42, 1) == bytes.fromhex(expected)


def test_sign_in_and_u64_heartbeat(acp_server: FakeACPServer, client: MiniClient) -> None:
    request_id, challenge = client.step1()
    assert set(challenge) == {"nonce", "cert", "signature"} and challenge["nonce"]
    # The server proves itself: signature over (agent_id + request_id).lower(), cert issued by its root, no AIA.
    server_cert = x509.load_pem_x509_certificate(challenge["cert"].encode())
    server_cert.public_key().verify(bytes.fromhex(challenge["signature"]), (AID + request_id).lower().encode(),
                                    ec.ECDSA(hashes.SHA256()))
    root = x509.load_pem_x509_certificate(acp_server.root_ca_pem.encode())
    root.public_key().verify(server_cert.signature, server_cert.tbs_certificate_bytes,
                             ec.ECDSA(server_cert.signature_hash_algorithm))
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        server_cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)

    resp = client.step2(request_id, challenge["nonce"])
    assert resp.status_code == 200, resp.text
    session = resp.json()
    assert session["server_ip"] == "127.0.0.1" and session["port"] == acp_server.udp_port
    assert isinstance(session["sign_cookie"], int) and 1 <= session["sign_cookie"] < 2**63
    assert session["signature"]

    client.beat(session["sign_cookie"], session["port"])
    data, addr = client.recv()
    assert data == u64_reply(1, 5000) and len(data) == 14
    assert addr == acp_server.udp_address
    (beat,) = acp_server.wait_for_beats(1, agent_id=AID)
    assert isinstance(beat, Beat) and beat.valid and beat.seq == 1 and beat.cookie == session["sign_cookie"]
    assert beat.addr == client.udp.getsockname() and acp_server.last_address(AID) == beat.addr
    records = acp_server.wait_for_sign_ins(2, agent_id=AID, status=200)
    assert [r.step for r in records] == [1, 2]


def test_wrong_proofs_are_rejected(acp_server_factory: Any, tmp_path: Any) -> None:
    srv = acp_server_factory()
    client = MiniClient(srv.heartbeat_url, AID, *srv.issue_identity(AID, str(tmp_path / "a")))
    try:
        request_id, challenge = client.step1()
        bad = client.step2(request_id, challenge["nonce"], signed_text=challenge["nonce"] + "x")
        assert bad.status_code == 401 and "signature" in bad.json()["error"]
        # The nonce is single use, even after a failed proof.
        reuse = client.step2(request_id, challenge["nonce"])
        assert reuse.status_code == 401 and "nonce" in reuse.json()["error"]
        request_id, challenge = client.step1()
        assert client.step2("other" + request_id, challenge["nonce"]).status_code == 401
        request_id, challenge = client.step1()
        other_key = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        assert client.step2(request_id, challenge["nonce"], public_key=other_key).status_code == 401
        request_id, challenge = client.step1()
        assert client.step2(request_id, challenge["nonce"], cert="garbage").status_code == 400
        assert client.post("/sign_in", {"agent_id": AID}).status_code == 400
        assert srv.sessions == []
    finally:
        client.close()

    # A certificate from another server's CA, an expired one and one for another CN are all refused.
    foreign = acp_server_factory()
    cases = [
        (AID, foreign.issue_identity(AID, str(tmp_path / "f")), "agent CA"),
        (AID, srv.issue_identity(AID, str(tmp_path / "e"), expired=True), "expired"),
        ("bob.example.com", srv.issue_identity(AID, str(tmp_path / "b")), "CN"),
    ]
    for aid, paths, reason in cases:
        c = MiniClient(srv.heartbeat_url, aid, *paths)
        try:
            request_id, challenge = c.step1()
            resp = c.step2(request_id, challenge["nonce"])
            assert resp.status_code == 401 and reason in resp.json()["error"], resp.text
        finally:
            c.close()
    assert [r for r in srv.sign_ins if r.step == 2 and r.status == 200] == []


def test_server_auth_none_omits_cert_and_signature(acp_server_factory: Any, tmp_path: Any) -> None:
    srv = acp_server_factory(server_auth="none")
    c = MiniClient(srv.heartbeat_url, AID, *srv.issue_identity(AID, str(tmp_path)))
    try:
        _request_id, challenge = c.step1()
        assert set(challenge) == {"nonce"}
        assert c.sign_in()["sign_cookie"] > 0
    finally:
        c.close()


def test_issue_identity_files(acp_server: FakeACPServer, tmp_path: Any) -> None:
    certs = tmp_path / "deep" / "certs"
    key_path, cert_path = acp_server.issue_identity(AID, str(certs), seed_password="s3cret")
    assert (key_path, cert_path) == (str(certs / f"{AID}.key"), str(certs / f"{AID}.crt"))
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key_pem = read(key_path)
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, hashlib.sha256(b"s3cret").hexdigest().encode())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    with pytest.raises((ValueError, TypeError)):
        serialization.load_pem_private_key(key_pem, hashlib.sha256(b"").hexdigest().encode())
    cert = x509.load_pem_x509_certificate(read(cert_path))
    assert cert.subject.rfc4514_string() == (
        f"CN={AID},O=SomeOrganization,L=SomeCity,ST=SomeState,C=CN"
    )
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    agent_ca = x509.load_pem_x509_certificate(acp_server.agent_ca_pem.encode())
    agent_ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert not [n for n in os.listdir(certs) if n.startswith(".tmp")]


def test_tls(acp_server_factory: Any, tmp_path: Any) -> None:
    srv = acp_server_factory(tls=True)
    assert srv.heartbeat_url.startswith("https://127.0.0.1:")
    assert read(srv.tls_cert_path).decode() == srv.tls_cert_pem
    c = MiniClient(srv.heartbeat_url, AID, *srv.issue_identity(AID, str(tmp_path)), verify=srv.tls_cert_path)
    try:
        assert c.sign_in()["port"] == srv.udp_port
    finally:
        c.close()
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(srv.heartbeat_url + "/sign_in", json={}, timeout=5)  # default CA bundle: not trusted


# ---------------------------------------------------------------------------------------------------- heartbeat


def test_varint_encoding_and_unknown_cookie(acp_server_factory: Any, tmp_path: Any) -> None:
    srv = acp_server_factory(next_beat_encoding="varint")
    c = MiniClient(srv.heartbeat_url, AID, *srv.issue_identity(AID, str(tmp_path)))
    try:
        session = c.sign_in()
        c.beat(session["sign_cookie"], srv.udp_port)
        assert c.recv()[0] == bytes.fromhex("00 01 01 02 00 02 88 27")
        c.beat(session["sign_cookie"] ^ 1, srv.udp_port)
        assert c.recv()[0] == bytes.fromhex("00 02 01 02 00 02 91 03")
        srv.set_next_beat(300, encoding="u64")
        c.beat(session["sign_cookie"], srv.udp_port)
        assert c.recv()[0] == u64_reply(3, 300)
    finally:
        c.close()


def test_unknown_cookie_gets_401(acp_server: FakeACPServer, client: MiniClient) -> None:
    client.beat(12345, acp_server.udp_port)
    assert client.recv()[0] == u64_reply(1, 401)
    (beat,) = acp_server.wait_for_beats(1, agent_id=AID, valid=False)
    assert not beat.valid and beat.cookie == 12345
    assert acp_server.beats_for(AID, valid=True) == [] and acp_server.beats_for(AID) == [beat]


def test_restart_forgets_sessions(acp_server: FakeACPServer, client: MiniClient) -> None:
    old = client.sign_in()
    acp_server.restart()
    client.beat(old["sign_cookie"], acp_server.udp_port)
    assert client.recv()[0] == u64_reply(1, 401)
    new = client.sign_in()
    assert new["port"] == acp_server.udp_port and new["sign_cookie"] != old["sign_cookie"]
    client.beat(new["sign_cookie"], new["port"])
    assert client.recv()[0] == u64_reply(2, 5000)


def test_restart_move_port(acp_server: FakeACPServer, client: MiniClient) -> None:
    old = client.sign_in()
    http_port = acp_server.http_port
    acp_server.restart(move_port=True)
    assert acp_server.udp_port != old["port"] and acp_server.http_port == http_port
    client.beat(old["sign_cookie"], old["port"])
    assert client.recv(NO_REPLY_S) is None
    new = client.sign_in()
    assert new["port"] == acp_server.udp_port
    client.beat(new["sign_cookie"], new["port"])
    assert client.recv()[0] == u64_reply(2, 5000)


def test_go_silent_and_resume(acp_server: FakeACPServer, client: MiniClient) -> None:
    session = client.sign_in()
    acp_server.go_silent()
    client.beat(session["sign_cookie"], session["port"])
    assert client.recv(NO_REPLY_S) is None
    assert len(acp_server.wait_for_beats(1, agent_id=AID)) == 1  # still recorded
    acp_server.resume()
    client.beat(session["sign_cookie"], session["port"])
    assert client.recv()[0] == u64_reply(2, 5000)


def test_malformed_and_unknown_datagrams(acp_server: FakeACPServer, client: MiniClient) -> None:
    session = client.sign_in()
    port = acp_server.udp_port
    client.udp.sendto(b"\x80", ("127.0.0.1", port))  # varint never ends
    client.udp.sendto(heartbeat_req(AID, session["sign_cookie"])[:-3], ("127.0.0.1", port))  # truncated cookie
    client.udp.sendto(bytes.fromhex("0001 0999 0000"), ("127.0.0.1", port))  # well-formed, unknown type
    client.beat(session["sign_cookie"], port)
    assert client.recv()[0] == u64_reply(1, 5000)  # served in order, so the bad ones were handled before
    assert acp_server.malformed == 2 and acp_server.ignored == 1
    assert len(acp_server.beats) == 1


def test_inject_spoofed_and_from_server(acp_server: FakeACPServer, client: MiniClient) -> None:
    target = client.udp.getsockname()
    source = acp_server.inject(b"spoofed", target)
    data, addr = client.recv()
    assert data == b"spoofed" and addr == source and addr[1] != acp_server.udp_port
    acp_server.inject(b"genuine", target, spoof=False)
    data, addr = client.recv()
    assert data == b"genuine" and addr == acp_server.udp_address


def test_send_invite_and_invite_response(acp_server: FakeACPServer, client: MiniClient) -> None:
    with pytest.raises(LookupError):
        acp_server.send_invite(AID, "bob.example.com", "s-1")
    session = client.sign_in()
    client.beat(session["sign_cookie"], session["port"])
    client.recv()
    sent = acp_server.send_invite(AID, "bob.example.com", "s-1", invite_code="CODE1",
                                  message_server="https://msg.example.com", expire=1767225600000)
    data, addr = client.recv()
    assert data == sent and addr == acp_server.udp_address
    invite = parse_invite_req(data)
    assert invite == {"type": 259, "seq": invite["seq"], "inviter": "bob.example.com", "code": "CODE1",
                      "expire": 1767225600000, "session_id": "s-1", "message_server": "https://msg.example.com",
                      "rest": b""}
    client.udp.sendto(invite_resp(AID, "bob.example.com", "", session["sign_cookie"]), acp_server.udp_address)
    (resp,) = acp_server.wait_for_invite_responses(1, agent_id=AID)
    assert (resp.inviter_agent_id, resp.session_id, resp.cookie, resp.seq) == (
        "bob.example.com", "", session["sign_cookie"], 2)


# ---------------------------------------------------------------------------------------------------- HTTP


def test_sign_in_modes(acp_server: FakeACPServer, client: MiniClient) -> None:
    port = acp_server.http_port
    acp_server.set_sign_in("503")
    assert client.post("/sign_in", {"agent_id": AID, "request_id": "r"}).status_code == 503
    assert acp_server.wait_for_sign_ins(1, status=503)[0].agent_id == AID

    acp_server.set_sign_in("refuse")
    with pytest.raises(requests.exceptions.ConnectionError):
        client.post("/sign_in", {"agent_id": AID, "request_id": "r"})
    acp_server.set_sign_in("ok")
    assert acp_server.http_port == port
    assert client.sign_in()["sign_cookie"] > 0

    acp_server.set_sign_in("slow", delay=0.3)
    started = time.monotonic()
    client.step1()
    assert time.monotonic() - started >= 0.3
    with pytest.raises(ValueError):
        acp_server.set_sign_in("bogus")


def test_sign_out_and_query_online_state(acp_server: FakeACPServer, client: MiniClient, tmp_path: Any) -> None:
    session = client.sign_in()
    client.beat(session["sign_cookie"], session["port"])
    client.recv()
    body = {"agent_id": AID, "signature": session["signature"]}
    as_list = client.post("/query_online_state", {**body, "agents": [AID, "bob.example.com"]})
    assert as_list.status_code == 200
    assert as_list.json() == {"data": [{"agent_id": AID, "online": True},
                                       {"agent_id": "bob.example.com", "online": False}]}
    as_text = client.post("/query_online_state", {**body, "agents": f";bob.example.com;{AID}"}).json()
    assert as_text["data"] == [{"agent_id": "bob.example.com", "online": False}, {"agent_id": AID, "online": True}]
    assert client.post("/query_online_state", {**body, "signature": "nope", "agents": [AID]}).status_code == 401
    assert client.post("/query_online_state", {**body, "agents": 7}).status_code == 400

    assert client.post("/sign_out", body).status_code == 200
    assert acp_server.sessions == []
    client.beat(session["sign_cookie"], session["port"])
    assert client.recv()[0] == u64_reply(2, 401)
    assert client.post("/sign_out", body).status_code == 401


def test_routes(acp_server: FakeACPServer) -> None:
    base = acp_server.heartbeat_url
    assert requests.post(base + "/no_such_thing", json={}, timeout=5).status_code == 404
    assert requests.get(base + "/sign_in", timeout=5).status_code == 405

    def echo(request: HttpRequest) -> HttpResponse:
        return HttpResponse(201, {"path": request.path, "body": request.json()})

    acp_server.add_route("POST", "/api/accesspoint/echo", echo)
    acp_server.add_route("GET", "/tuple", lambda request: (200, {"q": request.query}))
    resp = requests.post(base + "/api/accesspoint/echo", json={"a": 1}, timeout=5)
    assert resp.status_code == 201 and resp.json() == {"path": "/api/accesspoint/echo", "body": {"a": 1}}
    assert requests.get(base + "/tuple?x=1", timeout=5).json() == {"q": {"x": ["1"]}}
    acp_server.remove_route("GET", "/tuple")
    assert requests.get(base + "/tuple", timeout=5).status_code == 404


# ---------------------------------------------------------------------------------------------------- lifecycle


def test_stop_is_fast_and_leaves_no_threads(tmp_path: Any) -> None:
    before = set(threading.enumerate())
    srv = FakeACPServer()
    srv.start()
    srv.set_sign_in("slow", delay=30)
    # A sign-in stuck in "slow" mode and an idle TCP connection must not hold stop() up.
    outcome: Dict[str, Any] = {}

    def stuck_sign_in() -> None:
        try:
            outcome["status"] = requests.post(srv.heartbeat_url + "/sign_in",
                                              json={"agent_id": AID, "request_id": "r"}, timeout=5).status_code
        except requests.RequestException as exc:  # the server may cut the connection: that is fine too
            outcome["error"] = exc

    stuck = threading.Thread(target=stuck_sign_in, daemon=True)
    stuck.start()
    idle = socket.create_connection(("127.0.0.1", srv.http_port))
    time.sleep(0.05)  # let both connections reach their handler threads
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 0.2
    srv.stop()  # idempotent
    idle.close()
    stuck.join(5)
    assert outcome and not stuck.is_alive()
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(RuntimeError):
        srv.start()


def test_context_manager_and_trust_store() -> None:
    server_auth = pytest.importorskip("agentcp.base.server_auth")
    with FakeACPServer() as srv:
        assert srv.running
        roots = [c.public_bytes(serialization.Encoding.PEM).decode() for c in server_auth.trusted_roots()]
        assert srv.root_ca_pem in roots
    assert not srv.running
    roots = [c.public_bytes(serialization.Encoding.PEM).decode() for c in server_auth.trusted_roots()]
    assert srv.root_ca_pem not in roots


def test_fixture(acp_server: FakeACPServer) -> None:
    assert acp_server.running and acp_server.http_port > 0 and acp_server.udp_port > 0
    assert acp_server.heartbeat_url == f"http://127.0.0.1:{acp_server.http_port}"


@pytest.mark.acp_server(next_beat_ms=1234, next_beat_encoding="varint")
def test_fixture_marker(acp_server: FakeACPServer) -> None:
    assert (acp_server.next_beat_ms, acp_server.next_beat_encoding) == (1234, "varint")


def test_factory_servers_are_independent(acp_server_factory: Any) -> None:
    a, b = acp_server_factory(), acp_server_factory(next_beat_ms=100)
    assert a.udp_port != b.udp_port and a.root_ca_pem != b.root_ca_pem and b.next_beat_ms == 100


def test_plugin_import_is_cheap() -> None:
    code = ("import sys, agentcp.testing.pytest_plugin, agentcp.testing; "
            "assert 'cryptography' not in sys.modules, 'cryptography imported'; "
            "assert 'agentcp.testing.fake_server' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_invalid_options() -> None:
    with pytest.raises(ValueError):
        FakeACPServer(next_beat_encoding="u32")
    with pytest.raises(ValueError):
        FakeACPServer(server_auth="maybe")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fixed_ports(acp_server_factory: Any) -> None:
    http_port, udp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    srv = acp_server_factory(http_port=http_port, udp_port=udp_port)
    assert (srv.http_port, srv.udp_port) == (http_port, udp_port)
    assert srv.pki.agent_ca_pem == srv.agent_ca_pem
    assert requests.post(srv.heartbeat_url + "/sign_in", json={"agent_id": AID, "request_id": "r"},
                         timeout=5).status_code == 200
