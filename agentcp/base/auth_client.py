"""Two-step challenge sign-in to an ACP server (AP, heartbeat, message, file), liveness.md §2.

Compatible with 0.1.99's ``agentcp.base.auth_client.AuthClient`` (same constructor, attributes and wire format),
with the defects fixed: timeouts on every request, TLS verified by default, classified errors instead of silent
``None``/``""``, capped full-jitter retries that stop at once on permanent errors, a server that does not prove
its identity is reported (and refused in strict mode), verified server certificate chains, and a token cleared by
``sign_out``. Secrets (session token, nonce signature, seed password, key) are never logged.
"""
from __future__ import annotations

import logging
import random
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional

import requests

from agentcp.context import ErrorContext
from agentcp.context.exceptions import (
    AuthError,
    PermanentAuthError,
    SDKError,
    ServerAuthError,
    TLSVerificationError,
    TransientAuthError,
)

from .backoff import AUTH_BACKOFF, Backoff, Retrier
from .credentials import AgentCredentials
from .http import (
    DEFAULT_TIMEOUT,
    AbortableSession,
    ReplyTooLarge,
    RequestDeadlineExceeded,
    Timeout,
    VerifySetting,
    env_flag,
    parse_retry_after,
    request_limited,
    resolve_verify,
    tls_failure_text,
    user_agent,
)
from .limits import DEFAULT_LIMITS, LimitExceeded
from .server_auth import check_server_identity, fetch_issuer_http, verify_server_response
from .trust import MAX_NONCE_LENGTH, looks_like_nonce, url_host

__all__ = ["AuthClient", "STRICT_SERVER_AUTH_ENV"]

_log = logging.getLogger("agentcp.auth")

#: ``AGENTCP_STRICT_SERVER_AUTH=1`` refuses servers whose challenge reply carries no ``cert``/``signature``.
STRICT_SERVER_AUTH_ENV = "AGENTCP_STRICT_SERVER_AUTH"

_MAX_ERROR_TEXT = 200


def _short(value: Any, limit: int = _MAX_ERROR_TEXT) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_error_text(response: requests.Response) -> str:
    """The server's ``error`` (or ``message``) text from a JSON error body, or ``""``."""
    try:
        data = response.json()
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    error = data.get("error", data.get("message"))
    if isinstance(error, dict):  # {"error": {"code": ..., "message": ...}} per the C++ docs
        parts = [str(error[k]) for k in ("code", "message") if error.get(k)]
        error = ": ".join(parts)
    return _short(error) if error else ""


