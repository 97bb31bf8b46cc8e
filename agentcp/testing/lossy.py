"""A lossy network path in user space: a UDP and TCP relay that drops and delays traffic, seeded.

Machines without ``tc netem`` (or without the privileges for it) can still test how an agent behaves on a bad
network. :class:`LossyRelay` sits between client and server on loopback:

- UDP: every datagram, in either direction, is dropped with probability ``loss_up`` (client to server) or
  ``loss_down`` (server to client), and otherwise delivered after a one-way delay drawn uniformly from
  ``[delay - jitter, delay + jitter]`` (so datagrams may be reordered, as on a real path). Each client address
  gets its own upstream socket, so the server sees one source address per client, as through a NAT.
- TCP (for HTTP sign-in): a byte stream cannot lose bytes, so loss is emulated the way TCP experiences it: each
  chunk (and the connection set-up) is "retransmitted" once per loss draw, after a retransmission timeout (set-up:
  1 s, 2 s, 4 s ... as Linux retries a SYN; data: ``max(0.2, 4 * delay)`` s doubling), on top of the one-way delay.
  Order is kept. Note: the client's ``connect()`` itself completes at once (the relay accepts locally); the emulated
  set-up delay shows as a slow first response instead.
- :meth:`LossyRelay.blackout`: total loss. Datagrams are dropped; TCP connections are accepted but nothing is
  forwarded until the blackout ends (then held bytes flow again, like retransmissions after an outage).

All random draws come from one ``random.Random(seed)`` on the relay's thread. With :class:`FakeACPServer`, use
:meth:`LossyRelay.for_server`: it points the relay at the server and makes the server announce the relay's UDP
address in sign-in replies, so clients signing in at :attr:`LossyRelay.url` beat through the relay::

    with FakeACPServer() as server, LossyRelay.for_server(server, loss=0.2, delay=0.03, jitter=0.02, seed=1) as path:
        client = HeartbeatClient(aid, path.url, certs, seed)
        ...
        path.blackout()          # total loss
        path.blackout(False)     # back
        path.stats()             # counters: forwarded / dropped datagrams, TCP connections (during blackouts)
"""
from __future__ import annotations

import functools
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

logger = logging.getLogger("agentcp.testing.lossy")

__all__ = ["LossyRelay"]

Address = Tuple[str, int]

#: Distinct client addresses the UDP side keeps an upstream socket for (least recently used ones are dropped).
MAX_UDP_CLIENTS = 4096
_RECV = 65535
_BATCH = 64


class _Pipe:
    """One direction of a relayed TCP connection: bytes waiting for their release time, in order."""

    __slots__ = ("dst", "queue", "last_release", "eof_sent")

    def __init__(self, dst: socket.socket) -> None:
        self.dst = dst
        self.queue: Deque[Tuple[Optional[float], Optional[bytes]]] = deque()  # (release time, data; None = EOF)
        self.last_release = 0.0
        self.eof_sent = False


class _Conn:
    __slots__ = ("client", "server", "up", "down", "opened", "closed", "pending_connect")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: Optional[socket.socket] = None
        self.up: Optional[_Pipe] = None
        self.down: Optional[_Pipe] = None
        self.opened = time.monotonic()
        self.closed = False
        self.pending_connect = True


