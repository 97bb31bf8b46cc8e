"""Who may receive the agent's secrets: the trust domain of ``shared/protocol/trust.md`` as a pure value.

A :class:`TrustPolicy` is built from the access-point URL the application chose, the hosts the access point's own
config names, and ``AGENTCP_TRUSTED_HOSTS``. Every place that sends a sign-in proof, a token or a file-server
signature, or follows a URL it was handed, asks :meth:`TrustPolicy.check` first. The policy never touches the
network or the clock; :class:`RefusalLog` counts refusals for ``status()`` and logs each host once.

Rules (trust.md §2):

* the **network domain** is the AP host without its first label (``acp3.agentunion.cn`` -> ``agentunion.cn``);
  a host is trusted when it equals a host named by the AP config, equals the network domain or ends with
  ``.<network domain>``. An AP host of two labels or fewer is its own domain (``example.com`` never trusts all of
  ``.com``);
* a numeric-IP or ``localhost`` AP (the devserver, tests) trusts exactly that host, on any port;
* ``AGENTCP_TRUSTED_HOSTS`` adds host names or ``*.suffix`` patterns; nothing removes the AP;
* plain ``http``/``ws`` to a trusted host is acceptable only for loopback hosts or when the AP URL itself was
  ``http``; otherwise the URL must use TLS.

Also here: :func:`looks_like_nonce` (rule 2: sign only what looks like a challenge).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from agentcp.context.exceptions import SDKError

__all__ = [
    "TRUSTED_HOSTS_ENV",
    "TrustPolicy",
    "UntrustedHostError",
    "RefusalLog",
    "looks_like_nonce",
    "url_host",
]

_log = logging.getLogger("agentcp.trust")

#: Comma-separated host names or ``*.suffix`` patterns trusted in addition to the access point's domain.
TRUSTED_HOSTS_ENV = "AGENTCP_TRUSTED_HOSTS"

_SECURE_SCHEMES = {"https", "wss"}
_PLAIN_SCHEMES = {"http", "ws"}
# Characters that different URL parsers disagree about (``http://evil\@good``) or that no host may contain.
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
MAX_NONCE_LENGTH = 128


class UntrustedHostError(SDKError):
    """A secret would have gone to, or a URL pointed at, a host outside the agent's trust domain."""

    code = 1401

    def __init__(self, message: str, host: str = "", purpose: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.purpose = purpose


def looks_like_nonce(value: object) -> bool:
    """True if ``value`` may be signed as a challenge: a short string of hex / base64url characters (trust.md rule 2)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NONCE_LENGTH
        and _NONCE_RE.fullmatch(value) is not None
    )


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> Tuple[str, str]:
    """``(scheme, host)`` of an absolute URL, normalised; raises ``ValueError`` for anything ambiguous.

    Refused: no scheme or host, characters that URL parsers disagree about (backslash, whitespace, control
    characters), user-info (``user@host``), an invalid port, and host names that are not DNS names or IPs.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("not a URL")
    if _BAD_URL_CHARS.search(url):
        raise ValueError("URL contains whitespace, control characters or a backslash")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise ValueError("URL has no scheme or host")
    if "@" in parts.netloc:
        raise ValueError("URL carries user information")
    parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    host = _normalise_host(parts.hostname or "")
    if not host:
        raise ValueError("URL has no host")
    if not _is_ip(host) and not _HOST_RE.fullmatch(host):
        raise ValueError("URL host is not a DNS name or an IP address")
    return scheme, host


def _parse_patterns(text: str) -> Tuple[FrozenSet[str], Tuple[str, ...]]:
    exact, suffixes = set(), []
    for item in (text or "").split(","):
        item = _normalise_host(item)
        if not item:
            continue
        if item.startswith("*."):
            suffix = item[2:]
            if suffix and "." in suffix:        # "*.com" would trust a whole top-level domain
                suffixes.append(suffix)
            else:
                _log.warning("ignored trusted-host pattern %r: a suffix needs at least two labels", item)
        else:
            exact.add(item)
    return frozenset(exact), tuple(suffixes)


@dataclass(frozen=True)
class TrustPolicy:
    """The hosts an agent may send secrets to and follow URLs on (trust.md §2). Immutable; pure.

    Build it with :meth:`from_ap_url`; add the hosts of the access point's config with :meth:`with_hosts`.
    """

    ap_host: str
    ap_plain: bool = False                       # the AP URL itself was http: plain schemes are acceptable
    domain: str = ""                             # network domain ("" for an IP / localhost AP)
    hosts: FrozenSet[str] = field(default_factory=frozenset)        # exact host names (AP, config, env)
    suffixes: Tuple[str, ...] = ()               # from *.suffix patterns of AGENTCP_TRUSTED_HOSTS

    @classmethod
    def from_ap_url(cls, ap_url: str, config_urls: Iterable[str] = (),
                    env: Optional[Mapping[str, str]] = None) -> "TrustPolicy":
        """The policy of an agent whose access point is ``ap_url`` (``https://acp3.<domain>`` or an override)."""
        scheme, host = url_host(ap_url)
        if scheme not in _SECURE_SCHEMES | _PLAIN_SCHEMES:
            raise ValueError(f"access point URL must be http(s), got scheme {scheme!r}")
        environ = os.environ if env is None else env
        extra_hosts, suffixes = _parse_patterns(environ.get(TRUSTED_HOSTS_ENV, ""))
        domain = ""
        if not (_is_ip(host) or _is_loopback(host)):
            labels = host.split(".")
            domain = ".".join(labels[1:]) if len(labels) > 2 else host
        policy = cls(ap_host=host, ap_plain=scheme in _PLAIN_SCHEMES, domain=domain,
                     hosts=frozenset({host}) | extra_hosts, suffixes=suffixes)
        return policy.with_hosts(config_urls)

    def with_hosts(self, urls_or_hosts: Iterable[str]) -> "TrustPolicy":
        """A copy that also trusts the hosts of these URLs (or bare ``host[:port]`` strings) from the AP config."""
        added = set()
        for item in urls_or_hosts:
            if not item:
                continue
            text = str(item).strip()
            try:
                _, host = url_host(text if "://" in text else "udp://" + text)
            except ValueError:
                _log.warning("ignored an access-point config entry that is not a valid host or URL")
                continue
            added.add(host)
        if not added:
            return self
        return TrustPolicy(self.ap_host, self.ap_plain, self.domain, self.hosts | frozenset(added), self.suffixes)

    # -- decisions -----------------------------------------------------------------------------------------------

    def host_trusted(self, host: str) -> bool:
        """True if a bare host name (no scheme) belongs to the trust domain."""
        host = _normalise_host(host or "")
        if not host:
            return False
        if host in self.hosts:
            return True
        if self.domain and (host == self.domain or host.endswith("." + self.domain)):
            return True
        return any(host == s or host.endswith("." + s) for s in self.suffixes)

    def why_untrusted(self, url: str) -> Optional[str]:
        """``None`` if secrets may go to ``url``; otherwise the reason, naming the host but nothing secret."""
        try:
            scheme, host = url_host(url)
        except ValueError as exc:
            return f"malformed URL ({exc})"
        if scheme not in _SECURE_SCHEMES | _PLAIN_SCHEMES:
            return f"scheme {scheme!r} is not http(s) or ws(s)"
        if not self.host_trusted(host):
            return (f"host {host!r} is outside the trust domain of the access point {self.ap_host!r} "
                    f"(add it to {TRUSTED_HOSTS_ENV} if it is yours)")
        if scheme in _PLAIN_SCHEMES and not (self.ap_plain or _is_loopback(host)):
            return f"plain {scheme}:// to {host!r}; a TLS URL is required"
        return None

    def is_trusted(self, url: str) -> bool:
        """True if a proof, token or signature may be sent to ``url``."""
        return self.why_untrusted(url) is None

    def check(self, url: str, purpose: str = "") -> None:
        """Raise :class:`UntrustedHostError` unless secrets may go to ``url``. The message never holds the URL query."""
        reason = self.why_untrusted(url)
        if reason is not None:
            try:
                host = url_host(url)[1]
            except ValueError:
                host = "?"
            what = f" for {purpose}" if purpose else ""
            raise UntrustedHostError(f"refused{what}: {reason}", host=host, purpose=purpose)


class RefusalLog:
    """Counts refusals by purpose for ``status()`` and logs each (purpose, host) once at WARNING. Thread-safe."""

    def __init__(self, logger: Optional[logging.Logger] = None) -> None:
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {}
        self._seen: set = set()
        self._log = logger or _log

    def refuse(self, error: UntrustedHostError) -> None:
        """Record one refusal; the first for its (purpose, host) is logged."""
        key = (error.purpose, error.host)
        with self._lock:
            self._counts[error.purpose or "other"] = self._counts.get(error.purpose or "other", 0) + 1
            first = key not in self._seen
            if first and len(self._seen) < 1024:    # bounded: a flood of hosts cannot grow it without limit
                self._seen.add(key)
        if first:
            self._log.warning("%s", error.message)

    def snapshot(self) -> Dict[str, int]:
        """Refusals so far by purpose (a copy)."""
        with self._lock:
            return dict(self._counts)
