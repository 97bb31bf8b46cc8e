"""FakeACPServer: a real heartbeat server (HTTP sign-in + UDP heartbeat) on loopback, with fault controls.

It implements the server half of liveness.md §2 (two-step sign-in), §3 (UDP wire format) and §6 (heartbeat HTTP
endpoints) independently of the client code, so the client can be tested against it over real sockets::

    from agentcp.testing import FakeACPServer

    with FakeACPServer(next_beat_ms=5000) as srv:
        key_path, cert_path = srv.issue_identity("alice.example.com", certs_dir)
        ...  # point the client at srv.heartbeat_url
        srv.wait_for_beats(1, agent_id="alice.example.com")
        srv.restart()  # the server "forgets" every session: heartbeats now get NextBeat 401
        srv.wait_for_beats(1, agent_id="alice.example.com", since=time.monotonic())

Every public method is thread safe.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcp.msg.message_serialize import (
    MSG_HEARTBEAT_REQ,
    MSG_INVITE_RESP,
    NEXT_BEAT_REAUTH,
    HeartbeatMessageReq,
    HeartbeatMessageResp,
    InviteMessageReq,
    InviteMessageResp,
    MalformedDatagram,
    peek_message_type,
    to_bytes,
    uint64_to_varint,
)

from ._http import HttpError, HttpFrontend, HttpRequest, HttpResponse, RouteHandler
from ._loop import IOLoop
from ._pki import FakePKI, atomic_write

logger = logging.getLogger("agentcp.testing")

__all__ = ["FakeACPServer", "Beat", "SignInRecord", "InviteResponse", "Session"]

NEXT_BEAT_ENCODINGS = ("u64", "varint")
SERVER_AUTH_MODES = ("signed", "none")
SIGN_IN_MODES = ("ok", "503", "refuse", "slow")

#: A nonce from step 1 must be used within this many seconds.
NONCE_TTL_S = 300.0
#: An agent counts as online while its last valid heartbeat is younger than this many NextBeat intervals.
ONLINE_BEATS = 3
_UDP_RECV_BYTES = 65535
_UDP_BATCH = 64  # datagrams handled per wake-up before the loop looks at its other sockets again


@dataclass(frozen=True)
class Beat:
    """One HeartbeatReq the server received.

    ``valid``: the (agent_id, cookie) pair matched a live session; ``t``: ``time.monotonic()`` at receipt;
    ``addr``: the datagram's source address; ``seq``: header MessageSeq; ``cookie``: the SignCookie sent.
    """

    agent_id: str
    valid: bool
    t: float
    addr: Tuple[str, int]
    seq: int
    cookie: int


@dataclass(frozen=True)
class SignInRecord:
    """One ``POST /sign_in`` attempt.

    ``step``: 1 (challenge), 2 (proof, the body had a ``nonce``) or 0 (body was not a JSON object);
    ``status``: the HTTP status answered; ``t``: ``time.monotonic()`` at receipt; ``error``: the error text, if any.
    """

    agent_id: str
    step: int
    status: int
    t: float
    error: str = ""


@dataclass(frozen=True)
class InviteResponse:
    """One InviteResp (516) datagram the server received."""

    agent_id: str
    inviter_agent_id: str
    session_id: str
    cookie: int
    addr: Tuple[str, int]
    seq: int
    t: float


@dataclass(frozen=True)
class Session:
    """A heartbeat session created by a successful sign-in."""

    agent_id: str
    token: str
    sign_cookie: int
    created: float


@dataclass(frozen=True)
class _Nonce:
    agent_id: str
    request_id: str
    issued: float


class FakeACPServer:
    """A local ACP heartbeat server on loopback: HTTP sign-in/sign-out/online state plus the UDP heartbeat.

    Use it as a context manager (``with FakeACPServer() as srv:``) or call :meth:`start` / :meth:`stop`.

    Keyword options:

    - ``next_beat_ms``: NextBeat answered to valid heartbeats (milliseconds).
    - ``next_beat_encoding``: ``"u64"`` (8 bytes big-endian, what agentcp 0.1.99 reads) or ``"varint"``.
    - ``server_auth``: ``"signed"`` (step 1 carries ``cert`` and ``signature``) or ``"none"`` (omits both, like old
      servers).
    - ``tls``: serve HTTPS with a self-signed certificate (see :attr:`tls_cert_path`, usable as ``verify=``).
    - ``host``: address to bind (HTTP and UDP) and to announce as ``server_ip``.
    - ``trust_in_process``: when ``server_auth="signed"``, register :attr:`root_ca_pem` with
      ``agentcp.base.server_auth.add_trusted_root`` on start and remove it on stop, so the in-process client accepts
      this server's signed challenges.
    - ``http_port`` / ``udp_port``: fixed ports to bind (default 0: ephemeral ports; what tests should use).

    A new sign-in of an agent supersedes that agent's previous session (its token and cookie stop working).
    """

    def __init__(
        self,
        *,
        next_beat_ms: int = 5000,
        next_beat_encoding: str = "u64",
        server_auth: str = "signed",
        tls: bool = False,
        host: str = "127.0.0.1",
        trust_in_process: bool = True,
        http_port: int = 0,
        udp_port: int = 0,
    ) -> None:
        _check_next_beat(next_beat_ms, next_beat_encoding)
        if server_auth not in SERVER_AUTH_MODES:
            raise ValueError(f"server_auth must be one of {SERVER_AUTH_MODES}, got {server_auth!r}")
        self._host = host
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._tls = bool(tls)
        self._server_auth = server_auth
        self._trust_in_process = bool(trust_in_process)
        self._pki = FakePKI(host)

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._state = "new"  # new -> running -> stopped
        self._stop_event = threading.Event()

        self._next_beat_ms = int(next_beat_ms)
        self._encoding = next_beat_encoding
        self._silent = False
        self._announce: Optional[Tuple[str, int]] = None  # announce_udp_address()
        self._sign_in_mode = "ok"
        self._sign_in_delay = 0.0
        self._sign_in_overrides: Dict[str, Any] = {}

        self._nonces: Dict[str, _Nonce] = {}
        self._sessions: Dict[str, Session] = {}  # by token
        self._by_cookie: Dict[Tuple[str, int], Session] = {}
        self._beats: List[Beat] = []
        self._sign_ins: List[SignInRecord] = []
        self._invite_responses: List[InviteResponse] = []
        self._malformed = 0
        self._ignored = 0
        self._last_addr: Dict[str, Tuple[str, int]] = {}
        self._last_valid_beat: Dict[str, float] = {}
        self._seq = itertools.count(1)

        self._loop = IOLoop("fakeacp-io")
        self._http = HttpFrontend(self._loop, host, port=int(http_port))
        self._initial_udp_port = int(udp_port)
        self._udp_sock: Optional[socket.socket] = None
        self._udp_port = 0
        self._tmpdir: Optional[str] = None
        self._tls_cert_path: Optional[str] = None
        self._trusted = False

        self.add_route("POST", "/sign_in", self.handle_sign_in)
        self.add_route("POST", "/sign_out", self.handle_sign_out)
        self.add_route("POST", "/query_online_state", self.handle_query_online_state)

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeACPServer":
        """Bind the UDP and HTTP sockets on ``host`` (ephemeral ports unless fixed ones were given) and start
        serving; returns ``self``.

        Calling it on a running server does nothing; a stopped server cannot be started again.
        """
        with self._lock:
            if self._state == "running":
                return self
            if self._state == "stopped":
                raise RuntimeError("a stopped FakeACPServer cannot be started again; create a new one")
            self._state = "running"
        try:
            self._loop.start()
            sock = self._bind_udp(self._initial_udp_port)
            self._loop.call(lambda: self._install_udp(sock))
            if self._tls:
                self._http.tls_context = self._make_tls_context()
            self._http.listen()
            with self._lock:
                refuse = self._sign_in_mode == "refuse"
            if refuse:  # bound once so the port is known, then closed as asked before start()
                self._http.close_listener()
            if self._server_auth == "signed" and self._trust_in_process:
                self._trusted = _call_trust_store("add_trusted_root", self._pki.root_ca_pem)
        except BaseException:
            self.stop()
            raise
        logger.info("FakeACPServer up: %s, udp %s:%d", self.heartbeat_url, self._host, self._udp_port)
        return self

    def stop(self) -> None:
        """Stop serving: close every socket and join every thread this server started. Idempotent and fast."""
        with self._lock:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
            self._cond.notify_all()
        self._stop_event.set()  # wakes sign-ins sleeping in "slow" mode
        if was_running:
            self._http.close()

            def close_udp() -> None:
                sock, self._udp_sock = self._udp_sock, None
                if sock is not None:
                    self._loop.remove_reader(sock)
                    sock.close()

            self._loop.call(close_udp)
            self._loop.stop()
        if self._trusted:
            _call_trust_store("remove_trusted_root", self._pki.root_ca_pem)
            self._trusted = False
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._tls_cert_path = None
        logger.info("FakeACPServer stopped")

    def __enter__(self) -> "FakeACPServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<FakeACPServer {self._state} http={self._http.port} udp={self._udp_port} "
            f"next_beat={self._next_beat_ms}ms/{self._encoding} auth={self._server_auth}>"
        )

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._state == "running"

    # ------------------------------------------------------------------------------------------------ addresses

    @property
    def http_port(self) -> int:
        """TCP port of the HTTP(S) server (0 before start; unchanged while sign-in is in "refuse" mode)."""
        return self._http.port

    @property
    def udp_port(self) -> int:
        """Current UDP heartbeat port (changes on ``restart(move_port=True)``)."""
        return self._udp_port

    @property
    def udp_address(self) -> Tuple[str, int]:
        """``(host, udp_port)``: where heartbeats go."""
        return (self._host, self._udp_port)

    @property
    def heartbeat_url(self) -> str:
        """Base URL of the heartbeat server, e.g. ``http://127.0.0.1:PORT`` (``https`` when ``tls=True``)."""
        scheme = "https" if self._tls else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._http.port}"

    # ------------------------------------------------------------------------------------------------ certificates

    @property
    def root_ca_pem(self) -> str:
        """PEM of the root CA that signs the server certificate (and the agent CA)."""
        return self._pki.root_ca_pem

    @property
    def agent_ca_pem(self) -> str:
        """PEM of the CA that issues agent certificates (:meth:`issue_identity`); accepted at sign-in step 2."""
        return self._pki.agent_ca_pem

    @property
    def server_cert_pem(self) -> str:
        """PEM of the certificate whose key signs step-1 challenges (no AIA extension; issued by the root)."""
        return self._pki.server_cert_pem

    @property
    def tls_cert_pem(self) -> Optional[str]:
        """PEM of the self-signed HTTPS certificate, or ``None`` when ``tls=False``."""
        return self._pki.tls_cert_pem if self._tls else None

    @property
    def tls_cert_path(self) -> Optional[str]:
        """Path of a file holding :attr:`tls_cert_pem` (pass as ``requests``' ``verify=``); ``None`` without TLS or
        before start. Removed by :meth:`stop`."""
        return self._tls_cert_path

    @property
    def pki(self) -> FakePKI:
        """The server's certificate authority (keys and certificates), for endpoints mounted with :meth:`add_route`.

        Stable members: ``root_ca_pem``, ``agent_ca_pem``, ``server_cert_pem``, ``sign_challenge(agent_id,
        request_id)``, ``verify_agent_cert(cert) -> Optional[str]``, ``issue_agent_cert(aid, public_key, expired=)``,
        ``issue_identity(...)``.
        """
        return self._pki

    def issue_identity(
        self, aid: str, certs_dir: str, seed_password: str = "", *, expired: bool = False
    ) -> Tuple[str, str]:
        """Create an agent identity issued by this server's agent CA, laid out like 0.1.99 stores it (§5.1-5.2).

        Writes ``<certs_dir>/<aid>.key`` (EC P-384, encrypted PKCS#8 PEM, password = ASCII of the lowercase SHA-256
        hex of ``seed_password``, mode 0600) and ``<certs_dir>/<aid>.crt`` (PEM; subject C=CN, ST=SomeState,
        L=SomeCity, O=SomeOrganization, CN=<aid>), atomically; creates ``certs_dir``. ``expired=True`` issues a
        certificate whose validity ended yesterday (sign-in with it is rejected). Returns ``(key_path, cert_path)``.
        Works before :meth:`start`.
        """
        return self._pki.issue_identity(aid, certs_dir, seed_password, expired=expired)

    # ------------------------------------------------------------------------------------------------ records

    @property
    def beats(self) -> List[Beat]:
        """Snapshot of every HeartbeatReq received, oldest first."""
        with self._lock:
            return list(self._beats)

    @property
    def sign_ins(self) -> List[SignInRecord]:
        """Snapshot of every ``POST /sign_in`` attempt, oldest first."""
        with self._lock:
            return list(self._sign_ins)

    @property
    def invite_responses(self) -> List[InviteResponse]:
        """Snapshot of every InviteResp (516) datagram received, oldest first."""
        with self._lock:
            return list(self._invite_responses)

    @property
    def malformed(self) -> int:
        """Number of datagrams that could not be decoded (they were ignored)."""
        with self._lock:
            return self._malformed

    @property
    def ignored(self) -> int:
        """Number of well-formed datagrams of a type the server does not handle (ignored)."""
        with self._lock:
            return self._ignored

    @property
    def sessions(self) -> List[Session]:
        """Snapshot of the live sessions."""
        with self._lock:
            return list(self._sessions.values())

    @property
    def next_beat_ms(self) -> int:
        """NextBeat currently answered to valid heartbeats."""
        return self._next_beat_ms

    @property
    def next_beat_encoding(self) -> str:
        """Current NextBeat encoding, ``"u64"`` or ``"varint"``."""
        return self._encoding

    def last_address(self, agent_id: str) -> Optional[Tuple[str, int]]:
        """Source address of the last heartbeat from ``agent_id`` (``None`` if it never beat)."""
        with self._lock:
            return self._last_addr.get(agent_id)

    def is_online(self, agent_id: str) -> bool:
        """True if ``agent_id`` sent a valid heartbeat within the last 3 x NextBeat (what query_online_state says)."""
        with self._lock:
            last = self._last_valid_beat.get(agent_id)
            window = ONLINE_BEATS * self._next_beat_ms / 1000.0
        return last is not None and time.monotonic() - last <= window

    def beats_for(self, agent_id: str, valid: Optional[bool] = None) -> List[Beat]:
        """Heartbeats from ``agent_id``; only valid (``True``) or only invalid (``False``) ones, or all (``None``)."""
        with self._lock:
            return [b for b in self._beats if b.agent_id == agent_id and (valid is None or b.valid == valid)]

    def wait_for_beats(
        self,
        n: int,
        agent_id: Optional[str] = None,
        valid: Optional[bool] = True,
        timeout: float = 5.0,
        *,
        since: Optional[float] = None,
    ) -> List[Beat]:
        """Block until at least ``n`` matching heartbeats were received; return all matching ones (oldest first).

        Filters: ``agent_id`` (``None``: any agent), ``valid`` (``None``: valid or not), ``since`` (a
        ``time.monotonic()`` value: only beats received at or after it). Raises ``TimeoutError`` after ``timeout``
        seconds.
        """

        def match() -> List[Beat]:
            return [
                b
                for b in self._beats
                if (agent_id is None or b.agent_id == agent_id)
                and (valid is None or b.valid == valid)
                and (since is None or b.t >= since)
            ]

        return self._wait(match, n, timeout, f"{n} heartbeat(s) (agent_id={agent_id!r}, valid={valid!r})")

    def wait_for_sign_ins(
        self,
        n: int,
        timeout: float = 5.0,
        *,
        agent_id: Optional[str] = None,
        step: Optional[int] = None,
        status: Optional[int] = None,
        since: Optional[float] = None,
    ) -> List[SignInRecord]:
        """Block until at least ``n`` matching sign-in attempts were recorded; return all matching ones.

        Filters: ``agent_id``, ``step`` (1 or 2), ``status`` (e.g. 200), ``since`` (monotonic time). Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """

        def match() -> List[SignInRecord]:
            return [
                r
                for r in self._sign_ins
                if (agent_id is None or r.agent_id == agent_id)
                and (step is None or r.step == step)
                and (status is None or r.status == status)
                and (since is None or r.t >= since)
            ]

        return self._wait(match, n, timeout, f"{n} sign-in(s) (agent_id={agent_id!r}, step={step!r}, "
                                             f"status={status!r})")

    def wait_for_invite_responses(
        self, n: int, timeout: float = 5.0, *, agent_id: Optional[str] = None
    ) -> List[InviteResponse]:
        """Block until at least ``n`` InviteResp datagrams (from ``agent_id``, if given) arrived; return them."""

        def match() -> List[InviteResponse]:
            return [r for r in self._invite_responses if agent_id is None or r.agent_id == agent_id]

        return self._wait(match, n, timeout, f"{n} invite response(s) (agent_id={agent_id!r})")

    def _wait(self, match: Any, n: int, timeout: float, what: str) -> List[Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = match()
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"waited {timeout} s for {what}; got {len(found)}: {found[-5:]!r}")
                self._cond.wait(remaining)

    # ------------------------------------------------------------------------------------------------ fault controls

    def restart(self, move_port: bool = False) -> None:
        """Simulate a server restart: forget every session and pending nonce, so heartbeats get NextBeat 401.

        With ``move_port=True`` the UDP socket is also closed and a new one bound on a different port: datagrams to
        the old port are refused (ICMP port unreachable), and sign-in now announces the new port. The HTTP server
        stays up on its port either way. Records (beats, sign-ins, ...) are kept.
        """
        with self._lock:
            self._sessions.clear()
            self._by_cookie.clear()
            self._nonces.clear()
            running = self._state == "running"
        if move_port and running:
            # Bound before the old socket closes, so the kernel cannot hand out the old port again.
            new_sock = self._bind_udp()

            def swap() -> None:
                old = self._udp_sock
                if old is not None:
                    self._loop.remove_reader(old)
                    old.close()
                self._install_udp(new_sock)

            self._loop.call(swap)
        logger.info("FakeACPServer restarted (move_port=%s, udp port %d)", move_port, self._udp_port)

    def announce_udp_address(self, address: Optional[Tuple[str, int]]) -> None:
        """Announce ``address`` as ``server_ip``/``port`` in sign-in replies instead of the server's own UDP socket
        (e.g. a :class:`~agentcp.testing.lossy.LossyRelay` in front of it); ``None`` restores the real one."""
        with self._lock:
            self._announce = None if address is None else (str(address[0]), int(address[1]))

    def go_silent(self) -> None:
        """Stop answering heartbeats (they are still received and recorded), as if replies were lost."""
        with self._lock:
            self._silent = True

    def resume(self) -> None:
        """Answer heartbeats again after :meth:`go_silent`."""
        with self._lock:
            self._silent = False

    def set_sign_in(self, mode: str, delay: float = 0.0) -> None:
        """Change how ``POST /sign_in`` behaves.

        - ``"ok"``: normal; if the listener was closed by ``"refuse"``, re-bind the SAME port.
        - ``"503"``: answer 503 ``{"error": ...}`` to every sign-in request (other endpoints work).
        - ``"refuse"``: close the HTTP listening socket: every HTTP connection is refused (all endpoints).
        - ``"slow"``: sleep ``delay`` seconds before answering sign-in requests (woken early by :meth:`stop`).

        Any mode but ``"refuse"`` re-opens a closed listener on the same port (``OSError`` if it was taken).
        """
        if mode not in SIGN_IN_MODES:
            raise ValueError(f"sign-in mode must be one of {SIGN_IN_MODES}, got {mode!r}")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        with self._lock:
            self._sign_in_mode = mode
            self._sign_in_delay = float(delay)
            running = self._state == "running"
        if running:
            if mode == "refuse":
                self._http.close_listener()
            else:
                self._http.listen()
        logger.info("FakeACPServer sign-in mode %s (delay %.3f s)", mode, delay)

    def set_sign_in_overrides(self, overrides: Optional[Dict[str, Any]] = None) -> None:
        """Attacker knob: fields that replace those of every successful sign-in reply (e.g. ``{"port": 1.9}`` or
        ``{"server_ip": "127.0.0.1\\x00evil"}``); ``None`` restores the normal reply."""
        with self._lock:
            self._sign_in_overrides = dict(overrides or {})

    def set_next_beat(self, ms: int, encoding: Optional[str] = None) -> None:
        """Answer valid heartbeats with NextBeat ``ms`` from now on, in ``encoding`` (unchanged if ``None``)."""
        encoding = encoding or self._encoding
        _check_next_beat(ms, encoding)
        with self._lock:
            self._next_beat_ms = int(ms)
            self._encoding = encoding

    def inject(self, datagram: bytes, to: Tuple[str, int], spoof: bool = True) -> Tuple[str, int]:
        """Send raw ``datagram`` to address ``to``; return the source address it was sent from.

        ``spoof=True``: from a throw-away socket on another port (looks like another host to a client that checks
        the source); ``spoof=False``: from the real server UDP socket.
        """
        if spoof:
            with socket.socket(self._family, socket.SOCK_DGRAM) as sock:
                sock.bind((self._host, 0))
                sock.sendto(datagram, to)
                source = sock.getsockname()
        else:
            sock = self._require_udp()
            sock.sendto(datagram, to)
            source = sock.getsockname()
        return (str(source[0]), int(source[1]))

    def send_invite(
        self,
        agent_id: str,
        inviter: str,
        session_id: str,
        invite_code: str = "CODE",
        message_server: str = "http://127.0.0.1:1",
        expire: int = 0,
    ) -> bytes:
        """Send an InviteReq (259) from the server socket to the last address ``agent_id`` beat from.

        Returns the datagram sent. Raises ``LookupError`` if the agent never sent a heartbeat.
        """
        with self._lock:
            addr = self._last_addr.get(agent_id)
            seq = next(self._seq)
        if addr is None:
            raise LookupError(f"{agent_id!r} has not sent a heartbeat, so its address is unknown")
        msg = InviteMessageReq()
        msg.header.MessageSeq = seq
        msg.InviterAgentId = inviter
        msg.InviteCode = invite_code
        msg.InviteCodeExpire = int(expire)
        msg.SessionId = session_id
        msg.MessageServer = message_server
        data = to_bytes(msg)
        self._require_udp().sendto(data, addr)
        logger.debug("invite for %s sent to %s", agent_id, addr)
        return data

    # ------------------------------------------------------------------------------------------------ HTTP routes

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``method`` requests for exactly ``path`` with ``handler`` (replaces an existing route).

        ``handler(request: HttpRequest)`` returns an ``HttpResponse`` or a ``(status, body)`` tuple (a dict/list body
        is sent as JSON) and may raise ``HttpError(status, message)`` to answer ``{"error": message}``. Handlers run
        on per-connection threads; an exception becomes a 500. Unknown paths get 404.
        """
        self._http.add_route(method, path, handler)

    def remove_route(self, method: str, path: str) -> None:
        """Remove a route (unknown routes are ignored)."""
        self._http.remove_route(method, path)

    def handle_sign_in(self, request: HttpRequest) -> HttpResponse:
        """Route handler of ``POST /sign_in`` (both steps, liveness.md §2.3/§2.6).

        Public so the same flow can be mounted elsewhere, e.g.
        ``srv.add_route("POST", "/api/accesspoint/sign_in", srv.handle_sign_in)``.
        """
        received = time.monotonic()
        try:
            body = request.json_object()
        except HttpError as exc:
            self._record_sign_in("", 0, exc.status, received, exc.message)
            raise
        agent_id = body.get("agent_id")
        agent_id = agent_id if isinstance(agent_id, str) else ""
        step = 2 if "nonce" in body else 1
        with self._lock:
            mode, delay = self._sign_in_mode, self._sign_in_delay
        if mode == "503":
            response = HttpResponse(503, {"error": "service unavailable (FakeACPServer sign-in mode 503)"})
        else:
            if mode == "slow" and delay > 0 and self._stop_event.wait(delay):
                raise HttpError(503, "server stopping")
            try:
                response = self._sign_in_step2(body) if step == 2 else self._sign_in_step1(body)
            except HttpError as exc:
                response = HttpResponse(exc.status, {"error": exc.message})
        error = response.body.get("error", "") if isinstance(response.body, dict) else ""
        self._record_sign_in(agent_id, step, response.status, received, error)
        return response

    def handle_sign_out(self, request: HttpRequest) -> HttpResponse:
        """Route handler of ``POST /sign_out {agent_id, signature}``: ends that session (401 if unknown)."""
        body = request.json_object()
        agent_id, token = _required_str(body, "agent_id"), _required_str(body, "signature")
        with self._lock:
            session = self._sessions.get(token)
            if session is None or session.agent_id != agent_id:
                raise HttpError(401, "unknown session")
            self._drop_session(session)
        logger.debug("sign_out %s", agent_id)
        return HttpResponse(200, {"result": "ok"})

    def handle_query_online_state(self, request: HttpRequest) -> HttpResponse:
        """Route handler of ``POST /query_online_state {agent_id, signature, agents}``.

        ``agents`` is a list of AIDs or a ``";"``-joined string (empty parts ignored). Needs a live session token.
        Answers ``{"data": [{"agent_id": ..., "online": bool}, ...]}`` in request order.
        """
        body = request.json_object()
        agent_id, token = _required_str(body, "agent_id"), _required_str(body, "signature")
        with self._lock:
            session = self._sessions.get(token)
        if session is None or session.agent_id != agent_id:
            raise HttpError(401, "unknown session")
        agents = body.get("agents")
        if isinstance(agents, str):
            names = [part.strip() for part in agents.split(";") if part.strip()]
        elif isinstance(agents, list) and all(isinstance(a, str) for a in agents):
            names = list(agents)
        else:
            raise HttpError(400, "agents must be a list of strings or a ';'-joined string")
        return HttpResponse(200, {"data": [{"agent_id": name, "online": self.is_online(name)} for name in names]})

    # ------------------------------------------------------------------------------------------------ sign-in steps

    def _sign_in_step1(self, body: Dict[str, Any]) -> HttpResponse:
        agent_id, request_id = _required_str(body, "agent_id"), _required_str(body, "request_id")
        nonce = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            for stale in [k for k, v in self._nonces.items() if now - v.issued > NONCE_TTL_S]:
                del self._nonces[stale]
            self._nonces[nonce] = _Nonce(agent_id, request_id, now)
        reply: Dict[str, Any] = {"nonce": nonce}
        if self._server_auth == "signed":
            reply["cert"] = self._pki.server_cert_pem
            reply["signature"] = self._pki.sign_challenge(agent_id, request_id)
        return HttpResponse(200, reply)

    def _sign_in_step2(self, body: Dict[str, Any]) -> HttpResponse:
        agent_id = _required_str(body, "agent_id")
        request_id = _required_str(body, "request_id")
        nonce = _required_str(body, "nonce")
        public_key_pem = _required_str(body, "public_key")
        cert_pem = _required_str(body, "cert")
        signature_hex = _required_str(body, "signature")

        with self._lock:
            # Consumed by any attempt, right or wrong: a nonce is single use, so a bad proof cannot be retried.
            issued = self._nonces.pop(nonce, None)
        if issued is None or time.monotonic() - issued.issued > NONCE_TTL_S:
            raise HttpError(401, "unknown, expired or already used nonce")
        if issued.agent_id != agent_id or issued.request_id != request_id:
            raise HttpError(401, "nonce was issued for another agent_id/request_id")

        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode("utf-8"))
        except ValueError as exc:
            raise HttpError(400, f"cert is not a PEM certificate: {exc}") from exc
        problem = self._pki.verify_agent_cert(cert)
        if problem is not None:
            raise HttpError(401, problem)
        common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not common_names or common_names[0].value != agent_id:
            raise HttpError(401, "certificate CN does not match agent_id")

        cert_key = cert.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey):
            raise HttpError(401, "certificate key is not an EC key")
        try:
            claimed = serialization.load_pem_public_key(public_key_pem.encode("utf-8"))
        except ValueError as exc:
            raise HttpError(400, f"public_key is not a PEM public key: {exc}") from exc
        if _spki(claimed) != _spki(cert_key):
            raise HttpError(401, "public_key does not match the certificate")
        try:
            signature = bytes.fromhex(signature_hex)
            cert_key.verify(signature, nonce.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature):
            raise HttpError(401, "nonce signature does not verify") from None

        session = Session(
            agent_id=agent_id,
            token=secrets.token_urlsafe(32),
            sign_cookie=secrets.randbelow((1 << 63) - 1) + 1,  # [1, 2^63): safe even for signed-int64 readers
            created=time.monotonic(),
        )
        with self._lock:
            for old in [s for s in self._sessions.values() if s.agent_id == agent_id]:
                self._drop_session(old)
            self._sessions[session.token] = session
            self._by_cookie[(agent_id, session.sign_cookie)] = session
            udp_host, udp_port = self._announce or (self._host, self._udp_port)
        logger.debug("sign_in %s ok", agent_id)
        reply = {"signature": session.token, "server_ip": udp_host, "port": udp_port,
                 "sign_cookie": session.sign_cookie}
        with self._lock:
            reply.update(self._sign_in_overrides)
        return HttpResponse(200, reply)

    def _drop_session(self, session: Session) -> None:
        self._sessions.pop(session.token, None)
        self._by_cookie.pop((session.agent_id, session.sign_cookie), None)

    def _record_sign_in(self, agent_id: str, step: int, status: int, t: float, error: str) -> None:
        with self._cond:
            self._sign_ins.append(SignInRecord(agent_id, step, status, t, error))
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------------ UDP

    def _bind_udp(self, port: int = 0) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.bind((self._host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _install_udp(self, sock: socket.socket) -> None:
        # Runs on the loop thread: the loop is the only owner that registers/closes the UDP socket.
        with self._lock:
            self._udp_sock = sock
            self._udp_port = int(sock.getsockname()[1])
        self._loop.add_reader(sock, self._on_udp_readable)

    def _require_udp(self) -> socket.socket:
        with self._lock:
            sock = self._udp_sock
        if sock is None:
            raise RuntimeError("FakeACPServer is not running")
        return sock

    def _on_udp_readable(self, sock: socket.socket) -> None:
        for _ in range(_UDP_BATCH):
            try:
                data, addr = sock.recvfrom(_UDP_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # e.g. ECONNREFUSED left by an ICMP error for an earlier reply: nothing to read, keep serving.
                logger.debug("udp recv: %s", exc)
                return
            self._on_datagram(sock, data, (str(addr[0]), int(addr[1])))

    def _on_datagram(self, sock: socket.socket, data: bytes, addr: Tuple[str, int]) -> None:
        try:
            msg_type = peek_message_type(data)
            if msg_type == MSG_HEARTBEAT_REQ:
                self._on_heartbeat(sock, HeartbeatMessageReq.deserialize(data)[0], addr)
            elif msg_type == MSG_INVITE_RESP:
                self._on_invite_response(InviteMessageResp.deserialize(data)[0], addr)
            else:
                logger.debug("udp: ignored message type %d from %s", msg_type, addr)
                with self._lock:
                    self._ignored += 1
        except MalformedDatagram as exc:
            logger.debug("udp: malformed datagram from %s (%s): %s", addr, exc, data[:64].hex())
            with self._lock:
                self._malformed += 1

    def _on_heartbeat(self, sock: socket.socket, req: HeartbeatMessageReq, addr: Tuple[str, int]) -> None:
        now = time.monotonic()
        with self._cond:
            valid = (req.AgentId, req.SignCookie) in self._by_cookie
            self._beats.append(Beat(req.AgentId, valid, now, addr, req.header.MessageSeq, req.SignCookie))
            self._last_addr[req.AgentId] = addr
            if valid:
                self._last_valid_beat[req.AgentId] = now
            silent, next_beat, encoding = self._silent, self._next_beat_ms, self._encoding
            self._cond.notify_all()
        if silent:
            return
        resp = HeartbeatMessageResp()
        resp.header.MessageSeq = req.header.MessageSeq  # echoed, so a client can match replies if it wants to
        resp.NextBeat = next_beat if valid else NEXT_BEAT_REAUTH
        varint = encoding == "varint"
        if varint:
            # PayloadSize = real payload length (2 for 5000), as in the varint example of liveness.md §3.11.
            resp.header.PayloadSize = len(uint64_to_varint(resp.NextBeat))
        out = io.BytesIO()
        resp.serialize(out, varint=varint)
        data = out.getvalue()
        try:
            sock.sendto(data, addr)
        except OSError as exc:
            logger.debug("udp: reply to %s failed: %s", addr, exc)

    def _on_invite_response(self, resp: InviteMessageResp, addr: Tuple[str, int]) -> None:
        record = InviteResponse(
            agent_id=resp.AgentId,
            inviter_agent_id=resp.InviterAgentId,
            session_id=resp.SessionId,
            cookie=resp.SignCookie,
            addr=addr,
            seq=resp.header.MessageSeq,
            t=time.monotonic(),
        )
        with self._cond:
            self._invite_responses.append(record)
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------------ TLS

    def _make_tls_context(self) -> ssl.SSLContext:
        self._tmpdir = tempfile.mkdtemp(prefix="fakeacp-")
        cert_path = os.path.join(self._tmpdir, "server.crt")
        key_path = os.path.join(self._tmpdir, "server.key")
        atomic_write(cert_path, self._pki.tls_cert_pem.encode("ascii"), 0o644)
        key_pem = self._pki.tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(key_path, key_pem, 0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self._tls_cert_path = cert_path
        return context


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _required_str(body: Dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"missing or empty field {name!r}")
    return value


def _check_next_beat(ms: int, encoding: str) -> None:
    if encoding not in NEXT_BEAT_ENCODINGS:
        raise ValueError(f"next_beat_encoding must be one of {NEXT_BEAT_ENCODINGS}, got {encoding!r}")
    if not isinstance(ms, int) or ms < 0 or ms >= 1 << 63:
        raise ValueError(f"next_beat_ms must be a non-negative int, got {ms!r}")
    if ms == NEXT_BEAT_REAUTH:
        logger.warning("NextBeat %d is the in-band re-auth value: clients will sign in again, not wait %d ms", ms, ms)


def _call_trust_store(function: str, pem: str) -> bool:
    """Call ``agentcp.base.server_auth.<function>(pem)`` if that module exists; return True if it was called."""
    try:
        # Imported lazily: the colleague's module may not exist yet, and the server must work without it.
        from agentcp.base import server_auth
    except ImportError:
        logger.debug("agentcp.base.server_auth not available: root CA not registered in-process")
        return False
    fn = getattr(server_auth, function, None)
    if fn is None:
        logger.debug("agentcp.base.server_auth has no %s", function)
        return False
    try:
        fn(pem)
    except Exception:
        logger.warning("agentcp.base.server_auth.%s failed", function, exc_info=True)
        return False
    return True
