"""``agentcp.ap_client``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.ap.ap_client`; new code should import from there.
"""
from agentcp.ap.ap_client import ApClient  # noqa: F401
