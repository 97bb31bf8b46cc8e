"""agentcp: connect AI agents to the ACP agent network (resilient edition).

``import agentcp`` is cheap: it starts no thread, opens no socket and imports nothing heavy. ``AgentCP`` and
``AgentID`` are loaded on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:  # type checkers see the real classes; at run time they load lazily (see __getattr__)
    from agentcp.agentcp import AgentCP, AgentID
    from agentcp.mermaid import Mermaid
    from agentcp.workflow import Workflow

__version__ = "0.2.0"

__all__ = ["__version__", "AgentCP", "AgentID", "Mermaid", "Workflow"]

_LAZY = {
    "AgentCP": "agentcp.agentcp",
    "AgentID": "agentcp.agentcp",
    "Mermaid": "agentcp.mermaid",
    "Workflow": "agentcp.workflow",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'agentcp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
