"""``agentcp.wss_binary_message``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.msg.wss_binary_message`; new code should import from there.
"""
from agentcp.msg.wss_binary_message import encode_wss_binary_message, decode_wss_binary_message  # noqa: F401
