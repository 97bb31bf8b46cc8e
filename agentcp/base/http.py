"""Small HTTP helpers shared by the SDK's clients: timeouts, the TLS-verification knob, Retry-After parsing.

Nothing here silences urllib3 warnings: turning TLS verification off is the caller's explicit choice, and the
warning urllib3 emits for it is the honest consequence (0.1.99 hid it process-wide, D-A8).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import weakref
from email.utils import parsedate_to_datetime
from typing import Any, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_TIMEOUT",
    "Timeout",
    "VerifySetting",
    "TLS_VERIFY_ENV",
    "env_flag",
    "resolve_verify",
    "parse_retry_after",
    "is_loopback_url",
    "no_proxy_for",
    "user_agent",
    "read_limited",
    "AbortableSession",
]

#: (connect, read) seconds used for every request unless the caller configures otherwise.
DEFAULT_TIMEOUT: Tuple[float, float] = (3.0, 10.0)

Timeout = Union[float, Tuple[float, float]]
VerifySetting = Union[bool, str]

#: ``AGENTCP_TLS_VERIFY=0`` turns HTTPS certificate verification off (for a test server you trust); a path
#: names a CA bundle instead.
TLS_VERIFY_ENV = "AGENTCP_TLS_VERIFY"

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on", ""}


def env_flag(name: str, default: bool = False) -> bool:
    """True if environment variable ``name`` is set to 1/true/yes/on (case-insensitive)."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE - {""}:
        return True
    return default


def resolve_verify(verify: Optional[VerifySetting] = None) -> VerifySetting:
    """The ``verify=`` value to hand to :mod:`requests`.

    An explicit ``True``/``False``/CA-bundle path wins; ``None`` consults ``AGENTCP_TLS_VERIFY`` (0/false/no/off →
    off, a path → that CA bundle, anything else → on). Verification is on by default.
    """
    if verify is not None:
        return verify
    value = os.environ.get(TLS_VERIFY_ENV)
    if value is None:
        return True
    text = value.strip()
    if text.lower() in _FALSE:
        return False
    if text.lower() in _TRUE:
        return True
    if os.path.exists(text):
        return text
    return True


def parse_retry_after(value: Optional[str], *, now: Optional[float] = None) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); 0.0 if absent or unusable."""
    if value is None:
        return 0.0
    text = str(value).strip()
    if not text:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0
        if when is None:
            return 0.0
        # An HTTP-date names a wall-clock instant, so only the wall clock can turn it into a wait; the wait
        # itself is then timed on the monotonic clock by the caller.
        current = time.time() if now is None else now
        try:
            seconds = when.timestamp() - current
        except (OverflowError, OSError, ValueError):
            return 0.0
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0
    return seconds


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs whose host is ``localhost`` or a loopback IP literal."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_proxy_for(url: str) -> Optional[Dict[str, Any]]:
    """``proxies=`` for a request: bypass environment proxies for loopback hosts, else ``None`` (requests' default).

    A proxy configured for the outside world cannot reach this machine's loopback interface; requests only skips
    it when ``no_proxy`` says so. Mapping the schemes to ``None`` makes requests drop the environment proxy for
    this one request without disturbing proxies for real servers.
    """
    if is_loopback_url(url):
        return {"http": None, "https": None, "all": None}
    return None


def user_agent(agent_id: str) -> str:
    """The 0.1.99 User-Agent format: ``AgentCP/<version> (AuthClient; <aid>)``."""
    from agentcp import __version__

    return f"AgentCP/{__version__} (AuthClient; {agent_id})"


def read_limited(response: Any, limit: int) -> bytes:
    """Read at most ``limit`` bytes of a streamed :mod:`requests` response body; ValueError if it is longer."""
    chunks = []
    total = 0
    for chunk in response.iter_content(chunk_size=8192):
        if not chunk:
            continue
        total += len(chunk)
        if total > limit:
            raise ValueError(f"response body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class AbortableSession:
    """A :class:`requests.Session` whose requests in flight another thread can abort at once.

    A thread blocked in ``session.post(...)`` waits up to the read timeout for the server; closing the session does
    not wake it. :meth:`abort` shuts down the sockets of this session's connections, so a blocked request fails at
    once with a connection error (a connection still being opened fails as soon as it is open). Idle pooled
    connections are shut down too; later requests simply open new ones.
    """

    def __init__(self) -> None:
        import requests
        from urllib3.connection import HTTPConnection, HTTPSConnection
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        self._lock = threading.Lock()
        self._conns: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._epoch = 0
        owner = self

        def tracked(base: Any) -> Any:
            class Tracked(base):
                def connect(self) -> None:
                    epoch = owner._epoch
                    super().connect()
                    with owner._lock:
                        owner._conns.add(self)
                        aborted = owner._epoch != epoch
                    if aborted:  # abort() ran while this connection was being opened
                        owner._shutdown(self)

            Tracked.__name__ = f"Abortable{base.__name__}"
            return Tracked

        class Pool(HTTPConnectionPool):
            ConnectionCls = tracked(HTTPConnection)

        class TLSPool(HTTPSConnectionPool):
            ConnectionCls = tracked(HTTPSConnection)

        self.session = requests.Session()
        for prefix in ("http://", "https://"):
            adapter = self.session.get_adapter(prefix)
            manager = getattr(adapter, "poolmanager", None)
            if manager is not None:
                manager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    @staticmethod
    def _shutdown(conn: Any) -> None:
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass  # already closed or never connected: nothing is blocked on it

    def abort(self) -> None:
        """Make every request of this session that is in flight now fail at once."""
        with self._lock:
            self._epoch += 1
            conns = list(self._conns)
        for conn in conns:
            self._shutdown(conn)
