"""Server authentication during sign-in: the server's signature over the challenge and its certificate chain.

Fixes of 0.1.99 (liveness.md §2.4-2.5, defects D-S2..D-S5):

* every certificate's signature is verified by its issuer's key, even when the issuer came from the cache (D-S2);
* fetched issuers are cached only after the whole chain validated, in a bounded cache with a TTL (D-S3, D-S5);
* a chain must end at a trust anchor from the trust store, so a self-signed certificate whose AIA points to itself
  fails; validity dates, the CA flag of issuers, path length and issuer/subject name chaining are checked (D-S4);
* AIA issuers may be PEM or DER;
* :func:`check_server_identity` (trust.md rule 3): the certificate must name the host contacted, so a certificate
  that merely chains to a trusted root (an ordinary agent's, or the real server's relayed by someone else) does
  not identify a server.

The trust store starts with the AgentUnion Root CA (§5.7). :func:`add_trusted_root` adds more (the fake test
server uses it); ``AGENTCP_CA_ROOT`` names a PEM file or a directory of ``*.crt``/``*.pem`` files read at
verification time.
"""
from __future__ import annotations

import collections
import datetime as _dt
import ipaddress
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from agentcp.context.exceptions import ServerAuthError

from .credentials import cert_validity, split_pem_certificates
from .http import DEFAULT_TIMEOUT, request_limited

__all__ = [
    "AGENTUNION_ROOT_CA_PEM",
    "CA_ROOT_ENV",
    "MAX_CHAIN_DEPTH",
    "add_trusted_root",
    "remove_trusted_root",
    "trusted_roots",
    "reset_trusted_roots",
    "clear_issuer_cache",
    "fetch_issuer_http",
    "verify_server_response",
    "check_server_identity",
]

_log = logging.getLogger("agentcp.auth")

#: The built-in trust anchor: AgentUnion Root CA (liveness.md §5.7), EC P-521, valid 2025-05-08 to 2045-05-08.
AGENTUNION_ROOT_CA_PEM = """-----BEGIN CERTIFICATE-----
MIICJjCCAYigAwIBAgIQf2zjuigigLrW8Su0I+2AiTAKBggqhkjOPQQDBDAnMRMw
EQYDVQQKEwpBZ2VudFVuaW9uMRAwDgYDVQQDEwdSb290IENBMB4XDTI1MDUwODA3
MDE1OFoXDTQ1MDUwODA3MDE1OFowJzETMBEGA1UEChMKQWdlbnRVbmlvbjEQMA4G
A1UEAxMHUm9vdCBDQTCBmzAQBgcqhkjOPQIBBgUrgQQAIwOBhgAEAUuDc4dMcjXI
GVxem8HStonZlyfyqtujfpTz8WP4ZcMUCTlrvnxZRjzNarmzSc2Yx2COcK1VEuzP
TcyQGE/Pw9i4AP9qGtX0j3dwLw+i2+TzEOmgoulm+t+fyjxhLsmqyWrIUdTv6T5C
IYVkSnX1mM0UPVQYxZi/2Uuyw8FOcPzIq7eWo1MwUTAOBgNVHQ8BAf8EBAMCAf4w
DwYDVR0lBAgwBgYEVR0lADAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDgQWBBQhkljB
FddnHb7Y0j6YEZ7wtYReNzAKBggqhkjOPQQDBAOBiwAwgYcCQWKjy52NZwqJZ1FN
1n1BRPAIy6nFDTke+HbM/JFWGyFrNSx4ceVSurpa+Uy9TWmwNUuog82MHRDXnlYp
e1KpOe6qAkIBGGII4Yfzoc5x+ZC0le7kyAYTJJl1XVLCdwECPRfzk/uZHonFA4tV
nHMwnEqFoMdsj2GgOqoRqAw/miMQwo2T0hA=
-----END CERTIFICATE-----
"""

#: Extra trust anchors: a PEM file, or a directory whose ``*.crt``/``*.pem`` files are read.
CA_ROOT_ENV = "AGENTCP_CA_ROOT"
#: Longest accepted chain, leaf and anchor included.
MAX_CHAIN_DEPTH = 5
#: Largest AIA issuer download accepted.
MAX_ISSUER_BYTES = 64 * 1024
ISSUER_CACHE_SIZE = 64
ISSUER_CACHE_TTL = 3600.0

FetchFn = Callable[[str], bytes]

# -- trust store ----------------------------------------------------------------------------------------------

