"""Sessions on the message server: create, invite, join, leave, close, members, messages, streams.

Drop-in for 0.1.99's ``agentcp.msg.session_manager`` (``Session``, ``SessionManager``; api.md §8.3), with the
defects of messaging.md §7 fixed:

* No lock is held across a network wait: a command is handed to the :class:`MessageClient` (which never blocks on
  a connect), then the caller waits for its ack on a per-request future.
* Every session this agent belongs to is re-joined after **every** reconnect, before queued messages go out
  (owner re-join with the identifying code; invited sessions with their invite). ``last_msg_id`` carries the last
  message received in the session, so a server that keeps history can replay what was missed.
* ``send_msg`` returns a :class:`~agentcp.msg.message_client.SendResult` (delivered / sent / queued / failed)
  instead of always True.
* Invites arrive from the heartbeat (UDP ``InviteMessageReq``) or, on newer servers, as ``invite_agent_req`` on the
  WebSocket; both join the session.
* The owner's close sends ``close_session_req``; eject names the target; the member list is requested and its
  answer handled; a frame without ``session_id`` is ignored instead of raising.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from agentcp.base.limits import LimitExceeded
from agentcp.base.trust import UntrustedHostError
from agentcp.msg.message_client import (
    ConnectionState,
    MessageClient,
    MessageClientConfig,
    SendResult,
    SendStatus,
    Ticket,
    reply_key,
)

log = logging.getLogger("agentcp.msg")

__all__ = ["Session", "SessionManager", "encode_message", "decode_message", "to_plain"]

_MEMBER_LIST_CMDS = ("get_member_list_ack", "get_member_list_resp", "member_list")


def _ms() -> int:
    return int(time.time() * 1000)


_LEAVES = frozenset({str, int, float, bool})


def to_plain(obj: Any) -> Any:
    """A JSON-serialisable copy of a block/instruction: dataclasses (also nested) become dicts."""
    kind = type(obj)
    if obj is None or kind in _LEAVES:  # most of a block: answered before the dataclass check
        return obj
    if kind is dict:  # exactly dict (a subclass may be a dataclass too): the usual block
        return {k: to_plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in obj.__dict__.items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "to_json") and callable(obj.to_json):  # OpenAIMessage
        try:
            return json.loads(obj.to_json())
        except (TypeError, ValueError):
            return str(obj)
    return obj


# urllib.parse.quote(text, safe="/") as one table lookup per UTF-8 byte (its own per-call quoter costs about twice
# as much on the send path): unreserved characters and "/" stay, every other byte becomes %XX.
_UNQUOTED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/")
_QUOTED = tuple(chr(b) if b in _UNQUOTED else f"%{b:02X}" for b in range(256))


def quote_slash_safe(text: str) -> str:
    """Exactly ``urllib.parse.quote(text, safe="/")``."""
    return "".join(map(_QUOTED.__getitem__, text.encode("utf-8")))


def encode_message(blocks: List[Any]) -> str:
    """``data.message`` on the wire: default-settings JSON of the block list, percent-encoded (messaging.md §3.1)."""
    return quote_slash_safe(json.dumps(to_plain(blocks)))


def decode_message(text: Any) -> Any:
    """Plain percent-decoding (``+`` stays ``+``); non-strings are returned unchanged."""
    return urllib.parse.unquote(text) if isinstance(text, str) else text


class _Waiter:
    """One pending request: completed by the reader thread, awaited by the caller (no lock held meanwhile)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: Optional[Dict[str, Any]] = None

    def set(self, data: Dict[str, Any]) -> None:
        self.data = data
        self.event.set()

    def wait(self, timeout: float) -> Optional[Dict[str, Any]]:
        return self.data if self.event.wait(timeout) else None


