"""``agentcp.group_manager``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

``Group``/``GroupManager``, adapters over :mod:`agentcp.msg.session_manager` (new code should use that module).
"""
from agentcp._legacy.sessions import Group, GroupManager  # noqa: F401
