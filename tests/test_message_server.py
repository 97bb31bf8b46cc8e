"""The fake message server on its own: handshake, RFC 6455 framing, commands, replay, fault controls.

Driven by a minimal hand-written WebSocket client (raw socket + masked frames), so the server is checked
independently of agentcp's MessageClient.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct

import pytest
import requests

from agentcp.base.auth_client import AuthClient
from agentcp.ca.identity_store import hash_seed_password
from agentcp.testing.message_server import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, MessageServer, encode_frame


@pytest.fixture
def ms(acp_server):
    return MessageServer(acp_server).install()


@pytest.fixture
def token(acp_server, ms, tmp_path):
    def sign_in(aid: str) -> str:
        certs = os.path.join(str(tmp_path), aid)
        acp_server.issue_identity(aid, certs, "seed")
        auth = AuthClient(aid, ms.url, certs, hash_seed_password("seed"))
        auth.sign_in_once()
        return auth.signature

    return sign_in


class RawWS:
    """Just enough of a WebSocket client to talk to the server."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def frame(self):
        b1, b2 = self._read(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        return b1 & 0x0F, self._read(n)

    def send(self, cmd: str, data: dict) -> None:
        self.sock.sendall(encode_frame(OP_TEXT, json.dumps({"cmd": cmd, "data": data}).encode(), mask=True))

    def recv(self, cmd: str):
        while True:
            op, payload = self.frame()
            if op == OP_TEXT:
                frame = json.loads(payload)
                if frame["cmd"] == cmd:
                    return frame["data"]

    def close(self) -> None:
        self.sock.close()


def connect(acp_server, ms, aid: str, token: str) -> RawWS:
    return RawWS(acp_server.http_port, f"{ms.prefix}/session?agent_id={aid}&signature={token}")


def test_handshake_needs_a_message_server_token(acp_server, ms, token):
    bad = connect(acp_server, ms, "ann.example.com", "nope")
    assert bad.status == 401
    bad.close()
    tok = token("ann.example.com")
    other = connect(acp_server, ms, "bob.example.com", tok)  # someone else's token
    assert other.status == 401
    other.close()
    ok = connect(acp_server, ms, "ann.example.com", tok)
    assert ok.status == 101
    ms.wait_connected("ann.example.com")
    ok.close()
    assert ms.counters["rejected"] == 2


def test_message_server_sign_in_leaves_the_heartbeat_session_alone(acp_server, ms, token):
    token("ann.example.com")
    assert acp_server.sessions == []  # the access point's flow with its own tokens


def test_ping_pong_and_stop_pongs(acp_server, ms, token):
    ws = connect(acp_server, ms, "ann.example.com", token("ann.example.com"))
    ws.sock.sendall(encode_frame(OP_PING, b"hi", mask=True))
    assert ws.frame() == (OP_PONG, b"hi")
    ms.stop_pongs(True)
    ws.sock.sendall(encode_frame(OP_PING, b"x", mask=True))
    ws.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        ws.frame()
    assert ms.counters["pongs_withheld"] == 1
    ws.close()


def test_refuse_and_drop_all(acp_server, ms, token):
    tok = token("ann.example.com")
    ws = connect(acp_server, ms, "ann.example.com", tok)
    ms.wait_connected("ann.example.com")
    ms.refuse(True)
    refused = connect(acp_server, ms, "ann.example.com", tok)
    assert refused.status == 503
    refused.close()
    assert ms.drop_all() == 1
    with pytest.raises((ConnectionError, OSError)):
        ws.frame()
    ms.refuse(False)
    again = connect(acp_server, ms, "ann.example.com", tok)
    assert again.status == 101
    again.close()


def test_session_lifecycle_relay_ack_members_and_dismissal(acp_server, ms, token):
    a = connect(acp_server, ms, "ann.example.com", token("ann.example.com"))
    b = connect(acp_server, ms, "bob.example.com", token("bob.example.com"))
    ms.wait_connected("bob.example.com")
    a.send("create_session_req", {"request_id": "r", "type": "public", "group_name": "g", "subject": "",
                                  "timestamp": "1"})
    ack = a.recv("create_session_ack")
    assert ack["request_id"] == "r" and ack["status_code"] == 200 and ack["session_id"] and ack["identifying_code"]
    sid, code = ack["session_id"], ack["identifying_code"]
    a.send("invite_agent_req", {"session_id": sid, "request_id": "i", "inviter_id": "ann.example.com",
                                "acceptor_id": "bob.example.com", "invite_code": code})
    invite = b.recv("invite_agent_req")  # bob has no heartbeat: pushed on his WebSocket
    assert invite["session_id"] == sid and invite["invite_code"] == code
    assert a.recv("invite_agent_ack")["status_code"] == 200
    b.send("join_session_req", {"session_id": sid, "request_id": "j", "inviter_agent_id": "ann.example.com",
                                "invite_code": code, "last_msg_id": "0"})
    ms.wait_for(lambda: "bob.example.com" in ms.members(sid))
    # a fragmented text frame (two frames) is reassembled
    text = json.dumps({"cmd": "session_message", "data": {"message_id": "m1", "session_id": sid, "ref_msg_id": "",
                                                          "sender": "ann.example.com", "receiver": "bob.example.com",
                                                          "message": "%5B%5D", "timestamp": "1"}}).encode()
    first = bytearray(encode_frame(OP_TEXT, text[:10], mask=True))
    first[0] &= 0x7F  # FIN off
    a.sock.sendall(bytes(first) + encode_frame(OP_CONT, text[10:], mask=True))
    got = b.recv("session_message")
    assert got["message_id"].isdigit() and got["sender"] == "ann.example.com"  # the server's own sequence
    assert a.recv("session_message_ack") == {"session_id": sid, "message_id": "m1", "request_id": "m1",
                                              "status_code": 200, "message": "ok", "offline_receivers": [],
                                              "server_msg_id": got["message_id"]}
    a.send("get_member_list", {"session_id": sid, "request_id": "ml"})
    members = a.recv("get_member_list_ack")
    assert {m["agent_id"]: m["role"] for m in members["member_list"]} == {"ann.example.com": "owner",
                                                                          "bob.example.com": "member"}
    a.send("close_session_req", {"session_id": sid, "request_id": "c", "identifying_code": code})
    assert b.recv("system_message")["event_type"] == "Session dismissed"
    assert sid not in ms.sessions()
    a.sock.sendall(encode_frame(OP_CLOSE, b"\x03\xe8", mask=True))
    assert a.frame()[0] == OP_CLOSE
    a.close()
    b.close()


def test_rejoin_replays_what_was_missed(acp_server, ms, token):
    ta, tb = token("ann.example.com"), token("bob.example.com")
    a = connect(acp_server, ms, "ann.example.com", ta)
    a.send("create_session_req", {"request_id": "r", "type": "public", "group_name": "g", "subject": "",
                                  "timestamp": "1"})
    ack = a.recv("create_session_ack")
    sid, code = ack["session_id"], ack["identifying_code"]
    a.send("invite_agent_req", {"session_id": sid, "request_id": "i", "inviter_id": "ann.example.com",
                                "acceptor_id": "bob.example.com", "invite_code": code})
    assert a.recv("invite_agent_ack")["status_code"] == 404  # bob is nowhere yet, but is a member now

    def msg(mid):
        a.send("session_message", {"message_id": mid, "session_id": sid, "ref_msg_id": "",
                                   "sender": "ann.example.com", "receiver": "bob.example.com", "message": mid,
                                   "timestamp": "1"})
        a.recv("session_message_ack")

    def received(n):
        frames = [b.recv("session_message") for _ in range(n)]
        return [f["message"] for f in frames], [f["message_id"] for f in frames]

    msg("1")
    msg("2")
    b = connect(acp_server, ms, "bob.example.com", tb)
    join = {"session_id": sid, "request_id": "j", "inviter_agent_id": "ann.example.com", "invite_code": code,
            "last_msg_id": "0"}
    b.send("join_session_req", join)
    texts, ids = received(2)
    assert texts == ["1", "2"]  # never pushed before
    assert len(set(ids)) == 2 and all(i.isdigit() for i in ids)  # relayed under the server's own sequence
    msg("3")
    assert received(1)[0] == ["3"]
    b.close()
    msg("4")
    b = connect(acp_server, ms, "bob.example.com", tb)
    b.send("join_session_req", dict(join, last_msg_id=ids[1]))  # bob saw up to 2 (3 was lost in his socket)
    assert received(2)[0] == ["3", "4"]
    # a restart keeps sessions and members (a server with a database) ...
    ms.restart()
    assert ms.sessions() == [sid] and set(ms.members(sid)) == {"ann.example.com", "bob.example.com"}
    # ... unless told to forget them
    ms.restart(forget_sessions=True)
    assert ms.sessions() == []
    b.close()
    a.close()


def test_devserver_network_has_a_message_server(acp_server):
    from agentcp.testing.access_point import AccessPoint

    ap = AccessPoint(acp_server).install()
    assert ap.messages is not None and ap.message_server == ap.messages.url
    assert requests.post(ap.messages.url + "/sign_in", json={"agent_id": "x.example.com", "request_id": "r"},
                         timeout=5).status_code == 200
