"""UDP heartbeat: :class:`HeartbeatClient` (the shell), :mod:`.liveness` (the decisions), :mod:`.reactor` (I/O)."""
from __future__ import annotations

__all__ = ["HeartbeatClient"]


def __getattr__(name: str):
    # Lazy, so that importing the pure state machine does not pull in requests and cryptography.
    if name == "HeartbeatClient":
        from .heartbeat_client import HeartbeatClient

        return HeartbeatClient
    raise AttributeError(f"module 'agentcp.heartbeat' has no attribute {name!r}")
