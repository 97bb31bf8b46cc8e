"""Access point and CA endpoints for :class:`~agentcp.testing.FakeACPServer` (liveness.md §1.4, §1.6, §5.3-§5.5).

Mounted under ``/api/accesspoint`` with the server's public ``add_route``, so ``AGENTCP_AP_URL=<srv.heartbeat_url>``
(or ``AgentCP(..., ap_url=srv.heartbeat_url)``) lets an unmodified agent create identities and go online::

    from agentcp.testing import FakeACPServer
    from agentcp.testing.access_point import AccessPoint

    with FakeACPServer() as srv:
        ap = AccessPoint(srv).install()
        acp = AgentCP(path, seed_password="s", ap_url=ap.url)
        aid = acp.create_aid("example.com", "alice")
        aid.online()

Endpoints: ``sign_in`` (two steps, own sessions: an AP sign-in never ends the agent's heartbeat session),
``sign_out``, ``get_accesspoint_config`` (config as a JSON string, like the real server most likely sends),
``sign_cert``, ``resign_cert`` (two steps), ``sign_guest_cert`` (GET), and the data endpoints
``get_agent_list``, ``get_all_public_data``, ``get_agent_public_data``, ``get_agent_private_data``,
``post_agent_private_data``, ``sync_public_files``, ``upload_file``, ``download_file``, ``delete_public_file``.
Certificates are issued by the server's agent CA, so the heartbeat sign-in accepts them.

``install()`` also mounts the message server (:class:`~agentcp.testing.message_server.MessageServer`, as
``ap.messages``) at the ``message_server`` the config announces, unless an external one was given, and the file
server (:class:`~agentcp.testing.oss_server.OssServer`, as ``ap.oss``) at ``<base>/api/oss``.

Fault controls: :meth:`AccessPoint.set_available` (503 on every AP endpoint), :meth:`AccessPoint.expire_tokens`
(the next authorised call gets 401), :meth:`AccessPoint.set_ca_available` (CA endpoints answer 503).
Attacker knobs: :meth:`AccessPoint.set_trickle` (a reply that never ends, one byte at a time) and
:meth:`AccessPoint.set_oversized_reply` (a reply of any size).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcp.base.credentials import cert_validity

from ._http import HttpError, HttpRequest, HttpResponse

logger = logging.getLogger("agentcp.testing")

__all__ = ["AccessPoint", "PREFIX", "accept_any_issuer"]

PREFIX = "/api/accesspoint"
NONCE_TTL_S = 300.0
_MULTIPART_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


@dataclass
class _Pending:
    agent_id: str
    request_id: str
    issued: float
    public_key: str = ""


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _str(body: Dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"missing or empty field {name!r}")
    return value


class AccessPoint:
    """The access point + CA of a :class:`FakeACPServer` (call :meth:`install` once the server exists)."""

    def __init__(self, server: Any, *, message_server: Optional[str] = None, guest_domain: str = "acp.local",
                 server_auth: Optional[str] = None, accept_any_issuer: bool = False) -> None:
        """``server_auth``: "signed" (challenge carries cert + signature) or "none"; default: as the server.
        ``accept_any_issuer``: accept agent certificates from any issuer at sign-in (still checks dates and proof of
        possession), so identities issued by the real CA can be used on a local network."""
        self.server = server
        self.server_auth = server_auth or getattr(server, "_server_auth", "signed")
        self.accept_any_issuer = bool(accept_any_issuer)
        # The CA endpoints issue with the server's own agent CA, so heartbeat sign-in accepts the certificates.
        self._pki = server.pki
        self._message_server = message_server
        self.guest_domain = guest_domain
        self._lock = threading.Lock()
        self._nonces: Dict[str, _Pending] = {}
        self._renew_nonces: Dict[str, _Pending] = {}
        self._sessions: Dict[str, str] = {}  # token -> agent_id
        self._available = True
        self._ca_available = True
        # Attacker knobs: endpoint name -> a function making the hostile reply (set_trickle, set_oversized_reply).
        self._hostile: Dict[str, Any] = {}
        self._hostile_stop = threading.Event()
        self._files: Dict[str, Dict[str, bytes]] = {}  # agent_id -> {file name: content}
        self._private: Dict[str, Any] = {}
        #: Counters for tests: sign_ins (successful), configs, certs_issued, renewals, guests, unauthorised.
        self.counters: Dict[str, int] = {
            "sign_ins": 0, "configs": 0, "certs_issued": 0, "renewals": 0, "guests": 0, "unauthorised": 0,
        }
        self._installed = False
        #: The :class:`~agentcp.testing.message_server.MessageServer` that :meth:`install` mounts at
        #: :attr:`message_server` (None if an external ``message_server`` was given).
        self.messages: Any = None
        #: The file server (:class:`~agentcp.testing.oss_server.OssServer`) that :meth:`install` mounts at
        #: ``<base>/api/oss``.
        self.oss: Any = None

    # --- setup ----------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """What to export as ``AGENTCP_AP_URL`` (the server's base URL; the client appends ``/api/accesspoint``)."""
        return self.server.heartbeat_url

    @property
    def message_server(self) -> str:
        return self._message_server or self.server.heartbeat_url + "/message"

    def install(self) -> "AccessPoint":
        """Add every route to the server; returns ``self``."""
        routes = {
            ("POST", "sign_in"): self.handle_sign_in,
            ("POST", "sign_out"): self.handle_sign_out,
            ("POST", "get_accesspoint_config"): self.handle_config,
            ("POST", "sign_cert"): self.handle_sign_cert,
            ("POST", "resign_cert"): self.handle_resign_cert,
            ("GET", "sign_guest_cert"): self.handle_guest,
            ("POST", "get_agent_list"): self.handle_agent_list,
            ("POST", "get_all_public_data"): self.handle_all_public_data,
            ("POST", "get_agent_public_data"): self.handle_agent_public_data,
            ("POST", "get_agent_private_data"): self.handle_private_get,
            ("POST", "post_agent_private_data"): self.handle_private_post,
            ("POST", "sync_public_files"): self.handle_sync,
            ("POST", "upload_file"): self.handle_upload,
            ("GET", "download_file"): self.handle_download,
            ("POST", "delete_public_file"): self.handle_delete,
        }
        for (method, name), handler in routes.items():
            self.server.add_route(method, f"{PREFIX}/{name}", self._guard(handler, ca=name in (
                "sign_cert", "resign_cert", "sign_guest_cert"), name=name))
        if self._message_server is None and self.messages is None:
            # The config announces <base>/message: serve the message server there (sign-in + WebSocket).
            from .message_server import MessageServer

            self.messages = MessageServer(self.server, accept_any_issuer=self.accept_any_issuer,
                                          server_auth=self.server_auth).install()
        if self.oss is None:
            from .oss_server import OssServer

            self.oss = OssServer(self.server, accept_any_issuer=self.accept_any_issuer,
                                 server_auth=self.server_auth).install()
        self._installed = True
        return self

    # --- fault controls -------------------------------------------------------------------------------------------
    def set_available(self, available: bool) -> None:
        """``False``: every access point endpoint answers 503 (the heartbeat endpoints are unaffected)."""
        with self._lock:
            self._available = bool(available)

    def set_ca_available(self, available: bool) -> None:
        """``False``: the CA endpoints (sign_cert, resign_cert, sign_guest_cert) answer 503."""
        with self._lock:
            self._ca_available = bool(available)

    def expire_tokens(self) -> None:
        """Forget every access point session: the next authorised call gets 401 (and the client signs in again)."""
        with self._lock:
            self._sessions.clear()

    def set_trickle(self, interval: Optional[float], endpoints=("sign_in",), piece: bytes = b" ") -> None:
        """Attacker knob: the named endpoints answer 200 at once, then send their body one ``piece`` every
        ``interval`` seconds, forever (until the client goes away or the knob is cleared). A per-read timeout
        never fires on such a reply. ``None`` restores normal replies."""
        def trickle(_request: HttpRequest) -> HttpResponse:
            stop = self._hostile_stop

            def pieces():
                yield b"{"
                while not stop.wait(interval):
                    yield piece

            return HttpResponse(200, stream=pieces(), content_type="application/json")

        self._set_hostile(endpoints, None if interval is None else trickle)

    def set_oversized_reply(self, size: Optional[int], endpoints=("sign_in",), declare_length: bool = False) -> None:
        """Attacker knob: the named endpoints answer 200 with a JSON-looking body of ``size`` bytes, sent as fast
        as the client reads it (``declare_length``: with a Content-Length header, else until the connection
        closes). ``None`` restores normal replies."""
        if size is None:
            self._set_hostile(endpoints, None)
            return
        block = b" " * 65536

        def oversized(_request: HttpRequest) -> HttpResponse:
            def pieces():
                yield b'{"nonce": "'
                left = size - 11
                while left > 0 and not self._hostile_stop.is_set():
                    chunk = block if left >= len(block) else block[:left]
                    left -= len(chunk)
                    yield chunk

            headers = {"Content-Length": str(size)} if declare_length else {}
            return HttpResponse(200, stream=pieces(), headers=headers, content_type="application/json")

        self._set_hostile(endpoints, oversized)

    def _set_hostile(self, endpoints, make) -> None:
        with self._lock:
            for name in ([endpoints] if isinstance(endpoints, str) else endpoints):
                if make is None:
                    self._hostile.pop(name, None)
                else:
                    self._hostile[name] = make
            if not self._hostile:
                self._hostile_stop.set()  # end the trickles in progress
                self._hostile_stop = threading.Event()

    def _guard(self, handler, *, ca: bool, name: str = ""):
        def guarded(request: HttpRequest):
            with self._lock:
                ok = self._available and (self._ca_available or not ca)
                hostile = self._hostile.get(name)
            if hostile is not None:
                return hostile(request)
            if not ok:
                return HttpResponse(503, {"error": "access point unavailable (AccessPoint fault control)"})
            return handler(request)

        return guarded

    # --- sign-in (two steps, liveness.md §2.3-§2.6) ---------------------------------------------------------------
    def handle_sign_in(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        if "nonce" not in body:
            agent_id, request_id = _str(body, "agent_id"), _str(body, "request_id")
            nonce = secrets.token_hex(16)
            with self._lock:
                self._expire(self._nonces)
                self._nonces[nonce] = _Pending(agent_id, request_id, time.monotonic())
            reply: Dict[str, Any] = {"nonce": nonce}
            if self.server_auth == "signed":
                reply["cert"] = self._pki.server_cert_pem
                reply["signature"] = self._pki.sign_challenge(agent_id, request_id)
            return HttpResponse(200, reply)
        agent_id, request_id, nonce = _str(body, "agent_id"), _str(body, "request_id"), _str(body, "nonce")
        public_key_pem, cert_pem, signature = _str(body, "public_key"), _str(body, "cert"), _str(body, "signature")
        with self._lock:
            pending = self._nonces.pop(nonce, None)
        if pending is None or time.monotonic() - pending.issued > NONCE_TTL_S:
            raise HttpError(401, "unknown, expired or already used nonce")
        if pending.agent_id != agent_id or pending.request_id != request_id:
            raise HttpError(401, "nonce was issued for another agent_id/request_id")
        cert = self._agent_cert(cert_pem, agent_id, allow_expired=False)
        try:
            claimed = serialization.load_pem_public_key(public_key_pem.encode("utf-8"))
        except ValueError:
            raise HttpError(400, "public_key is not a PEM public key") from None
        if _spki(claimed) != _spki(cert.public_key()):
            raise HttpError(401, "public_key does not match the certificate")
        self._verify(cert.public_key(), signature, nonce)
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = agent_id
            self.counters["sign_ins"] += 1
        return HttpResponse(200, {"signature": token})

    def handle_sign_out(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        with self._lock:
            self._sessions.pop(str(body.get("signature")), None)
        return HttpResponse(200, {"result": "ok"})

    def _authorised(self, body: Dict[str, Any], agent_field: bool = True) -> str:
        token = body.get("signature")
        with self._lock:
            owner = self._sessions.get(token) if isinstance(token, str) else None
            if owner is None:
                self.counters["unauthorised"] += 1
        if owner is None:
            raise HttpError(401, "unknown or expired session token")
        return owner

    # --- config ---------------------------------------------------------------------------------------------------
    def handle_config(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        self._authorised(body)
        with self._lock:
            self.counters["configs"] += 1
        config = {"heartbeat_server": self.server.heartbeat_url, "message_server": self.message_server}
        return HttpResponse(200, {"config": json.dumps(config)})

    # --- CA -------------------------------------------------------------------------------------------------------
    def _agent_cert(self, cert_pem: str, agent_id: str, *, allow_expired: bool) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode("utf-8"))
        except ValueError:
            raise HttpError(400, "cert is not a PEM certificate") from None
        problem = self._pki.verify_agent_cert(cert)
        if problem is not None and self.accept_any_issuer:
            problem = _date_problem(cert)
        if problem is not None and not (allow_expired and problem in ("certificate expired",
                                                                       "certificate not yet valid")):
            raise HttpError(401, problem)
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not names or names[0].value != agent_id:
            raise HttpError(401, "certificate CN does not match the agent id")
        return cert

    @staticmethod
    def _verify(public_key: Any, signature_hex: str, data: str) -> None:
        try:
            public_key.verify(bytes.fromhex(signature_hex), data.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature):
            raise HttpError(401, "signature does not verify") from None

    def _csr(self, csr_pem: str, agent_id: str) -> x509.CertificateSigningRequest:
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        except ValueError:
            raise HttpError(400, "csr is not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise HttpError(400, "csr signature does not verify")
        names = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not names or names[0].value != agent_id:
            raise HttpError(400, "csr CN does not match id")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise HttpError(400, "csr key is not an EC key")
        return csr

    def _issue(self, agent_id: str, public_key: Any) -> str:
        cert = self._pki.issue_agent_cert(agent_id, public_key)
        return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def handle_sign_cert(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        agent_id = _str(body, "id")
        if len(agent_id.split(".")) < 3 or any(c in agent_id for c in "/\\ "):
            raise HttpError(400, f"invalid agent id {agent_id!r}")
        csr = self._csr(_str(body, "csr"), agent_id)
        pem = self._issue(agent_id, csr.public_key())
        with self._lock:
            self.counters["certs_issued"] += 1
        logger.debug("sign_cert %s", agent_id)
        return HttpResponse(200, {"certificate": pem})

    def handle_resign_cert(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        agent_id, request_id, public_key_pem = _str(body, "id"), _str(body, "request_id"), _str(body, "public_key")
        if "nonce" not in body:
            nonce = secrets.token_hex(16)
            with self._lock:
                self._expire(self._renew_nonces)
                self._renew_nonces[nonce] = _Pending(agent_id, request_id, time.monotonic(), public_key_pem)
            return HttpResponse(200, {"nonce": nonce})
        nonce = _str(body, "nonce")
        with self._lock:
            pending = self._renew_nonces.pop(nonce, None)
        if (pending is None or pending.agent_id != agent_id or pending.request_id != request_id
                or pending.public_key != public_key_pem):
            raise HttpError(401, "unknown nonce or request mismatch")
        try:
            public_key = serialization.load_pem_public_key(public_key_pem.encode("utf-8"))
        except ValueError:
            raise HttpError(400, "public_key is not a PEM public key") from None
        self._verify(public_key, _str(body, "signature"), public_key_pem + nonce)
        cert = self._agent_cert(_str(body, "cert"), agent_id, allow_expired=True)
        if _spki(cert.public_key()) != _spki(public_key):
            raise HttpError(401, "public_key does not match the current certificate")
        csr = self._csr(_str(body, "csr"), agent_id)
        if _spki(csr.public_key()) != _spki(public_key):
            raise HttpError(400, "csr key does not match public_key")
        pem = self._issue(agent_id, public_key)
        with self._lock:
            self.counters["renewals"] += 1
        return HttpResponse(200, {"certificate": pem, "entrypoint": self.url})

    def handle_guest(self, request: HttpRequest) -> HttpResponse:
        key = ec.generate_private_key(ec.SECP384R1())
        guest = f"guest_{secrets.token_hex(4)}.{self.guest_domain}"
        cert_pem = self._issue(guest, key.public_key())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        with self._lock:
            self.counters["guests"] += 1
        return HttpResponse(200, {"guest_aid": guest, "key": key_pem, "cert": cert_pem, "entrypoint": self.url})

    # --- data endpoints -------------------------------------------------------------------------------------------
    def handle_agent_list(self, request: HttpRequest) -> HttpResponse:
        self._authorised(request.json_object())
        with self._lock:
            agents = sorted(set(self._sessions.values()))
        return HttpResponse(200, {"data": agents})

    def handle_all_public_data(self, request: HttpRequest) -> HttpResponse:
        self._authorised(request.json_object())
        with self._lock:
            data = [{"agent_id": aid, "public_data": json.dumps(sorted(files))} for aid, files in self._files.items()]
        return HttpResponse(200, {"data": data})

    def handle_agent_public_data(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        self._authorised(body)
        with self._lock:
            files = sorted(self._files.get(str(body.get("agent_id")), {}))
        return HttpResponse(200, {"data": {"files": files}})

    def handle_private_get(self, request: HttpRequest) -> HttpResponse:
        owner = self._authorised(request.json_object())
        with self._lock:
            return HttpResponse(200, {"data": self._private.get(owner)})

    def handle_private_post(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        owner = self._authorised(body)
        with self._lock:
            self._private[owner] = body.get("data")
        return HttpResponse(200, {"data": body.get("data")})

    def handle_sync(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        owner = self._authorised(body)
        items = body.get("file_list") or []
        with self._lock:
            stored = self._files.setdefault(owner, {})
            need = [item.get("full_path") for item in items
                    if isinstance(item, dict) and item.get("full_path")
                    and str(item["full_path"]).replace("\\", "/").rsplit("/", 1)[-1] not in stored]
        return HttpResponse(200, {"need_upload_files": need, "need_download_files": []})

    def handle_upload(self, request: HttpRequest) -> HttpResponse:
        fields = _parse_multipart(request)
        token = fields.get("signature", b"").decode("utf-8", "replace")
        owner = self._authorised({"signature": token})
        name = fields.get("file_name", b"").decode("utf-8", "replace")
        content = fields.get("file", b"")
        if not name:
            raise HttpError(400, "missing file_name")
        with self._lock:
            self._files.setdefault(owner, {})[name] = content
        return HttpResponse(200, {"url": f"{self.url}/files/{owner}/{name}"})

    def handle_download(self, request: HttpRequest) -> HttpResponse:
        token = (request.query.get("signature") or [""])[0]
        owner = self._authorised({"signature": token})
        name = (request.query.get("file_name") or [""])[0].replace("\\", "/").rsplit("/", 1)[-1]
        with self._lock:
            content = self._files.get(owner, {}).get(name)
        if content is None:
            raise HttpError(404, "no such file")
        return HttpResponse(200, content)

    def handle_delete(self, request: HttpRequest) -> HttpResponse:
        body = request.json_object()
        owner = self._authorised(body)
        name = str(body.get("file_name", "")).replace("\\", "/").rsplit("/", 1)[-1]
        with self._lock:
            self._files.get(owner, {}).pop(name, None)
        return HttpResponse(200, {"result": "ok"})

    # --- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def _expire(table: Dict[str, _Pending]) -> None:
        now = time.monotonic()
        for key in [k for k, v in table.items() if now - v.issued > NONCE_TTL_S]:
            del table[key]

    def issued_agents(self) -> List[str]:
        with self._lock:
            return sorted(set(self._sessions.values()))


def _date_problem(cert: x509.Certificate) -> Optional[str]:
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    nb, na = cert_validity(cert)
    if now < nb:
        return "certificate not yet valid"
    if now > na:
        return "certificate expired"
    return None


def accept_any_issuer(server: Any) -> None:
    """Make ``server``'s heartbeat sign-in accept agent certificates from any issuer (dates still checked).

    For the dev network, where identities issued by the real CA (or written by hand) should go online too.
    """
    pki = server.pki
    original = pki.verify_agent_cert

    def lenient(cert: x509.Certificate, now: Any = None) -> Optional[str]:
        problem = original(cert, now) if now is not None else original(cert)
        return None if problem is None else _date_problem(cert)

    pki.verify_agent_cert = lenient


def _parse_multipart(request: HttpRequest) -> Dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body (file parts by field name, content as bytes)."""
    ctype = request.header("content-type", "") or ""
    match = _MULTIPART_BOUNDARY.search(ctype)
    if not ctype.startswith("multipart/form-data") or not match:
        raise HttpError(400, "expected multipart/form-data")
    boundary = b"--" + match.group(1).encode("latin-1")
    fields: Dict[str, bytes] = {}
    for part in request.body.split(boundary):
        part = part.strip(b"\r\n")
        if not part or part == b"--":
            continue
        head, _, content = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name:
            fields[name.group(1).decode("utf-8", "replace")] = content
    return fields
