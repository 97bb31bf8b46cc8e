"""The message server of :class:`~agentcp.testing.FakeACPServer`: HTTP sign-in plus the session WebSocket.

Mounted on the same host and port as the rest of the fake network (messaging.md §1.3-§1.4, §2)::

    from agentcp.testing import FakeACPServer
    from agentcp.testing.message_server import MessageServer

    with FakeACPServer() as srv:
        msg = MessageServer(srv).install()          # POST <base>/sign_in, WebSocket <base>/session
        msg.url                                     # http://127.0.0.1:PORT/message (the AP config's message_server)
        msg.drop_all()                              # fault controls: drop_all, refuse, stop_pongs, restart

It relays between connected agents: ``create_session_req`` (-> ``create_session_ack``), ``invite_agent_req``
(-> the invitee gets the UDP invite from the heartbeat server if it is heartbeat-online, else the server pushes
``invite_agent_req`` on its WebSocket; -> ``invite_agent_ack``, 404 if the invitee is nowhere), ``join_session_req``,
``leave_session_req``, ``close_session_req`` (-> ``system_message`` "Session dismissed" to the others),
``eject_agent_req``, ``get_member_list`` (-> ``get_member_list_ack`` with ``member_list``), ``session_message``
(-> delivered to every other member under the server's own sequence number as ``message_id``, whatever id the
sender chose, then ``session_message_ack`` to the sender with the sender's ``message_id``), and
``session_create_stream_req`` (-> ``session_create_stream_ack`` with push/pull URLs, served by
:class:`~agentcp.testing.stream_server.StreamServer` as ``msg.streams``).

Delivery guarantees (a model of a server that keeps session history): every session keeps a log of its messages.
A member gets messages pushed only on a connection where it joined (or created) the session; when it joins again,
``last_msg_id`` (the last server sequence number it received in that session) makes the server replay everything
after that message, and ``"0"`` replays what the server never pushed to it. So a client that re-joins after a
reconnect loses nothing, even messages that were in a socket buffer when the connection died.

:meth:`MessageServer.restart` cuts every connection and forgets every token but keeps sessions, members and their
logs (a server with a database): everything it acknowledged reaches every member once it re-joins.
``restart(forget_sessions=True)`` forgets sessions too; a ``join_session_req`` that presents the session's
identifying code then re-creates it with its former members, so nothing acknowledged afterwards is lost either.

The WebSocket side is a small RFC 6455 server written here (no dependency), so ``python -m agentcp devserver``
works without the test extras.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import queue
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from agentcp.msg.message_client import replay_key

from ._http import HttpRequest

logger = logging.getLogger("agentcp.testing.msg")

__all__ = ["MessageServer", "PREFIX"]

PREFIX = "/message"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_FRAME = 16 << 20
#: Messages kept per session for replay after a re-join.
LOG_SIZE = 20000

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_STOP = object()


def _ms() -> str:
    return str(int(time.time() * 1000))


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode("ascii")


def encode_frame(opcode: int, payload: bytes, mask: bool = False, *, fin: bool = True,
                 length: Optional[int] = None) -> bytes:
    """One WebSocket frame (server frames are unmasked; ``mask=True`` for tests acting as a client).

    Attacker knobs: ``fin=False`` starts or continues a fragmented message; ``length`` announces another payload
    length than ``len(payload)`` in the header (e.g. 2**40 with a short payload)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload) if length is None else int(length)
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if mask:
        key = secrets.token_bytes(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


class _Closed(Exception):
    pass


def _read_exact(rfile: Any, n: int) -> bytes:
    data = rfile.read(n) if n else b""
    if len(data) != n:
        raise _Closed("connection closed")
    return data


def read_frame(rfile: Any) -> Tuple[bool, int, bytes]:
    """``(fin, opcode, payload)`` of the next frame (unmasked)."""
    b1, b2 = _read_exact(rfile, 2)
    fin, opcode = bool(b1 & 0x80), b1 & 0x0F
    masked, n = bool(b2 & 0x80), b2 & 0x7F
    if n == 126:
        n = struct.unpack(">H", _read_exact(rfile, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", _read_exact(rfile, 8))[0]
    if n > _MAX_FRAME:
        raise _Closed(f"frame of {n} bytes is too large")
    key = _read_exact(rfile, 4) if masked else b""
    payload = _read_exact(rfile, n)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 64 else _unmask(payload, key)
    return fin, opcode, payload


def _unmask(payload: bytes, key: bytes) -> bytes:
    # XOR with an int of the whole repeated key: much faster than a per-byte loop for big frames.
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


class _Conn:
    """One agent's WebSocket: the reader is the HTTP connection thread; a writer thread drains ``out``."""

    _ids = itertools.count(1)

    def __init__(self, agent_id: str, sock: socket.socket) -> None:
        self.id = next(self._ids)
        self.agent_id = agent_id
        self.sock = sock
        self.out: "queue.Queue[object]" = queue.Queue()
        self.alive = True
        #: Sessions joined (or created) on this connection: only those get messages pushed.
        self.joined: Set[str] = set()
        self.opened = time.monotonic()
        self.writer = threading.Thread(target=self._write_loop, name=f"fakeacp-ws-writer-{self.id}", daemon=True)

    def send_json(self, cmd: str, data: Dict[str, Any]) -> None:
        self.send_frame(OP_TEXT, json.dumps({"cmd": cmd, "data": data}).encode("utf-8"))

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.alive:
            self.out.put(encode_frame(opcode, payload))

    def _write_loop(self) -> None:
        while True:
            item = self.out.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):  # send_raw(wait=True): everything before it was written
                item.set()
                continue
            try:
                self.sock.sendall(item)  # type: ignore[arg-type]
            except OSError:
                self.alive = False
                self.abort()
                return

    def abort(self) -> None:
        """Cut the connection (no close frame): both directions fail at once, as when a network drops."""
        self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self.alive = False
        self.out.put(_STOP)
        if self.writer.ident is not None and self.writer.is_alive() and self.writer is not threading.current_thread():
            self.writer.join(2.0)


@dataclass
class _Entry:
    seq: int
    message_id: str
    sender: str
    recipients: Tuple[str, ...]
    data: Dict[str, Any]


@dataclass
class _Session:
    session_id: str
    owner: str
    identifying_code: str
    name: str = ""
    subject: str = ""
    type: str = "public"
    members: Dict[str, str] = field(default_factory=dict)  # aid -> role ("owner" / "member")
    log: Deque[_Entry] = field(default_factory=lambda: deque(maxlen=LOG_SIZE))
    pushed_upto: Dict[str, int] = field(default_factory=dict)  # aid -> last log seq pushed to a live connection
    # (sender, sender's message id, digest of the content) -> entry: a sender's resend after a reconnect is acked
    # again but not relayed twice (senders' ids alone are not unique: 0.1.99 uses the millisecond clock).
    by_sender_key: "OrderedDict[Tuple[str, str, str, bytes], _Entry]" = field(default_factory=OrderedDict)


class MessageServer:
    """The fake message server; call :meth:`install` to mount it on a :class:`FakeACPServer`."""

    def __init__(self, server: Any, *, prefix: str = PREFIX, accept_any_issuer: bool = False,
                 server_auth: Optional[str] = None) -> None:
        from .access_point import AccessPoint

        self.server = server
        self.prefix = "/" + prefix.strip("/")
        # Sign-in is the access point's two-step flow with its own token table (never the heartbeat session's).
        self._auth = AccessPoint(server, server_auth=server_auth, accept_any_issuer=accept_any_issuer)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._conns: Dict[str, _Conn] = {}
        self._all_conns: Set[_Conn] = set()
        self._sessions: Dict[str, _Session] = {}
        # Members of sessions forgotten by restart(forget_sessions=True), restored when a session is re-created.
        self._former_members: Dict[str, Dict[str, str]] = {}
        self._known: Set[str] = set()
        self._session_ids = itertools.count(int(time.time() * 1000) * 1000)
        self._seq = itertools.count(1)
        self._refuse = False
        self._no_pongs = False
        #: How invites reach the invitee: "auto" (UDP if heartbeat-online, else WebSocket), "udp" or "ws".
        self.invite_via = "auto"
        #: Counters for tests.
        self.counters: Dict[str, int] = {
            "handshakes": 0, "rejected": 0, "refused": 0, "connections": 0, "frames_in": 0, "messages": 0,
            "delivered": 0, "replayed": 0, "pings": 0, "pongs_withheld": 0, "invites_udp": 0, "invites_ws": 0,
            "drops": 0, "joins": 0,
        }
        #: Close frames received from agents, as ``(agent_id, status code or None)``.
        self.close_codes: List[Tuple[str, Optional[int]]] = []
        #: Every command received, as ``(agent_id, cmd, data)`` (most recent 10000).
        self.received: Deque[Tuple[str, str, Dict[str, Any]]] = deque(maxlen=10000)
        from .stream_server import StreamServer

        #: The stream endpoints (push WebSocket, text and file pull), mounted by :meth:`install`.
        self.streams = StreamServer(self)

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def url(self) -> str:
        """The message server base URL (what the access point config announces as ``message_server``)."""
        return self.server.heartbeat_url + self.prefix

    def install(self) -> "MessageServer":
        """Mount ``POST <prefix>/sign_in``, ``POST <prefix>/sign_out`` and the WebSocket ``<prefix>/session``."""
        self.server.add_route("POST", f"{self.prefix}/sign_in", self._auth.handle_sign_in)
        self.server.add_route("POST", f"{self.prefix}/sign_out", self._auth.handle_sign_out)
        self.server._http.add_upgrade(f"{self.prefix}/session", self._handle_upgrade)
        self.streams.install()
        return self

    # ------------------------------------------------------------------------------------------------ fault controls
    def drop_all(self) -> int:
        """Cut every WebSocket connection at once (no close frame); returns how many were cut."""
        with self._lock:
            conns = list(self._all_conns)
            self.counters["drops"] += 1
        for conn in conns:
            conn.abort()
        logger.info("message server: dropped %d connection(s)", len(conns))
        return len(conns)

    def refuse(self, refuse: bool = True) -> None:
        """``True``: answer new WebSocket handshakes with 503 (open connections stay)."""
        with self._lock:
            self._refuse = bool(refuse)

    def stop_pongs(self, stop: bool = True) -> None:
        """``True``: ignore pings (connections look half-open: nothing comes back unless a message is relayed)."""
        with self._lock:
            self._no_pongs = bool(stop)

    def restart(self, forget_sessions: bool = False) -> None:
        """Forget every token and connection (connections are cut; old tokens get 401 at handshake).

        Sessions, members and message logs are kept, as a server with a database keeps them; with
        ``forget_sessions`` they are forgotten too, but a re-created session (a join with its identifying code) gets
        its former members back, so no message is acknowledged to a sender and then withheld from a member.
        """
        with self._lock:
            if forget_sessions:
                for sid, session in self._sessions.items():
                    self._former_members[sid] = dict(session.members)
                self._sessions.clear()
        self._auth.expire_tokens()
        self.drop_all()
        logger.info("message server restarted")

    # ------------------------------------------------------------------------------------------------ views
    def connected_agents(self) -> List[str]:
        with self._lock:
            return sorted(self._conns)

    def is_connected(self, agent_id: str) -> bool:
        with self._lock:
            return agent_id in self._conns

    def members(self, session_id: str) -> Dict[str, str]:
        """``{aid: role}`` of a session (empty if unknown)."""
        with self._lock:
            session = self._sessions.get(session_id)
            return dict(session.members) if session else {}

    def sessions(self) -> List[str]:
        with self._lock:
            return list(self._sessions)

    def messages(self, session_id: str) -> List[Dict[str, Any]]:
        """The ``data`` of every message logged in ``session_id`` (oldest first)."""
        with self._lock:
            session = self._sessions.get(session_id)
            return [dict(e.data) for e in session.log] if session else []

    def commands(self, cmd: Optional[str] = None, agent_id: Optional[str] = None) -> List[Dict[str, Any]]:
        with self._lock:
            return [d for (a, c, d) in self.received if (cmd is None or c == cmd)
                    and (agent_id is None or a == agent_id)]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Block until ``predicate()`` (evaluated under the server lock) is truthy; return it. ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s")
                self._cond.wait(left)

    def wait_connected(self, agent_id: str, timeout: float = 5.0) -> None:
        self.wait_for(lambda: agent_id in self._conns, timeout)

    def connection(self, agent_id: str) -> Any:
        """``agent_id``'s current connection (an opaque handle for :meth:`send_raw`), or None."""
        with self._lock:
            return self._conns.get(agent_id)

    def send_raw(self, agent_id: str, data: bytes, *, wait: float = 5.0, connection: Any = None) -> bool:
        """Attacker knob: write ``data`` (frames the test built with :func:`encode_frame`) to ``agent_id``'s
        connection, in order with the server's own frames (pongs go between, never inside, them). Waits up to
        ``wait`` seconds until it was written (so an endless attacker holds no more than one piece in memory).
        False if the agent is not connected (or no longer on ``connection``, when given) or the write did not
        complete in time (e.g. the agent closed)."""
        with self._lock:
            conn = self._conns.get(agent_id)
        if conn is None or not conn.alive or (connection is not None and conn is not connection):
            return False
        written = threading.Event()
        conn.out.put(data)
        conn.out.put(written)
        return written.wait(wait) and conn.alive

    def push(self, agent_id: str, cmd: str, data: Dict[str, Any]) -> bool:
        """Send an arbitrary frame to ``agent_id`` (False if it is not connected)."""
        with self._lock:
            conn = self._conns.get(agent_id)
        if conn is None:
            return False
        conn.send_json(cmd, data)
        return True

    # ------------------------------------------------------------------------------------------------ WebSocket
    def _handle_upgrade(self, request: HttpRequest, sock: socket.socket, rfile: Any) -> None:
        agent_id = (request.query.get("agent_id") or [""])[0]
        token = (request.query.get("signature") or [""])[0]
        key = request.header("sec-websocket-key") or ""
        with self._lock:
            refuse = self._refuse
        if refuse:
            with self._lock:
                self.counters["refused"] += 1
            self._http_reply(sock, 503, "message server refuses connections (fault control)")
            return
        try:
            owner = self._auth._authorised({"signature": token})
        except Exception:  # HttpError 401: unknown or expired token
            owner = None
        if owner is None or owner != agent_id:
            with self._lock:
                self.counters["rejected"] += 1
            self._http_reply(sock, 401, "unknown or expired signature")
            return
        if not key or (request.header("sec-websocket-version") or "13") != "13":
            self._http_reply(sock, 400, "bad WebSocket handshake")
            return
        accept = accept_key(key)
        conn = _Conn(agent_id, sock)
        # Registered before the 101 goes out: once the client sees "connected", fault controls reach it.
        with self._cond:
            old = self._conns.get(agent_id)
            self._conns[agent_id] = conn
            self._all_conns.add(conn)
            self._known.add(agent_id)
            self.counters["handshakes"] += 1
            self.counters["connections"] += 1
            self._cond.notify_all()
        try:
            sock.settimeout(None)  # idle WebSockets are normal; close()/drop_all() unblock the read
            # Small frames must leave at once (Nagle + delayed ACK would add ~40 ms to every round trip).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall((
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode("ascii"))
            ok = True
        except OSError:
            ok = False
        if ok:
            conn.writer.start()
        else:
            conn.alive = False
        if old is not None:
            old.abort()  # one connection per agent: the newer one wins
        logger.debug("message server: %s connected (conn %d)", agent_id, conn.id)
        try:
            if ok:
                self._serve(conn, rfile)
        finally:
            with self._cond:
                self._all_conns.discard(conn)
                if self._conns.get(agent_id) is conn:
                    del self._conns[agent_id]
                self._cond.notify_all()
            conn.finish()
            logger.debug("message server: %s disconnected (conn %d)", agent_id, conn.id)

    @staticmethod
    def _http_reply(sock: socket.socket, status: int, text: str) -> None:
        body = json.dumps({"error": text}).encode("utf-8")
        reason = {400: "Bad Request", 401: "Unauthorized", 503: "Service Unavailable"}.get(status, "Error")
        try:
            sock.sendall((f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body)
        except OSError:
            pass

    def _serve(self, conn: _Conn, rfile: Any) -> None:
        fragments: List[bytes] = []
        while conn.alive:
            try:
                fin, opcode, payload = read_frame(rfile)
            except (_Closed, OSError, ValueError):
                return
            if opcode == OP_PING:
                with self._lock:
                    self.counters["pings"] += 1
                    withhold = self._no_pongs
                    if withhold:
                        self.counters["pongs_withheld"] += 1
                if not withhold:
                    conn.send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                with self._cond:
                    self.close_codes.append((conn.agent_id, code))
                    self._cond.notify_all()
                conn.send_frame(OP_CLOSE, payload[:2])
                return
            if opcode in (OP_TEXT, OP_BINARY):
                fragments = [payload]
            elif opcode == OP_CONT:
                fragments.append(payload)
            else:
                return  # unknown opcode: protocol error, drop the connection
            if not fin:
                continue
            data, fragments = b"".join(fragments), []
            if opcode == OP_BINARY:
                continue
            try:
                frame = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                logger.debug("message server: non-JSON frame from %s ignored", conn.agent_id)
                continue
            if isinstance(frame, dict) and isinstance(frame.get("cmd"), str) and isinstance(frame.get("data"), dict):
                try:
                    self._on_command(conn, frame["cmd"], frame["data"])
                except Exception:  # a bad command must not kill the connection thread
                    logger.exception("message server: command %s from %s failed", frame.get("cmd"), conn.agent_id)

    # ------------------------------------------------------------------------------------------------ commands
    def _on_command(self, conn: _Conn, cmd: str, data: Dict[str, Any]) -> None:
        with self._cond:
            self.counters["frames_in"] += 1
            self.received.append((conn.agent_id, cmd, dict(data)))
            self._cond.notify_all()
        handler = {
            "create_session_req": self._create_session,
            "invite_agent_req": self._invite,
            "join_session_req": self._join,
            "leave_session_req": self._leave,
            "close_session_req": self._close,
            "eject_agent_req": self._eject,
            "get_member_list": self._member_list,
            "session_message": self._message,
            "session_create_stream_req": self._create_stream,
        }.get(cmd)
        if handler is None:
            logger.debug("message server: unknown cmd %r from %s ignored", cmd, conn.agent_id)
            return
        handler(conn, data)

    def _create_session(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(next(self._session_ids))
        code = secrets.token_hex(16)
        session = _Session(session_id, conn.agent_id, code, str(data.get("group_name", "")),
                           str(data.get("subject", "")), str(data.get("type", "public") or "public"))
        session.members[conn.agent_id] = "owner"
        with self._cond:
            self._sessions[session_id] = session
            conn.joined.add(session_id)
            self._cond.notify_all()
        conn.send_json("create_session_ack", {"request_id": data.get("request_id", ""), "session_id": session_id,
                                              "identifying_code": code, "status_code": 200, "message": "success"})

    def _invite(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        acceptor = str(data.get("acceptor_id", ""))
        code = str(data.get("invite_code", ""))
        ack = {"request_id": data.get("request_id", ""), "session_id": session_id, "acceptor_id": acceptor}
        with self._lock:
            session = self._sessions.get(session_id)
            allowed = session is not None and (code == session.identifying_code or conn.agent_id in session.members)
            if allowed and session is not None:
                code = session.identifying_code
                # A member from now on: messages sent before it joins wait for it (quick_send sends at once).
                session.members.setdefault(acceptor, "member")
            target = self._conns.get(acceptor)
        if not allowed:
            conn.send_json("invite_agent_ack", dict(ack, status_code=403, message="not allowed to invite"))
            return
        delivered = False
        online = getattr(self.server, "is_online", None)
        if self.invite_via != "ws" and online is not None and online(acceptor):
            with self._lock:  # counted before it is sent: the invitee may have joined before send_invite returns
                self.counters["invites_udp"] += 1
            try:
                self.server.send_invite(acceptor, conn.agent_id, session_id, invite_code=code, message_server=self.url)
                delivered = True
            except (LookupError, OSError, RuntimeError):
                delivered = False
                with self._lock:
                    self.counters["invites_udp"] -= 1
        if not delivered and target is not None and self.invite_via != "udp":
            target.send_json("invite_agent_req", {"session_id": session_id, "inviter_id": conn.agent_id,
                                                  "invite_code": code, "acceptor_id": acceptor,
                                                  "message_server": self.url})
            delivered = True
            with self._lock:
                self.counters["invites_ws"] += 1
        if delivered:
            conn.send_json("invite_agent_ack", dict(ack, status_code=200, message="ok"))
        else:
            conn.send_json("invite_agent_ack", dict(ack, status_code=404, message="invitee is not online"))

    def _join(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        code = str(data.get("invite_code", ""))
        inviter = str(data.get("inviter_agent_id", ""))
        last = str(data.get("last_msg_id", "0") or "0")
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None:
                if not code:
                    logger.debug("message server: %s joins unknown session %s without a code", conn.agent_id,
                                 session_id)
                    return
                owner = conn.agent_id if not inviter else inviter
                session = _Session(session_id, owner, code)
                session.members.update(self._former_members.pop(session_id, {}))
                session.members[owner] = "owner"
                self._sessions[session_id] = session
            elif code != session.identifying_code and conn.agent_id not in session.members:
                logger.debug("message server: %s presented a wrong code for %s", conn.agent_id, session_id)
                return
            session.members.setdefault(conn.agent_id, "owner" if conn.agent_id == session.owner else "member")
            self.counters["joins"] += 1
            replay = self._replay_entries(session, conn.agent_id, last)
            if replay:
                session.pushed_upto[conn.agent_id] = replay[-1].seq
                self.counters["replayed"] += len(replay)
            # Queued under the lock, before the connection counts as joined: live messages come after the replay.
            for entry in replay:
                conn.send_json("session_message", entry.data)
            conn.joined.add(session_id)
            self._cond.notify_all()

    @staticmethod
    def _replay_entries(session: _Session, aid: str, last: str) -> List[_Entry]:
        mine = [e for e in session.log if aid in e.recipients]
        try:
            after = int(last) if last and last != "0" else None
        except ValueError:  # not one of our sequence numbers: replay what was never pushed to it
            after = None
        if after is None:
            after = session.pushed_upto.get(aid, 0)
        return [e for e in mine if e.seq > after]

    def _leave(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        with self._cond:
            session = self._sessions.get(session_id)
            if session is not None:
                session.members.pop(conn.agent_id, None)
                if not session.members:
                    del self._sessions[session_id]
            self._cond.notify_all()

    def _close(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None or str(data.get("identifying_code", "")) != session.identifying_code:
                return
            del self._sessions[session_id]
            others = [self._conns.get(a) for a in session.members if a != conn.agent_id]
            self._cond.notify_all()
        for other in others:
            if other is not None:
                other.send_json("system_message", {"session_id": session_id, "event_type": "Session dismissed",
                                                   "timestamp": _ms()})

    def _eject(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        target = str(data.get("eject_agent_id", ""))
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None or str(data.get("identifying_code", "")) != session.identifying_code:
                return
            if target == session.owner:
                return
            session.members.pop(target, None)
            other = self._conns.get(target)
            self._cond.notify_all()
        if other is not None:
            other.send_json("system_message", {"session_id": session_id, "event_type": "Session dismissed",
                                               "timestamp": _ms()})

    def _member_list(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        with self._lock:
            session = self._sessions.get(session_id)
            members = [{"agent_id": aid, "role": role, "online": aid in self._conns}
                       for aid, role in (session.members.items() if session else [])]
        conn.send_json("get_member_list_ack", {"request_id": data.get("request_id", ""), "session_id": session_id,
                                               "status_code": 200 if session else 404, "member_list": members})

    def _message(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        message_id = str(data.get("message_id", "") or "")
        ack: Dict[str, Any] = {"session_id": session_id, "message_id": message_id, "request_id": message_id}
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None or conn.agent_id not in session.members:
                status = 404 if session is None else 403
                text = "no such session" if session is None else "not a member of the session"
                self._cond.notify_all()
                conn.send_json("session_message_ack", dict(ack, status_code=status, message=text,
                                                           offline_receivers=[]))
                return
            resend_key = None
            if message_id:
                # What identifies one message is the client's own rule (one definition): a resend, not a new
                # message reusing an id. The sender is the connection's agent, whatever the frame claims.
                resend_key = replay_key(dict(data, sender=conn.agent_id))
                earlier = session.by_sender_key.get(resend_key)
                if earlier is not None:  # the same message sent again (its ack was lost with a connection)
                    self.counters["resends"] = self.counters.get("resends", 0) + 1
                    self._cond.notify_all()
                    conn.send_json("session_message_ack", dict(ack, status_code=200, message="ok",
                                                               offline_receivers=[],
                                                               server_msg_id=str(earlier.seq)))
                    return
            seq = next(self._seq)
            if not message_id:
                message_id = str(seq)
                ack["message_id"] = ack["request_id"] = message_id
            ack["server_msg_id"] = str(seq)
            out = dict(data)
            # Relayed under the server's own sequence (as the real server does): senders' ids need not be unique
            # (0.1.99 uses the millisecond clock), and last_msg_id on a re-join refers to this sequence.
            out["message_id"] = str(seq)
            out["sender"] = conn.agent_id
            out.setdefault("request_id", "")
            out.setdefault("ref_msg_id", "")
            out.setdefault("receiver", "")
            out.setdefault("timestamp", _ms())
            named = [a for a in str(out.get("receiver", "")).replace(",", ";").split(";") if a]
            unknown = [a for a in named if a not in session.members and a not in self._known]
            recipients = tuple(a for a in session.members if a != conn.agent_id)
            entry = _Entry(seq, message_id, conn.agent_id, recipients, out)
            session.log.append(entry)
            if resend_key is not None:
                session.by_sender_key[resend_key] = entry
                if len(session.by_sender_key) > LOG_SIZE:
                    session.by_sender_key.popitem(last=False)
            targets = []
            for aid in recipients:
                target = self._conns.get(aid)
                if target is not None and session_id in target.joined:
                    targets.append(target)
                    session.pushed_upto[aid] = entry.seq
                    target.send_json("session_message", out)  # under the lock: per-session order holds
            self.counters["messages"] += 1
            self.counters["delivered"] += len(targets)
            self._cond.notify_all()
        if unknown:
            conn.send_json("session_message_ack", dict(ack, status_code=404, message="receiver offline",
                                                       offline_receivers=unknown))
        else:
            conn.send_json("session_message_ack", dict(ack, status_code=200, message="ok", offline_receivers=[]))

    def _create_stream(self, conn: _Conn, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id", ""))
        with self._lock:
            known = session_id in self._sessions
        request_id = data.get("request_id", "")
        if not known:
            conn.send_json("session_create_stream_ack", {"request_id": request_id, "session_id": session_id,
                                                         "error": "no such session"})
            return
        message_id = str(next(self._seq))
        receivers = [a for a in str(data.get("receiver", "")).replace(";", ",").split(",") if a]
        self.streams.register(session_id, message_id, conn.agent_id, receivers,
                              str(data.get("content_type", "") or "text/event-stream"))
        conn.send_json("session_create_stream_ack", {
            "request_id": request_id, "session_id": session_id, "message_id": message_id,
            "push_url": self.streams.push_url(session_id, message_id),
            "pull_url": self.streams.pull_url(session_id, message_id),
        })
