"""Write identities exactly as agentcp 0.1.99 lays them out (liveness.md §5.1-§5.3), independently of agentcp's code.

Only ``cryptography`` and the standard library are used, so tests can prove that files written by "the old
library" load in the new one.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

UTC = datetime.timezone.utc


def seed_hex(seed: str) -> str:
    return hashlib.sha256(seed.encode("utf-8")).hexdigest()


def make_test_ca() -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LegacyTest"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Legacy CA")])
    now = datetime.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def write_legacy_identity(
    aid_path: str,
    aid: str,
    seed: str,
    ca: Tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
    openssl_pbes2: Optional[str] = None,
    stray_key: bool = False,
) -> str:
    """Write ``<aid_path>/<aid>/private/certs/<aid>.key|.crt|.csr`` (order crt, csr, key, as 0.1.99) and return the
    certs directory. ``openssl_pbes2="aes-128-cbc:hmacWithSHA1"`` encrypts the key with the ``openssl`` command
    and those PBES2 parameters instead of ``cryptography``'s default."""
    ca_key, ca_cert = ca
    now = datetime.datetime.now(UTC)
    not_before = not_before or now - datetime.timedelta(days=1)
    not_after = not_after or now + datetime.timedelta(days=365)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "SomeState"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "SomeCity"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SomeOrganization"),
        x509.NameAttribute(NameOID.COMMON_NAME, aid),
    ])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    password = seed_hex(seed).encode("ascii")
    if openssl_pbes2 is None:
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(password))
    else:
        import subprocess

        cipher, prf = openssl_pbes2.split(":")
        plain = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        key_pem = subprocess.run(
            ["openssl", "pkcs8", "-topk8", "-v2", cipher, "-v2prf", prf, "-passout", "stdin"],
            input=password + b"\n" + plain, capture_output=True, check=True, timeout=20,
        ).stdout
    certs = os.path.join(aid_path, aid, "private", "certs")
    os.makedirs(certs, exist_ok=True)
    with open(os.path.join(certs, aid + ".crt"), "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(certs, aid + ".csr"), "wb") as fh:
        fh.write(csr.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(certs, aid + ".key"), "wb") as fh:
        fh.write(key_pem)
    if stray_key:  # left behind by 0.1.99's broken modify_seed_password (D-I2)
        with open(os.path.join(aid_path, aid, aid + ".key"), "wb") as fh:
            fh.write(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\ngarbage\n-----END ENCRYPTED PRIVATE KEY-----\n")
    return certs
