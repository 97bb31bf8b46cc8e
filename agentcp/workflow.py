"""``Workflow``: wire agents' output ports to input ports along the labelled edges of a :class:`Mermaid` graph."""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections import defaultdict
from typing import Any, Dict

from .mermaid import Mermaid, _split_inline

_log = logging.getLogger("agentcp.workflow")

__all__ = ["Workflow"]


def _run_awaitable(value):
    """Run a coroutine to completion from synchronous code (scheduled as a task inside a running loop)."""
    if not inspect.isawaitable(value):
        return value
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        return asyncio.ensure_future(value)
    new_loop = asyncio.new_event_loop()
    try:
        return new_loop.run_until_complete(value)
    finally:
        new_loop.close()


class Workflow:
    """Bind decorated ports of agents (``addnode``) along the edges of ``mermaid`` (``start``)."""

    _storage_lock = threading.Lock()
    _storage: Dict[str, Dict[Any, Any]] = {}

    def __init__(self, mermaid: Mermaid) -> None:
        self.mermaid = mermaid
        self.nodes: Dict[str, Any] = {}
        # (id(agent), method name) -> list of bound input-port methods
        self.port_mapping: Dict[Any, list] = defaultdict(list)

    # --- decorators (plain functions in the class body, used as @Workflow.output_port(...)) --------------------
    def output_port(description: str):  # type: ignore[misc]  # noqa: N805 (0.1.99: a plain function in the class)
        """Mark a method as the output port ``description``; its result is forwarded to the bound input port."""

        def decorator(func):
            def _targets(self):
                wf = getattr(self, "_workflow", None)
                if wf is None:
                    return []
                return list(wf.port_mapping.get((id(self), func.__name__), []))

            if asyncio.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(self, *args, **kwargs):
                    try:
                        result = await func(self, *args, **kwargs)
                        targets = _targets(self)
                        if not targets:
                            _log.error("output port %r of %r is not bound to any input port", description, self)
                        for target in targets:
                            out = target(result)
                            if inspect.isawaitable(out):
                                await out
                        return result
                    except Exception:
                        _log.exception("output port %r failed", description)
                        raise

                wrapper: Any = async_wrapper  # gets the port attributes below
            else:

                @functools.wraps(func)
                def sync_wrapper(self, *args, **kwargs):
                    try:
                        result = func(self, *args, **kwargs)
                        targets = _targets(self)
                        if not targets:
                            _log.error("output port %r of %r is not bound to any input port", description, self)
                        for target in targets:
                            _run_awaitable(target(result))
                        return result
                    except Exception:
                        _log.exception("output port %r failed", description)
                        raise

                wrapper = sync_wrapper
            wrapper.is_output_port = True
            wrapper.output_port_desc = description
            return wrapper

        return decorator

    def input_port(param: str):  # type: ignore[misc]  # noqa: N805 (0.1.99: a plain function in the class)
        """Mark a method as the input port ``param`` (the edge description it listens on)."""

        def decorator(func):
            if asyncio.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(self, *args, **kwargs):
                    try:
                        return await func(self, *args, **kwargs)
                    except Exception:
                        _log.exception("input port %r failed", param)
                        raise

                wrapper: Any = async_wrapper  # gets the port attributes below
            else:

                @functools.wraps(func)
                def sync_wrapper(self, *args, **kwargs):
                    try:
                        return func(self, *args, **kwargs)
                    except Exception:
                        _log.exception("input port %r failed", param)
                        raise

                wrapper = sync_wrapper
            wrapper.is_input_port = True
            wrapper.input_port_desc = param
            return wrapper

        return decorator

    # --- graph -------------------------------------------------------------------------------------------------
    def addnode(self, agent, node_name) -> "Workflow":
        """Register ``agent`` as the node whose Mermaid **description** is ``node_name``; chainable."""
        self.nodes[node_name] = agent
        try:
            agent._workflow = self
        except AttributeError:
            _log.warning("cannot attach workflow to %r", agent)
        return self

    def _node_desc(self, token: str) -> str:
        node_id, inline = _split_inline(token)
        if inline is not None:
            return inline
        return self.mermaid.node_dict.get(node_id, node_id)

    @staticmethod
    def _find_port(agent, flag: str, desc_attr: str, description: str):
        for name in dir(type(agent)):
            attr = getattr(type(agent), name, None)
            if callable(attr) and getattr(attr, flag, False) and getattr(attr, desc_attr, None) == description:
                return name, getattr(agent, name)
        return None, None

    def start(self) -> None:
        """Bind, for every edge, the source node's output port to the target node's input port."""
        for src, desc, dst in self.mermaid.edges:
            src_agent = self.nodes.get(self._node_desc(src))
            dst_agent = self.nodes.get(self._node_desc(dst))
            if src_agent is None or dst_agent is None:
                _log.warning("edge %s -> %s: node not added to the workflow", src, dst)
                continue
            out_name, _ = self._find_port(src_agent, "is_output_port", "output_port_desc", desc)
            _, in_method = self._find_port(dst_agent, "is_input_port", "input_port_desc", desc)
            if out_name is None:
                _log.warning("edge %s -> %s: no output port %r", src, dst, desc)
                continue
            if in_method is None:
                _log.warning("edge %s -> %s: no input port %r", src, dst, desc)
                continue
            targets = self.port_mapping[(id(src_agent), out_name)]
            if in_method not in targets:
                targets.append(in_method)

    # --- per-caller storage ------------------------------------------------------------------------------------
    @classmethod
    def getstorage(cls, key=None, default=None, caller: str = ""):
        """The storage dict of ``caller`` (default: the current thread); with ``key``, ``setdefault(key, default)``."""
        owner = caller or threading.current_thread().name
        with cls._storage_lock:
            store = cls._storage.setdefault(owner, {})
            if key is None:
                return store
            return store.setdefault(key, default)

    @classmethod
    def clearstorage(cls, caller: str = "") -> None:
        owner = caller or threading.current_thread().name
        with cls._storage_lock:
            cls._storage.pop(owner, None)
