"""Every bound on hostile input in one place (``shared/protocol/trust.md`` rule 4), as an immutable value.

An agent's bounds are ``aid.limits`` (defaults: :data:`DEFAULT_LIMITS`); change one with
``aid.limits = dataclasses.replace(aid.limits, ws_message_max=...)`` before ``online()``. Crossing a bound closes
the source that crossed it (a connection, a stream, a request), never the process: the crossing is counted in
``status()`` and reported with :class:`LimitExceeded`, whose message names the bound and how to raise it.
"""
from __future__ import annotations

from dataclasses import dataclass

from agentcp.context.exceptions import SDKError

__all__ = ["Limits", "DEFAULT_LIMITS", "LimitExceeded", "MiB", "GiB"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Limits:
    """Bounds on what servers and peers can make the agent hold, do or wait for."""

    #: one incoming WebSocket message on the message channel, all fragments together (crossing: close 1009)
    ws_message_max: int = 16 * MiB
    #: one stream chunk or one file-stream chunk (crossing: that stream fails)
    stream_chunk_max: int = 16 * MiB
    #: a file pulled through a file stream, in addition to its announced size (crossing: fail, delete the partial)
    file_stream_max: int = 2 * GiB
    #: a file downloaded from the file server (``download_file``; crossing: fail, delete the partial)
    file_transfer_max: int = 2 * GiB
    #: one HTTP reply body (sign-in, access point, CA)
    http_reply_max: int = 1 * MiB
    #: one public file downloaded from the access point by ``sync_public_files`` (read into memory)
    public_file_max: int = 16 * MiB
    #: one issuer certificate fetched for server authentication
    issuer_cert_max: int = 64 * KiB
    #: distinct message servers (message clients) per agent; an invite naming another one is refused
    message_clients_max: int = 4
    #: stream-announce handlers running at once per agent
    announce_workers: int = 8
    #: stream announces waiting for a worker; beyond it an announce is dropped with a reported error
    announce_queue_max: int = 64
    #: incoming messages waiting for handlers per agent; when full the socket is not read until it drains
    handler_backlog_messages: int = 1000
    #: bytes of incoming messages waiting for handlers per agent (same back-pressure)
    handler_backlog_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()


class LimitExceeded(SDKError):
    """A server or peer sent more than a bound allows; the source that crossed it was closed."""

    code = 1402

    def __init__(self, bound: str, limit: int, source: str = "", got: object = None) -> None:
        detail = f" (got {got})" if got is not None else ""
        where = f"{source}: " if source else ""
        super().__init__(f"{where}input exceeds Limits.{bound} = {limit}{detail}; the source was closed. "
                         f"Raise the bound with aid.limits = dataclasses.replace(aid.limits, {bound}=...) "
                         f"if this peer or server is expected to send that much")
        self.bound = bound
        self.limit = limit
        self.source = source
