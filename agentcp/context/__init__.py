"""Error collection: ``ErrorContext.subscribe(aid, fn)`` to receive every SDK error, ``publish`` to report one."""
from . import exceptions  # noqa: F401  (agentcp.context.exceptions, as in 0.1.99)
from .context import AtomicErrorContext

ErrorContext = AtomicErrorContext(max_queue_size=1024)

__all__ = ["ErrorContext"]
