"""``agentcp.env``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.base.env`; new code should import from there.
"""
from agentcp.base.env import Environ  # noqa: F401
