"""``agentcp.heartbeat_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.heartbeat.heartbeat_client`; new code should import from there.
"""
from agentcp.heartbeat.heartbeat_client import HeartbeatClient  # noqa: F401
