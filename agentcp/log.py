"""``agentcp.log``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.base.log`; new code should import from there. ``logger`` and ``log_enabled`` are
read from it live.
"""
from agentcp.base import log as _log
from agentcp.base.log import (  # noqa: F401
    get_logger, log_debug, log_error, log_exception, log_info, log_warning, set_log_enabled,
)


def __getattr__(name: str):
    return getattr(_log, name)  # module state (logger, log_enabled) as it is now, not as it was at import