_store_lock = threading.Lock()
_builtin_root = x509.load_pem_x509_certificate(AGENTUNION_ROOT_CA_PEM.encode("ascii"))
_store: "collections.OrderedDict[bytes, x509.Certificate]" = collections.OrderedDict()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _parse_certificates(data: "str | bytes") -> List[x509.Certificate]:
    """All certificates in ``data``: PEM blocks, or a single DER certificate."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    blocks = split_pem_certificates(raw)
    if blocks:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    return [x509.load_der_x509_certificate(raw)]


def reset_trusted_roots() -> None:
    """Back to the built-in AgentUnion root only (for tests)."""
    with _store_lock:
        _store.clear()
        _store[_der(_builtin_root)] = _builtin_root


reset_trusted_roots()


def add_trusted_root(pem: "str | bytes") -> None:
    """Trust the root certificate(s) in ``pem`` (PEM text, possibly several blocks, or DER bytes)."""
    try:
        certs = _parse_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"not a certificate: {exc}") from None
    with _store_lock:
        for cert in certs:
            _store[_der(cert)] = cert
    for cert in certs:
        _log.info("trusting root certificate %s", cert.subject.rfc4514_string())


def remove_trusted_root(pem: "str | bytes") -> None:
    """Stop trusting the root certificate(s) in ``pem``; unknown certificates are ignored."""
    try:
        certs = _parse_certificates(pem)
    except ValueError:
        return
    with _store_lock:
        for cert in certs:
            _store.pop(_der(cert), None)


def _env_roots() -> List[x509.Certificate]:
    location = os.environ.get(CA_ROOT_ENV, "").strip()
    if not location:
        return []
    paths: List[str] = []
    if os.path.isdir(location):
        try:
            names = sorted(os.listdir(location))
        except OSError as exc:
            _log.warning("cannot list %s=%s: %s", CA_ROOT_ENV, location, exc)
            return []
        paths = [os.path.join(location, n) for n in names if n.lower().endswith((".crt", ".pem"))]
    elif os.path.isfile(location):
        paths = [location]
    else:
        _log.warning("%s=%s is neither a file nor a directory; ignored", CA_ROOT_ENV, location)
        return []
    roots: List[x509.Certificate] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                roots.extend(_parse_certificates(fh.read()))
        except (OSError, ValueError) as exc:
            _log.warning("ignoring unreadable root certificate file %s: %s", path, exc)
    return roots


def trusted_roots() -> List[x509.Certificate]:
    """Every trust anchor: the process-wide store, then the roots named by ``AGENTCP_CA_ROOT``."""
    with _store_lock:
        roots = list(_store.values())
    seen = {_der(c) for c in roots}
    for cert in _env_roots():
        der = _der(cert)
        if der not in seen:
            seen.add(der)
            roots.append(cert)
    return roots


# -- issuer cache ---------------------------------------------------------------------------------------------


class _IssuerCache:
    """AIA URL → issuer certificate, bounded (LRU) with a TTL on a monotonic clock.

    Entries only save a download: a cached issuer is still used to verify signatures, never to skip them.
    """

    def __init__(self, maxsize: int = ISSUER_CACHE_SIZE, ttl: float = ISSUER_CACHE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._items: "collections.OrderedDict[str, Tuple[float, x509.Certificate]]" = collections.OrderedDict()

    def get(self, url: str) -> Optional[x509.Certificate]:
        with self._lock:
            item = self._items.get(url)
            if item is None:
                return None
            if item[0] <= self.clock():
                del self._items[url]
                return None
            self._items.move_to_end(url)
            return item[1]

    def put(self, url: str, cert: x509.Certificate) -> None:
        with self._lock:
            self._items[url] = (self.clock() + self.ttl, cert)
            self._items.move_to_end(url)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def discard(self, url: str) -> None:
        with self._lock:
            self._items.pop(url, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, url: object) -> bool:
        return isinstance(url, str) and self.get(url) is not None


_issuer_cache = _IssuerCache()


def clear_issuer_cache() -> None:
    """Forget every cached AIA issuer."""
    _issuer_cache.clear()


# -- certificate helpers --------------------------------------------------------------------------------------


def _utc(value: _dt.datetime) -> _dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string() or "<empty subject>"
    except ValueError:
        return "<unreadable subject>"


def _ca_constraints(cert: x509.Certificate) -> Optional[x509.BasicConstraints]:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _aia_issuer_url(cert: x509.Certificate) -> Optional[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.CA_ISSUERS and isinstance(
            desc.access_location, x509.UniformResourceIdentifier
        ):
            return desc.access_location.value
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s subject is ``cert``'s issuer and ``issuer``'s key verifies ``cert``'s signature."""
    if cert.issuer != issuer.subject:
        return False
    direct = getattr(cert, "verify_directly_issued_by", None)
    if direct is not None:  # cryptography >= 40
        try:
            direct(issuer)
            return True
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            return False
    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False  # DSA, or a key type that cannot sign certificates
        return True
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False


