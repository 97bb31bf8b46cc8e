"""``agentcp.ca_root``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.ca.ca_root`; new code should import from there.
"""
from agentcp.ca.ca_root import CARoot  # noqa: F401
