"""Binary stream/file frames (messaging.md §4.5): hand-computed vectors, round trips, malformed input."""
from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest

from agentcp.file import wss_binary_message as filecodec
from agentcp.msg import wss_binary_message as codec
from agentcp.msg.wss_binary_message import (
    MalformedFrame,
    WssBinaryMessage,
    decode_wss_binary_buffer,
    decode_wss_binary_message,
    encode_wss_binary_buffer,
    encode_wss_binary_message,
)

# §4.5 example: a 5-byte file chunk at offset 1234. CRC-32("hello") = 0x3610a686 (standard test value).
HELLO_CHUNK = bytes.fromhex(
    "4d55" "0101" "00000000" "0005" "00000000" "05" "00" "000004d2" "3610a686" "00000005") + b"hello"
# JSON-text frame of "123456789"; CRC-32("123456789") = 0xcbf43926 is the CRC-32 check value.
JSON_FRAME = bytes.fromhex(
    "4d55" "0101" "00000000" "0001" "00000000" "01" "00" "00000000" "cbf43926" "00000009") + b"123456789"
EMPTY_FRAME = bytes.fromhex("4d55" "0101" "00000000" "0001" "00000000" "01" "00" "00000000" "00000000" "00000000")


def file_header(offset: int) -> WssBinaryMessage:
    return WssBinaryMessage(msg_type=5, content_type=5, reserved=offset)


def frame(payload: bytes, compressed: int = 0, magic: bytes = b"MU", length=None, crc=None) -> bytes:
    """Build a frame by hand (independent of the codec) to feed the decoders odd headers."""
    crc = zlib.crc32(payload) if crc is None else crc
    length = len(payload) if length is None else length
    return struct.pack(">BBHIHIBBIII", magic[0], magic[1], 0x0101, 0, 1, 0, 1, compressed, 0, crc, length) + payload


def test_header_layout_constants():
    assert codec.HEADER_SIZE == 28 and codec.HEADER_FORMAT == ">BBHIHIBBIII"
    assert [f.name for f in dataclasses.fields(WssBinaryMessage)] == [
        "magic_byte1", "magic_byte2", "version", "flags", "msg_type", "msg_seq", "content_type", "compressed",
        "reserved", "crc32", "payload_length", "payload"]
    default = WssBinaryMessage()
    assert (default.magic_byte1, default.magic_byte2, default.version, default.msg_type, default.content_type) == (
        77, 85, 0x101, 1, 1)


def test_file_chunk_vector():
    assert encode_wss_binary_buffer(b"hello", file_header(1234)) == HELLO_CHUNK
    msg = decode_wss_binary_buffer(HELLO_CHUNK)
    assert msg == WssBinaryMessage(77, 85, 0x101, 0, 5, 0, 5, 0, 1234, 0x3610A686, 5, b"hello")


def test_json_vectors():
    assert encode_wss_binary_message("123456789") == JSON_FRAME
    assert decode_wss_binary_message(JSON_FRAME) == "123456789"
    assert encode_wss_binary_message("") == EMPTY_FRAME
    assert decode_wss_binary_message(EMPTY_FRAME) == ""


def test_compression_threshold_and_round_trip():
    below = '"' + "a" * 509 + '"'  # 511 bytes
    at = '"' + "a" * 510 + '"'  # 512 bytes
    small, big = encode_wss_binary_message(below), encode_wss_binary_message(at)
    assert small[15] == 0 and len(small) == 28 + 511
    assert big[15] == 1
    packed = zlib.compress(at.encode())
    assert big[28:] == packed  # default-level zlib stream with header
    assert struct.unpack(">I", big[24:28])[0] == len(packed)
    assert struct.unpack(">I", big[20:24])[0] == zlib.crc32(packed)  # CRC of the payload as transmitted
    assert decode_wss_binary_message(big) == at and decode_wss_binary_message(small) == below
    assert decode_wss_binary_buffer(big).payload == at.encode()
    text = '{"chunk": "' + "\u4f60\u597d" * 400 + '"}'  # non-ASCII survives UTF-8 + zlib
    assert decode_wss_binary_message(encode_wss_binary_message(text)) == text


