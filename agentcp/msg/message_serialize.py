"""UDP heartbeat wire format (liveness.md §3).

Pure encoding and decoding, no I/O. Names and field names match agentcp 0.1.99 so code that imports
``agentcp.msg.message_serialize`` keeps working. Unlike 0.1.99, every decoder is bounds-checked: a short or
malformed buffer raises :class:`MalformedDatagram` (a ``ValueError``) instead of yielding silent zeros.
"""
from __future__ import annotations

import io
import struct
from typing import Tuple

__all__ = [
    "MalformedDatagram",
    "uint64_to_varint",
    "varint_to_uint64",
    "UdpMessageHeader",
    "HeartbeatMessageReq",
    "HeartbeatMessageResp",
    "InviteMessageReq",
    "InviteMessageResp",
    "MSG_HEARTBEAT_REQ",
    "MSG_HEARTBEAT_RESP",
    "MSG_INVITE_REQ",
    "MSG_INVITE_RESP",
    "NEXT_BEAT_REAUTH",
    "decode_next_beat",
    "peek_message_type",
]

MSG_HEARTBEAT_REQ = 513
MSG_HEARTBEAT_RESP = 258
MSG_INVITE_REQ = 259
MSG_INVITE_RESP = 516

#: NextBeat value by which the server says "I do not know your session any more: sign in again".
NEXT_BEAT_REAUTH = 401

_MAX_VARINT_BYTES = 10  # a uint64 never needs more than 10 LEB128 groups
_U64_MAX = (1 << 64) - 1

class MalformedDatagram(ValueError):
    """A datagram could not be decoded (too short, bad varint, bad UTF-8, out-of-range value)."""


def uint64_to_varint(v: int) -> bytes:
    """Encode an unsigned 64-bit integer as an unsigned LEB128 varint."""
    if not isinstance(v, int) or v < 0 or v > _U64_MAX:
        raise ValueError(f"varint value out of range [0, 2**64): {v!r}")
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_to_uint64(buf: bytes, offset: int = 0) -> Tuple[int, int]:
    """Decode an unsigned LEB128 varint from ``buf`` at ``offset``.

    Returns ``(value, bytes_consumed)``. Raises ``ValueError("Invalid varint")`` (a :class:`MalformedDatagram`)
    when the input ends mid-varint, is longer than 10 bytes, or exceeds 2**64-1.
    """
    value = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(buf):
            break
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > _U64_MAX:
                break
            return value, i + 1
        shift += 7
    raise MalformedDatagram("Invalid varint")


def _need(buf: bytes, offset: int, n: int, what: str) -> None:
    if offset < 0 or offset + n > len(buf):
        raise MalformedDatagram(f"datagram too short for {what}: need {n} bytes at offset {offset}, have {len(buf)}")


def _read_u16(buf: bytes, offset: int, what: str) -> Tuple[int, int]:
    _need(buf, offset, 2, what)
    return struct.unpack_from(">H", buf, offset)[0], offset + 2


def _read_u64(buf: bytes, offset: int, what: str) -> Tuple[int, int]:
    _need(buf, offset, 8, what)
    return struct.unpack_from(">Q", buf, offset)[0], offset + 8


def _read_i64(buf: bytes, offset: int, what: str) -> Tuple[int, int]:
    _need(buf, offset, 8, what)
    return struct.unpack_from(">q", buf, offset)[0], offset + 8


def _read_varint(buf: bytes, offset: int) -> Tuple[int, int]:
    value, used = varint_to_uint64(buf, offset)
    return value, offset + used


def _read_str(buf: bytes, offset: int, what: str) -> Tuple[str, int]:
    length, offset = _read_varint(buf, offset)
    _need(buf, offset, length, what)
    try:
        text = bytes(buf[offset : offset + length]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedDatagram(f"{what} is not valid UTF-8") from exc
    return text, offset + length


def _write_str(out: io.BytesIO, text: str) -> None:
    data = text.encode("utf-8")
    out.write(uint64_to_varint(len(data)))
    out.write(data)


def _write_u64(out: io.BytesIO, value: int, what: str) -> None:
    try:
        value = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be an integer, got {value!r}") from exc
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} out of range [0, 2**64): {value}")
    out.write(struct.pack(">Q", value))


class UdpMessageHeader:
    """Header of every heartbeat datagram: varint mask, varint seq, u16 type, u16 payload size."""

    def __init__(self) -> None:
        self.MessageMask = 0
        self.MessageSeq = 0
        self.MessageType = 0
        self.PayloadSize = 0

    def serialize(self, buf: io.BytesIO) -> None:
        buf.write(uint64_to_varint(self.MessageMask))
        buf.write(uint64_to_varint(self.MessageSeq))
        buf.write(struct.pack(">HH", self.MessageType & 0xFFFF, self.PayloadSize & 0xFFFF))

    @classmethod
    def deserialize(cls, buf: bytes, offset: int = 0) -> Tuple["UdpMessageHeader", int]:
        header = cls()
        header.MessageMask, offset = _read_varint(buf, offset)
        header.MessageSeq, offset = _read_varint(buf, offset)
        header.MessageType, offset = _read_u16(buf, offset, "MessageType")
        header.PayloadSize, offset = _read_u16(buf, offset, "PayloadSize")
        return header, offset

    def __repr__(self) -> str:
        return (
            f"UdpMessageHeader(mask={self.MessageMask}, seq={self.MessageSeq}, "
            f"type={self.MessageType}, payload={self.PayloadSize})"
        )


def peek_message_type(buf: bytes) -> int:
    """Return the MessageType of a datagram (raises :class:`MalformedDatagram` if the header is incomplete)."""
    header, _ = UdpMessageHeader.deserialize(buf, 0)
    return header.MessageType


