"""The binary frame codec as ``agentcp.file.wss_binary_message`` (api.md §8.5).

0.1.99 ships this duplicate of :mod:`agentcp.msg.wss_binary_message` whose dataclass has **no field defaults**;
the functions are the same, so they are shared here. ``decode_wss_binary_buffer`` returns this module's class.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..msg import wss_binary_message as _codec
from ..msg.wss_binary_message import (
    MalformedFrame,
    decode_wss_binary_message,
    encode_wss_binary_buffer,
    encode_wss_binary_message,
)

__all__ = [
    "WssBinaryMessage",
    "MalformedFrame",
    "encode_wss_binary_message",
    "decode_wss_binary_message",
    "encode_wss_binary_buffer",
    "decode_wss_binary_buffer",
]


@dataclass
class WssBinaryMessage:
    """One frame's header fields plus its payload; every field must be given (0.1.99's file variant)."""

    magic_byte1: int
    magic_byte2: int
    version: int
    flags: int
    msg_type: int
    msg_seq: int
    content_type: int
    compressed: int
    reserved: int
    crc32: int
    payload_length: int
    payload: bytes


def decode_wss_binary_buffer(data) -> WssBinaryMessage:
    """Parse and validate a frame (see :func:`agentcp.msg.wss_binary_message.decode_wss_binary_buffer`)."""
    fields, payload = _codec._unpack(data)
    return WssBinaryMessage(*fields, payload=payload)
