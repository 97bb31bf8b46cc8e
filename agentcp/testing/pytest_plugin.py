"""pytest plugin (``pytest11`` entry point ``agentcp``): fixtures that run a :class:`~agentcp.testing.FakeACPServer`.

- ``acp_server``: a started server, stopped after the test. Options come from the ``acp_server`` marker or from
  indirect parametrization::

      @pytest.mark.acp_server(next_beat_ms=100, next_beat_encoding="varint")
      def test_fast_beats(acp_server): ...

- ``acp_server_factory``: ``acp_server_factory(**options)`` starts another server; all are stopped at teardown.

This module is imported by every pytest run of anyone who installed agentcp, so it imports nothing heavy: the server
(and ``cryptography``) load only when a fixture is used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from agentcp.testing.fake_server import FakeACPServer


def pytest_configure(config: Any) -> None:
    """Register the ``acp_server`` marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers", "acp_server(**options): FakeACPServer keyword options for the acp_server fixture"
    )


def _options(request: Any) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    marker = request.node.get_closest_marker("acp_server")
    if marker is not None:
        if marker.args:
            raise TypeError("@pytest.mark.acp_server takes keyword options only")
        options.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):  # indirect parametrization: @pytest.mark.parametrize("acp_server", [{...}], indirect=True)
        options.update(param)
    return options


@pytest.fixture
def acp_server(request: Any) -> Iterator["FakeACPServer"]:
    """A started FakeACPServer (options from the ``acp_server`` marker / indirect param), stopped after the test."""
    from agentcp.testing.fake_server import FakeACPServer

    server = FakeACPServer(**_options(request))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def acp_server_factory() -> Iterator[Callable[..., "FakeACPServer"]]:
    """A function ``(**options) -> FakeACPServer`` that starts servers; every one is stopped at teardown."""
    from agentcp.testing.fake_server import FakeACPServer

    servers: List[FakeACPServer] = []

    def make(**options: Any) -> FakeACPServer:
        server = FakeACPServer(**options)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            server.stop()
