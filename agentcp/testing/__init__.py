"""Test support shipped with agentcp: a real local ACP server and a pytest plugin.

- :class:`FakeACPServer`: heartbeat server on loopback (HTTP two-step sign-in, UDP heartbeat) with fault controls.
- :class:`Beat`, :class:`SignInRecord`, :class:`InviteResponse`, :class:`Session`: what it records.
- :class:`HttpRequest`, :class:`HttpResponse`, :class:`HttpError`: for routes added with ``FakeACPServer.add_route``.
- :class:`LossyRelay`: a lossy, delaying UDP/TCP path between a client and a server (no privileges needed).
- :class:`FakePKI`: the server's CA (``FakeACPServer.pki``), for such routes (e.g. a fake CA issuing certificates).
- pytest fixtures ``acp_server`` and ``acp_server_factory`` (:mod:`agentcp.testing.pytest_plugin`, auto-loaded).

Names are imported lazily, so ``import agentcp.testing`` (done by the pytest plugin in every test run of users who
installed agentcp) does not load ``cryptography``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._http import HttpError, HttpRequest, HttpResponse
    from ._pki import FakePKI
    from .fake_server import Beat, FakeACPServer, InviteResponse, Session, SignInRecord
    from .lossy import LossyRelay

__all__ = [
    "FakeACPServer",
    "Beat",
    "SignInRecord",
    "InviteResponse",
    "Session",
    "HttpRequest",
    "HttpResponse",
    "HttpError",
    "FakePKI",
    "LossyRelay",
]

_LAZY: Dict[str, str] = {
    "FakeACPServer": "agentcp.testing.fake_server",
    "Beat": "agentcp.testing.fake_server",
    "SignInRecord": "agentcp.testing.fake_server",
    "InviteResponse": "agentcp.testing.fake_server",
    "Session": "agentcp.testing.fake_server",
    "HttpRequest": "agentcp.testing._http",
    "HttpResponse": "agentcp.testing._http",
    "HttpError": "agentcp.testing._http",
    "FakePKI": "agentcp.testing._pki",
    "LossyRelay": "agentcp.testing.lossy",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'agentcp.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
