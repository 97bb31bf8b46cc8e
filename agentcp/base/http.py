"""Small HTTP helpers shared by the SDK's clients: timeouts, the TLS-verification knob, Retry-After parsing, and
:func:`request_limited`, the one way the SDK's HTTP clients (sign-in, access point, CA) make a request: a total
deadline that aborts the socket (not a per-read timeout a trickling server can stretch forever), and a reply body
read with a cap (trust.md rule 4).

Nothing here silences urllib3 warnings: turning TLS verification off is the caller's explicit choice, and the
warning urllib3 emits for it is the honest consequence (0.1.99 hid it process-wide, D-A8).
"""
from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import requests

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
    "ReplyTooLarge",
    "RequestDeadlineExceeded",
    "total_deadline",
    "request_limited",
    "tls_failure_text",
    "connect_error_text",
    "release_idle_threads",
]

_log = logging.getLogger("agentcp.http")

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


class ReplyTooLarge(ValueError):
    """A reply body longer than the cap it was read with; the connection was closed, nothing more was read."""

    def __init__(self, limit: int, url: str = "", bound: str = "http_reply_max") -> None:
        where = f"{url} sent" if url else "the server sent"
        super().__init__(f"{where} a reply larger than Limits.{bound} = {limit} bytes; the request was aborted")
        self.limit = limit
        self.url = url
        self.bound = bound


class RequestDeadlineExceeded(requests.exceptions.Timeout):
    """The whole request (connect, send, status line, headers and body) did not finish within its deadline.

    A :class:`requests.exceptions.Timeout`, so callers that classify timeouts as transient keep doing so.
    """


def total_deadline(timeout: Timeout) -> float:
    """Seconds a whole request may take, from a :mod:`requests`-style timeout: ``(connect, read)`` → their sum.

    :mod:`requests` applies the read timeout to every single read, so a server that sends one byte per read
    timeout holds a request forever; the SDK turns the same numbers into one deadline for the whole request.
    """
    if isinstance(timeout, (tuple, list)):
        return float(sum(float(t) for t in timeout if t is not None)) or DEFAULT_TIMEOUT[0] + DEFAULT_TIMEOUT[1]
    if timeout is None:
        return DEFAULT_TIMEOUT[0] + DEFAULT_TIMEOUT[1]
    return float(timeout)


def read_limited(response: Any, limit: int, url: str = "", bound: str = "http_reply_max",
                 deadline: Optional[float] = None) -> bytes:
    """Read at most ``limit`` bytes of a streamed :mod:`requests` response body; :class:`ReplyTooLarge` (a
    ``ValueError``) as soon as it is longer, without reading the rest. ``deadline`` (monotonic) is also checked
    between chunks, for sessions whose sockets :func:`request_limited` cannot abort."""
    declared = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ReplyTooLarge(limit, url, bound)  # refused before a byte of the body is read
    chunks = []
    total = 0
    for chunk in response.iter_content(chunk_size=min(65536, limit + 1)):
        if not chunk:
            continue
        total += len(chunk)
        if total > limit:
            raise ReplyTooLarge(limit, url, bound)
        chunks.append(chunk)
        if deadline is not None and time.monotonic() > deadline:
            raise RequestDeadlineExceeded(f"{url or 'the server'} did not finish its reply in time")
    return b"".join(chunks)


# -- whole-request deadlines -----------------------------------------------------------------------------------


