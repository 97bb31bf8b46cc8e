"""0.1.99's older session classes, as adapters over :class:`agentcp.msg.session_manager.SessionManager`.

0.1.99 still shipped ``agentcp.session_manager`` (``Session``, ``SessionManager``) and ``agentcp.group_manager``
(``Group``, ``GroupManager``), the predecessors of ``agentcp.msg.session_manager`` (api.md §1). Their difference is
per-session callbacks: ``session.set_on_message_receive(fn)`` and friends, fed by ``session.on_message(ws, message)``,
and ``initialize(name, subject, type, session_id)`` to create (or adopt) a session from a bare message client.

Here they are the current classes plus exactly that: the sessions are :class:`~agentcp.msg.session_manager.Session`
subclasses, the managers :class:`~agentcp.msg.session_manager.SessionManager` subclasses that create them and hand
every frame of a session to the session's own callbacks after the usual handling. Creating, joining, re-joining
after reconnects, sending, streams and acks are the current code.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, Optional, Union, cast

from agentcp.msg import session_manager as _current
from agentcp.msg.message_client import MessageClient

__all__ = ["LegacySession", "LegacySessionManager", "Group", "GroupManager"]

log = logging.getLogger("agentcp.legacy")

Callback = Optional[Callable[[Dict[str, Any]], Any]]

#: Frame ``cmd`` -> the session attribute holding its callback.
_CALLBACK_OF = {
    "session_message": "on_message_receive",
    "invite_agent_ack": "on_invite_ack",
    "session_message_ack": "on_session_message_ack",
    "system_message": "on_system_message",
    "get_member_list_ack": "on_member_list_receive",
    "get_member_list_resp": "on_member_list_receive",
    "member_list": "on_member_list_receive",
}


def _frame(message: Union[str, bytes, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``{"cmd", "data"}`` of a message-server frame (text or already parsed); None if it is not one."""
    if isinstance(message, (str, bytes, bytearray)):
        try:
            message = json.loads(message)
        except ValueError:
            return None
    if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
        return None
    return message if isinstance(message.get("data"), dict) else None


class _OwnCallbacks(_current.Session):
    """A session with its own callbacks (0.1.99's per-session ``set_on_*``).

    They run on the message client's reader thread, as in 0.1.99: return quickly (hand long work to a thread). One
    that raises is counted and reported by the client; the frame's usual handling has happened before.
    """

    def __init__(self, agent_id: str, message_client: MessageClient) -> None:
        super().__init__(agent_id, message_client)
        self.on_message_receive: Callback = None
        self.on_invite_ack: Callback = None
        self.on_session_message_ack: Callback = None
        self.on_system_message: Callback = None
        self.on_member_list_receive: Callback = None

    def set_on_message_receive(self, on_message_recive: Callback) -> None:
        """``on_message_recive(data)`` (sic) for each message in this session (``message`` percent-decoded)."""
        self.on_message_receive = on_message_recive

    def set_on_invite_ack(self, on_invite_ack: Callback) -> None:
        self.on_invite_ack = on_invite_ack

    def set_on_session_message_ack(self, on_session_message_ack: Callback) -> None:
        self.on_session_message_ack = on_session_message_ack

    def set_on_system_message(self, on_system_message: Callback) -> None:
        self.on_system_message = on_system_message

    def set_on_member_list_receive(self, on_member_list_receive: Callback) -> None:
        self.on_member_list_receive = on_member_list_receive

    def on_message(self, ws: Any, message: Union[str, bytes, Dict[str, Any]]) -> None:
        """A frame from the message server: if it concerns this session, its callback gets the frame's ``data``."""
        frame = _frame(message)
        if frame is None:
            return
        data = frame["data"]
        if str(data.get("session_id") or "") != self.session_id:
            return
        attr = _CALLBACK_OF.get(frame["cmd"])
        callback = getattr(self, attr) if attr else None
        if callback is None:
            return
        if frame["cmd"] == "session_message":
            data = dict(data, message=_current.decode_message(data.get("message")))
        callback(data)

    def _initialize(self, name: str, subject: str, kind: str, session_id: Optional[str]) -> Optional[str]:
        """Adopt ``session_id``, or create a session on the server; the session id, or None if not created."""
        self.name, self.subject, self.type = name, subject, kind or "public"
        manager = self.manager if self.manager is not None else self._manager_of_client()
        if session_id:
            self.session_id = str(session_id)
        else:
            new_id, code = manager.create_session_id(name, self.message_client, subject, session_type=self.type)
            if new_id is None:
                return None
            self.session_id, self.identifying_code = new_id, code or ""
            self.members = [self.agent_id]
            self.joined = True
        manager.init_his_session(self.session_id, self)
        return self.session_id

    def _manager_of_client(self) -> "_RoutingManager":
        """A session built on a bare client (0.1.99 style): a manager over that client receives its frames and
        re-joins after reconnects."""
        client = self.message_client
        if isinstance(client.message_handler, _RoutingManager):
            return client.message_handler  # another session on this client made one already
        if client.message_handler not in (None, self):
            raise RuntimeError("this message client already has another message handler; create sessions with "
                               "GroupManager / SessionManager instead")
        manager = (GroupManager if isinstance(self, Group) else LegacySessionManager)(
            client.agent_id, client.server_url, client.aid_path, client.seed_password, config=client.config)
        with manager.lock:
            manager.message_client_map[client.server_url] = client
        client.set_message_handler(manager)
        client.start()
        return manager