def fetch_issuer_http(url: str, *, timeout=DEFAULT_TIMEOUT, verify=None, session=None) -> bytes:
    """GET an AIA caIssuers URL: one total deadline (an ``AbortableSession`` cuts the socket at it), TLS verified
    unless configured off, the body capped at ``MAX_ISSUER_BYTES``; the body bytes."""
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"unsupported AIA URL scheme in {url!r}")
    response = request_limited(session, "GET", url, timeout=timeout, verify=verify, max_bytes=MAX_ISSUER_BYTES,
                               bound="issuer_cert_max")
    if not 200 <= response.status_code < 300:
        raise ValueError(f"HTTP {response.status_code}")
    return response.content


# -- verification ---------------------------------------------------------------------------------------------


def _fail(message: str) -> ServerAuthError:
    # Debug only: the caller (AuthClient) reports the failure once, with its context.
    _log.debug("server authentication failed: %s", message)
    return ServerAuthError(message)


def _check_dates(cert: x509.Certificate, now: _dt.datetime, role: str) -> None:
    before, after = cert_validity(cert)
    if now < before:
        raise _fail(f"{role} certificate {_name(cert)} is not valid before {before.isoformat()}")
    if now > after:
        raise _fail(f"{role} certificate {_name(cert)} expired at {after.isoformat()}")


def _find_anchor(cert: x509.Certificate, roots: Sequence[x509.Certificate]) -> Optional[x509.Certificate]:
    der = _der(cert)
    for root in roots:
        if _der(root) == der:
            return root
    for root in roots:
        if _issued_by(cert, root):
            return root
    return None


def _verify_chain(leaf: x509.Certificate, extras: List[x509.Certificate], fetch: Optional[FetchFn],
                  now: _dt.datetime) -> None:
    roots = trusted_roots()
    chain: List[x509.Certificate] = [leaf]
    seen = {_der(leaf)}
    fetched: Dict[str, x509.Certificate] = {}
    current = leaf
    while True:
        role = "server" if current is leaf else "intermediate"
        _check_dates(current, now, role)

        anchor = _find_anchor(current, roots)
        if anchor is not None:
            _check_dates(anchor, now, "root")
            # An anchor that is not the presented certificate itself still counts toward the path length.
            _check_path_length(chain + ([anchor] if _der(anchor) != _der(current) else []))
            break

        if len(chain) >= MAX_CHAIN_DEPTH:
            raise _fail(f"certificate chain of {_name(leaf)} is longer than {MAX_CHAIN_DEPTH} without reaching "
                        "a trusted root")

        issuer = next((c for c in extras if _der(c) not in seen and _issued_by(current, c)), None)
        if issuer is None:
            url = _aia_issuer_url(current)
            if url is None:
                raise _fail(f"{role} certificate {_name(current)} was not issued by a trusted root and names no "
                            "issuer to fetch (no AIA caIssuers); add its root with add_trusted_root or "
                            f"{CA_ROOT_ENV} if you trust it")
            cached = _issuer_cache.get(url)
            if cached is not None and _issued_by(current, cached):
                issuer = cached
            else:
                issuer = _download_issuer(url, current, fetch)
                fetched[url] = issuer
        der = _der(issuer)
        if der in seen:
            # A self-signed certificate (or a loop) that is not a trust anchor ends here.
            raise _fail(f"certificate {_name(issuer)} is self-signed or loops back and is not a trusted root")
        constraints = _ca_constraints(issuer)
        if constraints is None or not constraints.ca:
            raise _fail(f"issuer certificate {_name(issuer)} is not a CA (basicConstraints CA:TRUE missing)")
        seen.add(der)
        chain.append(issuer)
        current = issuer

    # Cache only now: the whole chain validated (D-S3).
    for url, cert in fetched.items():
        _issuer_cache.put(url, cert)


def _check_path_length(chain: List[x509.Certificate]) -> None:
    # chain[0] is the leaf; chain[i] (i >= 1) is a CA with i - 1 intermediates below it.
    for i in range(1, len(chain)):
        constraints = _ca_constraints(chain[i])
        if constraints is not None and constraints.path_length is not None and i - 1 > constraints.path_length:
            raise _fail(f"certificate chain exceeds the path length limit of {_name(chain[i])}")


def _download_issuer(url: str, cert: x509.Certificate, fetch: Optional[FetchFn]) -> x509.Certificate:
    getter = fetch if fetch is not None else fetch_issuer_http
    try:
        body = getter(url)
    except Exception as exc:  # any transport failure means the chain cannot be built
        raise _fail(f"cannot fetch the issuer of {_name(cert)} from {url}: {exc}") from None
    try:
        candidates = _parse_certificates(body)
    except ValueError:
        raise _fail(f"the issuer fetched from {url} is not a PEM or DER certificate") from None
    for candidate in candidates:
        if _issued_by(cert, candidate):
            return candidate
    raise _fail(f"certificate {_name(cert)} was not signed by the issuer fetched from {url}")


