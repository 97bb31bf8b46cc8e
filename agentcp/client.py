"""``agentcp.client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.base.client`; new code should import from there.
"""
from agentcp.base.client import IClient  # noqa: F401
