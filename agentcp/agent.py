"""``agentcp.agent.Agent`` (0.1.99): a plain holder of an agent's name and prompt (0.1.99 never used it)."""
from __future__ import annotations

from typing import Any

__all__ = ["Agent"]


class Agent:
    """``Agent(name, pomp)``: ``pomp`` (sic, 0.1.99's spelling) is the agent's prompt."""

    def __init__(self, name: str, pomp: Any) -> None:
        self.name = name
        self.pomp = pomp

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r})"
