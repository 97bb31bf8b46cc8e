"""``agentcp.ca_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.ca.ca_client`; new code should import from there.
"""
from agentcp.ca.ca_client import CAClient  # noqa: F401