def _make_header(msg_type: int, seq: int = 0, payload_size: int = 0) -> UdpMessageHeader:
    header = UdpMessageHeader()
    header.MessageType = msg_type
    header.MessageSeq = seq
    header.PayloadSize = payload_size
    return header


class HeartbeatMessageReq:
    """HeartbeatReq (513): header, str AgentId, u64 SignCookie."""

    def __init__(self) -> None:
        self.header = _make_header(MSG_HEARTBEAT_REQ, payload_size=100)
        self.AgentId = ""
        self.SignCookie = 0

    def serialize(self, buf: io.BytesIO) -> None:
        self.header.serialize(buf)
        _write_str(buf, self.AgentId)
        _write_u64(buf, self.SignCookie, "SignCookie")

    @classmethod
    def deserialize(cls, buf: bytes, offset: int = 0) -> Tuple["HeartbeatMessageReq", int]:
        msg = cls()
        msg.header, offset = UdpMessageHeader.deserialize(buf, offset)
        msg.AgentId, offset = _read_str(buf, offset, "AgentId")
        msg.SignCookie, offset = _read_u64(buf, offset, "SignCookie")
        return msg, offset


def decode_next_beat(buf: bytes, offset: int) -> Tuple[int, int]:
    """Decode NextBeat by length (liveness.md §3.7).

    Exactly 8 bytes after the header is a u64 big-endian (0.1.99, C++); anything else is a uvarint (Node SDK).
    """
    remaining = len(buf) - offset
    if remaining == 8:
        return _read_u64(buf, offset, "NextBeat")
    if remaining <= 0:
        raise MalformedDatagram("HeartbeatResp has no NextBeat")
    return _read_varint(buf, offset)


class HeartbeatMessageResp:
    """HeartbeatResp (258): header, NextBeat in milliseconds (or 401: sign in again).

    ``deserialize`` accepts both encodings seen in the wild (u64 BE when exactly 8 bytes follow the header,
    uvarint otherwise); ``serialize`` writes u64 BE as 0.1.99 expects, or a uvarint when ``varint`` is true.
    """

    def __init__(self) -> None:
        self.header = _make_header(MSG_HEARTBEAT_RESP, payload_size=8)
        self.NextBeat = 0

    def serialize(self, buf: io.BytesIO, varint: bool = False) -> None:
        self.header.serialize(buf)
        if varint:
            buf.write(uint64_to_varint(self.NextBeat))
        else:
            _write_u64(buf, self.NextBeat, "NextBeat")

    @classmethod
    def deserialize(cls, buf: bytes, offset: int = 0) -> Tuple["HeartbeatMessageResp", int]:
        msg = cls()
        msg.header, offset = UdpMessageHeader.deserialize(buf, offset)
        msg.NextBeat, offset = decode_next_beat(buf, offset)
        return msg, offset


class InviteMessageReq:
    """InviteReq (259), server to client: Inviter, InviteCode, i64 InviteCodeExpire, SessionId, MessageServer."""

    def __init__(self) -> None:
        self.header = _make_header(MSG_INVITE_REQ)
        self.InviterAgentId = ""
        self.InviteCode = ""
        self.InviteCodeExpire = 0
        self.SessionId = ""
        self.MessageServer = ""

    def serialize(self, buf: io.BytesIO) -> None:
        # Written once (0.1.99 wrote InviteCodeExpire twice, so its output did not round-trip; D-H17).
        self.header.serialize(buf)
        _write_str(buf, self.InviterAgentId)
        _write_str(buf, self.InviteCode)
        buf.write(struct.pack(">q", int(self.InviteCodeExpire)))
        _write_str(buf, self.SessionId)
        _write_str(buf, self.MessageServer)

    @classmethod
    def deserialize(cls, buf: bytes, offset: int = 0) -> Tuple["InviteMessageReq", int]:
        msg = cls()
        msg.header, offset = UdpMessageHeader.deserialize(buf, offset)
        msg.InviterAgentId, offset = _read_str(buf, offset, "InviterAgentId")
        msg.InviteCode, offset = _read_str(buf, offset, "InviteCode")
        msg.InviteCodeExpire, offset = _read_i64(buf, offset, "InviteCodeExpire")
        msg.SessionId, offset = _read_str(buf, offset, "SessionId")
        msg.MessageServer, offset = _read_str(buf, offset, "MessageServer")
        return msg, offset


class InviteMessageResp:
    """InviteResp (516), client to server: AgentId, InviterAgentId, SessionId, then u64 SignCookie (last)."""

    def __init__(self) -> None:
        self.header = _make_header(MSG_INVITE_RESP)
        self.AgentId = ""
        self.SignCookie = 0
        self.InviterAgentId = ""
        self.SessionId = ""

    def serialize(self, buf: io.BytesIO) -> None:
        self.header.serialize(buf)
        _write_str(buf, self.AgentId)
        _write_str(buf, self.InviterAgentId)
        _write_str(buf, self.SessionId)
        _write_u64(buf, self.SignCookie, "SignCookie")

    @classmethod
    def deserialize(cls, buf: bytes, offset: int = 0) -> Tuple["InviteMessageResp", int]:
        msg = cls()
        msg.header, offset = UdpMessageHeader.deserialize(buf, offset)
        msg.AgentId, offset = _read_str(buf, offset, "AgentId")
        msg.InviterAgentId, offset = _read_str(buf, offset, "InviterAgentId")
        msg.SessionId, offset = _read_str(buf, offset, "SessionId")
        msg.SignCookie, offset = _read_u64(buf, offset, "SignCookie")
        return msg, offset


def to_bytes(msg) -> bytes:
    """Serialize any message object of this module to bytes."""
    out = io.BytesIO()
    msg.serialize(out)
    return out.getvalue()
