"""Certificate authority of the fake server: root CA, agent CA, server and TLS certificates, agent identities.

Independent of the client's protocol code on purpose: the fake server is the reference the client is tested
against, so it implements its half of the protocol (liveness.md §2, §5: key password derivation, subject layout,
signatures) directly with ``cryptography``. Only generic helpers (atomic file writes, reading certificate dates)
are shared with the client.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentcp.base.credentials import cert_validity
from agentcp.ca.identity_store import atomic_write

logger = logging.getLogger("agentcp.testing")

__all__ = ["FakePKI", "seed_to_password", "atomic_write"]

_ONE_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def seed_to_password(seed_password: str) -> bytes:
    """Return the key-file password for a seed: ASCII bytes of the lowercase SHA-256 hex of its UTF-8 (§5.1)."""
    return hashlib.sha256(seed_password.encode("utf-8")).hexdigest().encode("ascii")


def _name(common_name: str, organization: str = "FakeACP") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(issuer_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _host_names(host: str) -> List[x509.GeneralName]:
    """SANs of a certificate for a server on ``host``: localhost, 127.0.0.1 and ``host`` (an IP or a DNS name)."""
    names: List[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        address = ipaddress.ip_address(host)
        if address != ipaddress.ip_address("127.0.0.1"):
            names.append(x509.IPAddress(address))
    except ValueError:
        if host and host != "localhost":
            names.append(x509.DNSName(host))
    return names


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class FakePKI:
    """All keys and certificates of one fake server, generated once at construction (EC keys are cheap).

    - root CA (P-384, self-signed, basicConstraints CA:TRUE): signs the server certificate and the agent CA;
    - server certificate (P-256, no AIA extension, issued by the root, SAN naming ``host``, EKU serverAuth): signs
      sign-in challenges (§2.4);
    - agent CA (P-384, issued by the root): issues agent certificates (:meth:`issue_agent_cert`);
    - TLS certificate (P-256, self-signed, SAN localhost / 127.0.0.1 / ``host``): used when serving HTTPS.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        now = _now()
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("FakeACP Root CA"))
            .issuer_name(_name("FakeACP Root CA"))
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 3650 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(_ski(self.root_key), critical=False)
            .sign(self.root_key, hashes.SHA384())
        )

        self.agent_ca_key = ec.generate_private_key(ec.SECP384R1())
        self.agent_ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("FakeACP Agent CA"))
            .issuer_name(self.root_cert.subject)
            .public_key(self.agent_ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 3650 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(_ski(self.agent_ca_key), critical=False)
            .add_extension(_aki(self.root_key), critical=False)
            .sign(self.root_key, hashes.SHA384())
        )

        alt_names = _host_names(host)

        # Deliberately without Authority Information Access: a client must fall back to its trusted root (§2.5).
        # Signed with SHA-384, so a client that hard-codes SHA-256 instead of the cert's own hash fails loudly.
        # It names the host it serves (SAN localhost, 127.0.0.1 and ``host``; EKU serverAuth), so clients that check
        # the server's identity (trust.md rule 3, AGENTCP_STRICT_SERVER_AUTH=1) accept it.
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("FakeACP Heartbeat Server"))
            .issuer_name(self.root_cert.subject)
            .public_key(self.server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 365 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(_ski(self.server_key), critical=False)
            .add_extension(_aki(self.root_key), critical=False)
            .sign(self.root_key, hashes.SHA384())
        )

        self.tls_key = ec.generate_private_key(ec.SECP256R1())
        self.tls_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost"))
            .issuer_name(_name("localhost"))
            .public_key(self.tls_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 365 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(_ski(self.tls_key), critical=False)
            .add_extension(_aki(self.tls_key), critical=False)
            .sign(self.tls_key, hashes.SHA256())
        )

        self.root_ca_pem = _pem(self.root_cert)
        self.agent_ca_pem = _pem(self.agent_ca_cert)
        self.server_cert_pem = _pem(self.server_cert)
        self.tls_cert_pem = _pem(self.tls_cert)

    def present_certificate(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                            chain: "List[x509.Certificate] | tuple" = ()) -> None:
        """Sign sign-in challenges with ``key`` and present ``cert`` (followed by the intermediates ``chain``) from
        now on. For attacker tests: e.g. an ordinary agent's certificate and key, with the agent CA, presented as
        the server's."""
        self.server_key = key
        self.server_cert = cert
        self.server_cert_pem = _pem(cert) + "".join(_pem(c) for c in chain)

    # -- server side of the protocol -------------------------------------------------------------------------------

    def sign_challenge(self, agent_id: str, request_id: str) -> str:
        """Return the server's step-1 signature: hex DER ECDSA-SHA256 over UTF-8 of ``(agent_id + request_id).lower()``."""
        data = (agent_id + request_id).lower().encode("utf-8")
        return self.server_key.sign(data, ec.ECDSA(hashes.SHA256())).hex()

    def verify_agent_cert(self, cert: x509.Certificate, now: Optional[datetime.datetime] = None) -> Optional[str]:
        """Check that ``cert`` was issued by the agent CA and is within its validity dates.

        Returns ``None`` when acceptable, otherwise a short reason (used as the HTTP error text).
        """
        try:
            hash_algorithm = cert.signature_hash_algorithm
            if hash_algorithm is None:
                return "unsupported certificate signature algorithm"
            self.agent_ca_key.public_key().verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm)
            )
        except InvalidSignature:
            return "certificate not issued by this server's agent CA"
        except Exception as exc:  # unsupported algorithm and the like: still "not ours"
            return f"certificate signature not verifiable: {exc}"
        now = now or _now()
        not_before, not_after = cert_validity(cert)
        if now < not_before:
            return "certificate not yet valid"
        if now > not_after:
            return "certificate expired"
        return None

    # -- agent identities ------------------------------------------------------------------------------------------

    def issue_agent_cert(
        self, aid: str, public_key: ec.EllipticCurvePublicKey, *, expired: bool = False
    ) -> x509.Certificate:
        """Issue a certificate for ``CN=aid`` with the subject layout of a real ACP CA (§5.3)."""
        now = _now()
        if expired:
            not_before, not_after = now - 400 * _ONE_DAY, now - _ONE_DAY
        else:
            not_before, not_after = now - _ONE_DAY, now + 365 * _ONE_DAY
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
                x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "SomeState"),
                x509.NameAttribute(NameOID.LOCALITY_NAME, "SomeCity"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SomeOrganization"),
                x509.NameAttribute(NameOID.COMMON_NAME, aid),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.agent_ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.agent_ca_key, hashes.SHA256())
        )

    def issue_identity(
        self, aid: str, certs_dir: str, seed_password: str = "", *, expired: bool = False
    ) -> Tuple[str, str]:
        """Create ``<certs_dir>/<aid>.key`` (encrypted PKCS#8, §5.1 password) and ``<aid>.crt``; return both paths."""
        if not aid or "/" in aid or "\\" in aid or aid in (".", ".."):
            raise ValueError(f"not a usable agent id for a file name: {aid!r}")
        os.makedirs(certs_dir, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        cert = self.issue_agent_cert(aid, key.public_key(), expired=expired)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(seed_to_password(seed_password)),
        )
        key_path = os.path.join(certs_dir, f"{aid}.key")
        cert_path = os.path.join(certs_dir, f"{aid}.crt")
        # Certificate first, key last: a reader that finds the key can rely on the certificate being there.
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        atomic_write(key_path, key_pem, 0o600)
        logger.debug("issued identity %s in %s (expired=%s)", aid, certs_dir, expired)
        return key_path, cert_path
