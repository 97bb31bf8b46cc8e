"""``agentcp.stream_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.msg.stream_client`; new code should import from there.
"""
from agentcp.msg.stream_client import StreamClient  # noqa: F401
