"""``IClient``: the small HTTP base class of 0.1.99's server clients, with timeouts and a working 401 retry."""
from __future__ import annotations

import abc
import logging
from typing import Any, Dict, Optional

_log = logging.getLogger("agentcp.client")

__all__ = ["IClient"]


class IClient(abc.ABC):
    """Subclasses provide ``sign_in() -> bool``, ``get_headers() -> dict`` and ``sign_out()``.

    ``timeout``/``verify`` attributes (if set) apply to every request. On HTTP 401 the client signs in again once
    and resends the request with the new token in ``signature`` (0.1.99 resent the stale one, D-A4; its GET retry
    was unreachable, D-A5).
    """

    timeout: Any = (3.0, 10.0)
    verify: Any = None

    @abc.abstractmethod
    def sign_in(self) -> bool: ...

    @abc.abstractmethod
    def get_headers(self) -> Dict[str, str]: ...

    @abc.abstractmethod
    def sign_out(self): ...

    def current_signature(self) -> Optional[str]:
        """The token to put into a retried request (subclasses with an auth client override this)."""
        return None

    def _refresh(self, params: Optional[dict], body: Optional[dict]):
        token = self.current_signature()
        if token is not None:
            if isinstance(params, dict) and "signature" in params:
                params = dict(params, signature=token)
            if isinstance(body, dict) and "signature" in body:
                body = dict(body, signature=token)
        return params, body

    #: Largest reply body read (``Limits.http_reply_max``).
    max_reply: int = 1 << 20

    def _http_session(self) -> Any:
        """The session requests go through (an :class:`~agentcp.base.http.AbortableSession` if the subclass has
        one, so ``abort()`` and the whole-request deadline can cut a request short); ``None``: a one-off."""
        return None

    def _request(self, method: str, url: str, **kwargs: Any):
        """One whole request with a total deadline and a capped reply (:func:`~agentcp.base.http.request_limited`)."""
        from agentcp.base.http import request_limited

        return request_limited(self._http_session(), method, url, timeout=self.timeout, verify=self.verify,
                               max_bytes=self.max_reply, **kwargs)

    def get_request(self, url, params=None, headers=None, is_retry=True):
        """GET; the response, or ``None`` for a 4xx/5xx status, a network error, a deadline or a reply too large."""
        import requests

        try:
            resp = self._request("GET", url, params=params, headers=headers)
            if resp.status_code == 401 and is_retry and self.sign_in():
                params, _ = self._refresh(params, None)
                return self.get_request(url, params=params, headers=headers, is_retry=False)
            resp.raise_for_status()
            return resp
        except (requests.RequestException, ValueError) as exc:
            _log.warning("GET %s failed: %s", url.split("?")[0], _describe(exc))
            return None

    def post_request(self, url, data=None, json=None, headers=None, is_retry=True):
        """POST; the response (any status). Network errors, deadlines and replies over the cap raise
        ``requests.RequestException`` / :class:`~agentcp.base.http.ReplyTooLarge` (a ``ValueError``)."""
        resp = self._request("POST", url, data=data, json=json, headers=headers)
        if resp.status_code == 401 and is_retry and self.sign_in():
            _, json = self._refresh(None, json)
            if isinstance(data, dict):
                data, _ = self._refresh(data, None)
            return self.post_request(url, data=data, json=json, headers=headers, is_retry=False)
        return resp


def _describe(exc: BaseException) -> str:
    # The class name only for network errors (their text can carry the URL and its token query); our own
    # deadline / size errors say what happened without the query.
    from agentcp.base.http import ReplyTooLarge, RequestDeadlineExceeded

    if isinstance(exc, (ReplyTooLarge, RequestDeadlineExceeded)):
        return str(exc)
    return type(exc).__name__
