"""0.1.99 import path of :class:`~agentcp.message.OpenAIMessage` (the class lives in :mod:`agentcp.message`)."""
from __future__ import annotations

from agentcp.message import OpenAIMessage

try:  # 0.1.99 re-exported openai's sentinel; openai is not a dependency, so it is optional here
    from openai import NOT_GIVEN  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    NOT_GIVEN = None

__all__ = ["OpenAIMessage", "NOT_GIVEN"]