class LossyRelay:
    """Relays UDP to ``udp_target`` and TCP to ``tcp_target`` through a lossy, delaying path. See the module doc."""

    def __init__(
        self,
        udp_target: Optional[Address] = None,
        tcp_target: Optional[Address] = None,
        *,
        loss: float = 0.0,
        loss_up: Optional[float] = None,
        loss_down: Optional[float] = None,
        delay: float = 0.0,
        jitter: float = 0.0,
        seed: Optional[int] = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._host = host
        self._udp_target = udp_target
        self._tcp_target = tcp_target
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loss_up = self._loss_down = 0.0
        self._delay = self._jitter = 0.0
        self.set(loss=loss, loss_up=loss_up, loss_down=loss_down, delay=delay, jitter=jitter)
        self._blackout = False
        self._counters: Dict[str, int] = dict.fromkeys(
            ("udp_up", "udp_up_dropped", "udp_down", "udp_down_dropped", "udp_errors", "tcp_connections",
             "tcp_connections_in_blackout", "tcp_chunks", "tcp_retransmits", "tcp_errors"), 0)
        self.connection_times: List[float] = []  # monotonic time of every accepted TCP connection
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: Deque[Callable[[], None]] = deque()
        self._udp_front: Optional[socket.socket] = None
        self._udp_back: Dict[Address, socket.socket] = {}  # client address -> upstream socket (insertion = LRU)
        self._tcp_listener: Optional[socket.socket] = None
        self._conns: List[_Conn] = []
        self._held: List[_Pipe] = []  # pipes with bytes held by a blackout
        self._held_connects: List[_Conn] = []  # connections accepted in a blackout, not yet relayed

    # ------------------------------------------------------------------------------------------------ set-up

    @classmethod
    def for_server(cls, server: Any, **options: Any) -> "LossyRelay":
        """Start a relay in front of a running :class:`~agentcp.testing.FakeACPServer` and make the server announce
        the relay's UDP address at sign-in. Sign in at :attr:`url`. Stopping the relay restores the announcement."""
        relay = cls(server.udp_address, ("127.0.0.1", server.http_port), **options)
        relay.start()
        server.announce_udp_address(relay.udp_address)
        relay._on_stop = lambda: server.announce_udp_address(None)
        return relay

    _on_stop: Optional[Callable[[], None]] = None

    def start(self) -> "LossyRelay":
        if self._thread is not None:
            return self
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        if self._udp_target is not None:
            self._udp_front = socket.socket(family, socket.SOCK_DGRAM)
            self._udp_front.bind((self._host, 0))
            self._udp_front.setblocking(False)
            self._selector.register(self._udp_front, selectors.EVENT_READ, ("udp_front", None))
        if self._tcp_target is not None:
            self._tcp_listener = socket.socket(family, socket.SOCK_STREAM)
            self._tcp_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._tcp_listener.bind((self._host, 0))
            self._tcp_listener.listen(512)
            self._tcp_listener.setblocking(False)
            self._selector.register(self._tcp_listener, selectors.EVENT_READ, ("accept", None))
        self._thread = threading.Thread(target=self._run, name="agentcp-lossy-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket and join the relay thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._poke()
        thread.join()
        self._thread = None
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None

    def __enter__(self) -> "LossyRelay":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------ controls

    @property
    def udp_address(self) -> Address:
        """Where clients send their datagrams."""
        if self._udp_front is None:
            raise RuntimeError("the relay has no UDP side (no udp_target) or is not started")
        host, port = self._udp_front.getsockname()[:2]
        return (str(host), int(port))

    @property
    def tcp_address(self) -> Address:
        if self._tcp_listener is None:
            raise RuntimeError("the relay has no TCP side (no tcp_target) or is not started")
        host, port = self._tcp_listener.getsockname()[:2]
        return (str(host), int(port))

    @property
    def url(self) -> str:
        """``http://host:port`` of the TCP side (e.g. a heartbeat server URL to sign in through the path)."""
        host, port = self.tcp_address
        return f"http://{host}:{port}"

    def set(self, *, loss: Optional[float] = None, loss_up: Optional[float] = None,
            loss_down: Optional[float] = None, delay: Optional[float] = None, jitter: Optional[float] = None) -> None:
        """Change the path: ``loss`` sets both directions; ``loss_up`` / ``loss_down`` one each (0..1);
        ``delay`` the one-way mean delay and ``jitter`` its spread (seconds)."""
        with self._lock:
            if loss is not None:
                self._loss_up = self._loss_down = _probability(loss)
            if loss_up is not None:
                self._loss_up = _probability(loss_up)
            if loss_down is not None:
                self._loss_down = _probability(loss_down)
            if delay is not None:
                if delay < 0:
                    raise ValueError("delay must be >= 0")
                self._delay = float(delay)
            if jitter is not None:
                if jitter < 0:
                    raise ValueError("jitter must be >= 0")
                self._jitter = float(jitter)

    def blackout(self, on: bool = True) -> None:
        """Total loss from now on (``on=True``) or until now (``on=False``)."""
        with self._lock:
            self._blackout = bool(on)
        if not on:
            self._call(self._release_held)
        logger.info("lossy relay: blackout %s", "on" if on else "off")

    @property
    def blacked_out(self) -> bool:
        return self._blackout

    def set_udp_target(self, target: Address) -> None:
        """Relay UDP to a new server address from now on (existing client mappings are re-aimed)."""
        def swap() -> None:
            self._udp_target = target
            for back in list(self._udp_back.values()):
                self._close_back(back)
            self._udp_back.clear()
        self._call(swap)

    def stats(self) -> Dict[str, int]:
        """Counters: datagrams forwarded / dropped each way, TCP connections (and those opened in a blackout)."""
        with self._lock:
            return dict(self._counters)

    # ------------------------------------------------------------------------------------------------ loop

    def _call(self, fn: Callable[[], None]) -> None:
        if self._thread is None:
            fn()
            return
        with self._lock:
            self._calls.append(fn)
        self._poke()

    def _poke(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:
            pass  # pipe full (already poked) or closing

    def _later(self, at: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (at, next(self._seq), fn))

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _sample_delay(self) -> float:
        with self._lock:
            delay, jitter = self._delay, self._jitter
        if jitter <= 0:
            return delay
        return max(0.0, delay + jitter * (2 * self._rng.random() - 1))

    def _lost(self, up: bool) -> bool:
        with self._lock:
            if self._blackout:
                return True
            p = self._loss_up if up else self._loss_down
        return p > 0 and self._rng.random() < p

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, _mask in self._selector.select(timeout):
                    kind, data = key.data
                    try:
                        self._on_readable(kind, key.fileobj, data)
                    except OSError as exc:  # one broken socket must not stop the relay
                        self._count("tcp_errors" if kind.startswith("tcp") or kind == "accept" else "udp_errors")
                        logger.debug("lossy relay: %s failed: %s", kind, exc)
                with self._lock:
                    calls, self._calls = self._calls, deque()
                for fn in calls:
                    fn()
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, fn = heapq.heappop(self._timers)
                    try:
                        fn()
                    except OSError as exc:
                        self._count("tcp_errors")
                        logger.debug("lossy relay: delivery failed: %s", exc)
        finally:
            self._close_all()

    def _on_readable(self, kind: str, sock: Any, data: Any) -> None:
        if kind == "wake":
            try:
                while sock.recv(512):
                    pass
            except (BlockingIOError, OSError):
                pass
        elif kind == "udp_front":
            self._udp_from_client(sock)
        elif kind == "udp_back":
            self._udp_from_server(sock, data)
        elif kind == "accept":
            self._accept(sock)
        elif kind == "tcp":
            conn, upward = data
            self._tcp_readable(conn, upward)

    # -- UDP ----------------------------------------------------------------------------------------------------

    def _udp_from_client(self, front: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                data, addr = front.recvfrom(_RECV)
            except BlockingIOError:
                return
            except OSError:
                self._count("udp_errors")
                return
            client = (str(addr[0]), int(addr[1]))
            if self._lost(up=True):
                self._count("udp_up_dropped")
                continue
            self._count("udp_up")
            back = self._back_for(client)
            if back is not None:
                self._later(time.monotonic() + self._sample_delay(), functools.partial(self._send_back, back, data))

    def _back_for(self, client: Address) -> Optional[socket.socket]:
        back = self._udp_back.pop(client, None)
        if back is None:
            if len(self._udp_back) >= MAX_UDP_CLIENTS:
                oldest = next(iter(self._udp_back))
                self._close_back(self._udp_back.pop(oldest))
            back = socket.socket(self._udp_front.family, socket.SOCK_DGRAM)  # type: ignore[union-attr]
            try:
                back.bind((self._host, 0))
                back.connect(self._udp_target)  # type: ignore[arg-type]
                back.setblocking(False)
            except OSError:
                back.close()
                self._count("udp_errors")
                return None
            self._selector.register(back, selectors.EVENT_READ, ("udp_back", client))  # type: ignore[union-attr]
        self._udp_back[client] = back  # re-inserted: most recently used last
        return back

    def _send_back(self, back: socket.socket, data: bytes) -> None:
        if back.fileno() < 0:
            return
        try:
            back.send(data)
        except OSError:
            self._count("udp_errors")  # e.g. the server's port is closed (ICMP); a real path would lose it too

    def _udp_from_server(self, back: socket.socket, client: Address) -> None:
        for _ in range(_BATCH):
            try:
                data = back.recv(_RECV)
            except BlockingIOError:
                return
            except OSError:
                self._count("udp_errors")
                return
            if self._lost(up=False):
                self._count("udp_down_dropped")
                continue
            self._count("udp_down")
            self._later(time.monotonic() + self._sample_delay(), functools.partial(self._send_front, data, client))

    def _send_front(self, data: bytes, client: Address) -> None:
        if self._udp_front is None:
            return
        try:
            self._udp_front.sendto(data, client)
        except OSError:
            self._count("udp_errors")

    def _close_back(self, back: socket.socket) -> None:
        try:
            self._selector.unregister(back)  # type: ignore[union-attr]
        except (KeyError, ValueError):
            pass
        back.close()

    # -- TCP ----------------------------------------------------------------------------------------------------

    def _transit(self, up: bool, first_rto: float, now: float) -> float:
        """One-way time of a segment: delay, plus one retransmission timeout per loss draw (doubling)."""
        extra, rto = 0.0, first_rto
        for _ in range(6):
            if self._blackout or not self._lost(up):
                break  # in a blackout the segment is held instead (see _tcp_readable, _connect_upstream)
            self._count("tcp_retransmits")
            extra += rto
            rto *= 2
        return now + extra + self._sample_delay()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                client, _addr = listener.accept()
            except BlockingIOError:
                return
            now = time.monotonic()
            conn = _Conn(client)
            self._conns.append(conn)
            self.connection_times.append(now)
            self._count("tcp_connections")
            if self._blackout:
                self._count("tcp_connections_in_blackout")
            client.setblocking(True)
            client.settimeout(2.0)
            # Set-up: the SYN up and the SYN-ACK down may each be lost (retried after 1 s, 2 s, ...).
            at = max(self._transit(True, 1.0, now), self._transit(False, 1.0, now))
            self._later(at, functools.partial(self._connect_upstream, conn))

    def _connect_upstream(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if self._blackout:
            self._held_connects.append(conn)  # set up when the blackout ends (_release_held)
            return
        try:
            server = socket.create_connection(self._tcp_target, timeout=2.0)  # type: ignore[arg-type]
        except OSError:
            self._count("tcp_errors")
            self._close_conn(conn)
            return
        conn.server = server
        conn.pending_connect = False
        conn.up = _Pipe(server)
        conn.down = _Pipe(conn.client)
        self._selector.register(conn.client, selectors.EVENT_READ, ("tcp", (conn, True)))  # type: ignore[union-attr]
        self._selector.register(server, selectors.EVENT_READ, ("tcp", (conn, False)))  # type: ignore[union-attr]

    def _tcp_readable(self, conn: _Conn, upward: bool) -> None:
        src = conn.client if upward else conn.server
        pipe = conn.up if upward else conn.down
        if conn.closed or src is None or pipe is None:
            return
        try:
            data = src.recv(_RECV)
        except OSError:
            data = b""
        if not data:
            try:
                self._selector.unregister(src)  # type: ignore[union-attr]
            except (KeyError, ValueError):
                pass
        self._count("tcp_chunks")
        now = time.monotonic()
        with self._lock:
            rto = max(0.2, 4 * self._delay)
        release: Optional[float] = None if self._blackout else max(pipe.last_release,
                                                                     self._transit(upward, rto, now))
        if release is not None:
            pipe.last_release = release
            self._later(release, lambda: self._flush(conn, pipe))
        elif pipe not in self._held:
            self._held.append(pipe)
        pipe.queue.append((release, data or None))

    def _flush(self, conn: _Conn, pipe: _Pipe) -> None:
        now = time.monotonic()
        while pipe.queue and pipe.queue[0][0] is not None and pipe.queue[0][0] <= now:
            _, data = pipe.queue.popleft()
            if conn.closed:
                return
            try:
                if data is None:
                    pipe.dst.shutdown(socket.SHUT_WR)
                    pipe.eof_sent = True
                else:
                    pipe.dst.sendall(data)
            except OSError:
                self._close_conn(conn)
                return
        if conn.up is not None and conn.down is not None and conn.up.eof_sent and conn.down.eof_sent:
            self._close_conn(conn)

    def _release_held(self) -> None:
        now = time.monotonic()
        connects, self._held_connects = self._held_connects, []
        for conn in connects:
            self._later(now + self._sample_delay(), functools.partial(self._connect_upstream, conn))
        held, self._held = self._held, []
        for pipe in held:
            owner = next((c for c in self._conns if c.up is pipe or c.down is pipe), None)
            if owner is None or owner.closed:
                continue
            release = max(pipe.last_release, now + self._sample_delay())
            pipe.last_release = release
            pipe.queue = deque((release if at is None else at, data) for at, data in pipe.queue)
            self._later(release, functools.partial(self._flush, owner, pipe))

    def _close_conn(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.server):
            if sock is None:
                continue
            try:
                self._selector.unregister(sock)  # type: ignore[union-attr]
            except (KeyError, ValueError):
                pass
            sock.close()
        self._conns.remove(conn)

    def _close_all(self) -> None:
        for conn in list(self._conns):
            self._close_conn(conn)
        for back in list(self._udp_back.values()):
            self._close_back(back)
        self._udp_back.clear()
        for sock in (self._udp_front, self._tcp_listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp_front = self._tcp_listener = self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None


def _probability(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a loss probability must be within [0, 1], got {value}")
    return value
