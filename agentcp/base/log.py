"""0.1.99's ``log_*`` helpers over stdlib :mod:`logging`.

They work before anything is configured (0.1.99 raised ``AttributeError`` until ``AgentCP()`` ran): they log to
the ``agentcp`` logger, which has a ``NullHandler`` until the application configures logging or calls
:func:`set_log_enabled`.

Tokens never reach a log (trust.md rule 6): the SDK's own lines are written without them, and
:class:`RedactSecrets` (installed by :func:`install_redaction` when this module is imported, i.e. by
``import agentcp``) rewrites ``signature=``, ``token=`` and ``cookie=`` query values to ``***`` in the DEBUG lines
of urllib3's connection pool and websocket-client, which print request lines with their query strings, and in
the stderr handler of :func:`set_log_enabled`. Installing a filter opens nothing and starts nothing.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Optional

from .env import Environ

VERBOSE = logging.DEBUG - 1
_ROOT_NAME = "agentcp"
logging.getLogger(_ROOT_NAME).addHandler(logging.NullHandler())

# ``name=value`` pairs whose value is a secret: signature (session tokens), *token, *cookie (sign cookies).
_SECRET_PAIR = re.compile(r"((?:signature|token|cookie)=)[^&\s'\"#;,]+", re.IGNORECASE)
#: Loggers of other libraries that log request URLs (query strings included) at DEBUG.
REDACTED_LOGGERS = ("urllib3.connectionpool", "websocket", "websockets.client", "agentcp.msg.wire")


def redact_secrets(text: str) -> str:
    """``text`` with the values of ``signature=``, ``token=`` and ``cookie=`` pairs replaced by ``***``."""
    return _SECRET_PAIR.sub(r"\1***", text)


class RedactSecrets(logging.Filter):
    """A logging filter that rewrites secret query values in a record's message to ``***`` (never drops it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself when it formats; leave it alone
            return True
        clean = redact_secrets(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def install_redaction() -> None:
    """Put one :class:`RedactSecrets` on every logger of :data:`REDACTED_LOGGERS` (idempotent)."""
    for name in REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())


install_redaction()

logger: Optional[logging.Logger] = None
log_enabled = True
_handler: Optional[logging.Handler] = None


def _level(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    named = logging.getLevelName(text.upper())
    return named if isinstance(named, int) else default


def get_logger(name: str = _ROOT_NAME, level: Any = None) -> logging.Logger:
    """Return logger ``name`` at ``level`` with one stderr handler (added once, never duplicated)."""
    global _handler
    log = logging.getLogger(name)
    log.setLevel(_level(level if level is not None else Environ.LOG_LEVEL.get(logging.INFO), logging.INFO))
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _handler.addFilter(RedactSecrets())
    if _handler not in log.handlers:
        log.addHandler(_handler)
    return log


def set_log_enabled(enabled: bool, level: int = logging.INFO) -> None:
    """Turn the helpers on or off and send the ``agentcp`` logs to stderr at ``level``."""
    global log_enabled, logger
    log_enabled = bool(enabled)
    logger = get_logger(_ROOT_NAME, Environ.LOG_LEVEL.get(level))


def _target() -> logging.Logger:
    return logger if logger is not None else logging.getLogger(_ROOT_NAME)


def log_exception(e: Any) -> None:
    if log_enabled:
        _target().error("%s", e, exc_info=isinstance(e, BaseException) and (type(e), e, e.__traceback__))


def log_info(content: str) -> None:
    if log_enabled:
        _target().info("%s", content)


def log_error(content: str) -> None:
    if log_enabled:
        _target().error("%s", content)


def log_debug(content: str) -> None:
    if log_enabled:
        _target().debug("%s", content)


def log_warning(content: str) -> None:
    if log_enabled:
        _target().warning("%s", content)


def log_critical(content: str) -> None:
    if log_enabled:
        _target().critical("%s", content)


def log_verbose(content: str) -> None:
    if log_enabled:
        _target().log(VERBOSE, "%s", content)
