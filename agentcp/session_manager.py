"""``agentcp.session_manager``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The older ``Session``/``SessionManager`` with per-session callbacks, adapters over :mod:`agentcp.msg.session_manager`
(new code should use that module).
"""
from agentcp._legacy.sessions import LegacySession as Session, LegacySessionManager as SessionManager  # noqa: F401