class Session:
    """One chat session (``Session(agent_id, message_client)``)."""

    def __init__(self, agent_id: str, message_client: MessageClient) -> None:
        self.agent_id = agent_id
        self.message_client = message_client
        self.session_id = ""
        self.identifying_code = ""
        self.invite_message: Any = None
        self.stream_client_map: Dict[str, Any] = {}
        self.name = ""
        self.subject = ""
        self.type = "public"
        #: The last message id received in this session (sent as ``last_msg_id`` when re-joining). With
        #: ``SessionManager.confirm_handled`` it is the last one *handled*, so a re-join asks the server again for
        #: messages that were read from the socket but never reached a handler (e.g. dropped by ``offline()``).
        self.last_msg_id = "0"
        #: Members this agent knows of (invited, seen sending, or from the last member list).
        self.members: List[str] = []
        self.joined = False
        self.manager: Optional["SessionManager"] = None

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, owner={bool(self.identifying_code)})"

    # -- 0.1.99 API ---------------------------------------------------------------------------------------------
    def can_invite_member(self) -> bool:
        return bool(self.identifying_code) or self.invite_message is not None

    def set_session_id(self, session_id: str) -> None:
        self.session_id = session_id

    def _send(self, cmd: str, data: Dict[str, Any]) -> Ticket:
        return self.message_client.send({"cmd": cmd, "data": data})

    def close_session(self) -> None:
        """The owner dismisses the session (``close_session_req``); a member leaves it (``leave_session_req``)."""
        if self.identifying_code:
            self._send("close_session_req", {"session_id": self.session_id, "request_id": str(_ms()),
                                             "identifying_code": self.identifying_code})
        else:
            self._send("leave_session_req", {"session_id": self.session_id, "request_id": str(_ms())})

    def leave(self) -> None:
        self._send("leave_session_req", {"session_id": self.session_id, "request_id": str(_ms())})

    def _join_frame(self) -> Optional[Dict[str, Any]]:
        invite = self.invite_message
        if invite is not None:
            inviter, code = getattr(invite, "InviterAgentId", ""), getattr(invite, "InviteCode", "")
        elif self.identifying_code:
            inviter, code = "", self.identifying_code
        else:
            return None
        return {"cmd": "join_session_req", "data": {
            "session_id": self.session_id, "request_id": str(_ms()), "inviter_agent_id": inviter,
            "invite_code": code, "last_msg_id": self.last_msg_id or "0"}}

    def accept_invite(self, invite_req: Any) -> None:
        """Join the session of ``invite_req`` (an ``InviteMessageReq``) and remember the invite for re-joins."""
        self.invite_message = invite_req
        frame = self._join_frame()
        if frame is not None:
            self.message_client.send(frame)
            self.joined = True

    def reject_invite(self, invite_req: Any) -> None:
        """0.1.99 no-op (the protocol has no reject command)."""

    def leave_session(self, session_id: str) -> None:
        """0.1.99 no-op; use :meth:`SessionManager.leave_session`."""

    def invite_member(self, acceptor_aid: str) -> bool:
        """Send ``invite_agent_req`` for ``acceptor_aid``; False if the invite could not even be queued."""
        code = self.identifying_code or (getattr(self.invite_message, "InviteCode", "") if self.invite_message else "")
        ticket = self._send("invite_agent_req", {"session_id": self.session_id, "request_id": uuid.uuid4().hex,
                                                 "inviter_id": self.agent_id, "acceptor_id": acceptor_aid,
                                                 "invite_code": code})
        if acceptor_aid not in self.members:
            self.members.append(acceptor_aid)
        return ticket.status is not SendStatus.FAILED

    def eject_member(self, eject_aid: str) -> bool:
        if not self.identifying_code:
            return False
        ticket = self._send("eject_agent_req", {"session_id": self.session_id, "request_id": str(_ms()),
                                                "eject_agent_id": eject_aid,  # 0.1.99 sent its own AID here
                                                "identifying_code": self.identifying_code})
        return ticket.status is not SendStatus.FAILED

    def get_member_list(self) -> bool:
        ticket = self._send("get_member_list", {"session_id": self.session_id, "request_id": str(_ms())})
        return ticket.status is not SendStatus.FAILED

    def send_msg(self, msg: list, receiver: str, ref_msg_id: str = "", message_id: str = "",
                 agent_cmd_block: Any = None, *, wait_ack: Optional[float] = None) -> Optional[SendResult]:
        """Send a ``session_message``; None for an empty block list with no instruction (nothing is sent).

        Waits up to ``wait_ack`` seconds (default: the client's ``ack_timeout``) for the server's ack while
        connected; a queued message returns at once with status QUEUED.
        """
        if not msg and agent_cmd_block is None:
            log.warning("session %s: empty message not sent", self.session_id)
            return None
        manager = self.manager
        message_id = message_id or (manager.next_message_id() if manager else str(_ms()))
        data = {
            "message_id": message_id,
            "session_id": self.session_id,
            "ref_msg_id": ref_msg_id or "",
            "sender": self.agent_id,
            "instruction": to_plain(agent_cmd_block) if agent_cmd_block is not None else None,
            "receiver": receiver,
            "message": encode_message(list(msg or [])),
            "timestamp": str(_ms()),
        }
        ticket = self.message_client.send({"cmd": "session_message", "data": data}, ack_key=message_id,
                                          message_id=message_id, session_id=self.session_id)
        client = self.message_client
        wait = client.config.ack_timeout if wait_ack is None else wait_ack
        # While connected the message is on its way (the reactor writes it); while disconnected it waits in the
        # outbox and the result says 'queued' at once (no wait on a connect).
        if (wait > 0 and not ticket.done and client.acks_expected
                and getattr(client, "connection_state", None) is ConnectionState.CONNECTED):
            if not ticket.wait(wait) and ticket.status is SendStatus.SENT:
                client.note_ack_timeout()
        return ticket.result()

    def on_open(self, ws: Any = None) -> None:
        """Re-join after a (re)connect: through ``ws.send`` (ahead of the outbox) when given."""
        frame = self._join_frame()
        if frame is None:
            return
        if ws is not None and hasattr(ws, "send"):
            ws.send(json.dumps(frame))
        else:
            self.message_client.send(frame)
        self.joined = True

    def owner_rejoin(self) -> None:
        if self.identifying_code:
            self.on_open()

    # -- streams ------------------------------------------------------------------------------------------------
    async def create_stream(self, to_aid_list: List[str], content_type: str = "text/event-stream",
                            ref_msg_id: str = "") -> Tuple[Optional[str], Optional[str]]:
        """Ask the server for a stream: ``(push_url, pull_url)`` or ``(None, reason)``. Waits without blocking
        the event loop."""
        manager = self.manager
        if manager is None:
            return None, "session is not managed"
        return await manager.create_stream(self.session_id, to_aid_list, content_type, ref_msg_id)

    def send_chunk_to_stream(self, stream_url: str, chunk: Any, type: str = "text/event-stream") -> Any:
        """Queue one text chunk on the stream pushed at ``stream_url``: a ``SendResult``; False if unknown."""
        client = self.stream_client_map.get(stream_url)
        if client is None:
            return False
        return client.send_chunk_to_stream(chunk, type)

    def send_file_chunk_to_stream(self, stream_url: str, offset: int, chunk: bytes) -> Any:
        """Queue one file chunk (waits while the window is full): a ``SendResult``; False if the URL is unknown."""
        client = self.stream_client_map.get(stream_url)
        if client is None:
            return False
        return client.send_chunk_to_file_stream(offset, chunk)

    def close_stream(self, stream_url: str) -> bool:
        """Close the stream and join its threads: True if the server confirmed every chunk; False if unknown."""
        client = self.stream_client_map.pop(stream_url, None)
        if client is None:
            return False
        return bool(client.close_stream(stream_url))

    def stop_streams(self) -> None:
        """Stop every open stream at once (pending chunks are reported as failed) and join its threads."""
        clients = list(self.stream_client_map.values())
        self.stream_client_map.clear()
        for client in clients:
            client.stop_websocket_client()


