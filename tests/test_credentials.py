"""AgentCredentials: the stored identity format of liveness.md §5.2, seed handling, errors and reloading."""
from __future__ import annotations

import datetime as dt
import logging
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agentcp.base.credentials import AgentCredentials, hash_seed, split_pem_certificates
from agentcp.context.exceptions import CredentialError

AID = "alice.example.com"
SEED = "correct horse battery staple"


def _self_signed(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


def write_identity(certs_dir, aid=AID, password=None, extra_pem=b"", key=None):
    """Write ``<aid>.key`` (PKCS#8, encrypted with ``password`` bytes if given) and ``<aid>.crt``."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    enc = (serialization.BestAvailableEncryption(password) if password is not None
           else serialization.NoEncryption())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    cert = _self_signed(key, aid)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM) + extra_pem
    os.makedirs(certs_dir, exist_ok=True)
    with open(os.path.join(certs_dir, f"{aid}.key"), "wb") as fh:
        fh.write(key_pem)
    with open(os.path.join(certs_dir, f"{aid}.crt"), "wb") as fh:
        fh.write(cert_pem)
    return key, cert, key_pem, cert_pem


def _verifies(cert: x509.Certificate, sig_hex: str, data: bytes) -> bool:
    cert.public_key().verify(bytes.fromhex(sig_hex), data, ec.ECDSA(hashes.SHA256()))
    return True


def test_hash_seed_is_sha256_hex():
    assert hash_seed("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert hash_seed("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_seed("é") == hash_seed("\u00e9") and len(hash_seed("é")) == 64


def test_hashed_seed_as_given_loads_key_written_by_best_available_encryption(tmp_path):
    key, cert, _, cert_pem = write_identity(tmp_path, password=hash_seed(SEED).encode("ascii"))
    creds = AgentCredentials(AID, str(tmp_path), hash_seed(SEED))  # the 0.1.99 contract
    assert creds.private_key.private_numbers() == key.private_numbers()
    assert creds.cert_pem == cert_pem.decode()
    assert creds.certificate == cert
    sig = creds.sign(b"nonce-123")
    assert sig == sig.lower() and _verifies(cert, sig, b"nonce-123")


def test_raw_seed_is_accepted_too(tmp_path):
    key, _, _, _ = write_identity(tmp_path, password=hash_seed(SEED).encode("ascii"))
    creds = AgentCredentials(AID, str(tmp_path), SEED)
    assert creds.private_key.private_numbers() == key.private_numbers()


def test_default_empty_seed(tmp_path):
    write_identity(tmp_path, password=hash_seed("").encode("ascii"))
    AgentCredentials(AID, str(tmp_path), hash_seed("")).load()
    AgentCredentials(AID, str(tmp_path), "").load()


def test_wrong_seed_password_says_so_without_leaking_it(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    write_identity(tmp_path, password=hash_seed(SEED).encode("ascii"))
    creds = AgentCredentials(AID, str(tmp_path), "wrong-seed")
    with pytest.raises(CredentialError) as info:
        creds.load()
    msg = str(info.value)
    assert os.path.join(str(tmp_path), f"{AID}.key") in msg
    assert "could not be decrypted with the seed password" in msg
    assert "must be the one the identity" in msg
    assert "wrong-seed" not in msg and hash_seed("wrong-seed") not in msg
    assert "wrong-seed" not in caplog.text and hash_seed("wrong-seed") not in caplog.text
    assert info.value.permanent


@pytest.mark.parametrize("missing", ["key", "crt"])
def test_missing_file_names_the_path(tmp_path, missing):
    write_identity(tmp_path, password=hash_seed(SEED).encode("ascii"))
    path = tmp_path / f"{AID}.{missing}"
    path.unlink()
    creds = AgentCredentials(AID, str(tmp_path), hash_seed(SEED))
    with pytest.raises(CredentialError) as info:
        creds.load()
    assert str(path) in str(info.value)
    assert "create" in str(info.value) and "restore" in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CredentialError, match="not found"):
        _ = AgentCredentials(AID, str(tmp_path / "nope"), hash_seed(SEED)).cert_pem


def test_unencrypted_pkcs8_fallback(tmp_path):
    key, _, _, _ = write_identity(tmp_path, password=None)
    creds = AgentCredentials(AID, str(tmp_path), hash_seed(SEED))
    assert creds.private_key.private_numbers() == key.private_numbers()


def test_garbage_key_file(tmp_path):
    write_identity(tmp_path, password=None)
    (tmp_path / f"{AID}.key").write_text("not a key")
    with pytest.raises(CredentialError, match="not a PEM private key"):
        AgentCredentials(AID, str(tmp_path), "").load()


def test_multi_block_certificate_uses_first_and_sends_whole_text(tmp_path):
    other = _self_signed(ec.generate_private_key(ec.SECP256R1()), "intermediate")
    extra = other.public_bytes(serialization.Encoding.PEM)
    key, cert, _, cert_pem = write_identity(tmp_path, password=hash_seed(SEED).encode(), extra_pem=extra)
    creds = AgentCredentials(AID, str(tmp_path), hash_seed(SEED))
    assert creds.certificate == cert
    assert creds.cert_pem == cert_pem.decode() and creds.cert_pem.count("BEGIN CERTIFICATE") == 2
    assert len(split_pem_certificates(creds.cert_pem)) == 2
    expected = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert creds.public_key_pem == expected
    assert creds.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----") and creds.public_key_pem.endswith("\n")


def test_key_and_certificate_must_match(tmp_path):
    write_identity(tmp_path, password=hash_seed(SEED).encode())
    other = _self_signed(ec.generate_private_key(ec.SECP384R1()), AID)
    (tmp_path / f"{AID}.crt").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CredentialError, match="does not match"):
        AgentCredentials(AID, str(tmp_path), hash_seed(SEED)).load()


def test_cached_and_reloaded_when_files_change(tmp_path):
    pw = hash_seed(SEED).encode()
    key1, cert1, _, _ = write_identity(tmp_path, password=pw)
    creds = AgentCredentials(AID, str(tmp_path), hash_seed(SEED))
    first = creds.private_key
    assert creds.private_key is first  # cached
    key2, cert2, _, _ = write_identity(tmp_path, password=pw)
    later = os.stat(tmp_path / f"{AID}.key").st_mtime + 5
    os.utime(tmp_path / f"{AID}.key", (later, later))
    os.utime(tmp_path / f"{AID}.crt", (later, later))
    assert creds.private_key.private_numbers() == key2.private_numbers()
    assert creds.certificate == cert2
    creds.load()


def test_repr_hides_password(tmp_path):
    assert SEED not in repr(AgentCredentials(AID, str(tmp_path), SEED))
