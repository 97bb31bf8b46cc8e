"""``agentcp.auth_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.base.auth_client`; new code should import from there.
"""
from agentcp.base.auth_client import AuthClient  # noqa: F401
