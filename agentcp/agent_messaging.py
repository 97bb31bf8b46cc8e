"""AgentID's messaging API (api.md §3.3-3.6): handlers, sending, sessions, and the incoming-message pipeline.

A mixin of :class:`agentcp.agentcp.AgentID`; it uses the agent's session manager (``agentcp.msg``) and history
(``agentcp.db``). Same names and parameters as agentcp 0.1.99; results are truthful (:class:`SendResult`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

from agentcp.base.limits import LimitExceeded, Limits
from agentcp.base.log import log_debug, log_error, log_exception, log_info, set_log_enabled  # noqa: F401
from agentcp.context import exceptions
from agentcp.context.exceptions import AuthError, CredentialError, SDKError  # noqa: F401
from agentcp.message import AgentInstructionBlock, AssistantMessageBlock  # noqa: F401
from agentcp.msg.dispatcher import Dispatcher, call_arity, is_coroutine_handler
from agentcp.msg.message_client import MessageClientConfig, SendResult, SendStatus
from agentcp.msg.session_manager import SessionManager, to_plain


_log = logging.getLogger("agentcp.agent")


class _OpenOnUse:
    """The session manager's view of the history: ``load_session_history`` opens the database on first use."""

    __slots__ = ("_open",)

    def __init__(self, open_db) -> None:
        self._open = open_db

    def load_session_history(self, session_id: str) -> list:
        db = self._open()
        return db.load_session_history(session_id) if db is not None else []


