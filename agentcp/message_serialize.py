"""``agentcp.message_serialize``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.msg.message_serialize`; new code should import from there.
"""
from agentcp.msg.message_serialize import (  # noqa: F401
    HeartbeatMessageReq, HeartbeatMessageResp, InviteMessageReq, InviteMessageResp, UdpMessageHeader,
    uint64_to_varint, varint_to_uint64,
)
