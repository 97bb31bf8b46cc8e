"""The local LLM proxy of agentcp 0.1.99 (api.md §12): one OpenAI-compatible gateway per process.

``run_server`` starts :class:`agentcp.llm_gateway.LLMGateway` on ``127.0.0.1`` (port 0: a free one);
``get_base_url(aid, llm_aid)`` is ``http://127.0.0.1:<port>/<llm_aid>``, the ``base_url`` for any OpenAI client;
the client's API key is the key of the *calling* identity (``get_llm_api_key(aid_str)``), which sends the request
to ``llm_aid`` as an ACP message. Same function names and parameters as 0.1.99 (no Flask). What changed:

* one server per process, really running while ``llm_server_is_running()`` says so; ``shutdown_server()`` stops
  it and joins its threads (0.1.99's unauthenticated ``POST /shutdown`` route is gone);
* keys are random (``secrets``; 0.1.99 hashed the time), compared in constant time, never logged; a wrong key
  gets 401 in OpenAI's error format; every other failure has its own status (404, 413, 503, 504, ...);
* identities are held weakly; an identity going ``offline()`` cancels its requests in flight.

Module attributes of 0.1.99 are still readable: ``app`` (the gateway or None), ``actual_port``, ``is_running``,
``llm_aid_app_key_map`` (AID → key) and ``llm_app_key_aid_map`` (key → AID); the maps are copies.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Optional, Tuple

from agentcp.llm_agent_utils import GatewayError, LLMAgent
from agentcp.llm_gateway import GatewayConfig, Keyring, LLMGateway, authenticate, chat_completion, valid_aid

log = logging.getLogger("agentcp.llm")

__all__ = ["add_llm_aid", "add_llm_api_key", "get_base_url", "get_llm_api_key", "llm_request",
           "llm_server_is_running", "run_server", "shutdown_server", "release_server", "agent_offline",
           "gateway_config"]

_lock = threading.RLock()
_keyring = Keyring()
_agents: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_gateway: Optional[LLMGateway] = None
_owners: "weakref.WeakSet[Any]" = weakref.WeakSet()
#: Requests of ``llm_request`` (in-process) still alive, so ``offline()`` of their caller cancels them too.
_local: "weakref.WeakSet[LLMAgent]" = weakref.WeakSet()
#: Bounds of the next gateway ``run_server`` starts (tests and embedders may replace it).
gateway_config = GatewayConfig()


def __getattr__(name: str) -> Any:  # 0.1.99's module state, read live
    if name == "app":
        return _gateway
    if name == "actual_port":
        gateway = _gateway
        return gateway.port if gateway is not None else None
    if name == "is_running":
        return llm_server_is_running()
    if name == "llm_aid_app_key_map":
        return _keyring.maps()[0]
    if name == "llm_app_key_aid_map":
        return _keyring.maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(aid_str: str) -> Any:
    return _agents.get(aid_str)


def run_server(debug: bool = False, port: int = 0, llm_aid_app_key_map_h=None, llm_app_key_aid_map_h=None, *,
               owner: Any = None) -> int:
    """Start the gateway on ``127.0.0.1:port`` unless one runs already; the port it listens on.

    The two maps (0.1.99: AID → key, key → AID; values may be ``AgentID`` objects) add keys to the key table.
    ``owner`` (an ``AgentCP``) holds the server until ``release_server(owner)``. A port in use raises
    ``OSError``. ``debug`` is accepted for compatibility (logging is configured by ``AgentCP``).
    """
    global _gateway
    for aid_str, key in dict(llm_aid_app_key_map_h or {}).items():
        _keyring.add(str(getattr(aid_str, "id", aid_str)), key)
    for key, aid in dict(llm_app_key_aid_map_h or {}).items():
        if not isinstance(aid, str) and getattr(aid, "id", None):
            _agents[aid.id] = aid
        _keyring.add(str(getattr(aid, "id", aid)), key)
    with _lock:
        if owner is not None:
            _owners.add(owner)
        gateway = _gateway
        if gateway is not None and gateway.running:
            if port and port != gateway.port:
                log.warning("the LLM gateway already listens on port %d; port %s not used", gateway.port, port)
            return gateway.port
        _gateway = LLMGateway(_keyring, _resolve, int(port or 0), gateway_config)
        return _gateway.port


def shutdown_server(*, timeout: Optional[float] = None) -> bool:
    """Stop the gateway and join its threads (requests in flight are answered 503); True if it was running."""
    global _gateway
    with _lock:
        gateway, _gateway = _gateway, None
        _owners.clear()
    if gateway is None:
        return False
    gateway.shutdown(timeout)
    return True


def release_server(owner: Any) -> bool:
    """``owner`` (an ``AgentCP`` leaving its ``with`` block) no longer needs the gateway; it stops when no owner
    is left. True if this stopped it."""
    with _lock:
        if owner not in _owners:
            return False
        _owners.discard(owner)
        if len(_owners):
            return False
    return shutdown_server()


def llm_server_is_running() -> bool:
    """True while the gateway accepts requests."""
    gateway = _gateway
    return gateway is not None and gateway.running


def add_llm_aid(aid) -> bool:
    """Register the identity ``aid`` (an ``AgentID``) as a caller; it gets a key if it has none. True."""
    _agents[aid.id] = aid
    _keyring.key_for(aid.id)
    return True


def add_llm_api_key(aid, llm_app_key) -> bool:
    """Let the identity ``aid`` (an ``AgentID``, or an AID string) call with the key ``llm_app_key``.

    False if the key is not 16-512 printable ASCII characters or belongs to another identity.
    """
    aid_str = str(getattr(aid, "id", aid))
    if not isinstance(aid, str):
        _agents[aid_str] = aid
    return _keyring.add(aid_str, llm_app_key)


def get_base_url(aid, llm_aid) -> str:
    """``http://127.0.0.1:<port>/<llm_aid>``; ``RuntimeError`` if the gateway is not running."""
    gateway = _gateway
    if gateway is None or not gateway.running:
        raise RuntimeError("the local LLM gateway is not running: create AgentCP(..., run_proxy=True) or call "
                           "run_llm_proxy(port) first")
    return gateway.base_url(str(llm_aid))


