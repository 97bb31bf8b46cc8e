"""``agentcp.message_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.msg.message_client`; new code should import from there.
"""
from agentcp.msg.message_client import MessageClient  # noqa: F401
