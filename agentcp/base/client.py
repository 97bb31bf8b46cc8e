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

    def _kwargs(self, url: str) -> Dict[str, Any]:
        from agentcp.base.http import no_proxy_for, resolve_verify

        return {"timeout": self.timeout, "verify": resolve_verify(self.verify), "proxies": no_proxy_for(url)}

    def get_request(self, url, params=None, headers=None, is_retry=True):
        """GET; the response, or ``None`` for a 4xx/5xx status or a network error."""
        import requests

        try:
            resp = requests.get(url, params=params, headers=headers, **self._kwargs(url))
            if resp.status_code == 401 and is_retry and self.sign_in():
                params, _ = self._refresh(params, None)
                return self.get_request(url, params=params, headers=headers, is_retry=False)
            resp.raise_for_status()
            return resp
        except requests.RequestException as exc:
            _log.warning("GET %s failed: %s", url.split("?")[0], type(exc).__name__)
            return None

    def post_request(self, url, data=None, json=None, headers=None, is_retry=True):
        """POST; the response (any status). Network errors raise ``requests.RequestException``."""
        import requests

        resp = requests.post(url, data=data, json=json, headers=headers, **self._kwargs(url))
        if resp.status_code == 401 and is_retry and self.sign_in():
            _, json = self._refresh(None, json)
            if isinstance(data, dict):
                data, _ = self._refresh(data, None)
            return self.post_request(url, data=data, json=json, headers=headers, is_retry=False)
        return resp
