"""Binary WebSocket frames of the stream/file channels (messaging.md §4.5, api.md §8.5).

A frame is a 28-byte big-endian header (struct ``>BBHIHIBBIII``) followed by the payload:

====  ====  ===============  ==================================================================
off   size  field            value
====  ====  ===============  ==================================================================
0     1     magic_byte1      0x4D ``'M'``
1     1     magic_byte2      0x55 ``'U'``
2     2     version          0x0101
4     4     flags            0
8     2     msg_type         1 = JSON text, 5 = file chunk
10    4     msg_seq          0
14    1     content_type     1 = JSON text, 5 = file bytes
15    1     compressed       0 = none, 1 = zlib stream
16    4     reserved         byte offset of a file chunk
20    4     crc32            CRC-32 (zlib) of the payload as transmitted
24    4     payload_length   length of the payload as transmitted
====  ====  ===============  ==================================================================

Names and signatures are those of agentcp 0.1.99. One deliberate difference: where 0.1.99's decoders returned
``""``/``None`` on a bad frame, ours raise :class:`MalformedFrame` (a ``ValueError``) that says what is wrong, and
the encoders reject out-of-range header fields instead of letting ``struct`` fail obscurely.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Tuple, Union

__all__ = [
    "WssBinaryMessage",
    "MalformedFrame",
    "encode_wss_binary_message",
    "decode_wss_binary_message",
    "encode_wss_binary_buffer",
    "decode_wss_binary_buffer",
    "HEADER_FORMAT",
    "HEADER_SIZE",
    "MAGIC_BYTE1",
    "MAGIC_BYTE2",
    "PROTOCOL_VERSION",
    "MSG_TYPE_JSON",
    "MSG_TYPE_FILE",
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_FILE",
    "COMPRESS_THRESHOLD",
    "MAX_PAYLOAD_SIZE",
]

HEADER_FORMAT = ">BBHIHIBBIII"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 28
MAGIC_BYTE1 = 0x4D  # 'M'
MAGIC_BYTE2 = 0x55  # 'U'
PROTOCOL_VERSION = 0x0101
MSG_TYPE_JSON = 1
MSG_TYPE_FILE = 5
CONTENT_TYPE_JSON = 1
CONTENT_TYPE_FILE = 5
#: JSON payloads of this many UTF-8 bytes or more are zlib-compressed by :func:`encode_wss_binary_message`.
COMPRESS_THRESHOLD = 512
#: Upper bound for a decompressed payload: a small frame must not be able to inflate into gigabytes.
MAX_PAYLOAD_SIZE = 64 * 1024 * 1024

# (field name, struct width in bits) in header order; used to range-check before packing.
_FIELDS: Tuple[Tuple[str, int], ...] = (
    ("magic_byte1", 8), ("magic_byte2", 8), ("version", 16), ("flags", 32), ("msg_type", 16), ("msg_seq", 32),
    ("content_type", 8), ("compressed", 8), ("reserved", 32), ("crc32", 32), ("payload_length", 32),
)

Bytes = Union[bytes, bytearray, memoryview]


class MalformedFrame(ValueError):
    """A binary frame that is not a valid §4.5 frame (or a header that cannot be encoded)."""


@dataclass
class WssBinaryMessage:
    """One frame's header fields plus its payload (0.1.99 field names and defaults: a JSON-text frame)."""

    magic_byte1: int = MAGIC_BYTE1
    magic_byte2: int = MAGIC_BYTE2
    version: int = PROTOCOL_VERSION
    flags: int = 0
    msg_type: int = MSG_TYPE_JSON
    msg_seq: int = 0
    content_type: int = CONTENT_TYPE_JSON
    compressed: int = 0
    reserved: int = 0
    crc32: int = 0
    payload_length: int = 0
    payload: bytes = b""


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def _pack(header: Any, payload: bytes, compressed: int) -> bytes:
    """Pack ``header``'s fields (any object with the dataclass attributes) with crc and length of ``payload``."""
    values = {}
    for name, _ in _FIELDS:
        if not hasattr(header, name):
            raise TypeError(f"msg_header has no field {name!r}")
        values[name] = getattr(header, name)
    values["compressed"] = compressed
    values["crc32"] = zlib.crc32(payload) & 0xFFFFFFFF
    values["payload_length"] = len(payload)
    for name, bits in _FIELDS:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"header field {name} must be an int, got {type(value).__name__}")
        if not 0 <= value < (1 << bits):
            hint = " (file offsets of 4 GiB and more cannot be encoded)" if name == "reserved" else ""
            raise MalformedFrame(f"header field {name}={value} does not fit in {bits} bits{hint}")
    if compressed not in (0, 1):
        raise MalformedFrame(f"compressed must be 0 or 1, got {compressed}")
    return struct.pack(HEADER_FORMAT, *(values[name] for name, _ in _FIELDS)) + payload


