"""The agent's own identity on disk: ``<certs_dir>/<aid>.key`` (encrypted PKCS#8 PEM) and ``<aid>.crt`` (PEM).

The key password is the ASCII lowercase-hex SHA-256 of the user's seed (liveness.md §5.2; MUST (compat)).
0.1.99 passes that already-hashed value around as "seed_password", so :class:`AgentCredentials` expects it, but
also accepts the raw seed as a courtesy. Error messages name files and say what to do; they never contain key
material or passwords.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import logging
import os
import re
import threading
from typing import List, Optional, Sequence, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcp.context.exceptions import CredentialError

__all__ = ["hash_seed", "AgentCredentials", "split_pem_certificates", "load_private_key_pem", "cert_validity",
           "pem_damage"]

_log = logging.getLogger("agentcp.auth")

_CERT_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL
)


def hash_seed(seed: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 ``seed``: the key password derivation of 0.1.99 (``""`` → e3b0…b855)."""
    return hashlib.sha256((seed or "").encode("utf-8")).hexdigest()


def load_private_key_pem(data: Union[str, bytes], passwords: Sequence[str], what: str = "the private key"):
    """Load a PEM private key: encrypted PKCS#8 tried with each of ``passwords``, or (as a fallback that 0.1.99
    never wrote, e.g. an imported identity) unencrypted.

    Raises :class:`CredentialError` saying what to do; the message never contains a password or key material.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    damage = pem_damage(raw)
    if damage is not None:  # told apart from a wrong password: no password can open a damaged file
        raise CredentialError(
            f"{what} is damaged or truncated ({damage}); it is not a seed password problem. Restore the "
            "identity's key file from a backup (or create a new identity)"
        )
    if b"ENCRYPTED" in raw:
        for password in passwords:
            try:
                return serialization.load_pem_private_key(raw, password=password.encode("utf-8"))
            except (ValueError, TypeError):
                continue
        raise CredentialError(
            f"wrong seed password: {what} could not be decrypted with the seed password; the seed_password "
            "given to AgentCP must be the one the identity was created with"
        )
    try:
        return serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise CredentialError(f"{what} is not a PEM private key; restore the identity's key file") from None


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def pem_damage(raw: bytes) -> Optional[str]:
    """Why the PEM private key in ``raw`` is structurally damaged (truncated, cut base64, a DER length that does
    not match the data), or ``None`` if it looks whole or is not PEM at all (the caller says "not a PEM private
    key" then). Pure: no password is tried."""
    if b"-----BEGIN" not in raw:
        return None
    match = _PEM_BLOCK.search(raw)
    if match is None:
        return "the PEM block has no matching 'END' line: the file was cut short"
    body = b"".join(match.group(2).split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return "the PEM body is not valid base64"
    if len(der) < 2 or der[0] != 0x30:
        return "the PEM body is not a DER structure"
    size, offset = der[1], 2
    if size & 0x80:
        count = size & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return "the DER length is malformed"
        size, offset = int.from_bytes(der[2:2 + count], "big"), 2 + count
    if offset + size != len(der):
        return f"the DER data is {len(der)} bytes but declares {offset + size}: the key was cut or padded"
    return None


def cert_validity(cert: x509.Certificate) -> Tuple[_dt.datetime, _dt.datetime]:
    """``(not_before, not_after)`` of ``cert`` as aware UTC datetimes, on old and new ``cryptography``."""

    def utc(value: _dt.datetime) -> _dt.datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)

    # not_valid_*_utc exists from cryptography 42; older versions only have the naive UTC attributes.
    before = getattr(cert, "not_valid_before_utc", None) or utc(cert.not_valid_before)
    after = getattr(cert, "not_valid_after_utc", None) or utc(cert.not_valid_after)
    return before, after


def split_pem_certificates(data: "str | bytes") -> List[bytes]:
    """Every ``-----BEGIN CERTIFICATE-----`` block in ``data``, in order, as bytes (with a trailing newline)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return [m.group(0) + b"\n" for m in _CERT_BLOCK.finditer(raw)]


def _stamp(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


class AgentCredentials:
    """Lazily loaded, cached key and certificate of one agent; reloaded when either file changes on disk."""

    def __init__(self, agent_id: str, certs_dir: str, seed_password: str) -> None:
        self.agent_id = agent_id
        self.certs_dir = certs_dir
        self.seed_password = seed_password if seed_password is not None else ""
        self._lock = threading.RLock()
        self._key: Optional[ec.EllipticCurvePrivateKey] = None
        self._key_stamp: Optional[Tuple[int, int]] = None
        self._key_password: Optional[str] = None
        self._cert_pem: Optional[str] = None
        self._cert: Optional[x509.Certificate] = None
        self._cert_stamp: Optional[Tuple[int, int]] = None

    # -- paths ----------------------------------------------------------------------------------------------
    @property
    def key_path(self) -> str:
        return os.path.join(self.certs_dir, f"{self.agent_id}.key")

    @property
    def cert_path(self) -> str:
        return os.path.join(self.certs_dir, f"{self.agent_id}.crt")

    def _missing(self, path: str, what: str) -> CredentialError:
        return CredentialError(
            f"{what} of agent {self.agent_id} not found at {path}; create the identity (AgentCP.create_aid) "
            f"or restore its files into {self.certs_dir}"
        )

    # -- loading --------------------------------------------------------------------------------------------
    def _load_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.key_path
        try:
            stamp = _stamp(path)
        except FileNotFoundError:
            raise self._missing(path, "private key") from None
        except OSError as exc:
            raise CredentialError(f"cannot read the private key at {path}: {exc.strerror or exc}") from None
        if self._key is not None and stamp == self._key_stamp and self._key_password == self.seed_password:
            return self._key
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise CredentialError(f"cannot read the private key at {path}: {exc.strerror or exc}") from None

        # The 0.1.99 contract hands over the hashed seed; a raw seed is accepted too, as a courtesy.
        candidates = [self.seed_password]
        hashed = hash_seed(self.seed_password)
        if hashed != self.seed_password:
            candidates.append(hashed)
        key = load_private_key_pem(data, candidates, what=f"the private key at {path}")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialError(f"the private key at {path} is not an EC key; agent identities use ECDSA keys")
        _log.debug("loaded private key of %s from %s", self.agent_id, path)
        self._key, self._key_stamp, self._key_password = key, stamp, self.seed_password
        return key

    def _load_cert(self) -> Tuple[str, x509.Certificate]:
        path = self.cert_path
        try:
            stamp = _stamp(path)
        except FileNotFoundError:
            raise self._missing(path, "certificate") from None
        except OSError as exc:
            raise CredentialError(f"cannot read the certificate at {path}: {exc.strerror or exc}") from None
        if self._cert is not None and self._cert_pem is not None and stamp == self._cert_stamp:
            return self._cert_pem, self._cert
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise CredentialError(f"cannot read the certificate at {path}: {exc.strerror or exc}") from None
        blocks = split_pem_certificates(data)
        if not blocks:
            raise CredentialError(f"no PEM certificate found in {path}; restore the identity's certificate")
        try:
            cert = x509.load_pem_x509_certificate(blocks[0])
            text = data.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise CredentialError(f"the certificate at {path} is malformed; restore the identity's certificate") \
                from None
        _log.debug("loaded certificate of %s from %s", self.agent_id, path)
        self._cert_pem, self._cert, self._cert_stamp = text, cert, stamp
        return text, cert

    def load(self) -> None:
        """Load (or reload if changed) key and certificate now, and check that they belong together."""
        with self._lock:
            key = self._load_key()
            _, cert = self._load_cert()
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
                raise CredentialError(
                    f"the private key at {self.key_path} does not match the certificate at {self.cert_path}; "
                    "restore both files of the same identity"
                )

    # -- public accessors -----------------------------------------------------------------------------------
    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        with self._lock:
            return self._load_key()

    @property
    def cert_pem(self) -> str:
        """The whole stored certificate file (sent as ``cert`` in sign-in step 2)."""
        with self._lock:
            return self._load_cert()[0]

    @property
    def certificate(self) -> x509.Certificate:
        """The agent's own certificate (the first PEM block of the file)."""
        with self._lock:
            return self._load_cert()[1]

    @property
    def public_key_pem(self) -> str:
        """PEM SubjectPublicKeyInfo of the key inside the certificate, with its trailing newline."""
        pem = self.certificate.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        return pem if pem.endswith("\n") else pem + "\n"

    def sign(self, data: bytes) -> str:
        """ECDSA-SHA256 signature of ``data`` with the agent's key: DER, lowercase hex."""
        return self.private_key.sign(bytes(data), ec.ECDSA(hashes.SHA256())).hex()

    def __repr__(self) -> str:  # never show the password
        return f"AgentCredentials(agent_id={self.agent_id!r}, certs_dir={self.certs_dir!r})"
