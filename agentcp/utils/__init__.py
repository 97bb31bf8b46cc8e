"""Small utilities (``agentcp.utils``), as in 0.1.99: :mod:`.file_util` describes local files."""
from __future__ import annotations

from . import file_util

__all__ = ["file_util"]
