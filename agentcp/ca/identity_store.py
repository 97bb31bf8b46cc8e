"""Identities on disk, in agentcp 0.1.99's layout (liveness.md §5.2), written atomically.

Layout under ``aid_path`` (``<certificate_path or <data>/agentcp>/AIDs``)::

    <aid>/private/certs/<aid>.key   EC private key, PEM PKCS#8 encrypted with sha256_hex(seed) (ASCII bytes)
    <aid>/private/certs/<aid>.crt   certificate PEM exactly as the CA returned it
    <aid>/private/certs/<aid>.csr   CSR PEM (create only)

Every write goes to a temporary file in the same directory and is moved into place with :func:`os.replace`, so a
crash leaves either the old or the new file, never a torn one. The key is written before the certificate (a
certificate without its key is useless; a key without a certificate can be certified again), keys get mode 0600,
and nothing here ever deletes an identity directory.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import tempfile
from typing import Dict, List, Optional, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agentcp.base.credentials import cert_validity, hash_seed, load_private_key_pem
from agentcp.base.names import check_aid, is_valid_aid
from agentcp.context.exceptions import CredentialError

_log = logging.getLogger("agentcp.ca")

__all__ = [
    "hash_seed_password",
    "atomic_write",
    "IdentityStore",
    "build_csr",
    "generate_private_key",
    "encrypt_private_key",
    "decrypt_private_key",
    "load_certificate",
    "cert_validity",
    "needs_renewal",
    "is_usable",
    "public_key_pem",
    "sign_hex",
]


#: The key password of 0.1.99: lowercase hex SHA-256 of the UTF-8 seed (``None`` counts as ``""``).
hash_seed_password = hash_seed


# --- files --------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: Union[str, bytes], mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
        except (AttributeError, OSError):  # Windows has no fchmod
            pass
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        os.chmod(path, mode)
    except OSError:
        pass
    _fsync_dir(directory)


# --- keys, CSRs and certificates ----------------------------------------------------------------------------------


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A new NIST P-384 key, as 0.1.99 creates for every CSR-issued identity."""
    return ec.generate_private_key(ec.SECP384R1())


def encrypt_private_key(key, password_hex: str) -> bytes:
    """PEM PKCS#8 encrypted with ``password_hex`` (the hashed seed) using the best available scheme."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.BestAvailableEncryption(password_hex.encode("ascii")),
    )


def decrypt_private_key(pem: Union[str, bytes], password_hex: str, *, aid: str = "", path: str = ""):
    """Load an encrypted (or, as a fallback, unencrypted) PEM private key.

    Raises :class:`CredentialError` with a message that names the wrong seed password when decryption fails.
    """
    who = f" of {aid}" if aid else ""
    where = f" ({path})" if path else ""
    return load_private_key_pem(pem, [password_hex], what=f"the private key{who}{where}")


def acp_subject(aid: str) -> x509.Name:
    """The subject 0.1.99 puts in CSRs (and ACP CAs in certificates): C=CN, ST=SomeState, L=SomeCity,
    O=SomeOrganization, CN=<aid>."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "SomeState"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "SomeCity"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SomeOrganization"),
            x509.NameAttribute(NameOID.COMMON_NAME, aid),
        ]
    )


def build_csr(aid: str, key) -> x509.CertificateSigningRequest:
    """CSR as 0.1.99 builds it: C=CN, ST=SomeState, L=SomeCity, O=SomeOrganization, CN=<aid>; CA:FALSE critical."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(acp_subject(aid))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def load_certificate(pem: Union[str, bytes]) -> x509.Certificate:
    """The first certificate of a PEM text (a chain may follow it)."""
    if isinstance(pem, str):
        pem = pem.encode("utf-8")
    return x509.load_pem_x509_certificate(pem)


def _now(now: Optional[_dt.datetime]) -> _dt.datetime:
    return now if now is not None else _dt.datetime.now(_dt.timezone.utc)


def is_usable(cert: x509.Certificate, now: Optional[_dt.datetime] = None) -> bool:
    """True while ``not_before <= now <= not_after`` (the certificate can still be used to sign in)."""
    nb, na = cert_validity(cert)
    t = _now(now)
    return nb <= t <= na


def needs_renewal(cert: x509.Certificate, now: Optional[_dt.datetime] = None) -> bool:
    """0.1.99's rule: renew when not usable or within the last 10 % of the lifetime."""
    nb, na = cert_validity(cert)
    t = _now(now)
    if not (nb <= t <= na):
        return True
    return t + (na - nb) / 10 > na