def get_llm_api_key(aid_str: str) -> str:
    """The bearer key of the identity ``aid_str`` (64 hex characters, made on first request)."""
    return str(_keyring.key_for(str(aid_str)))  # create=True: never None


def agent_offline(aid) -> int:
    """``AgentID.offline()``: cancel that identity's requests in flight (they are answered 503)."""
    reason = f"the calling agent {aid.id} went offline"
    mine = [agent for agent in list(_local) if agent.aid is aid]
    for agent in mine:
        agent.cancel(reason)
    gateway = _gateway
    return len(mine) + (gateway.cancel_agent(aid, reason) if gateway is not None else 0)


def llm_request(llm_aid, *, body: Any = None, api_key: str = "", deadline: Optional[float] = None
                ) -> Tuple[int, Any]:
    """The gateway's chat route without HTTP: ``(status, answer)``.

    ``answer`` is a ``chat.completion`` dict, an iterator of SSE strings (``"stream": true``) or an OpenAI error
    body. ``api_key`` selects the calling identity as over HTTP; ``deadline`` is a ``time.monotonic()`` value.
    """
    try:
        caller = authenticate(_keyring, _resolve, api_key)
        if not valid_aid(llm_aid):
            raise GatewayError(404, f"{str(llm_aid)[:100]!r} is not an agent id", "model_not_found")
        config = gateway_config
        agent = LLMAgent(llm_aid, caller)
        _local.add(agent)  # dropped when the request (or the stream it returns) is done with it
        return 200, chat_completion(agent, body, config,
                                    deadline if deadline is not None else time.monotonic() + config.request_deadline)
    except GatewayError as exc:
        return exc.status, exc.body()
