"""``agentcp.html_util``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.base.html_util`; new code should import from there.
"""
from agentcp.base.html_util import parse_html  # noqa: F401