def public_key_pem(key_or_cert) -> str:
    """PEM SubjectPublicKeyInfo (with its trailing newline) of a private key, public key or certificate."""
    if isinstance(key_or_cert, x509.Certificate):
        pub = key_or_cert.public_key()
    elif hasattr(key_or_cert, "public_key"):
        pub = key_or_cert.public_key()
    else:
        pub = key_or_cert
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def sign_hex(key, data: Union[str, bytes]) -> str:
    """Lowercase hex of the DER ECDSA-SHA256 signature over ``data`` (UTF-8 if str)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return key.sign(data, ec.ECDSA(hashes.SHA256())).hex()


# --- the store ----------------------------------------------------------------------------------------------------


class IdentityStore:
    """Reads and writes identities under ``aid_path`` without ever deleting one."""

    def __init__(self, aid_path: str) -> None:
        self.aid_path = aid_path

    # paths: every one goes through aid_dir, which refuses an AID that is not a DNS name (trust.md rule 5)
    def aid_dir(self, aid: str) -> str:
        """``<aid_path>/<aid>``; ``ValueError`` (``TypeError`` for a non-string) if ``aid`` is not a DNS name
        (``/``, ``\\``, NUL, ``..``, an absolute path: anything that could leave ``aid_path``)."""
        return os.path.join(self.aid_path, check_aid(aid))

    def certs_dir(self, aid: str) -> str:
        return os.path.join(self.aid_dir(aid), "private", "certs")

    def key_path(self, aid: str) -> str:
        return os.path.join(self.certs_dir(aid), aid + ".key")

    def crt_path(self, aid: str) -> str:
        return os.path.join(self.certs_dir(aid), aid + ".crt")

    def csr_path(self, aid: str) -> str:
        return os.path.join(self.certs_dir(aid), aid + ".csr")

    # queries
    def exists(self, aid: str) -> bool:
        """0.1.99's rule: an identity exists when its directory exists."""
        return os.path.isdir(self.aid_dir(aid))

    def has_key(self, aid: str) -> bool:
        return os.path.isfile(self.key_path(aid))

    def has_cert(self, aid: str) -> bool:
        return os.path.isfile(self.crt_path(aid))

    def list_aids(self) -> List[str]:
        """Directories whose names have at least 3 dot-separated labels, sorted.

        0.1.99 listed exactly-3-label directories in scan order (D-I10); 4+-label identities are listed too now.
        """
        try:
            names = os.listdir(self.aid_path)
        except FileNotFoundError:
            raise
        out = []
        for name in names:
            if name.startswith(".") or not is_valid_aid(name):
                continue
            labels = name.split(".")
            if len(labels) >= 3 and all(labels) and os.path.isdir(os.path.join(self.aid_path, name)):
                out.append(name)
        return sorted(out)

    def read_key_pem(self, aid: str) -> bytes:
        with open(self.key_path(aid), "rb") as fh:
            return fh.read()

    def read_cert_pem(self, aid: str) -> str:
        with open(self.crt_path(aid), encoding="utf-8") as fh:
            return fh.read()

    def load_key(self, aid: str, password_hex: str):
        """The decrypted private key; :class:`CredentialError` if missing or the seed password is wrong."""
        path = self.key_path(aid)
        try:
            pem = self.read_key_pem(aid)
        except FileNotFoundError:
            raise CredentialError(f"no private key for {aid}: {path} does not exist") from None
        return decrypt_private_key(pem, password_hex, aid=aid, path=path)

    def load_cert(self, aid: str) -> x509.Certificate:
        path = self.crt_path(aid)
        try:
            return load_certificate(self.read_cert_pem(aid))
        except FileNotFoundError:
            raise CredentialError(f"no certificate for {aid}: {path} does not exist") from None
        except ValueError as exc:
            raise CredentialError(f"the certificate of {aid} ({path}) is not valid PEM: {exc}") from None

    # writes
    def write_key(self, aid: str, key, password_hex: str) -> None:
        atomic_write(self.key_path(aid), encrypt_private_key(key, password_hex), mode=0o600)

    def write_cert(self, aid: str, cert_pem: str) -> None:
        atomic_write(self.crt_path(aid), cert_pem, mode=0o644)

    def write_csr(self, aid: str, csr_pem: Union[str, bytes]) -> None:
        atomic_write(self.csr_path(aid), csr_pem, mode=0o644)

    def save_identity(self, aid: str, key, cert_pem: str, password_hex: str, csr_pem=None) -> None:
        """Key first (0600), then CSR, then certificate; each write atomic."""
        self.write_key(aid, key, password_hex)
        if csr_pem is not None:
            self.write_csr(aid, csr_pem)
        self.write_cert(aid, cert_pem)

    def reencrypt_keys(self, old_password_hex: str, new_password_hex: str) -> Dict[str, str]:
        """Re-encrypt every stored key from the old to the new hashed seed.

        All keys are decrypted and re-encrypted into temporary files first; only then are they moved into place,
        so a key that fails to decrypt (another seed) is reported and left untouched, and the window in which the
        folder holds a mix of old and new passwords is as short as a series of renames. Returns ``{aid: status}``
        with status ``"ok"``, ``"no key"`` or an error text.
        """
        results: Dict[str, str] = {}
        staged: List[Tuple[str, str, str]] = []  # (aid, tmp, final)
        try:
            for aid in self._all_dirs():
                path = self.key_path(aid)
                if not os.path.isfile(path):
                    results[aid] = "no key"
                    continue
                try:
                    key = self.load_key(aid, old_password_hex)
                except CredentialError as exc:
                    results[aid] = str(exc)
                    continue
                data = encrypt_private_key(key, new_password_hex)
                fd, tmp = tempfile.mkstemp(prefix="." + aid + ".key.", suffix=".tmp", dir=os.path.dirname(path))
                try:
                    os.fchmod(fd, 0o600)
                except (AttributeError, OSError):
                    pass
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                staged.append((aid, tmp, path))
            for aid, tmp, final in staged:
                os.replace(tmp, final)
                _fsync_dir(os.path.dirname(final))
                results[aid] = "ok"
            staged = []
        finally:
            for _aid, tmp, _final in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return results

    def _all_dirs(self) -> List[str]:
        try:
            return sorted(n for n in os.listdir(self.aid_path)
                          if is_valid_aid(n) and os.path.isdir(os.path.join(self.aid_path, n)))
        except FileNotFoundError:
            return []