class MessagingMixin:
    """Messaging methods of :class:`~agentcp.agentcp.AgentID`."""

    # Provided by AgentID (declared for the type checker; no values here).
    id: str
    seed_password: str
    private_data_path: str
    db_manager: Any
    session_manager: Optional[SessionManager]
    message_config: Optional[MessageClientConfig]
    message_handlers: List[Callable]
    message_handlers_session_map: Dict[str, Callable]
    message_handlers_router_map: Dict[str, Callable]
    message_from_acp: bool
    is_online_success: bool
    online: Callable[[], Any]
    _stop: Any
    _phase: str
    MESSAGE_CONFIG: Optional[MessageClientConfig]
    HANDLER_WORKERS: int
    HANDLER_TIMEOUT: float
    _lock: Any
    _dispatcher: Optional[Dispatcher]
    _msg_counters: Dict[str, int]
    _msg_logged: set
    _remembered_sessions: Dict[str, Any]
    _forgotten_sessions: Set[str]
    _publish: Callable[[SDKError], None]
    _on_stream_announce: Callable[[dict, dict], None]
    limits: Limits
    _check_trusted: Callable[[str, str], bool]
    _limit_crossed: Callable[[LimitExceeded], None]

    # --- handlers -----------------------------------------------------------------------------------------------
    def message_handler(self, router: str = ""):
        """Decorator: ``@aid.message_handler()`` registers the function (``router="cmd"`` for instructions)."""

        def decorator(func):
            self.add_message_handler(func, router=router)
            return func

        return decorator
    def add_message_handler(self, handler, session_id: str = "", router: str = "", from_acp: bool = False) -> None:
        if from_acp:
            self.message_from_acp = True
        if not session_id and not router:
            self.message_handlers.append(handler)
        elif session_id:
            self.message_handlers_session_map[session_id] = handler
        else:
            self.message_handlers_router_map[router] = handler
    def remove_message_handler(self, handler, session_id) -> None:
        if session_id == "" or session_id is None:
            if handler in self.message_handlers:
                self.message_handlers.remove(handler)
            return
        self.message_handlers_session_map.pop(session_id, None)
    # --- message parsing (pure) ---------------------------------------------------------------------------------
    def get_sender_from_message(self, message):
        return message.get("sender") if isinstance(message, dict) else None
    def get_session_id_from_message(self, message):
        return message.get("session_id") if isinstance(message, dict) else None
    def get_receiver_from_message(self, message):
        return message.get("receiver") if isinstance(message, dict) else None
    def get_content_array_from_message(self, message):
        raw = message.get("message")  # AttributeError for a non-dict, as in 0.1.99
        if isinstance(raw, str):
            if not raw.strip():
                return []
            try:
                decoded = json.loads(raw)
            except ValueError:
                _log.warning("message content of %s is not JSON", message.get("message_id", "?"))
                return []
            if isinstance(decoded, list) and decoded:
                return decoded
            return [decoded]
        if isinstance(raw, list) and raw:
            return raw
        return []
    def get_content_from_message(self, message, message_type="content"):
        blocks = self.get_content_array_from_message(message)
        for wanted in ([message_type, "text"] if message_type == "content" else [message_type]):
            for block in blocks:
                if isinstance(block, dict) and block.get("type") == wanted:
                    content = block.get("content")
                    if isinstance(content, str):
                        try:
                            decoded = json.loads(content)
                        except ValueError:
                            return content
                        if isinstance(decoded, dict) and "text" in decoded:
                            return decoded["text"]
                        return content
                    if isinstance(content, dict) and "text" in content:
                        return content["text"]
                    return content
        return None
    # --- messaging: plumbing ------------------------------------------------------------------------------------
    def _db(self):
        """The history database (``DBManager``), opened on first use; None if it cannot be opened (logged)."""
        db = self.db_manager
        if db is not None:
            return db
        try:
            from agentcp.db.db_mananger import DBManager

            db = DBManager(self.private_data_path, self.id)
        except Exception as exc:  # history must never break messaging
            self._count_history_error("open", exc)
            return None
        db.on_flush_error = lambda exc, rows: self._count_history_error("write", exc)
        self.db_manager = db
        return db
    def _count_history_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._msg_counters["history_errors"] += 1
            first = what not in self._msg_logged
            self._msg_logged.add(what)
        if first:
            _log.warning("%s: message history %s failed (%s: %s); messaging goes on without it", self.id, what,
                         type(exc).__name__, exc)
        else:
            _log.debug("%s: message history %s failed: %s", self.id, what, exc)
    def _history(self, method: str, *args) -> None:
        """Call ``self.db_manager.<method>(*args)`` defensively: failures are logged once and counted."""
        db = self._db()
        fn = getattr(db, method, None) if db is not None else None
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # history must never break messaging
            self._count_history_error(method, exc)
    def _flush_history(self) -> None:
        """Write the history rows still buffered (write-behind) now; failures are counted like other writes."""
        db = self.db_manager
        if db is not None and hasattr(db, "flush"):
            try:
                db.flush()
            except Exception as exc:  # history must never break messaging
                self._count_history_error("flush", exc)
        from agentcp.db.write_behind import FLUSHER

        FLUSHER.stop_if_idle()  # the shared writer thread ends with the last agent that used it
    def _start_messaging(self, message_server: str, certs: str) -> None:
        """Lock held, from the connect thread: open the message-server connection now (not on first send)."""
        if not message_server:
            _log.error("%s: the access point config has no message_server; messaging is unavailable", self.id)
            return
        old = self.session_manager
        if old is not None and old.server_url == message_server.rstrip("/"):
            return
        config = self.message_config or self.MESSAGE_CONFIG or MessageClientConfig()
        # The history restores ownership of sessions on demand (after a restart); it is opened on first use, so an
        # agent that only idles holds no SQLite connection (memory per idle agent).
        sm = SessionManager(self.id, message_server, certs, self.seed_password, _OpenOnUse(self._db), config=config)
        sm.confirm_handled = True  # a message dropped by offline() before its handler ran is asked for again
        # trust.md rules 1 and 4: sign-ins and stream tokens go only to trusted hosts; message clients are bounded.
        sm.trust_check = self._check_trusted
        sm.max_clients = self.limits.message_clients_max
        sm.on_limit = self._limit_crossed
        sm.set_on_message_receive(self._on_incoming)
        sm.set_on_session_message_ack(self._on_message_ack)
        sm.set_on_invite_ack(self._on_invite_ack)
        sm.on_invite = self._on_ws_invite_joined
        # Bounds on what the servers and peers can make this agent hold (trust.md rule 4).
        sm.client_options = {"limits": self.limits, "on_limit": self._limit_crossed,
                             "backpressure": self._backlog_room, "when_room": self._backlog_when_room}
        sm.stream_options = {"limits": self.limits, "on_limit": self._limit_crossed}
        if old is not None:  # a new message server (config changed): carry the sessions over
            self._remember_sessions(old)
            old.stop()
        # Sessions of the previous online() (or the old server) are re-joined when the new connection opens.
        sm.forgotten.update(self._forgotten_sessions)
        remembered, self._remembered_sessions = self._remembered_sessions, {}
        if remembered:
            sm.adopt_sessions(remembered.values())
        if self._dispatcher is None or self._dispatcher.stopped:
            self._dispatcher = Dispatcher(f"agentcp-handlers-{self.id}", self.HANDLER_WORKERS, self.HANDLER_TIMEOUT,
                                          agent_id=self.id, backlog_messages=self.limits.handler_backlog_messages,
                                          backlog_bytes=self.limits.handler_backlog_bytes)
        self.session_manager = sm
        sm.start()
    def _remember_sessions(self, sm: SessionManager) -> None:
        """Lock held: keep ``sm``'s sessions (and the ones it forgot) for the next SessionManager."""
        with sm.lock:
            self._remembered_sessions.update(sm.sessions)
            self._forgotten_sessions = set(sm.forgotten)
    def _session_manager(self) -> Optional[SessionManager]:
        sm = self.session_manager
        if sm is None:
            retiring = getattr(self, "_retiring_sm", None)
            if retiring is not None:
                return retiring  # offline() lets running handlers finish: their replies still go out
        if sm is None and not self._stop.is_set() and not self.is_online_success and self._phase == "offline":
            self.online()  # 0.1.99 went online on demand
            sm = self.session_manager
        return sm
    def _on_ws_invite_joined(self, session) -> None:
        self._history("create_session", self.id, session.session_id, "", "", "public")
    def _submit(self, session_id: str, work) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.submit(session_id, work)
    def _backlog_room(self, timeout: float) -> bool:
        """Reader thread, before it hands over a message: wait (bounded) for room in the handler backlog. While
        False the reader does not read its socket (back-pressure; nothing is dropped)."""
        dispatcher = self._dispatcher
        return dispatcher is None or dispatcher.wait_for_room(timeout)
    def _backlog_when_room(self, callback: Callable[[], Any]) -> bool:
        """Message reactor, before it hands over a message: True if the handler backlog has room; otherwise
        ``callback()`` is called once when it has (the connection is not read meanwhile; nothing is dropped)."""
        dispatcher = self._dispatcher
        return dispatcher is None or dispatcher.when_room(callback)

    def _on_incoming(self, data: dict) -> None:
        """Reader thread: queue the message for its session (history, ping reply, handlers run there)."""
        with self._lock:
            self._msg_counters["received"] += 1
        session_id = str(data.get("session_id") or "")
        sm = self.session_manager
        session = sm.get(session_id) if sm is not None else None
        dispatcher = self._dispatcher
        # Bytes it holds, for the backlog bound: its content dominates (the rest is ids and a timestamp).
        size = len(str(data.get("message") or "")) + 256
        calls = self._async_calls(data) if dispatcher is not None else None
        if calls is not None and dispatcher is not None:
            # Only coroutine handlers: the whole handling runs on the handlers' event loop (no worker in between).
            submitted = dispatcher.submit(session_id, lambda: self._handle_incoming_async(data, sm, session, calls),
                                          size, coroutine=True)
        else:
            submitted = dispatcher is not None and dispatcher.submit(
                session_id, lambda: self._handle_incoming(data, sm, session), size)
        if not submitted:
            # offline() is under way: not handled, so not confirmed; the next online()'s re-join asks for it again
            with self._lock:
                self._msg_counters["not_handled"] = self._msg_counters.get("not_handled", 0) + 1
            _log.debug("%s: message %s in %s arrived while going offline; left for the re-join", self.id,
                       data.get("message_id"), session_id)
    def _handle_incoming(self, data: dict, sm=None, session=None) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.stopped:
            return  # dropped by offline(): not confirmed (see _on_incoming)
        self._history("save_message_later", data)  # the row is built now
        try:
            blocks = self.get_content_array_from_message(data)
        except AttributeError:
            blocks = []
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        if first.get("type") == "ping":
            self.reply_message(data, {"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                                      "content": "ping_result"})
        elif first.get("type") == "text/event-stream":
            self._on_stream_announce(data, first)  # its handlers pull the stream: a thread of their own
        elif not self._dispatch(data):
            return
        if sm is not None:
            sm.handled(session, data)
    def _async_calls(self, data: dict) -> Optional[list]:
        """The handler calls of an ordinary message whose handlers are all coroutines; None otherwise (a ping, a
        stream announce, or a sync handler among them: the message goes to a worker thread)."""
        try:
            blocks = self.get_content_array_from_message(data)
        except AttributeError:
            return None
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        if first.get("type") in ("ping", "text/event-stream"):
            return None
        calls = self._handler_calls(data)
        if calls and all(is_coroutine_handler(handler) for handler, _args in calls):
            return calls
        return None
    async def _handle_incoming_async(self, data: dict, sm, session, calls: list) -> None:
        """:meth:`_handle_incoming` for a message whose handlers are all coroutines, on the handlers' loop."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.stopped:
            return  # dropped by offline(): not confirmed (see _on_incoming)
        self._history("save_message_later", data)  # the row is built now
        if len(calls) == 1:
            handler, args = calls[0]
            try:
                await handler(*args)
            except Exception as exc:  # a handler's bug is reported, never retried, never fatal
                dispatcher._report(handler, exc)
        else:
            await asyncio.gather(*(self._call_async(dispatcher, h, a) for h, a in calls))
        if sm is not None and not dispatcher.stopped:
            sm.handled(session, data)  # as on the worker path: a handler that raised has run
    @staticmethod
    async def _call_async(dispatcher: Dispatcher, handler: Callable, args: list) -> None:
        try:
            await handler(*args)
        except Exception as exc:  # a handler's bug is reported, never retried, never fatal
            dispatcher._report(handler, exc)
    def _dispatch(self, data: dict) -> bool:
        """0.1.99's first-match rule: session handler, else router handler, else every global handler.
        False if the dispatcher was stopped (nothing was called)."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.stopped:
            return False
        calls = self._handler_calls(data)
        self._dispatch_calls(dispatcher, calls, [(h, a) for h, a in calls if is_coroutine_handler(h)])
        return True
    def _handler_calls(self, data: dict) -> list:
        """The handlers ``data`` goes to (first-match rule) with their arguments, by parameter count."""
        session_handler = self.message_handlers_session_map.get(str(data.get("session_id") or ""))
        if session_handler is not None:
            handlers = [session_handler]
        else:
            instruction = data.get("instruction")
            router = instruction.get("cmd") if isinstance(instruction, dict) else None
            routed = self.message_handlers_router_map.get(router) if isinstance(router, str) else None
            handlers = [routed] if routed is not None else list(self.message_handlers)
        calls = []
        for handler in handlers:
            arity = call_arity(handler)
            if arity == 1:
                args: List[Any] = [data]
            elif arity == 2 or arity == -1:
                args = [self, data]
            else:
                _log.warning("%s: message handler %r takes %s parameters (1 or 2 expected); not called", self.id,
                             handler, arity)
                continue
            calls.append((handler, args))
        return calls
    def _dispatch_calls(self, dispatcher: Dispatcher, calls: list, async_calls: list) -> None:
        for handler, args in calls:
            if not is_coroutine_handler(handler):
                dispatcher.call_handler(handler, args)
        if len(async_calls) == 1:
            dispatcher.call_handler(*async_calls[0])
        elif async_calls:
            async def gather_all():
                results = await asyncio.gather(*(h(*a) for h, a in async_calls), return_exceptions=True)
                for (handler, _args), result in zip(async_calls, results):
                    if isinstance(result, Exception):
                        dispatcher._report(handler, result)

            dispatcher.run_coroutine(gather_all())
    def _synthesize_offline(self, session_id: str, offline_aid: str) -> None:
        """0.1.99's synthetic error message for an offline receiver (no ``message_id``), into the handlers."""
        block = {"type": "error", "status": "success", "timestamp": int(time.time() * 1000),
                 "content": f"该模型的服务商{offline_aid}不在线 (provider {offline_aid} is not online)", "extra": ""}
        data = {"session_id": session_id, "ref_msg_id": "", "sender": offline_aid, "receiver": self.id,
                "message": json.dumps([block])}
        self._submit(session_id, lambda: self._dispatch(data))
    def _on_message_ack(self, data: dict) -> None:
        if str(data.get("status_code")) == "404":
            offline = data.get("offline_receivers")
            for aid in offline if isinstance(offline, list) else []:
                self._synthesize_offline(str(data.get("session_id") or ""), str(aid))
    def _on_invite_ack(self, data: dict) -> None:
        if str(data.get("status_code")) == "404":
            self._synthesize_offline(str(data.get("session_id") or ""), str(data.get("acceptor_id") or ""))
    @staticmethod
    def _blocks(message) -> list:
        """0.1.99's normalisation of ``message`` into a block list (dataclasses become dicts, also nested)."""
        if message is None or (isinstance(message, str) and message == ""):
            return []
        if isinstance(message, str):
            return [{"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                     "content": message}]
        if isinstance(message, dict) or (dataclasses.is_dataclass(message) and not isinstance(message, type)):
            return [to_plain(message)]
        if isinstance(message, (list, tuple)):
            return [to_plain(block) for block in message]
        raise TypeError(f"unsupported message type {type(message).__name__}: pass a str, a block (dict or "
                        "AssistantMessageBlock) or a list of blocks")
    def _failed(self, error: str, message_id: str = "") -> SendResult:
        self._note_send_failure(error)
        return SendResult(SendStatus.FAILED, message_id, error)

    def _note_send_failure(self, error: str) -> None:
        with self._lock:
            self._msg_counters["send_failures"] += 1
        _log.warning("%s: send failed: %s", self.id, error)
        err = exceptions.SendMsgError(error)
        err.agent_id = self.id
        self._publish(err)

    def _watch_result(self, result: SendResult) -> SendResult:
        """Count and report ``result`` if it fails, now or when it settles (sends return before the ack)."""
        def settled(r: SendResult) -> None:
            if r.failed:
                self._note_send_failure(r.error or "send failed")

        result.add_done_callback(settled)
        return result
    # --- messaging: 0.1.99 API --------------------------------------------------------------------------------
    def send_message(self, sessionId: str, to_aid_list: list, message, ref_msg_id: str = "", message_id: str = "",
                     agent_cmd_block: Optional[AgentInstructionBlock] = None, insert_message: bool = True):
        """Send ``message`` into session ``sessionId`` to ``to_aid_list``; a :class:`SendResult`.

        The result is truthy unless the message failed (not online, outbox full, refused, empty); ``.status``
        says ``delivered`` (the server acked it), ``sent`` (written, ack pending), ``queued`` (waiting for the
        reconnect; it goes out in order) or ``failed`` (with ``.error``). It compares equal to True/False.
        """
        blocks = self._blocks(message)
        instruction = to_plain(agent_cmd_block) if agent_cmd_block is not None else None
        if not blocks and instruction is None:
            return self._failed(f"empty message to session {sessionId}: nothing sent", message_id)
        if not sessionId:
            return self._failed("send_message needs a session id", message_id)
        sm = self._session_manager()
        if sm is None:
            return self._failed(f"{self.id} is not online (no message server connection)", message_id)
        receivers = [str(a) for a in (to_aid_list or [])]
        try:
            result = sm.send_msg(sessionId, blocks, ";".join(receivers), ref_msg_id or "", message_id or "",
                                 instruction)
        except RuntimeError as exc:  # the session manager was stopped meanwhile (offline)
            return self._failed(str(exc), message_id)
        if result is None:
            return self._failed(f"empty message to session {sessionId}: nothing sent", message_id)
        self._watch_result(result)
        if result.status is SendStatus.FAILED:
            return result
        if insert_message:
            self._history("save_message_later", {
                "session_id": sessionId, "message_id": result.message_id, "sender": self.id,
                "receiver": receivers, "ref_msg_id": ref_msg_id or "", "instruction": instruction,
                "message": blocks})  # fresh copies (see _blocks): serialised by the history writer
        return result
    def send_message_content(self, session_id: str, to_aid_list: list, llm_content: str, ref_msg_id: str = "",
                             message_id: str = ""):
        """One ``content`` block with ``llm_content``; None if the session id or the text is empty."""
        if not session_id or not llm_content:
            return None
        block = {"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                 "content": llm_content}
        return self.send_message(session_id, to_aid_list, [block], ref_msg_id, message_id)
    def reply_message(self, msg: dict, message):
        """Answer ``msg`` in its session, to its sender, referring to its id; False if it has no session id."""
        session_id = msg.get("session_id") if isinstance(msg, dict) else None
        if not session_id:
            return False
        sender = msg.get("sender")
        return self.send_message(session_id, [sender] if sender else [], message, msg.get("message_id", "") or "")
    def create_session(self, name, subject, *, type="public"):
        """Create a session (this agent owns it): its id, or None if the server did not confirm in time."""
        sm = self._session_manager()
        if sm is None:
            _log.error("create_session: %s is not online", self.id)
            return None
        try:
            session = sm.create_session(name, subject, type)
        except RuntimeError as exc:
            _log.error("create_session of %s failed: %s", self.id, exc)
            return None
        if session is None:
            err = exceptions.CreateSessionError(f"create_session of {self.id} failed (no answer from the server)")
            err.agent_id = self.id
            self._publish(err)
            return None
        self._history("create_session", self.id, session.session_id, session.identifying_code, name, type)
        return session.session_id
    def invite_member(self, session_id, to_aid):
        """Invite ``to_aid`` into ``session_id``; True if the invite was sent or queued."""
        sm = self._session_manager()
        if sm is None:
            _log.error("invite_member: %s is not online", self.id)
            return False
        ok = sm.invite_member(session_id, to_aid)
        if ok:
            self._history("invite_member", self.id, session_id, to_aid)
        return ok
    def get_session_member_list(self, session_id):
        """Members of ``session_id``: dicts with ``session_id``, ``aid`` (and ``agent_id``, ``role`` when the
        server says); from the server when it answers, else from the local history."""
        sm = self.session_manager
        members = sm.get_member_list(session_id) if sm is not None else None
        if members is not None:
            return [dict(m, session_id=session_id, aid=m.get("agent_id", "")) for m in members]
        db = self._db()
        if db is None:
            return []
        try:
            return [dict(row) for row in db.get_session_member_list(session_id)]
        except Exception as exc:  # history must never break messaging
            self._count_history_error("get_session_member_list", exc)
            return []
    def close_session(self, session_id):
        """Leave ``session_id`` and forget it (as 0.1.99); False if unknown. While offline it is only forgotten
        (it is not re-joined at the next online())."""
        sm = self.session_manager
        if sm is None:
            with self._lock:
                known = self._remembered_sessions.pop(session_id, None) is not None
                self._forgotten_sessions.add(session_id)
            return None if known else False
        if not sm.close_session(session_id):
            return False
        return None
    def delete_session(self, session_id):
        """``close_session`` plus deleting the session's local history; the history delete's result."""
        self.close_session(session_id)
        db = self._db()
        if db is None:
            return False
        try:
            return bool(db.delete_session(session_id))
        except Exception as exc:  # history must never break messaging
            self._count_history_error("delete_session", exc)
            return False
    def quick_send_message(self, to_aid: str, message, asnyc_message_result, insert_message: bool = True):
        """Create a "quick session", invite ``to_aid``, send ``message``; the session id.

        If ``asnyc_message_result`` is given it is called (awaited if it returns an awaitable) with the first
        message that arrives in that session, once. Raises ``Exception`` if the session cannot be created.
        """
        session_id = self.create_session("quick session", "")
        if not session_id:
            raise Exception("failed to create session")
        if asnyc_message_result is not None:  # before the invite: a "not online" notice can come right after it
            self._one_shot(session_id, asnyc_message_result)
        self.invite_member(session_id, to_aid)
        self.send_message(session_id, [to_aid], message, insert_message=insert_message)
        return session_id
    def _one_shot(self, session_id: str, callback) -> None:
        fired = threading.Event()

        def once(reply):
            if fired.is_set():
                return None
            fired.set()
            self.remove_message_handler(once, session_id)
            return callback(reply)  # an awaitable is awaited by the dispatcher

        self.add_message_handler(once, session_id)
    def quick_send_message_content(self, to_aid: str, message_content: str, asnyc_message_result):
        """As :meth:`quick_send_message` with one ``content`` block; returns ``send_message_content``'s result."""
        session_id = self.create_session("quick session", "")
        if not session_id:
            raise Exception("failed to create session")
        if asnyc_message_result is not None:  # before the invite, as in quick_send_message
            self._one_shot(session_id, asnyc_message_result)
        self.invite_member(session_id, to_aid)
        return self.send_message_content(session_id, [to_aid], message_content)

    # The names agents in the wild call (three s's; api.md §13).
    quick_send_messsage = quick_send_message
    quick_send_messsage_content = quick_send_message_content

    # --- instructions, forms, ping (0.1.99 API) -------------------------------------------------------------------
    #: What ``ping_aid`` returns when no answer came (0.1.99's value).
    PING_NO_ANSWER: float = 10000

    def send_instruction_message(self, session_id: str, to_aid, agent_cmd_block: Optional[AgentInstructionBlock] = None,
                                 ref_msg_id: str = ""):
        """Send the instruction ``agent_cmd_block`` (an :class:`AgentInstructionBlock` or a dict with ``cmd``) to
        ``to_aid`` (an AID or a list) in ``session_id``; a :class:`SendResult`, None if ``session_id`` is empty.

        The instruction travels as ``data.instruction``; the peer's handler for its ``cmd`` (``router=``) gets it.
        One ``content`` block carrying the instruction's description (else its ``cmd``) goes with it, so peers
        that drop a message without blocks (0.1.99) receive it too. (0.1.99 sent nothing at all.)
        """
        if not session_id:
            return None
        instruction = to_plain(agent_cmd_block) if agent_cmd_block is not None else None
        cmd = instruction.get("cmd") if isinstance(instruction, dict) else None
        if not isinstance(cmd, str) or not cmd:
            return self._failed(f"send_instruction_message needs an instruction with a cmd, got {agent_cmd_block!r}")
        receivers = [to_aid] if isinstance(to_aid, str) else list(to_aid or [])
        text = (instruction.get("description") if isinstance(instruction, dict) else None) or cmd
        block = {"type": "content", "status": "success", "timestamp": int(time.time() * 1000), "content": text}
        return self.send_message(session_id, receivers, [block], ref_msg_id or "", agent_cmd_block=instruction)

    def send_form_message(self, session_id: str, to_aid_list: list, result: list, ref_msg_id: str = ""):
        """Answer a ``form`` block: send ``[{"type": "form_result", "content": {"result": result}}]`` to
        ``to_aid_list`` in ``session_id``, referring to the form's message ``ref_msg_id``; a :class:`SendResult`.

        ``result`` is a list of :class:`~agentcp.message.AgentFormItemResultBlock` or dicts (``id``, ``result``).
        (0.1.99 first looked the form up in its history, which never found it, so nothing was ever sent.)
        """
        if not session_id:
            return self._failed("send_form_message needs a session id")
        items = to_plain(list(result or []))
        if not all(isinstance(item, dict) and "id" in item for item in items):
            return self._failed(f"send_form_message: each result needs an id, got {items!r}")
        block = {"type": "form_result", "status": "success", "timestamp": int(time.time() * 1000),
                 "content": {"result": items}}
        return self.send_message(session_id, list(to_aid_list or []), [block], ref_msg_id or "")

    def ping_aid(self, aid: str, *, timeout: float = 10.0) -> float:
        """Seconds until ``aid`` answered a ``ping`` (its SDK answers by itself; handlers are not involved), from
        creating the one-off session to the answer; ``PING_NO_ANSWER`` (10000) if it did not answer within
        ``timeout`` or is offline. The one-off session is left afterwards (0.1.99 kept one per ping)."""
        answered = threading.Event()
        outcome: Dict[str, Any] = {}

        def on_answer(reply):
            blocks = self.get_content_array_from_message(reply)
            first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
            outcome["at"] = time.monotonic()
            outcome["type"] = first.get("type")
            answered.set()

        block = {"type": "ping", "status": "success", "timestamp": int(time.time() * 1000), "content": "ping"}
        start = time.monotonic()
        try:
            session_id = self.quick_send_message(aid, [block], on_answer, insert_message=False)
        except Exception as exc:  # noqa: BLE001 - no session: the ping has no answer, as 0.1.99 reported
            _log.warning("%s: ping of %s not sent: %s", self.id, aid, exc)
            return self.PING_NO_ANSWER
        try:
            if not answered.wait(timeout):
                _log.info("%s: no answer to the ping of %s within %.1f s", self.id, aid, timeout)
                return self.PING_NO_ANSWER
            if outcome.get("type") == "error":  # the synthetic "not online" notice
                _log.info("%s: ping of %s: it is not online", self.id, aid)
                return self.PING_NO_ANSWER
            return max(0.0, outcome["at"] - start)
        finally:
            self.remove_message_handler(None, session_id)
            self.close_session(session_id)
