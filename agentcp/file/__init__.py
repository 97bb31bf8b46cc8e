"""File transfer helpers (``agentcp.file``). The binary frame codec lives in :mod:`.wss_binary_message`."""
from __future__ import annotations

from . import wss_binary_message

__all__ = ["wss_binary_message"]