def verify_server_response(
    agent_id: str,
    request_id: str,
    cert_pem: "str | bytes",
    signature_hex: str,
    *,
    fetch: Optional[FetchFn] = None,
    now: Optional[_dt.datetime] = None,
) -> x509.Certificate:
    """Check a sign-in challenge reply: the server's signature and its certificate chain to a trusted root.

    The signature is ECDSA-SHA256 (DER, hex) over the UTF-8 of ``(agent_id + request_id).lower()`` with the key
    of the first certificate in ``cert_pem``; further PEM blocks serve as intermediates. ``fetch(url) -> bytes``
    downloads AIA issuers (default: HTTP GET with timeout, TLS verified). Returns the server certificate; raises
    :class:`ServerAuthError` on any failure.
    """
    try:
        certs = _parse_certificates(cert_pem)
    except ValueError:
        raise _fail("the server's certificate is not a valid PEM certificate") from None
    if not certs:
        raise _fail("the server sent an empty certificate")
    leaf, extras = certs[0], certs[1:]

    try:
        signature = bytes.fromhex(str(signature_hex).strip())
    except ValueError:
        raise _fail("the server's challenge signature is not hex") from None
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail(f"server certificate {_name(leaf)} does not hold an EC key")
    message = (agent_id + request_id).lower().encode("utf-8")
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise _fail(f"the server's signature over the sign-in challenge does not verify with certificate "
                    f"{_name(leaf)}") from None

    when = _utc(now) if now is not None else _dt.datetime.now(_dt.timezone.utc)
    _verify_chain(leaf, extras, fetch, when)
    _log.debug("server certificate %s verified", _name(leaf))
    return leaf


# -- identity (trust.md rule 3) ---------------------------------------------------------------------------------


def _ip(text: str) -> "Optional[ipaddress._BaseAddress]":
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _dns_matches(pattern: str, host: str, domain: str) -> bool:
    """``pattern`` (a SAN DNS name or CN) names ``host``: equal, or ``*.<parent>`` with ``host`` one label below a
    parent of at least two labels that lies under the network ``domain`` (when one is known)."""
    pattern = pattern.strip().lower().rstrip(".")
    if not pattern:
        return False
    if pattern == host:
        return True
    if not pattern.startswith("*."):
        return False
    parent = pattern[2:]
    label, _, rest = host.partition(".")
    if not label or rest != parent or "*" in parent or parent.count(".") < 1:
        return False
    return not domain or parent == domain or parent.endswith("." + domain)


def check_server_identity(cert: x509.Certificate, host: str, domain: str = "") -> Optional[str]:
    """``None`` if ``cert`` identifies the server ``host``; otherwise why not (trust.md rule 3).

    A certificate identifies ``host`` when a SAN names it (a DNS name equal to it, a wildcard ``*.<parent>`` under
    the network ``domain``, or, for an IP host, an IP address SAN equal to it). A certificate without SANs may name
    a DNS host in its CN, but only if it is marked for servers (extended key usage serverAuth): an agent's
    certificate carries its AID as CN, and an AID can look like a host name. A certificate whose extended key
    usage excludes serverAuth never identifies a server.
    """
    host = (host or "").strip().lower().rstrip(".")
    domain = (domain or "").strip().lower().rstrip(".")
    subject = _name(cert)
    if not host:
        return "no host to check the server certificate against"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = set(eku)
    except x509.ExtensionNotFound:
        usages = None
    except ValueError:
        return f"certificate {subject} has an unreadable extended key usage"
    server_marked = usages is not None and bool(
        usages & {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE})
    if usages is not None and not server_marked:
        return f"certificate {subject} is not a server certificate (its extended key usage excludes serverAuth)"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError:
        return f"certificate {subject} has an unreadable subjectAltName"
    address = _ip(host)
    if san is not None:
        if address is not None:
            if any(ip == address for ip in san.get_values_for_type(x509.IPAddress)):
                return None
        elif any(_dns_matches(name, host, domain) for name in san.get_values_for_type(x509.DNSName)):
            return None
        return f"certificate {subject} does not name the server {host!r} in its subjectAltName"
    if address is None and server_marked:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if any(isinstance(n, str) and _dns_matches(n, host, domain) for n in names):
            return None
    return (f"certificate {subject} does not identify the server {host!r} (no subjectAltName naming it"
            + ("" if address is not None else ", and no serverAuth certificate whose CN names it") + ")")