class _Watchdog:
    """Runs callbacks at monotonic deadlines on one shared thread, which leaves when nothing is scheduled.

    Used to abort the socket of a request that outlives its deadline. The thread is started on demand and the
    next start joins the one that left, so no thread is left behind for long.
    """

    IDLE_LINGER = 1.0  # seconds the thread stays for the next request before it leaves

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: List[List[Any]] = []  # [when, seq, callback or None (cancelled)]
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._left: Optional[threading.Thread] = None

    def schedule(self, delay: float, callback: Callable[[], None]) -> List[Any]:
        entry = [time.monotonic() + max(0.0, delay), next(self._seq), callback]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                left, self._left = self._left, None
                if left is not None:
                    left.join()  # it has already left its loop: this returns at once
                self._thread = threading.Thread(target=self._run, name="agentcp-http-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: List[Any]) -> None:
        with self._cond:
            entry[2] = None  # dropped when it reaches the top of the heap

    def release(self) -> None:
        """If no deadline is pending, make the thread leave now and join it (an agent going offline leaves no
        thread behind); otherwise another request still needs it and it stays."""
        with self._cond:
            if any(entry[2] is not None for entry in self._heap):
                return
            self._heap.clear()
            thread, self._thread = self._thread, None
            left, self._left = self._left, None
            self._cond.notify_all()
        for t in (thread, left):
            if t is not None and t is not threading.current_thread():
                t.join()

    def _run(self) -> None:
        while True:
            due: List[Callable[[], None]] = []
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if self._thread is not threading.current_thread():
                    return  # released, or replaced by a newer thread after a release
                if not self._heap:
                    self._cond.wait(self.IDLE_LINGER)
                    while self._heap and self._heap[0][2] is None:
                        heapq.heappop(self._heap)
                    if self._thread is not threading.current_thread():
                        return
                    if not self._heap:
                        self._thread, self._left = None, threading.current_thread()
                        return
                    continue
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    entry = heapq.heappop(self._heap)
                    if entry[2] is not None:
                        due.append(entry[2])
                if not due:
                    self._cond.wait(self._heap[0][0] - now)
                    continue
            for callback in due:
                try:
                    callback()
                except Exception:  # an abort must never kill the watchdog
                    _log.exception("request deadline callback failed")


_WATCHDOG = _Watchdog()


def release_idle_threads() -> None:
    """Join the deadline thread if no request is in flight (called when an agent goes offline)."""
    _WATCHDOG.release()
_scope_local = threading.local()


class _Scope:
    """The connections (and their sockets) one :func:`request_limited` call used on this thread; :meth:`fire`
    aborts them. Sockets are kept too: once a reply that closes the connection has its headers, http.client
    hands the socket to the response and the connection object forgets it."""

    def __init__(self) -> None:
        self.conns: List[Any] = []
        self.fired = False
        self._lock = threading.Lock()

    def add(self, conn: Any) -> None:
        with self._lock:
            self.conns.append(conn)
            fired = self.fired
        if fired:
            _shutdown(conn)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            conns = list(self.conns)
        for conn in conns:
            _shutdown(conn)


def _shutdown(conn_or_sock: Any) -> None:
    """Shut down a socket (or a connection's socket) so that a thread blocked reading it wakes at once."""
    sock = getattr(conn_or_sock, "sock", conn_or_sock) if not isinstance(conn_or_sock, socket.socket) \
        else conn_or_sock
    if sock is not None and hasattr(sock, "shutdown"):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass  # already closed or never connected: nothing is blocked on it


class AbortableSession:
    """A :class:`requests.Session` whose requests in flight can be aborted at once: all of them by another thread
    (:meth:`abort`), or one of them at its deadline (:func:`request_limited`).

    A thread blocked in ``session.post(...)`` waits up to the read timeout for the server; closing the session does
    not wake it. :meth:`abort` shuts down the sockets of this session's connections, so a blocked request fails at
    once with a connection error (a connection still being opened fails as soon as it is open). Idle pooled
    connections are shut down too; later requests simply open new ones.
    """

    def __init__(self) -> None:
        from urllib3.connection import HTTPConnection, HTTPSConnection
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        self._lock = threading.Lock()
        self._conns: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._socks: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._epoch = 0
        owner = self

        def tracked(base: Any) -> Any:
            class Tracked(base):
                def connect(self) -> None:
                    epoch = owner._epoch
                    super().connect()
                    with owner._lock:
                        owner._conns.add(self)
                        if self.sock is not None:
                            owner._socks.add(self.sock)  # still reachable when a response has taken it over
                        aborted = owner._epoch != epoch
                    if aborted:  # abort() ran while this connection was being opened
                        _shutdown(self)

                def request(self, *args: Any, **kwargs: Any) -> Any:
                    # The request of the request_limited() call on this thread uses this connection: its deadline
                    # must be able to abort it (a pooled connection is reused without connect()).
                    scope = getattr(_scope_local, "scope", None)
                    if scope is not None:
                        scope.add(self)
                    result = super().request(*args, **kwargs)
                    if scope is not None and self.sock is not None:
                        scope.add(self.sock)
                    return result

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

    _shutdown = staticmethod(_shutdown)

    def abort(self) -> None:
        """Make every request of this session that is in flight now fail at once."""
        with self._lock:
            self._epoch += 1
            targets = list(self._conns) + list(self._socks)
        for target in targets:
            _shutdown(target)

    def close(self) -> None:
        self.session.close()


def request_limited(
    session: Union[AbortableSession, "requests.Session", None],
    method: str,
    url: str,
    *,
    timeout: Timeout = DEFAULT_TIMEOUT,
    max_bytes: int = 1 << 20,
    verify: Optional[VerifySetting] = None,
    bound: str = "http_reply_max",
    **kwargs: Any,
) -> "requests.Response":
    """One whole HTTP request: the response, its body already read (``.content``, ``.json()`` work) and its
    connection released.

    * The request must finish (connect, send, headers, body) within :func:`total_deadline` of ``timeout``; at the
      deadline its socket is shut down and :class:`RequestDeadlineExceeded` (a ``requests`` Timeout) is raised,
      however slowly the server trickles. This needs an :class:`AbortableSession`; with a plain session or
      ``None`` the deadline is only checked between body chunks.
    * The body is read with a cap of ``max_bytes``: :class:`ReplyTooLarge` as soon as it is longer (a declared
      Content-Length above the cap is refused before reading).
    * TLS verification follows :func:`resolve_verify`; loopback hosts bypass environment proxies.

    Other failures raise what :mod:`requests` raises.
    """
    send: Callable[..., requests.Response]
    if isinstance(session, AbortableSession):
        send = session.session.request
    elif session is not None:
        send = session.request
    else:
        send = requests.request
    seconds = total_deadline(timeout)
    deadline = time.monotonic() + seconds
    scope = _Scope()
    outer = getattr(_scope_local, "scope", None)
    _scope_local.scope = scope
    entry = _WATCHDOG.schedule(seconds, scope.fire)

    def too_late() -> RequestDeadlineExceeded:
        return RequestDeadlineExceeded(
            f"{url.split('?')[0]} did not complete its reply within {seconds:g} s (a deadline for the whole "
            "request, not per read); the request was aborted"
        )

    try:
        kwargs.setdefault("proxies", no_proxy_for(url))
        try:
            response = send(method, url, timeout=timeout, verify=resolve_verify(verify), stream=True, **kwargs)
        except requests.exceptions.RequestException:
            if scope.fired:
                raise too_late() from None
            raise
        try:
            body = read_limited(response, max_bytes, url.split("?")[0], bound, deadline)
        except requests.exceptions.RequestException:
            response.close()
            if scope.fired:
                raise too_late() from None
            raise
        except BaseException:
            response.close()
            raise
        if scope.fired:  # the socket was shut down: what arrived may be a truncated body that looks complete
            response.close()
            raise too_late()
        # The body is read: hand it out as requests would have (.content/.text/.json()) and free the connection.
        response._content = body
        response._content_consumed = True  # type: ignore[attr-defined]  # private in requests, not in its stubs
        response.close()
        return response
    finally:
        _WATCHDOG.cancel(entry)
        _scope_local.scope = outer


def is_tls_verification_failure(exc: BaseException) -> bool:
    """True if ``exc`` (from requests, websocket-client or ssl) means the server's certificate did not verify."""
    import ssl

    seen = 0
    current: Optional[BaseException] = exc
    while current is not None and seen < 8:  # requests and urllib3 wrap the ssl error a few levels deep
        if isinstance(current, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__ or (
            current.args[0] if current.args and isinstance(current.args[0], BaseException) else None)
        seen += 1
    return False


def connect_error_text(exc: BaseException, target: str) -> str:
    """How a connection attempt to ``target`` failed, for logs and errors: a TLS verification failure names
    ``AGENTCP_TLS_VERIFY`` (:func:`tls_failure_text`), anything else is ``"<type>: <message>"``."""
    if is_tls_verification_failure(exc):
        return tls_failure_text(target, exc)
    return f"{type(exc).__name__}: {exc}"


def tls_failure_text(target: str, exc: Any = None, *, override: str = "") -> str:
    """A clear message for a TLS certificate that could not be verified, naming ``AGENTCP_TLS_VERIFY``.

    ``target`` says what was contacted (a URL or "the message server at ..."); ``override`` names a per-client
    switch besides the environment variable (e.g. ``AuthClient(verify=False)``).
    """
    detail = ""
    if exc is not None:
        detail = " ".join(str(exc).split())
        detail = f" ({detail[:197] + '...' if len(detail) > 200 else detail})"
    also = f" (or {override})" if override else ""
    return (f"the TLS certificate of {target} could not be verified{detail}; if this is a test server you trust, "
            f"set {TLS_VERIFY_ENV}=0{also}, or {TLS_VERIFY_ENV}=<path to a CA bundle> to trust its CA")