class _RoutingManager(_current.SessionManager):
    """A SessionManager that also hands each frame of a session to that session's own callbacks."""

    def on_message(self, ws: Any, message: str) -> None:
        frame = _frame(message)
        # Looked up first: the usual handling forgets a dismissed session before its system_message is passed on.
        session = self.get(str(frame["data"].get("session_id") or "")) if frame is not None else None
        super().on_message(ws, message)
        if isinstance(session, _OwnCallbacks) and frame is not None:
            session.on_message(ws, frame)


class LegacySession(_OwnCallbacks):
    """``agentcp.session_manager.Session`` of 0.1.99."""

    def initialize(self, name: str, subject: str, session_type: str = "public",
                   session_id: Optional[str] = None) -> Optional[str]:
        """Create the session on the server (or adopt ``session_id``); its id, or None if the server did not
        answer (0.1.99 returned an id even then)."""
        return self._initialize(name, subject, session_type, session_id)


class LegacySessionManager(_RoutingManager):
    """``agentcp.session_manager.SessionManager`` of 0.1.99: its sessions are :class:`LegacySession`."""

    session_class = LegacySession


class Group(_OwnCallbacks):
    """``agentcp.group_manager.Group`` of 0.1.99: a session with its own callbacks."""

    def initialize(self, name: str, subject: str, group_type: str = "public",
                   session_id: Optional[str] = None) -> Optional[str]:
        """Create the group on the server (or adopt ``session_id``); its id, or None if not created."""
        return self._initialize(name, subject, group_type, session_id)

    def close_chat_group(self) -> None:
        """The owner dismisses the group for everyone; a member leaves it."""
        manager = self.manager
        if manager is not None and manager.get(self.session_id) is self:
            if not manager.dismiss_session(self.session_id):
                manager.close_session(self.session_id)
        else:
            self.close_session()

    def leave_group(self, session_id: Optional[str] = None) -> None:
        """Leave this group (``session_id``, if given, must be its id)."""
        if session_id and str(session_id) != self.session_id:
            log.warning("leave_group(%s) on group %s ignored", session_id, self.session_id)
            return
        manager = self.manager
        if manager is not None and manager.get(self.session_id) is self:
            manager.leave_session(self.session_id)
        else:
            self.leave()


class GroupManager(_RoutingManager):
    """``agentcp.group_manager.GroupManager`` of 0.1.99: a SessionManager whose sessions are :class:`Group`."""

    session_class = Group

    def create_group(self, name: str, subject: str, group_type: str = "public") -> Optional[Group]:
        """Create a group this agent owns; None if the server did not confirm it."""
        return cast(Optional[Group], self.create_session(name, subject, group_type))  # session_class is Group

    def join_group(self, req: Any) -> Group:
        """Accept an invite (``InviteMessageReq``) and join its group."""
        return cast(Group, self.join_session(req))  # session_class is Group

    def leave_group(self, session_id: str) -> None:
        self.leave_session(session_id)

    def close_group(self, session_id: str) -> bool:
        """Dismiss the group (owner) or leave it (member); False if unknown."""
        return self.dismiss_session(session_id) or self.close_session(session_id)