class SessionManager:
    """All sessions of one agent, over one :class:`MessageClient` per message server.

    Callbacks (``set_on_*``) run on the message client's reader thread: they must return quickly (AgentID queues
    the work for its dispatcher).
    """

    #: Seconds ``create_session`` waits for ``create_session_ack`` (0.1.99: 3 s; a queued request needs longer).
    CREATE_TIMEOUT: float = 10.0
    MEMBER_LIST_TIMEOUT: float = 5.0
    STREAM_TIMEOUT: float = 5.0
    #: Settings of the stream push sockets (None: defaults).
    stream_config: Any = None
    #: The class of the sessions this manager creates (the 0.1.99 ``Group``/legacy ``Session`` adapters subclass
    #: :class:`Session`).
    session_class: type = Session
    #: True: ``Session.last_msg_id`` advances only through :meth:`handled` (the consumer confirms each message it
    #: handled), not when a message is read from the socket. AgentID sets it.
    confirm_handled: bool = False
    #: ``trust_check(url, purpose) -> bool``: may a sign-in proof or token go to ``url`` (trust.md rule 1)? False
    #: means refused (the callee counted and logged it). None: every URL is accepted, as in 0.1.99. AgentID sets it.
    trust_check: Optional[Callable[[str, str], bool]] = None
    #: Message clients (distinct message servers, the default one included) at most; None: unbounded (0.1.99).
    max_clients: Optional[int] = None
    #: Called with the :class:`LimitExceeded` of an invite refused by ``max_clients`` (AgentID counts it).
    on_limit: Optional[Callable[[LimitExceeded], Any]] = None

    def __init__(self, agent_id: str, server_url: str, aid_path: str, seed_password: str, db_mananger: Any = None,
                 *, config: Optional[MessageClientConfig] = None) -> None:
        self.agent_id = agent_id
        self.server_url = (server_url or "").rstrip("/")
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.db_mananger = db_mananger
        self.config = config or MessageClientConfig()
        #: Extra keyword arguments of every MessageClient (AgentID: ``limits``, ``on_limit``, ``backpressure``).
        self.client_options: Dict[str, Any] = {}
        #: Extra keyword arguments of every StreamClient (AgentID: ``limits``, ``on_limit``).
        self.stream_options: Dict[str, Any] = {}
        self.lock = threading.RLock()
        self.sessions: Dict[str, Session] = {}
        self.message_client_map: Dict[str, MessageClient] = {}
        self.on_message_receive: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.on_invite_ack: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.on_session_message_ack: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.on_system_message: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.on_member_list_receive: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.on_invite: Optional[Callable[[Session], Any]] = None
        self._waiters: Dict[Tuple[str, str], _Waiter] = {}
        self._ids = itertools.count()
        self._last_id = 0
        self._id_lock = threading.Lock()
        self._stopped = False
        #: Sessions this agent left, closed or saw dismissed: never restored from the history on demand. AgentID
        #: hands the set on to the next SessionManager (offline/online).
        self.forgotten: Set[str] = set()

    # -- clients ------------------------------------------------------------------------------------------------
    def _client(self, server_url: Optional[str] = None, purpose: str = "message server") -> MessageClient:
        """The client of ``server_url`` (default: this manager's server), created and started on first use.

        A client for another server signs in there, so it is created only for a trusted URL (``trust_check``,
        else :class:`UntrustedHostError`) and only while fewer than ``max_clients`` exist (else
        :class:`LimitExceeded`, reported through ``on_limit``).
        """
        url = (server_url or self.server_url).rstrip("/")
        with self.lock:
            if self._stopped:
                raise RuntimeError("the session manager was stopped (agent offline)")
            client = self.message_client_map.get(url)
            if client is not None:
                return client
        other = url != self.server_url
        check = self.trust_check
        # Asked without this manager's lock: the check calls into the agent, which takes its own lock and, while
        # holding it, takes this one (offline, a new message server).
        if other and check is not None and not check(url, purpose):
            raise UntrustedHostError(f"refused for {purpose}: {url.split('?', 1)[0]} is outside the trust domain",
                                     purpose=purpose)
        crossed: Optional[LimitExceeded] = None
        with self.lock:
            if self._stopped:
                raise RuntimeError("the session manager was stopped (agent offline)")
            client = self.message_client_map.get(url)
            if client is None and other:
                crossed = self._over_cap(purpose)
            if client is None and crossed is None:
                client = MessageClient(self.agent_id, url, self.aid_path, self.seed_password, config=self.config,
                                       **self.client_options)
                client.set_message_handler(self)
                self.message_client_map[url] = client
                client.start()
        if crossed is not None:
            if self.on_limit is not None:
                self.on_limit(crossed)
            else:
                log.warning("%s: %s", self.agent_id, crossed.message)
            raise crossed
        return client  # type: ignore[return-value]

    def _over_cap(self, purpose: str) -> Optional[LimitExceeded]:
        """Lock held: the crossing if one more client for another server would exceed ``max_clients``."""
        cap = self.max_clients
        if cap is None:
            return None
        others = sum(1 for u in self.message_client_map if u != self.server_url)
        if others + 1 < cap:   # one slot always belongs to the default server
            return None
        return LimitExceeded("message_clients_max", cap, source=f"{purpose} naming another message server",
                             got=others + 2)

    @property
    def message_client(self) -> MessageClient:
        """The client of the default message server (created and started on first use)."""
        return self._client()

    def start(self) -> MessageClient:
        """Open the connection to the default message server now (agents receive without sending first)."""
        return self._client()

    def stop(self) -> None:
        """Stop every message client and join its threads; pending waits end. Idempotent."""
        with self.lock:
            self._stopped = True
            clients = list(self.message_client_map.values())
            waiters = list(self._waiters.values())
            self._waiters.clear()
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.stop_streams()
        for client in clients:
            client.stop_websocket_client()
        for waiter in waiters:
            waiter.event.set()

    def next_message_id(self) -> str:
        """A millisecond-timestamp id, unique within this agent (0.1.99's form, without its collisions)."""
        with self._id_lock:
            value = max(_ms(), self._last_id + 1)
            self._last_id = value
            return str(value)

    def _wait_for(self, kind: str, request_id: str) -> _Waiter:
        waiter = _Waiter()
        with self.lock:
            self._waiters[(kind, request_id)] = waiter
        return waiter

    def _complete(self, kind: str, request_id: str, data: Dict[str, Any]) -> bool:
        with self.lock:
            waiter = self._waiters.pop((kind, str(request_id)), None)
        if waiter is None:
            return False
        waiter.set(data)
        return True

    # -- 0.1.99 API ---------------------------------------------------------------------------------------------
    def get(self, session_id: str) -> Optional[Session]:
        with self.lock:
            return self.sessions.get(session_id)

    def create_session_id(self, name: str, message_client: MessageClient, subject: str, *,
                          session_type: str = "public") -> Tuple[Optional[str], Optional[str]]:
        """``create_session_req``; ``(session_id, identifying_code)`` or ``(None, None)`` (no ack in time)."""
        request_id = uuid.uuid4().hex
        waiter = self._wait_for("create", request_id)
        ticket = message_client.send({"cmd": "create_session_req", "data": {
            "request_id": request_id, "type": session_type or "public", "group_name": name, "subject": subject or "",
            "timestamp": str(_ms())}}, ack_key=reply_key(request_id))
        if ticket.status is SendStatus.FAILED:
            self._complete("create", request_id, {})
            log.error("create_session of %s failed: %s", self.agent_id, ticket.error)
            return None, None
        data = waiter.wait(self.CREATE_TIMEOUT)
        with self.lock:
            self._waiters.pop(("create", request_id), None)
        if not data:
            message_client.forget(reply_key(request_id))
            log.error("create_session of %s: no create_session_ack within %.0f s", self.agent_id, self.CREATE_TIMEOUT)
            return None, None
        if str(data.get("status_code", "200")) not in ("200", "0") or not data.get("session_id"):
            log.error("create_session of %s refused: %s %s", self.agent_id, data.get("status_code"),
                      data.get("message"))
            return None, None
        return str(data["session_id"]), str(data.get("identifying_code") or "")

    def create_session(self, name: str, subject: str, session_type: str = "public") -> Optional[Session]:
        client = self.message_client
        session_id, code = self.create_session_id(name, client, subject, session_type=session_type)
        if session_id is None:
            return None
        session = self.session_class(self.agent_id, client)
        session.session_id, session.identifying_code = session_id, code or ""
        session.name, session.subject, session.type = name, subject, session_type
        session.members = [self.agent_id]
        session.joined = True
        session.manager = self
        with self.lock:
            self.sessions[session_id] = session
        return session

    def init_his_session(self, session_id: str, session: Session) -> None:
        session.manager = self
        with self.lock:
            self.sessions[session_id] = session

    def adopt_sessions(self, sessions: Iterable[Session]) -> int:
        """Take over sessions of a stopped SessionManager (offline then online, or a new message server).

        Each is bound to this manager's client for its server and re-joined when that client connects (or at once,
        if it already is); returns how many were adopted.
        """
        count = 0
        # Held throughout: the client's on_open (which re-joins) needs this lock, so it sees every adopted session
        # whether it connects before or after they are registered.
        with self.lock:
            for session in sessions:
                if not session.session_id or session.session_id in self.sessions:
                    continue
                old_url = getattr(session.message_client, "server_url", "") or None
                try:
                    client = self._client(old_url, "session re-join")
                except (UntrustedHostError, LimitExceeded) as exc:  # counted where refused; the session stays out
                    log.warning("%s: session %s not carried over: %s", self.agent_id, session.session_id, exc)
                    continue
                session.message_client = client
                session.manager = self
                session.joined = False
                self.sessions[session.session_id] = session
                if client.wait_connected(0):
                    session.on_open()  # on_open for this connection has run already: join through the client
                count += 1
        if count:
            log.debug("%s carried %d session(s) over", self.agent_id, count)
        return count

    def restore_session(self, session_id: str) -> Optional[Session]:
        """The session ``session_id``: the known one, else restored from the history (after a restart).

        A session this agent created is stored with its ``identifying_code``; it comes back owned and is re-joined
        with that code (so it can invite, eject and dismiss again, and receives in it). None if unknown, stored
        without a code (a joined session cannot be re-joined without its invite), or left/closed earlier.
        (0.1.99 stubbed the history, so ownership was lost on restart.)
        """
        session = self.get(session_id)
        if session is not None or not session_id:
            return session
        db = self.db_mananger
        if db is None or session_id in self.forgotten or not hasattr(db, "load_session_history"):
            return None
        try:
            rows = db.load_session_history(session_id)
        except Exception as exc:  # noqa: BLE001 - the history must never break messaging
            log.warning("%s: cannot read the history of session %s: %s", self.agent_id, session_id, exc)
            return None
        row = next((r for r in rows or [] if r.get("identifying_code")), None)
        if row is None:
            return None
        session = self.session_class(self.agent_id, self.message_client)
        session.session_id = session_id
        session.identifying_code = str(row["identifying_code"])
        session.name = str(row.get("name") or "")
        session.type = str(row.get("type") or "public")
        session.members = [self.agent_id]
        session.manager = self
        with self.lock:
            known = self.sessions.setdefault(session_id, session)
        if known is session:  # this thread restored it: join once
            session.on_open()
            log.info("%s restored its session %s from the history (owner)", self.agent_id, session_id)
        return known

    def join_session(self, req: Any) -> Session:
        """Accept an invite (``InviteMessageReq`` or an object with its fields): create the Session and join.

        Raises ``ValueError`` for an invite without a session id (nothing to join, nothing to re-join later),
        :class:`UntrustedHostError` when it names a message server outside the trust domain (signing in there
        would hand it the agent's proof) and :class:`LimitExceeded` when it would need one message client more
        than ``max_clients``.
        """
        session_id = str(getattr(req, "SessionId", "") or "")
        if not session_id:
            raise ValueError("invite without a session id ignored")
        client = self._client(str(getattr(req, "MessageServer", "") or "") or None, "invite")
        session = self.session_class(self.agent_id, client)
        session.session_id = session_id
        session.manager = self
        inviter = str(getattr(req, "InviterAgentId", ""))
        session.members = [a for a in (inviter, self.agent_id) if a]
        with self.lock:
            self.forgotten.discard(session.session_id)  # invited again
            old = self.sessions.get(session.session_id)
            if old is not None:
                session.last_msg_id = old.last_msg_id
                if old.identifying_code:
                    session.identifying_code = old.identifying_code
            self.sessions[session.session_id] = session
        session.accept_invite(req)
        log.info("%s joined session %s (invited by %s)", self.agent_id, session.session_id, inviter or "?")
        callback = self.on_invite
        if callback is not None:
            callback(session)
        return session

    def leave_session(self, session_id: str) -> None:
        with self.lock:
            session = self.sessions.pop(session_id, None)
            self.forgotten.add(session_id)
        if session is not None:
            session.leave()

    def close_session(self, session_id: str) -> bool:
        """0.1.99: ``leave_session_req`` and forget the session; False if unknown."""
        self.restore_session(session_id)
        with self.lock:
            session = self.sessions.pop(session_id, None)
            self.forgotten.add(session_id)
        if session is None:
            return False
        session.leave()
        return True

    def dismiss_session(self, session_id: str) -> bool:
        """The owner closes the session for everyone (``close_session_req``); False if unknown or not owner."""
        self.restore_session(session_id)
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None or not session.identifying_code:
                return False
            self.sessions.pop(session_id, None)
            self.forgotten.add(session_id)
        session.close_session()
        return True

    def close_all_session(self) -> None:
        with self.lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
            self.forgotten.update(s.session_id for s in sessions)
        for session in sessions:
            try:
                session.leave()
            except Exception as exc:  # one failure must not keep the others registered (0.1.99 defect)
                log.warning("leaving %s failed: %s", session.session_id, exc)

    def invite_member(self, session_id: str, acceptor_aid: str) -> bool:
        session = self.restore_session(session_id)
        if session is None:
            log.error("invite_member: unknown session %s", session_id)
            return False
        return session.invite_member(acceptor_aid)

    def get_member_list(self, session_id: str, timeout: Optional[float] = None) -> Optional[List[Dict[str, Any]]]:
        """Ask the server for the members: a list of dicts (``agent_id``, ``role``, ...) or None (no answer)."""
        session = self.get(session_id)
        client = session.message_client if session is not None else self.message_client
        request_id = str(next(self._ids)) + "-" + str(_ms())
        waiter = self._wait_for("members", request_id)
        ticket = client.send({"cmd": "get_member_list", "data": {"session_id": session_id, "request_id": request_id}},
                             ack_key=reply_key(request_id))
        if ticket.status is SendStatus.FAILED:
            self._complete("members", request_id, {})
            return None
        data = waiter.wait(self.MEMBER_LIST_TIMEOUT if timeout is None else timeout)
        with self.lock:
            self._waiters.pop(("members", request_id), None)
        if not data:
            client.forget(reply_key(request_id))
            return None
        raw = data.get("member_list", data.get("members", data.get("data")))
        members: List[Dict[str, Any]] = []
        if isinstance(raw, list):
            for item in raw:
                if isinstance(item, str):
                    members.append({"agent_id": item})
                elif isinstance(item, dict):
                    entry = dict(item)
                    entry.setdefault("agent_id", entry.get("aid", entry.get("agent", "")))
                    members.append(entry)
        if session is not None:
            session.members = [m["agent_id"] for m in members if m.get("agent_id")]
        return members

    def send_msg(self, session_id: str, msg: list, receiver: str, ref_msg_id: str = "", message_id: str = "",
                 agent_cmd_block: Any = None) -> Optional[SendResult]:
        """Send into ``session_id``. An unknown id is restored from the history if this agent owns it, else
        used as is, without joining, as 0.1.99 did."""
        session = self.restore_session(session_id)
        if session is None:
            session = self.session_class(self.agent_id, self.message_client)
            session.session_id = session_id
            session.manager = self
            with self.lock:
                session = self.sessions.setdefault(session_id, session)
        return session.send_msg(msg, receiver, ref_msg_id, message_id, agent_cmd_block)

    # -- streams ------------------------------------------------------------------------------------------------
    async def create_stream(self, session_id: str, to_aid_list: Iterable[str],
                            content_type: str = "text/event-stream",
                            ref_msg_id: str = "") -> Tuple[Optional[str], Optional[str]]:
        session = self.get(session_id)
        if session is None:
            return None, f"unknown session {session_id}"
        request_id = uuid.uuid4().hex
        waiter = self._wait_for("stream", request_id)
        ticket = session.message_client.send({"cmd": "session_create_stream_req", "data": {
            "session_id": session_id, "request_id": request_id, "ref_msg_id": ref_msg_id or "",
            "sender": self.agent_id, "receiver": ",".join(to_aid_list), "content_type": content_type,
            "timestamp": str(_ms())}}, ack_key=reply_key(request_id))
        if ticket.status is SendStatus.FAILED:
            self._complete("stream", request_id, {})
            return None, f"cannot send the stream request: {ticket.error}"
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, waiter.wait, self.STREAM_TIMEOUT)
        with self.lock:
            self._waiters.pop(("stream", request_id), None)
        if not data:
            session.message_client.forget(reply_key(request_id))
            return None, f"no session_create_stream_ack within {self.STREAM_TIMEOUT:.0f} s"
        push, pull = data.get("push_url"), data.get("pull_url")
        if not push or not pull or not data.get("message_id"):
            return None, str(data.get("error") or data.get("message") or "stream creation refused")
        check = self.trust_check
        if check is not None and not check(str(push), "stream push"):   # the push socket carries our token
            return None, f"refused: the stream push URL is on an untrusted host ({str(push).split('?', 1)[0]})"
        from agentcp.msg.stream_client import StreamClient, StreamClientConfig

        auth = session.message_client.auth_client
        config = dataclasses.replace(self.stream_config) if self.stream_config is not None else StreamClientConfig()
        if config.verify is None:
            config.verify = getattr(auth, "verify", None)
        client = StreamClient(self.agent_id, session_id, str(push), auth.signature, config=config,
                              signature_provider=lambda: auth.signature, **self.stream_options)
        if not await loop.run_in_executor(None, client.start_websocket_client):
            # 0.1.99 retried once after 1 s; the client has been retrying with backoff meanwhile: give it that.
            if client.failed is None:
                await asyncio.sleep(1.0)
            if not client.connected:
                await loop.run_in_executor(None, client.stop_websocket_client)
                return None, "cannot connect to the stream push URL"
        with self.lock:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                session.stream_client_map[str(push)] = client
        if stopped:
            await loop.run_in_executor(None, client.stop_websocket_client)
            return None, "the session manager was stopped (agent offline)"
        return str(push), str(pull)

    def close_stream(self, session_id: str, stream_url: str) -> bool:
        """Close a stream: True if the server confirmed all of it; False for an unknown session or stream."""
        session = self.get(session_id)
        if session is None:
            return False
        return session.close_stream(stream_url)

    def send_chunk_to_stream(self, session_id: str, stream_url: str, chunk: Any,
                             type: str = "text/event-stream") -> Any:
        session = self.get(session_id)
        return False if session is None else session.send_chunk_to_stream(stream_url, chunk, type)

    def send_chunk_to_file_stream(self, session_id: str, stream_url: str, offset: int, chunk: bytes) -> Any:
        session = self.get(session_id)
        return False if session is None else session.send_file_chunk_to_stream(stream_url, offset, chunk)

    def check_stream_url_exists(self, stream_url: str) -> bool:
        with self.lock:
            return any(stream_url in s.stream_client_map for s in self.sessions.values())

    # -- setters (0.1.99 parameter names; on_message_recive sic) ------------------------------------------------------
    def set_on_message_receive(self, on_message_recive: Callable[[Dict[str, Any]], Any]) -> None:
        self.on_message_receive = on_message_recive

    def set_on_invite_ack(self, on_invite_ack: Callable[[Dict[str, Any]], Any]) -> None:
        self.on_invite_ack = on_invite_ack

    def set_on_session_message_ack(self, on_session_message_ack: Callable[[Dict[str, Any]], Any]) -> None:
        self.on_session_message_ack = on_session_message_ack

    def set_on_system_message(self, on_system_message: Callable[[Dict[str, Any]], Any]) -> None:
        self.on_system_message = on_system_message

    def set_on_member_list_receive(self, on_member_list_receive: Callable[[Dict[str, Any]], Any]) -> None:
        self.on_member_list_receive = on_member_list_receive

    # -- message client callbacks (reader / driver threads: quick, no waits) --------------------------------------
    def on_open(self, ws: Any) -> None:
        """Re-join every session of the client that just connected (0.1.99 re-joined those of every server)."""
        with self.lock:
            sessions = [s for s in self.sessions.values() if getattr(s.message_client, "_conn", None) is ws]
        for session in sessions:
            session.on_open(ws)
        if sessions:
            log.debug("%s re-joined %d session(s)", self.agent_id, len(sessions))

    def on_message(self, ws: Any, message: str) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return
        if isinstance(frame, dict):
            self.on_frame(ws, frame)

    # It only parses and hands on: the client may call on_frame with the frame it parsed (a subclass that
    # overrides on_message gets its on_message called, as before).
    on_message.frame_parser = True  # type: ignore[attr-defined]

    def on_frame(self, ws: Any, frame: Dict[str, Any]) -> None:
        """:meth:`on_message` for a frame the client has parsed already (it parses every frame once)."""
        cmd, data = frame.get("cmd"), frame.get("data")
        if not isinstance(cmd, str) or not isinstance(data, dict):
            return
        if cmd == "session_message":
            self._on_session_message(data)
        elif cmd == "create_session_ack":
            if not self._complete("create", str(data.get("request_id", "")), data):
                log.info("late create_session_ack for session %s ignored", data.get("session_id"))
        elif cmd == "session_create_stream_ack":
            self._complete("stream", str(data.get("request_id", "")), data)
        elif cmd in _MEMBER_LIST_CMDS:
            self._complete("members", str(data.get("request_id", "")), data)
            self._call(self.on_member_list_receive, data)
        elif cmd == "session_message_ack":
            self._call(self.on_session_message_ack, data)
        elif cmd == "invite_agent_ack":
            self._call(self.on_invite_ack, data)
        elif cmd == "system_message":
            self._on_system_message(data)
        elif cmd == "invite_agent_req":
            self._on_ws_invite(data)
        else:
            log.debug("unknown cmd %r ignored", cmd)

    def _call(self, fn: Optional[Callable[[Dict[str, Any]], Any]], data: Dict[str, Any]) -> None:
        if fn is not None:
            fn(data)

    def _on_session_message(self, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id") or "")
        if not session_id:
            return  # 0.1.99 raised UnboundLocalError here
        data["message"] = decode_message(data.get("message"))
        with self.lock:
            session = self.sessions.get(session_id)
        if session is not None:
            if data.get("message_id") and not self.confirm_handled:
                session.last_msg_id = str(data["message_id"])
            sender = data.get("sender")
            if isinstance(sender, str) and sender and sender not in session.members:
                session.members.append(sender)
        self._call(self.on_message_receive, data)

    def handled(self, session: Optional[Session], data: Dict[str, Any]) -> None:
        """The consumer handled ``data`` (``confirm_handled``): the next re-join of ``session`` starts after it."""
        if session is not None and data.get("message_id"):
            session.last_msg_id = str(data["message_id"])

    def _on_system_message(self, data: Dict[str, Any]) -> None:
        session_id = str(data.get("session_id") or "")
        if data.get("event_type") == "Session dismissed" and session_id:
            with self.lock:
                session = self.sessions.pop(session_id, None)
                self.forgotten.add(session_id)
            if session is not None:
                log.info("session %s was dismissed by its owner", session_id)
        self._call(self.on_system_message, data)

    def _on_ws_invite(self, data: Dict[str, Any]) -> None:
        """A newer server pushes the invite on the WebSocket (C++/Node SDKs answer it): join."""
        from agentcp.msg.message_serialize import InviteMessageReq

        req = InviteMessageReq()
        req.InviterAgentId = str(data.get("inviter_id", "") or data.get("inviter_agent_id", ""))
        req.InviteCode = str(data.get("invite_code", ""))
        req.SessionId = str(data.get("session_id", ""))
        req.MessageServer = str(data.get("message_server", "") or self.server_url)
        if not req.SessionId:
            return
        # join_session may create a client for another server (that starts a thread): not on the reader thread's
        # critical path, but quick (no network wait).
        try:
            self.join_session(req)
        except (UntrustedHostError, LimitExceeded) as exc:  # counted and logged where it was refused
            log.debug("%s: invite to session %s refused: %s", self.agent_id, req.SessionId, exc)
        except RuntimeError as exc:  # stopped meanwhile (offline)
            log.debug("%s: invite to session %s ignored: %s", self.agent_id, req.SessionId, exc)
