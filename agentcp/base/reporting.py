"""How the SDK reports faults it heals: log each kind once (then quietly), and publish it to ErrorContext.

A client that heals itself sees the same fault over and over while a server is away; logging each occurrence
at WARNING would bury the logs, and not logging it would hide the fault. :class:`FaultReporter` logs the first
occurrence of each kind at WARNING, later ones at DEBUG, and publishes every one through ``ErrorContext``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Set

from agentcp.context import ErrorContext
from agentcp.context.exceptions import SDKError

__all__ = ["FaultReporter", "publish"]

_log = logging.getLogger("agentcp")


def publish(err: SDKError, agent_id: str = "") -> None:
    """Publish ``err`` through ErrorContext; never raises (publishing is best effort by contract)."""
    if agent_id and not getattr(err, "agent_id", ""):
        err.agent_id = agent_id
    try:
        ErrorContext.publish(err)
    except Exception:  # a broken subscriber queue must never break the caller's I/O thread
        _log.debug("ErrorContext.publish failed", exc_info=True)


class FaultReporter:
    """Once-per-kind logging plus ErrorContext publishing, for one client."""

    def __init__(
        self,
        logger: logging.Logger,
        agent_id: str,
        wrap: Callable[[str], SDKError],
        redact: Optional[Callable[[str], str]] = None,
    ) -> None:
        self.logger = logger
        self.agent_id = agent_id
        self.wrap = wrap
        self.redact = redact
        self._seen: Set[str] = set()

    def log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        """Log at ``level`` the first time ``key`` is seen, at DEBUG afterwards."""
        if key in self._seen:
            self.logger.debug(msg, *args)
            return
        self._seen.add(key)
        self.logger.log(level, msg, *args)

    def note(self, key: str, message: str, exc: BaseException, exc_info: bool = False) -> None:
        """A fault: log it (once per ``key`` at WARNING) and publish it (as ``exc`` if it is an SDKError)."""
        if self.redact is not None:
            message = self.redact(message)
        if key in self._seen:
            self.logger.debug("%s", message)
        else:
            self._seen.add(key)
            self.logger.warning("%s", message, exc_info=exc_info)
        publish(exc if isinstance(exc, SDKError) else self.wrap(message), self.agent_id)

    def forget(self, *prefixes: str) -> None:
        """Let the next fault of these kinds warn again (a new outage deserves a new warning)."""
        self._seen = {k for k in self._seen if not k.startswith(prefixes)}
