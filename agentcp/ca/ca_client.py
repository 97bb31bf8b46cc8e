"""Certificate authority client: create (``sign_cert``), renew (``resign_cert``) and guest (``sign_guest_cert``).

Wire format as agentcp 0.1.99 (liveness.md §5.3-§5.5). Differences that fix 0.1.99 defects:

* every request has a timeout and TLS verification follows :func:`agentcp.base.http.resolve_verify` (D-I3);
* files are written atomically, key before certificate (D-I7), and a failure never deletes a directory (D-I8, D-I9);
* a stored certificate that is still valid keeps working when renewal fails (D-I6): renewal is retried later;
* the CA's responses (certificates) are not logged (D-I11).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

from cryptography.hazmat.primitives import serialization

from agentcp.base.env import Environ
from agentcp.base.http import (
    AbortableSession,
    ReplyTooLarge,
    RequestDeadlineExceeded,
    request_limited,
    tls_failure_text,
)
from agentcp.base.limits import DEFAULT_LIMITS
from agentcp.base.names import check_aid
from agentcp.base.trust import looks_like_nonce
from agentcp.context.exceptions import CredentialError

from .identity_store import (
    IdentityStore,
    build_csr,
    decrypt_private_key,
    encrypt_private_key,
    generate_private_key,
    hash_seed_password,
    is_usable,
    load_certificate,
    needs_renewal,
    public_key_pem,
    sign_hex,
)

_log = logging.getLogger("agentcp.ca")

__all__ = ["CAClient", "CAError"]


class CAError(RuntimeError):
    """The CA refused a request or could not be reached. ``transient`` tells whether retrying may help."""

    def __init__(self, message: str, *, status: int = 0, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


def _api_base(ca_server: str) -> str:
    base = ca_server.rstrip("/")
    if base.endswith("/api/accesspoint"):
        return base
    return base + "/api/accesspoint"


class CAClient:
    """``CAClient(ca_server, aid_path, seed_password, timeout=30)``; ``seed_password`` is the hashed seed (hex)."""

    def __init__(self, ca_server, aid_path, seed_password: str, timeout=30, *, verify=None,
                 max_reply: int = DEFAULT_LIMITS.http_reply_max) -> None:
        server = ca_server or Environ.CA_SERVER.get("")
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ValueError(f"CA server URL must start with http:// or https:// (got {server!r})")
        self.ca_server = _api_base(server)
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.timeout = timeout
        self.verify = verify
        #: Largest reply body read from the CA (``Limits.http_reply_max``).
        self.max_reply = max_reply
        self.store = IdentityStore(aid_path)
        self._http: Optional[AbortableSession] = None

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def _request_timeout(self) -> Tuple[float, float]:
        read = float(self.timeout) if self.timeout else 30.0
        return (min(3.0, read), read)

    def abort(self) -> None:
        """Make a CA request another thread is blocked in fail at once (the client stays usable)."""
        if self._http is not None:
            self._http.abort()

    def _request(self, method: str, endpoint: str, payload: Optional[Dict[str, Any]] = None) -> Tuple[int, Any]:
        """One CA request (whole-request deadline, reply capped): ``(status, JSON body or None)``; CAError if the
        CA cannot be reached, its TLS certificate cannot be verified, or its reply is too large."""
        import requests

        url = f"{self.ca_server}/{endpoint}"
        if self._http is None:
            self._http = AbortableSession()
        try:
            resp = request_limited(self._http, method, url, json=payload, timeout=self._request_timeout(),
                                   verify=self.verify, max_bytes=self.max_reply)
        except ReplyTooLarge as exc:
            raise CAError(f"CA {endpoint}: {exc}", transient=True) from None
        except requests.exceptions.SSLError as exc:
            raise CAError(f"CA {endpoint}: " + tls_failure_text(self.ca_server, exc)) from None
        except RequestDeadlineExceeded as exc:
            raise CAError(f"CA {endpoint}: {exc}", transient=True) from None
        except requests.RequestException as exc:
            raise CAError(f"CA {endpoint} unreachable at {self.ca_server}: {type(exc).__name__}", transient=True) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        return resp.status_code, body

    @staticmethod
    def _error_text(status: int, body: Any) -> str:
        if isinstance(body, dict) and body.get("error"):
            err = body["error"]
            if isinstance(err, dict):
                err = err.get("message") or err.get("code") or err
            return str(err)
        return f"HTTP {status}"

    # --- paths and files (0.1.99 names) -------------------------------------------------------------------------
    def get_aid_certs_path(self, aid_str: str) -> str:
        return self.store.certs_dir(aid_str)

    def aid_is_not_exist(self, agent_id: str) -> bool:
        return not self.store.exists(agent_id)

    def save_cert_to_file(self, name: str, certificate: str) -> None:
        try:
            self.store.write_cert(name, certificate)
        except OSError as exc:
            raise RuntimeError(f"failed to save certificate of {name}: {exc}") from exc

    def save_private_key_to_file(self, name: str, private_key) -> None:
        """Store ``private_key`` (key object or PEM, unencrypted) encrypted with the current hashed seed."""
        try:
            if isinstance(private_key, (str, bytes)):
                private_key = decrypt_private_key(private_key, self.seed_password, aid=name)
            self.store.write_key(name, private_key, self.seed_password)
        except OSError as exc:
            raise RuntimeError(f"failed to save private key of {name}: {exc}") from exc

    def load_private_key(self, agent_id: str):
        """The decrypted key, or ``None`` (logged) if it is missing or the seed password is wrong."""
        try:
            return self.store.load_key(agent_id, self.seed_password)
        except CredentialError as exc:
            _log.error("%s", exc)
            return None

    def load_private_key_str(self, agent_id: str, seed_password: str) -> str:
        """The key PEM re-encrypted with ``seed_password`` (a hashed seed); ``""`` on failure."""
        key = self.load_private_key(agent_id)
        if key is None:
            return ""
        return encrypt_private_key(key, seed_password).decode("ascii")

    def load_certificate_pem(self, agent_id: str) -> str:
        return self.store.read_cert_pem(agent_id)

    def modify_seed_password(self, aid_str: str, private_key, new_send_password: str) -> None:
        """Store ``private_key`` for ``aid_str`` encrypted with ``new_send_password`` (hashed), atomically."""
        if isinstance(private_key, (str, bytes)):
            private_key = decrypt_private_key(private_key, self.seed_password, aid=aid_str)
        self.store.write_key(aid_str, private_key, new_send_password)

    # --- create -------------------------------------------------------------------------------------------------
    def create_identity(self, agent_id: str) -> None:
        """Get a certificate for ``agent_id`` from the CA and store key, CSR and certificate.

        A key left by an interrupted earlier attempt (key present, certificate missing) is reused. Raises
        :class:`CAError` (refusal or unreachable CA) or :class:`CredentialError`; nothing is deleted on failure.
        """
        if self.store.has_key(agent_id) and not self.store.has_cert(agent_id):
            key = self.store.load_key(agent_id, self.seed_password)
            key_is_new = False
        else:
            key = generate_private_key()
            key_is_new = True
        csr_pem = build_csr(agent_id, key).public_bytes(serialization.Encoding.PEM).decode("ascii")
        status, body = self._request("POST", "sign_cert", {"id": agent_id, "csr": csr_pem})
        if status != 200 or not isinstance(body, dict) or not body.get("certificate"):
            raise CAError(
                f"CA refused to certify {agent_id}: {self._error_text(status, body)}",
                status=status,
                transient=status >= 500 or status == 429,
            )
        cert_pem = body["certificate"]
        try:
            load_certificate(cert_pem)
        except ValueError:
            raise CAError(f"CA returned an unreadable certificate for {agent_id}", status=status) from None
        if key_is_new:
            self.store.save_identity(agent_id, key, cert_pem, self.seed_password, csr_pem=csr_pem)
        else:
            self.store.write_csr(agent_id, csr_pem)
            self.store.write_cert(agent_id, cert_pem)
        _log.info("identity %s created", agent_id)

    def send_csr_to_server(self, agent_id: str):
        """0.1.99 contract: ``True`` on success, the CA's error text on refusal, RuntimeError if unreachable."""
        try:
            self.create_identity(agent_id)
            return True
        except CAError as exc:
            if exc.transient and exc.status == 0:
                raise RuntimeError("send csr to server error: " + str(exc)) from None
            return str(exc)

    # --- renewal ------------------------------------------------------------------------------------------------
    def renewal_due(self, agent_id: str) -> bool:
        try:
            return needs_renewal(self.store.load_cert(agent_id))
        except CredentialError:
            return False

    def renew(self, agent_id: str) -> None:
        """Renew the certificate with the same key (two-step ``resign_cert``); raises :class:`CAError`."""
        key = self.store.load_key(agent_id, self.seed_password)
        cert_text = self.store.read_cert_pem(agent_id)
        pub = public_key_pem(key)
        request_id = str(int(time.time() * 1000))
        status, body = self._request("POST", "resign_cert", {"id": agent_id, "request_id": request_id, "public_key": pub})
        if status != 200 or not isinstance(body, dict) or not body.get("nonce"):
            raise CAError(
                f"CA renewal of {agent_id} refused at step 1: {self._error_text(status, body)}",
                status=status,
                transient=status >= 500 or status in (0, 429) or (status == 200),
            )
        nonce = str(body["nonce"])
        if not looks_like_nonce(nonce):  # trust.md rule 2: sign a challenge, never a text the server chose
            raise CAError(f"CA renewal of {agent_id}: the CA sent a nonce that is not a challenge; nothing was "
                          "signed", status=status)
        csr_pem = build_csr(agent_id, key).public_bytes(serialization.Encoding.PEM).decode("ascii")
        payload = {
            "id": agent_id,
            "request_id": request_id,
            "public_key": pub,
            "nonce": nonce,
            "csr": csr_pem,
            "cert": cert_text,
            "signature": sign_hex(key, pub + nonce),
        }
        status, body = self._request("POST", "resign_cert", payload)
        if status != 200 or not isinstance(body, dict) or not body.get("certificate"):
            raise CAError(
                f"CA renewal of {agent_id} refused: {self._error_text(status, body)}",
                status=status,
                transient=status >= 500 or status == 429,
            )
        try:
            load_certificate(body["certificate"])
        except ValueError:
            raise CAError(f"CA returned an unreadable certificate for {agent_id}") from None
        self.store.write_cert(agent_id, body["certificate"])
        _log.info("certificate of %s renewed", agent_id)

    def resign_csr(self, agent_id: str) -> bool:
        """True if the stored certificate can be used (renewed first when due).

        A renewal that fails while the certificate is still within its validity period is logged and not fatal
        (retried later); an expired certificate that cannot be renewed gives False.
        """
        try:
            cert = self.store.load_cert(agent_id)
        except CredentialError as exc:
            _log.error("%s", exc)
            return False
        if not needs_renewal(cert):
            return True
        try:
            self.renew(agent_id)
            return True
        except (CAError, CredentialError, OSError) as exc:
            if is_usable(cert):
                _log.warning("certificate of %s is due for renewal; renewal failed (%s); will retry later", agent_id, exc)
                return True
            _log.error("certificate of %s has expired and renewal failed: %s", agent_id, exc)
            return False

    # --- guest --------------------------------------------------------------------------------------------------
    def find_local_guest(self) -> Optional[str]:
        """The first (sorted) stored guest identity whose certificate needs no renewal; nothing is deleted."""
        try:
            names = sorted(os.listdir(self.aid_path))
        except FileNotFoundError:
            return None
        for name in names:
            if not name.startswith("guest") or not os.path.isdir(os.path.join(self.aid_path, name)):
                continue
            try:
                cert = self.store.load_cert(name)
            except CredentialError:
                continue
            if not needs_renewal(cert) and self.store.has_key(name):
                return name
        return None

    def fetch_guest(self) -> str:
        """GET ``sign_guest_cert`` and store the guest identity; returns its AID. Raises :class:`CAError`."""
        status, body = self._request("GET", "sign_guest_cert")
        needed = ("guest_aid", "key", "cert", "entrypoint")
        if status != 200 or not isinstance(body, dict) or any(k not in body for k in needed):
            raise CAError(f"CA did not issue a guest identity: {self._error_text(status, body)}", status=status,
                          transient=status >= 500 or status in (0, 429))
        guest = body["guest_aid"]
        try:
            check_aid(guest, field="guest AID from the CA")
        except (TypeError, ValueError) as exc:
            raise CAError(f"CA returned an unusable guest AID: {exc}") from None
        key = decrypt_private_key(body["key"], self.seed_password, aid=guest)
        self.store.save_identity(guest, key, body["cert"], self.seed_password)
        return guest

    def get_guest_aid(self) -> Optional[str]:
        """A valid stored guest AID, else a new one from the CA; ``None`` on failure (logged)."""
        local = self.find_local_guest()
        if local:
            return local
        try:
            return self.fetch_guest()
        except (CAError, CredentialError, OSError) as exc:
            _log.error("guest identity: %s", exc)
            return None


def default_seed_hash() -> str:
    return hash_seed_password("")
