"""UDP wire format against the hex vectors of liveness.md §3.11."""
from __future__ import annotations

import pytest

from agentcp.msg import message_serialize as ms
from agentcp.msg.message_serialize import (
    HeartbeatMessageReq,
    HeartbeatMessageResp,
    InviteMessageReq,
    InviteMessageResp,
    MalformedDatagram,
    to_bytes,
    uint64_to_varint,
    varint_to_uint64,
)

HB_REQ = "00 01 02 01 00 64 11 61 6c 69 63 65 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 00 00 00 00 00 00 2a"
HB_RESP_5000 = "00 01 01 02 00 08 00 00 00 00 00 00 13 88"
HB_RESP_401 = "00 02 01 02 00 08 00 00 00 00 00 00 01 91"
HB_RESP_VARINT = "00 01 01 02 00 02 88 27"
INVITE_RESP = ("00 03 02 04 00 00 11 61 6c 69 63 65 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d "
               "0f 62 6f 62 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 00 00 00 00 00 00 00 2a")
INVITE_REQ = ("00 07 01 03 00 00 0f 62 6f 62 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d 05 43 4f 44 45 31 "
              "00 00 01 9b 76 da a8 00 03 73 2d 31 17 68 74 74 70 73 3a 2f 2f 6d 73 67 2e 65 78 61 "
              "6d 70 6c 65 2e 63 6f 6d")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.mark.parametrize("value, encoded", [(0, "00"), (1, "01"), (127, "7f"), (128, "80 01"), (300, "ac 02"),
                                            (401, "91 03"), (5000, "88 27"), (16384, "80 80 01"),
                                            (2**64 - 1, "ff ff ff ff ff ff ff ff ff 01")])
def test_varint_vectors(value, encoded):
    assert uint64_to_varint(value) == h(encoded)
    assert varint_to_uint64(h(encoded)) == (value, len(h(encoded)))


@pytest.mark.parametrize("bad", ["80", "ff ff", "ff ff ff ff ff ff ff ff ff ff 01", "ff ff ff ff ff ff ff ff ff 02"])
def test_bad_varints_raise(bad):
    with pytest.raises(ValueError, match="Invalid varint"):
        varint_to_uint64(h(bad))


def test_heartbeat_request_vector():
    req = HeartbeatMessageReq()
    req.header.MessageSeq = 1
    req.AgentId = "alice.example.com"
    req.SignCookie = 42
    assert to_bytes(req) == h(HB_REQ)
    back, end = HeartbeatMessageReq.deserialize(h(HB_REQ), 0)
    assert (back.AgentId, back.SignCookie, back.header.PayloadSize, end) == ("alice.example.com", 42, 100, 32)


@pytest.mark.parametrize("hexs, value", [(HB_RESP_5000, 5000), (HB_RESP_401, 401), (HB_RESP_VARINT, 5000),
                                         ("00 01 01 02 00 02 91 03", 401)])
def test_next_beat_decoded_by_length(hexs, value):
    resp, _ = HeartbeatMessageResp.deserialize(h(hexs), 0)
    assert resp.NextBeat == value


def test_heartbeat_response_serializes_both_encodings():
    resp = HeartbeatMessageResp()
    resp.header.MessageSeq = 1
    resp.NextBeat = 5000
    assert to_bytes(resp) == h(HB_RESP_5000)
    import io

    buf = io.BytesIO()
    resp.header.PayloadSize = 2
    resp.serialize(buf, varint=True)
    assert buf.getvalue() == h(HB_RESP_VARINT)


def test_invite_response_vector_carries_session_id_field():
    resp = InviteMessageResp()
    resp.header.MessageSeq = 3
    resp.AgentId = "alice.example.com"
    resp.InviterAgentId = "bob.example.com"
    resp.SignCookie = 42
    assert to_bytes(resp) == h(INVITE_RESP)
    resp.SessionId = "s-1"
    back, _ = InviteMessageResp.deserialize(to_bytes(resp), 0)
    assert (back.SessionId, back.SignCookie) == ("s-1", 42)


def test_invite_request_vector_round_trips():
    inv, end = InviteMessageReq.deserialize(h(INVITE_REQ), 0)
    assert (inv.InviterAgentId, inv.InviteCode, inv.InviteCodeExpire, inv.SessionId, inv.MessageServer) == (
        "bob.example.com", "CODE1", 1767225600000, "s-1", "https://msg.example.com")
    assert end == 64
    assert to_bytes(inv) == h(INVITE_REQ)  # 0.1.99 wrote the expiry twice (D-H17)


@pytest.mark.parametrize("data", ["", "00", "00 01 01", "00 01 01 02 00", "00 01 01 02 00 08",
                                  "00 01 01 03 00 00 05 41 42", "00 01 01 03 00 00 02 ff fe"])
def test_short_or_garbage_datagrams_raise_malformed(data):
    with pytest.raises(MalformedDatagram):
        raw = h(data)
        if ms.peek_message_type(raw) == ms.MSG_HEARTBEAT_RESP:
            HeartbeatMessageResp.deserialize(raw, 0)
        else:
            InviteMessageReq.deserialize(raw, 0)


@pytest.mark.parametrize("cookie", [-1, 2**64, "42x", None])
def test_bad_sign_cookie_is_a_clear_error(cookie):
    req = HeartbeatMessageReq()
    req.AgentId = "a.b.c"
    req.SignCookie = cookie
    with pytest.raises(ValueError, match="SignCookie"):
        to_bytes(req)
