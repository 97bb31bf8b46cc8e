"""SDK error classes (names, codes and ``to_dict`` fields as in agentcp 0.1.99), plus the liveness errors."""
from __future__ import annotations

import platform as _platform
from typing import Any, Dict


def _sdk_version() -> str:
    from agentcp import __version__

    return f"agentcp/{__version__}"


class SDKError(Exception):
    """Base class of every error the SDK publishes through :data:`agentcp.context.ErrorContext`."""

    trace_id: str = ""
    agent_id: str = ""
    platform: str = _platform.version()
    py_version: str = _platform.python_version()

    def __init__(self, message: Any, trace_id: str = "", code: int = 1000) -> None:
        super().__init__(message)
        self.message = str(message)
        self.trace_id = trace_id
        self.code = code
        self.sdk_version = _sdk_version()

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> Dict[str, Any]:
        return {
            "code": self.code,
            "trace_id": self.trace_id,
            "message": self.message,
            "agent_id": self.agent_id,
            "platform": self.platform,
            "py_version": self.py_version,
            "sdk_version": self.sdk_version,
        }


class LLMFlowError(SDKError):
    code = 1001


class CallLLMError(LLMFlowError):
    code = 1002


class CreateSessionError(LLMFlowError):
    code = 1003


class InviteMemberError(LLMFlowError):
    code = 1005


class JoinSessionError(LLMFlowError):
    code = 1007


class SendMsgError(LLMFlowError):
    code = 1009


class CreateStreamError(LLMFlowError):
    code = 1010


class StreamUrlNotifyError(LLMFlowError):
    code = 1012


class PullStreamError(LLMFlowError):
    code = 1013


class SendChunkToStreamError(LLMFlowError):
    code = 1014


class ChunksBySSEError(LLMFlowError):
    code = 1015


class CloseStreamError(LLMFlowError):
    code = 1016


# --- New in the resilient edition -------------------------------------------------------------------------------


class AuthError(SDKError):
    """Sign-in failed. ``permanent`` tells whether retrying can help (see the subclasses)."""

    permanent = False

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1100, *, status: int = 0) -> None:
        super().__init__(message, trace_id, code)
        self.status = status


class TransientAuthError(AuthError):
    """Sign-in failed for a reason that may pass: connection refused, timeout, 5xx, 429."""

    permanent = False

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1101, *, status: int = 0,
                 retry_after: float = 0.0) -> None:
        super().__init__(message, trace_id, code, status=status)
        self.retry_after = retry_after


class PermanentAuthError(AuthError):
    """Sign-in failed for a reason that retrying will not fix; the message says what to do."""

    permanent = True

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1102, *, status: int = 0) -> None:
        super().__init__(message, trace_id, code, status=status)


class CredentialError(PermanentAuthError):
    """The agent's own key or certificate cannot be used (missing file, wrong seed password, bad PEM)."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1103, *, status: int = 0) -> None:
        super().__init__(message, trace_id, code, status=status)


class ServerAuthError(PermanentAuthError):
    """The server failed to prove its identity (bad signature, untrusted or expired certificate chain)."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1104, *, status: int = 0) -> None:
        super().__init__(message, trace_id, code, status=status)


class TLSVerificationError(PermanentAuthError):
    """The HTTPS certificate of a server could not be verified."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1105, *, status: int = 0) -> None:
        super().__init__(message, trace_id, code, status=status)


class HeartbeatError(SDKError):
    """A heartbeat fault (socket error, missed replies, re-sign-in); published while the client heals itself."""

    def __init__(self, message: Any = "", trace_id: str = "", code: int = 1200) -> None:
        super().__init__(message, trace_id, code)


__all__ = [name for name, obj in list(globals().items()) if isinstance(obj, type) and issubclass(obj, SDKError)]