class AuthClient:
    """Signs an agent in to one server and keeps its session token in :attr:`signature`."""

    #: Kept for compatibility with 0.1.99 (its unbounded verified-issuer cache); unused.
    success_crt_list: List[str] = []

    def __init__(
        self,
        agent_id: str,
        server_url: str,
        aid_path: str,
        seed_password: str,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        verify: Optional[VerifySetting] = None,
        strict_server_auth: Optional[bool] = None,
        backoff: Backoff = AUTH_BACKOFF,
        sleep: Optional[Callable[[float], None]] = None,
        rand: Optional[Callable[[], float]] = None,
        session: Optional[requests.Session] = None,
        max_reply: int = DEFAULT_LIMITS.http_reply_max,
        on_limit: Optional[Callable[[LimitExceeded], None]] = None,
    ) -> None:
        self.agent_id = agent_id
        self.server_url = (server_url or "").rstrip("/")
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.signature: Optional[str] = None
        self.is_retry = False
        #: The error of the last failed sign-in (``None`` after a success).
        self.last_error: Optional[SDKError] = None
        #: "verified" (server proved its identity), "unauthenticated" (it did not), "host-mismatch" (it signed with
        #: a trusted certificate that does not name this server; refused in strict mode) or None (not yet known).
        self.server_auth_state: Optional[str] = None
        #: Sign-in attempts made by this client (each is one challenge/proof exchange).
        self.attempts = 0
        self.timeout = timeout
        #: ``True``/``False``/CA bundle path; ``None`` follows ``AGENTCP_TLS_VERIFY`` (default: verify).
        self.verify = verify
        #: ``None`` follows ``AGENTCP_STRICT_SERVER_AUTH``.
        self.strict_server_auth = strict_server_auth
        self.backoff = backoff
        #: Largest reply body read from the server (``Limits.http_reply_max``); a longer one fails the request.
        self.max_reply = max_reply
        #: Called with a :class:`LimitExceeded` when a reply crosses ``max_reply`` (the AgentID counts it).
        self.on_limit = on_limit
        self._sleep = sleep
        self._rand = rand if rand is not None else random.random
        self._owns_session = session is None
        self._abortable: Optional[AbortableSession] = AbortableSession() if session is None else None
        self._session = session if session is not None else self._abortable.session  # type: ignore[union-attr]
        # Single-flight sign-in: one exchange at a time; a waiter may reuse a success that finished meanwhile.
        self._sign_in_lock = threading.Lock()
        self._generation = 0
        self._last_result: Optional[Dict[str, Any]] = None
        self._warned_unauthenticated = False
        self._warned_host_mismatch = False
        self._credentials: Optional[AgentCredentials] = None

    # -- small helpers --------------------------------------------------------------------------------------
    def get_headers(self) -> Dict[str, str]:
        """HTTP headers of sign-in, sign-out and authorised calls (the 0.1.99 User-Agent)."""
        return {"User-Agent": user_agent(self.agent_id)}

    def _url(self, path: str) -> str:
        return f"{self.server_url}/{path.lstrip('/')}"

    def _verify_setting(self) -> VerifySetting:
        return resolve_verify(self.verify)

    def _strict(self) -> bool:
        if self.strict_server_auth is not None:
            return bool(self.strict_server_auth)
        return env_flag(STRICT_SERVER_AUTH_ENV)

    def _timeout_text(self) -> str:
        if isinstance(self.timeout, (tuple, list)) and len(self.timeout) == 2:
            return f"connect {self.timeout[0]:g} s / read {self.timeout[1]:g} s"
        return f"{self.timeout} s"

    def _get_credentials(self) -> AgentCredentials:
        # Rebuilt if the 0.1.99-public attributes were reassigned after construction.
        creds = self._credentials
        if (
            creds is None
            or creds.agent_id != self.agent_id
            or creds.certs_dir != self.aid_path
            or creds.seed_password != (self.seed_password or "")
        ):
            creds = AgentCredentials(self.agent_id, self.aid_path, self.seed_password)
            self._credentials = creds
        return creds

    def _fetch_issuer(self, url: str) -> bytes:
        return fetch_issuer_http(url, timeout=self.timeout, verify=self.verify, session=self._session)

    def abort(self) -> None:
        """Make a request of this client that another thread is blocked in fail at once (e.g. a slow sign-in
        during shutdown). Only for a session the client created; the client stays usable."""
        if self._abortable is not None:
            self._abortable.abort()

    def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session:
            self._session.close()

    # -- HTTP -----------------------------------------------------------------------------------------------
    def _send(self, path: str, payload: Dict[str, Any], what: str) -> Dict[str, Any]:
        """POST ``payload`` as JSON; the reply object of a 2xx, else a classified :class:`AuthError`.

        The whole request has one deadline (:func:`~agentcp.base.http.total_deadline` of ``timeout``) and the
        reply body is read with the cap ``max_reply`` (trust.md rule 4).
        """
        url = self._url(path)
        try:
            response = request_limited(
                self._abortable if self._abortable is not None else self._session,
                "POST",
                url,
                json=payload,
                headers=self.get_headers(),
                timeout=self.timeout,
                verify=self.verify,
                max_bytes=self.max_reply,
            )
        except ReplyTooLarge as exc:
            self._limit_crossed(exc)
            raise TransientAuthError(f"{what}: {exc}") from None
        except requests.exceptions.SSLError as exc:
            raise TLSVerificationError(
                f"{what}: " + tls_failure_text(url, exc, override="AuthClient(verify=False)")
            ) from None
        except RequestDeadlineExceeded as exc:
            raise TransientAuthError(f"{what}: {exc}") from None
        except requests.exceptions.Timeout:
            raise TransientAuthError(
                f"{what}: {url} did not answer in time ({self._timeout_text()})"
            ) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise PermanentAuthError(
                f"{what}: invalid server URL {url!r} ({_short(exc)}); check the server address"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise TransientAuthError(f"{what}: cannot reach {url} ({type(exc).__name__}: {_short(exc)})") \
                from None
        return self._classify(response, url, what)

    def _limit_crossed(self, exc: ReplyTooLarge) -> None:
        callback = self.on_limit
        if callback is None:
            return
        try:
            callback(LimitExceeded(exc.bound, exc.limit, exc.url))
        except Exception:  # reporting must never break the caller
            _log.debug("on_limit callback failed", exc_info=True)

    def _classify(self, response: requests.Response, url: str, what: str) -> Dict[str, Any]:
        status = response.status_code
        if 200 <= status < 300:
            try:
                data = response.json()
            except ValueError:
                raise TransientAuthError(
                    f"{what}: {url} answered HTTP {status} with a body that is not JSON", status=status
                ) from None
            if not isinstance(data, dict):
                raise TransientAuthError(
                    f"{what}: {url} answered HTTP {status} with JSON that is not an object", status=status
                )
            return data
        error = _server_error_text(response)
        detail = f" ({error})" if error else ""
        if status == 429 or status == 408 or status >= 500:
            wait = min(parse_retry_after(response.headers.get("Retry-After")), self.backoff.cap)
            hint = f"retry after {wait:g} s" if wait else "the server may recover; retrying helps"
            raise TransientAuthError(f"{what}: {url} answered HTTP {status}{detail}; {hint}",
                                     status=status, retry_after=wait)
        if status == 401:
            hint = f"the server did not accept the credentials or session token of {self.agent_id}"
        elif status == 403:
            hint = (f"the server refused agent {self.agent_id}; check that the identity is registered with this "
                    "server and its certificate is valid")
        elif status == 404:
            hint = f"check the server URL {self.server_url}"
        else:
            hint = "retrying will not help; check the server URL and the identity"
        raise PermanentAuthError(f"{what}: {url} answered HTTP {status}{detail}; {hint}", status=status)

    # -- sign-in --------------------------------------------------------------------------------------------
    def _authenticate_server(self, challenge: Dict[str, Any], request_id: str) -> None:
        cert = challenge.get("cert")
        signature = challenge.get("signature")
        if isinstance(cert, str) and cert and isinstance(signature, str) and signature:
            leaf = verify_server_response(self.agent_id, request_id, cert, signature, fetch=self._fetch_issuer)
            self._check_identity(leaf)
            return
        self.server_auth_state = "unauthenticated"
        if self._strict():
            raise ServerAuthError(
                f"{self.server_url} did not prove its identity (no cert/signature in the sign-in challenge "
                f"reply) and strict server authentication is on ({STRICT_SERVER_AUTH_ENV} or "
                "strict_server_auth=True)"
            )
        if not self._warned_unauthenticated:
            self._warned_unauthenticated = True
            _log.warning(
                "server %s did not prove its identity (no cert/signature in the sign-in challenge reply); "
                "continuing for compatibility. Set %s=1 to refuse such servers",
                self.server_url, STRICT_SERVER_AUTH_ENV,
            )

    def _check_identity(self, leaf: Any) -> None:
        """trust.md rule 3: a chain to a trusted root is not enough, the certificate must name this server.

        Strict mode refuses a certificate that does not; otherwise the sign-in goes on (as 0.1.99 did), a warning
        is logged once and :attr:`server_auth_state` says ``host-mismatch``.
        """
        try:
            host = url_host(self.server_url)[1]
        except ValueError:
            host = ""
        labels = host.split(".")
        domain = ".".join(labels[1:]) if len(labels) > 2 else ""
        problem = check_server_identity(leaf, host, domain)
        if problem is None:
            self.server_auth_state = "verified"
            return
        self.server_auth_state = "host-mismatch"
        if self._strict():
            raise ServerAuthError(
                f"{self.server_url} did not prove it is {host!r}: {problem}; strict server authentication is on "
                f"({STRICT_SERVER_AUTH_ENV} or strict_server_auth=True)"
            )
        if not self._warned_host_mismatch:
            self._warned_host_mismatch = True
            _log.warning(
                "server %s signed its challenge with a trusted certificate that does not name it (%s); continuing "
                "for compatibility. Set %s=1 to refuse such servers", self.server_url, problem,
                STRICT_SERVER_AUTH_ENV,
            )

    def _exchange(self) -> Dict[str, Any]:
        """One challenge/proof exchange; the step-2 reply."""
        self.attempts += 1
        creds = self._get_credentials()
        creds.load()  # a credential problem fails here, before any traffic
        request_id = uuid.uuid4().hex
        challenge = self._send("sign_in", {"agent_id": self.agent_id, "request_id": request_id},
                               "sign-in challenge")
        nonce = challenge.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise TransientAuthError(
                f"sign-in challenge: server returned no nonce ({self._url('sign_in')} answered without a "
                "non-empty 'nonce')"
            )
        if not looks_like_nonce(nonce):
            # trust.md rule 2: the agent's key signs challenges, never a text a server chose (it could be a
            # statement the server wants the agent's signature on). A protocol error, permanent for this server.
            raise PermanentAuthError(
                f"sign-in challenge: {self._url('sign_in')} sent a nonce that is not a challenge (not 1-"
                f"{MAX_NONCE_LENGTH} hex/base64url characters, got {len(nonce)} characters); nothing was signed"
            )
        self._authenticate_server(challenge, request_id)
        proof = {
            "agent_id": self.agent_id,
            "request_id": request_id,
            "nonce": nonce,
            "public_key": creds.public_key_pem,
            "cert": creds.cert_pem,
            "signature": creds.sign(nonce.encode("utf-8")),
        }
        reply = self._send("sign_in", proof, "sign-in proof")
        token = reply.get("signature")
        if not isinstance(token, str) or not token:
            raise TransientAuthError(
                f"sign-in proof: {self._url('sign_in')} accepted the proof but returned no session token"
            )
        self.signature = token
        return reply

    def _single_flight(self, generation: Optional[int]) -> Dict[str, Any]:
        """Run one exchange under the lock, or reuse a success that completed since ``generation`` was read."""
        with self._sign_in_lock:
            if (generation is not None and self._generation != generation
                    and self._last_result is not None and self.signature):
                _log.debug("reusing the sign-in of %s to %s that completed meanwhile",
                           self.agent_id, self.server_url)
                return dict(self._last_result)
            try:
                reply = self._exchange()
            except AuthError as exc:
                self.last_error = exc
                raise
            except Exception as exc:  # a bug or an unforeseen library error: classify rather than leak it
                _log.debug("unexpected sign-in failure", exc_info=True)
                err = TransientAuthError(
                    f"sign-in of {self.agent_id} to {self.server_url} failed unexpectedly "
                    f"({type(exc).__name__}: {_short(exc)})"
                )
                self.last_error = err
                raise err from None
            self._generation += 1
            self._last_result = reply
            self.last_error = None
            self.is_retry = False
            _log.info("signed in as %s to %s (server %s)", self.agent_id, self.server_url,
                      self.server_auth_state or "unknown")
            return reply

    def sign_in_once(self) -> Dict[str, Any]:
        """Exactly one sign-in attempt: the step-2 reply, or the classified :class:`AuthError` raised.

        If another thread's sign-in completes while this call waits for it, its result is reused.
        """
        return self._single_flight(self._generation)

    def sign_in(self, retry_count: int = 0, max_retry_num: int = 10, *,
                cancel: Optional[threading.Event] = None) -> Optional[Dict[str, Any]]:
        """Sign in with up to ``max_retry_num - retry_count + 1`` attempts; the step-2 reply or ``None``.

        Transient errors (network, timeout, 5xx, 429) are retried with capped full-jitter backoff honouring
        ``Retry-After``; permanent ones (4xx, credentials, server authentication, TLS) end at once. On failure
        :attr:`last_error` holds the error, which is logged once and published to ``ErrorContext``. Setting
        ``cancel`` aborts a wait between attempts.
        """
        attempts = int(max_retry_num) - int(retry_count) + 1
        if attempts < 1:
            _log.debug("sign_in called with retry_count > max_retry_num; nothing to do")
            return None
        generation = self._generation
        retrier = Retrier(self.backoff, attempts, sleep=self._sleep, rand=self._rand, cancel=cancel)

        def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
            _log.info("sign-in attempt %d of %s to %s failed (%s); retrying in %.1f s",
                      attempt, self.agent_id, self.server_url, exc, wait)

        try:
            return retrier.call(
                lambda: self._single_flight(generation),
                is_transient=lambda exc: isinstance(exc, AuthError) and not exc.permanent,
                retry_after=lambda exc: float(getattr(exc, "retry_after", 0.0) or 0.0),
                on_retry=on_retry,
            )
        except InterruptedError:
            _log.info("sign-in of %s to %s cancelled", self.agent_id, self.server_url)
            return None
        except Exception as exc:
            if cancel is not None and cancel.is_set():
                _log.info("sign-in of %s to %s cancelled after %d attempt(s) (%s)",
                          self.agent_id, self.server_url, retrier.attempts, exc)
                return None
            error = exc if isinstance(exc, SDKError) else AuthError(f"sign-in failed: {_short(exc)}")
            self.last_error = error
            if not getattr(error, "agent_id", ""):
                error.agent_id = self.agent_id
            _log.warning("sign-in of %s to %s failed after %d attempt(s): %s",
                         self.agent_id, self.server_url, retrier.attempts, error)
            try:
                ErrorContext.publish(error)
            except Exception:  # reporting must never break the caller
                _log.debug("ErrorContext.publish failed", exc_info=True)
            return None

    # -- sign-out -------------------------------------------------------------------------------------------
    def sign_out(self) -> None:
        """End the session if there is one; the token is cleared whatever the server says. Never raises."""
        token = self.signature
        if not token:
            return
        self.signature = None
        url = self._url("sign_out")
        try:
            response = request_limited(
                self._abortable if self._abortable is not None else self._session,
                "POST",
                url,
                json={"agent_id": self.agent_id, "signature": token},
                headers=self.get_headers(),
                timeout=self.timeout,
                verify=self.verify,
                max_bytes=self.max_reply,
            )
            if 200 <= response.status_code < 300:
                _log.debug("signed out %s from %s", self.agent_id, self.server_url)
            else:
                _log.warning("sign-out of %s from %s answered HTTP %d", self.agent_id, self.server_url,
                             response.status_code)
        except Exception as exc:
            _log.warning("sign-out of %s from %s failed (%s); the session will expire on the server",
                         self.agent_id, self.server_url, type(exc).__name__)

    # -- authorised calls -----------------------------------------------------------------------------------
    def _authorised(self, payload: Dict[str, Any], fresh_token: bool) -> Dict[str, Any]:
        body = dict(payload)
        body.setdefault("agent_id", self.agent_id)
        if fresh_token or body.get("signature") is None:
            body["signature"] = self.signature
        return body

    def post_json(self, path: str, payload: Dict[str, Any], *, reauth_on_401: bool = True) -> Dict[str, Any]:
        """Authorised POST of ``payload`` to ``<server_url>/<path>``; the JSON reply object.

        ``agent_id`` and the current token are added if missing. On HTTP 401 the client signs in again (once)
        and resends a fresh copy of the payload carrying the new token. Failures raise :class:`AuthError`
        subclasses (transient / permanent, as for sign-in).
        """
        what = f"POST {path}"
        body = self._authorised(payload, fresh_token=False)
        try:
            return self._send(path, body, what)
        except PermanentAuthError as exc:
            if exc.status != 401 or not reauth_on_401:
                raise
        generation = self._generation
        if self.signature and self.signature != body.get("signature"):
            # Another thread already replaced the token we sent: use its fresh one.
            _log.debug("%s on %s answered 401; using the token refreshed meanwhile", what, self.server_url)
        else:
            _log.info("%s on %s answered 401; signing in again", what, self.server_url)
            self._single_flight(generation)
        return self._send(path, self._authorised(payload, fresh_token=True), what)

    def __repr__(self) -> str:  # never show the token or the seed
        return f"AuthClient(agent_id={self.agent_id!r}, server_url={self.server_url!r})"