def test_buffer_round_trip_keeps_every_field():
    header = WssBinaryMessage(flags=7, msg_type=5, msg_seq=99, content_type=5, reserved=0xFFFFFFFF)
    data = bytes(range(256)) * 70
    out = decode_wss_binary_buffer(encode_wss_binary_buffer(bytearray(data), header))
    assert (out.flags, out.msg_seq, out.reserved, out.payload_length, out.payload) == (
        7, 99, 0xFFFFFFFF, len(data), data)
    assert decode_wss_binary_buffer(memoryview(HELLO_CHUNK)).payload == b"hello"


@pytest.mark.parametrize("data, match", [
    (b"", "shorter than the 28-byte header"),
    (HELLO_CHUNK[:27], "shorter"),
    (b"XU" + HELLO_CHUNK[2:], "bad magic"),
    (HELLO_CHUNK[:-1], "payload_length says 5 bytes but the frame carries 4"),
    (HELLO_CHUNK + b"!", "carries 6"),
    (HELLO_CHUNK[:-1] + b"O", "crc32 mismatch"),
    (frame(b"abc", compressed=2), "unknown compression flag 2"),
    (frame(b"not zlib", compressed=1), "not a valid zlib stream"),
    (frame(zlib.compress(b"abc")[:-3], compressed=1), "truncated"),
    (frame(zlib.compress(b"abc") + b"xx", compressed=1), "stray"),
])
def test_malformed_frames_raise_clear_errors(data, match):
    with pytest.raises(MalformedFrame, match=match):
        decode_wss_binary_buffer(data)
    with pytest.raises(ValueError, match=match):  # MalformedFrame is a ValueError
        decode_wss_binary_message(data)
    with pytest.raises(ValueError, match=match):
        filecodec.decode_wss_binary_buffer(data)


def test_non_utf8_text_and_bombs(monkeypatch):
    with pytest.raises(MalformedFrame, match="not UTF-8"):
        decode_wss_binary_message(frame(b"\xff\xfe"))
    assert decode_wss_binary_buffer(frame(b"\xff\xfe")).payload == b"\xff\xfe"  # binary is fine as a buffer
    monkeypatch.setattr(codec, "MAX_PAYLOAD_SIZE", 1000)
    bomb = frame(zlib.compress(b"\0" * 5000), compressed=1)
    with pytest.raises(MalformedFrame, match="exceeds 1000 bytes"):
        decode_wss_binary_buffer(bomb)


def test_encoders_reject_what_cannot_be_encoded():
    with pytest.raises(MalformedFrame, match="reserved=4294967296 does not fit in 32 bits.*4 GiB"):
        encode_wss_binary_buffer(b"x", file_header(1 << 32))
    with pytest.raises(MalformedFrame, match="msg_type=-1"):
        encode_wss_binary_buffer(b"x", WssBinaryMessage(msg_type=-1))
    with pytest.raises(MalformedFrame, match="compressed"):
        encode_wss_binary_buffer(b"x", WssBinaryMessage(compressed=3))
    with pytest.raises(TypeError, match="must be an int"):
        encode_wss_binary_buffer(b"x", WssBinaryMessage(flags="0"))
    with pytest.raises(TypeError, match="payload must be bytes"):
        encode_wss_binary_buffer("text", WssBinaryMessage())
    with pytest.raises(TypeError, match="no field"):
        encode_wss_binary_buffer(b"x", object())
    with pytest.raises(TypeError, match="json_data must be a str"):
        encode_wss_binary_message(b"{}")
    with pytest.raises(TypeError, match="data must be bytes"):
        decode_wss_binary_buffer("4d55")


def test_file_variant_has_no_defaults_and_shares_the_codec():
    with pytest.raises(TypeError):
        filecodec.WssBinaryMessage()
    assert [f.name for f in dataclasses.fields(filecodec.WssBinaryMessage)] == [
        f.name for f in dataclasses.fields(WssBinaryMessage)]
    header = filecodec.WssBinaryMessage(77, 85, 0x101, 0, 5, 0, 5, 0, 1234, 0, 0, b"")
    assert filecodec.encode_wss_binary_buffer(b"hello", header) == HELLO_CHUNK
    out = filecodec.decode_wss_binary_buffer(HELLO_CHUNK)
    assert isinstance(out, filecodec.WssBinaryMessage) and out.payload == b"hello" and out.reserved == 1234
    assert filecodec.encode_wss_binary_message("123456789") == JSON_FRAME
    assert filecodec.decode_wss_binary_message(JSON_FRAME) == "123456789"
