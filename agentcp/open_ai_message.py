"""``agentcp.open_ai_message``: a 0.1.99 compatibility home (see :mod:`agentcp._legacy`).

The code lives in :mod:`agentcp.msg.open_ai_message`; new code should import from there.
"""
from agentcp.msg.open_ai_message import OpenAIMessage, NOT_GIVEN  # noqa: F401