def _inflate(payload: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_PAYLOAD_SIZE)
    except zlib.error as exc:
        raise MalformedFrame(f"compressed payload is not a valid zlib stream: {exc}") from None
    if inflater.unconsumed_tail:
        raise MalformedFrame(f"decompressed payload exceeds {MAX_PAYLOAD_SIZE} bytes")
    if not inflater.eof:
        raise MalformedFrame("compressed payload is truncated (zlib stream does not end)")
    if inflater.unused_data:
        raise MalformedFrame(f"{len(inflater.unused_data)} stray byte(s) after the zlib stream")
    return out


def _unpack(data: Any) -> Tuple[Tuple[int, int, int, int, int, int, int, int, int, int, int], bytes]:
    """Validate a frame; return its 11 header values and its payload (decompressed if ``compressed`` is 1)."""
    raw = _as_bytes("data", data)
    if len(raw) < HEADER_SIZE:
        raise MalformedFrame(f"frame of {len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = struct.unpack_from(HEADER_FORMAT, raw)
    magic1, magic2, _, _, _, _, _, compressed, _, crc, length = fields
    if (magic1, magic2) != (MAGIC_BYTE1, MAGIC_BYTE2):
        raise MalformedFrame(f"bad magic 0x{magic1:02x}{magic2:02x} (expected 0x4d55 'MU')")
    actual = len(raw) - HEADER_SIZE
    if actual != length:
        raise MalformedFrame(f"payload_length says {length} bytes but the frame carries {actual}")
    payload = raw[HEADER_SIZE:]
    got_crc = zlib.crc32(payload) & 0xFFFFFFFF
    if got_crc != crc:
        raise MalformedFrame(f"crc32 mismatch: header 0x{crc:08x}, payload 0x{got_crc:08x}")
    if compressed == 1:
        payload = _inflate(payload)
    elif compressed != 0:
        raise MalformedFrame(f"unknown compression flag {compressed} (expected 0 or 1)")
    return fields, payload


def encode_wss_binary_message(json_data: str) -> bytes:
    """A JSON-text frame (msg_type 1, content_type 1) carrying ``json_data``; zlib-compressed (flag 1) when its
    UTF-8 form is :data:`COMPRESS_THRESHOLD` bytes or longer."""
    if not isinstance(json_data, str):
        raise TypeError(f"json_data must be a str, got {type(json_data).__name__}")
    payload = json_data.encode("utf-8")
    compressed = 0
    if len(payload) >= COMPRESS_THRESHOLD:
        payload, compressed = zlib.compress(payload), 1
    return _pack(WssBinaryMessage(), payload, compressed)


def decode_wss_binary_message(data: Bytes) -> str:
    """The text a frame carries (decompressed if needed). Raises :class:`MalformedFrame` for a bad frame or a
    payload that is not UTF-8 (0.1.99 returned ``""``)."""
    _, payload = _unpack(data)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedFrame(f"payload is not UTF-8 text: {exc}") from None


def encode_wss_binary_buffer(payload: Bytes, msg_header: WssBinaryMessage) -> bytes:
    """A frame with ``msg_header``'s fields and ``payload`` as given (never compressed here; ``crc32`` and
    ``payload_length`` are computed from ``payload``). File chunks: msg_type 5, content_type 5, reserved =
    byte offset."""
    body = _as_bytes("payload", payload)
    return _pack(msg_header, body, getattr(msg_header, "compressed", 0))


def decode_wss_binary_buffer(data: Bytes) -> WssBinaryMessage:
    """Parse and validate a frame. Header fields are as transmitted; ``payload`` is decompressed when
    ``compressed`` is 1. Raises :class:`MalformedFrame` (0.1.99 returned None)."""
    fields, payload = _unpack(data)
    return WssBinaryMessage(*fields, payload=payload)
