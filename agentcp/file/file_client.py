"""Files through the file server (OSS): sign-in, streamed upload and download (messaging.md §5, api.md §3.9).

Compatible with 0.1.99's ``agentcp.file.file_client.FileClient`` (same constructor, methods and return values,
the same multipart form and download query), with its defects fixed:

* a file of any size moves in constant memory: the multipart upload body is streamed from the file, the download
  is streamed into a temporary file beside the target, fsynced, and renamed over it (atomic); a transfer that
  fails at any point (a dropped connection, a short body, a stall, a size bound) leaves no partial file behind and
  returns a failure, with the reason in :attr:`FileClient.last_error`, logged and published via ``ErrorContext``;
* every request has a timeout (transfers: connect/stall ``TRANSFER_TIMEOUT``; there is no whole-transfer deadline,
  since a 1 GB file legitimately takes a while); a 401 signs in again once and resends with the fresh token;
* the sign-in proof and the token go only to hosts of the agent's trust domain (trust.md rule 1): a download URL
  on another host is refused before any request, and no token is sent there;
* a relative ``save_path`` must stay inside the current directory (trust.md rule 5; symlinks included);
* the auth query is appended with ``&`` when the URL already has a query (0.1.99 always used ``?``), and our own
  log lines never contain the token.

Base URL rules (:func:`file_server_url`): a domain ``D`` gives ``https://oss.D/api/oss`` (0.1.99); an access point
or file URL on a DNS host gives ``<scheme>://oss.<host minus its first label>/api/oss`` (0.1.99's rule for
downloads); one on an IP or ``localhost`` host (the devserver) gives ``<scheme>://<host:port>/api/oss``.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union
from urllib.parse import quote, urlsplit, urlunsplit

from agentcp.base.auth_client import AuthClient
from agentcp.base.http import AbortableSession, VerifySetting, no_proxy_for, read_limited, resolve_verify
from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded
from agentcp.base.names import resolve_inside
from agentcp.base.reporting import publish
from agentcp.base.trust import RefusalLog, TrustPolicy, UntrustedHostError, _is_ip, _is_loopback, url_host
from agentcp.ca.identity_store import _fsync_dir
from agentcp.context.exceptions import AuthError, SDKError

__all__ = [
    "FileClient",
    "FileTransferError",
    "file_server_url",
    "with_auth_query",
    "confine_path",
    "TRANSFER_TIMEOUT",
    "OSS_URL_ENV",
]

_log = logging.getLogger("agentcp.file")

#: ``AGENTCP_OSS_URL`` names the file server base (e.g. ``https://files.example.com/api/oss``) for uploads,
#: instead of the one derived from the access point.
OSS_URL_ENV = "AGENTCP_OSS_URL"
#: (connect, read) seconds of transfers. The read timeout bounds each wait for the server (a stall), not the
#: whole transfer; urllib3 applies the connect timeout to each send of the upload body.
TRANSFER_TIMEOUT: Tuple[float, float] = (10.0, 30.0)
#: Bytes moved per read of the file or the socket.
CHUNK = 256 * 1024
#: Largest upload reply read (it is a small JSON object).
_REPLY_MAX = 64 * 1024
#: Longest file URL accepted from the server.
_URL_MAX = 8192
_SIGNATURE_QUERY = re.compile(r"(signature=)[^&\s'\"]*")


class FileTransferError(SDKError):
    """An upload or download failed; the message says which file, where, how far it got and why."""

    def __init__(self, message: Any, *, status: int = 0) -> None:
        super().__init__(message, code=1403)
        self.status = status


# ------------------------------------------------------------------------------------------------------ pure helpers

def file_server_url(network_or_url: str) -> str:
    """The file server base for a network domain, an access point URL or a file URL (see the module notes)."""
    text = (network_or_url or "").strip().rstrip("/")
    if "://" not in text:
        return f"https://oss.{text}/api/oss"
    scheme, host = url_host(text)
    netloc = urlsplit(text).netloc
    if _is_ip(host) or _is_loopback(host):  # the devserver: the access point's own origin
        return f"{scheme}://{netloc}/api/oss"
    labels = host.split(".")
    parent = ".".join(labels[1:]) if len(labels) > 2 else host
    port = urlsplit(text).port
    return f"{scheme}://oss.{parent}{f':{port}' if port else ''}/api/oss"


def with_auth_query(url: str, agent_id: str, token: str) -> str:
    """``url`` with ``agent_id`` and ``signature`` added to its query (``?`` or ``&``), before any fragment."""
    parts = urlsplit(url)
    auth = f"agent_id={quote(agent_id, safe='')}&signature={quote(token, safe='')}"
    query = f"{parts.query}&{auth}" if parts.query else auth
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _shown(url: str) -> str:
    """A URL as our logs show it: scheme, host and path; never the query (it may carry a token)."""
    try:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    except ValueError:
        return "<malformed URL>"


def confine_path(save_path: str, base: Optional[str] = None) -> str:
    """The absolute path to write ``save_path`` to; a relative one must stay inside ``base`` (default: the current
    directory), symlinks included (trust.md rule 5). Absolute paths are the caller's choice. ``ValueError`` if not."""
    if not isinstance(save_path, (str, os.PathLike)) or not os.fspath(save_path):
        raise ValueError("the target path is empty")
    path = os.fspath(save_path)
    if "\x00" in path:
        raise ValueError("the target path contains a NUL character")
    if os.path.isabs(path):
        return os.path.abspath(path)
    return resolve_inside(base or os.getcwd(), path, field="the relative target path")


class _MultipartFile:
    """A ``multipart/form-data`` body streamed from a file: the text fields, then the file part.

    Its length is known up front (so requests sends ``Content-Length``, not chunks) and it is read in
    :data:`CHUNK` pieces as the socket takes them: memory stays constant whatever the file size. The file must keep
    its size while it is sent; if it shrinks the upload fails instead of sending a short body.
    """

    def __init__(self, fields: List[Tuple[str, str]], file_field: str, path: str, filename: str) -> None:
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'.encode()
            + value.encode("utf-8") + b"\r\n"
            for name, value in fields
        )
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(file_field)}"; '
                 f'filename="{_quoted(filename)}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        self._head = head
        self._tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._fh = open(path, "rb")
        self.file_size = os.fstat(self._fh.fileno()).st_size
        #: File bytes handed to the socket so far.
        self.sent = 0

    def __len__(self) -> int:
        return len(self._head) + self.file_size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        left = self.file_size
        while left > 0:
            chunk = self._fh.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"the file shrank while it was uploaded ({left} bytes missing)")
            left -= len(chunk)
            self.sent += len(chunk)
            yield chunk
        yield self._tail

    def close(self) -> None:
        self._fh.close()


def _quoted(value: str) -> str:
    # A name cannot end the quoted header value or start a new header line.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _check_status(response: Any, what: str) -> None:
    """Raise :class:`FileTransferError` for a non-2xx reply, with the server's error text if it sent one."""
    if 200 <= response.status_code < 300:
        return
    detail = _server_error(response)
    raise FileTransferError(f"{what}: the server answered HTTP {response.status_code}"
                            f"{f' ({detail})' if detail else ''}", status=response.status_code)


def _server_error(response: Any) -> str:
    try:
        body = read_limited(response, 4096)
        import json

        data = json.loads(body.decode("utf-8", "replace"))
        if isinstance(data, dict) and data.get("error"):
            return " ".join(str(data["error"]).split())[:200]
    except Exception:  # the error text is a courtesy; its absence is not a new fault
        _log.debug("no error text in the file server reply", exc_info=True)
    return ""


def _transport_errors() -> Tuple[Type[BaseException], ...]:
    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


# ------------------------------------------------------------------------------------------------------ the client

class FileClient:
    """Uploads and downloads files through one file server as one agent.

    ``FileClient(aid_path, seed_password, agent_id, agent_network)`` as in 0.1.99: ``aid_path`` is the agent's
    certificate folder, ``seed_password`` the hashed seed, ``agent_network`` the network domain (or an access point
    or file server URL). ``cert``/``key`` are accepted for compatibility; the credentials are read from
    ``aid_path``, like every other client. Keyword-only additions: ``server_url`` (the base, overriding the
    derived one), ``timeout``, ``verify``, ``trust`` (a :class:`TrustPolicy`; default: the file server's own
    domain), ``check_trusted`` (``(url, purpose) -> bool``, used instead of ``trust`` by ``AgentID``),
    ``max_download`` (bytes; default ``Limits.file_transfer_max``) and ``on_limit`` (called with the
    :class:`LimitExceeded` of a download that crossed it).
    """

    def __init__(self, aid_path: str, seed_password: str, agent_id: str, agent_network: str,
                 cert: Optional[str] = None, key: Optional[str] = None, *, server_url: Optional[str] = None,
                 timeout: Union[float, Tuple[float, float]] = TRANSFER_TIMEOUT,
                 verify: Optional[VerifySetting] = None, trust: Optional[TrustPolicy] = None,
                 check_trusted: Optional[Callable[[str, str], bool]] = None,
                 max_download: Optional[int] = None,
                 on_limit: Optional[Callable[[LimitExceeded], None]] = None) -> None:
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.agent_id = agent_id
        self.agent_network = agent_network
        self.cert = cert
        self.key = key
        self.server_url = (server_url or file_server_url(agent_network)).rstrip("/")
        self.timeout = timeout
        self.verify = verify
        self.max_download = int(max_download) if max_download else DEFAULT_LIMITS.file_transfer_max
        self.on_limit = on_limit
        self.auth_client = AuthClient(agent_id, self.server_url, aid_path, seed_password, verify=verify)
        self._trust = trust
        self._check_trusted = check_trusted
        self._refusals = RefusalLog(_log)
        self._abortable = AbortableSession()
        self._session = self._abortable.session
        self._lock = threading.Lock()
        self._uploaded_url = ""
        #: The error of the last failed operation (None after a success).
        self.last_error: Optional[SDKError] = None
        #: Counters: uploads, downloads (successful), failures, refused, bytes_up, bytes_down.
        self.counters: Dict[str, int] = {"uploads": 0, "downloads": 0, "failures": 0, "refused": 0,
                                         "bytes_up": 0, "bytes_down": 0}

    # -- 0.1.99 API ---------------------------------------------------------------------------------------------
    def sign_in(self) -> bool:
        """Sign in to the file server (challenge-response, a few retries); True on success."""
        if not self._trusted(self.server_url):
            return False
        return self.auth_client.sign_in(0, 3) is not None

    def sign_out(self) -> None:
        """End the file-server session; the token is forgotten whatever the server says."""
        self.auth_client.sign_out()

    def get_signature(self) -> Optional[str]:
        """The file-server token, signing in first if there is none; None if sign-in failed."""
        token = self.auth_client.signature
        if token:
            return token
        return self.auth_client.signature if self.sign_in() else None

    def get_uploaded_url(self) -> str:
        """The URL of the last successful upload, ``""`` before the first (0.1.99 always returned ``""``)."""
        return self._uploaded_url

    def post_file(self, full_path: str) -> Optional[str]:
        """Upload ``full_path`` (multipart ``agent_id``, ``signature``, ``file_name``, ``file``); its URL, or None
        (the reason is in :attr:`last_error`, logged and published)."""
        try:
            url = self._upload(full_path)
        except FileTransferError as exc:
            self._failed(exc)
            return None
        self.last_error = None
        self._uploaded_url = url
        return url

    def download_file(self, url: str, save_path: str) -> Optional[Tuple[str, Optional[str]]]:
        """Download ``url`` to ``save_path``: ``(url_with_auth_query, save_path)`` on success,
        ``(url_with_auth_query, None)`` if the transfer failed (no partial file is left), None if nothing was
        requested (untrusted host, refused path, no token)."""
        try:
            target = self._prepare_download(url, save_path)
        except FileTransferError as exc:
            self._failed(exc)
            return None
        full_url = ""
        try:
            full_url = self._download(url, target)
        except FileTransferError as exc:
            self._failed(exc)
            full_url = getattr(exc, "full_url", full_url)
            return (full_url, None) if full_url else None
        self.last_error = None
        return full_url, save_path

    def abort(self) -> None:
        """Make transfers in flight fail at once (their partial files are removed)."""
        self._abortable.abort()
        self.auth_client.abort()

    def close(self) -> None:
        """Abort transfers in flight, sign out and close the connections."""
        self.abort()
        self.sign_out()
        self._session.close()
        self.auth_client.close()

    # -- trust and reporting --------------------------------------------------------------------------------------
    def _trusted(self, url: str) -> bool:
        if self._check_trusted is not None:
            ok = bool(self._check_trusted(url, "file"))
        else:
            try:
                policy = self._trust or TrustPolicy.from_ap_url(self.server_url)
                policy.check(url, "file")
                ok = True
            except ValueError:
                ok = False
            except UntrustedHostError as err:
                self._refusals.refuse(err)
                publish(err, self.agent_id)
                ok = False
        if not ok:
            with self._lock:
                self.counters["refused"] += 1
            self.last_error = FileTransferError(f"refused: {_shown(url)} is outside the trust domain; no "
                                                "credentials were sent there")
        return ok

    def _failed(self, exc: FileTransferError) -> None:
        with self._lock:
            self.counters["failures"] += 1
        self.last_error = exc
        if getattr(exc, "reported", False):
            return
        _log.warning("%s: %s", self.agent_id, exc.message)
        publish(exc, self.agent_id)

    def _token(self) -> str:
        if not self._trusted(self.server_url):
            err = FileTransferError(f"the file server {self.server_url} is outside the trust domain; "
                                    "no sign-in was attempted")
            err.reported = True  # type: ignore[attr-defined]  # the refusal was logged and published
            raise err
        token = self.get_signature()
        if not token:
            cause = self.auth_client.last_error
            raise FileTransferError(f"sign-in to the file server {self.server_url} failed"
                                    f"{f' ({cause})' if cause else ''}")
        return token

    def _fresh_token(self, used: str) -> str:
        """After a 401: the token another thread refreshed meanwhile, or a new sign-in."""
        current = self.auth_client.signature
        if current and current != used:
            return current
        _log.info("the file server %s answered 401; signing in again", self.server_url)
        try:
            self.auth_client.sign_in_once()
        except AuthError as exc:
            raise FileTransferError(f"the file server {self.server_url} rejected the token and signing in "
                                    f"again failed ({exc})", status=401) from None
        return self.auth_client.signature or ""

    def _request_kwargs(self, url: str) -> Dict[str, Any]:
        return {"timeout": self.timeout, "verify": resolve_verify(self.verify), "proxies": no_proxy_for(url)}

    # -- upload ---------------------------------------------------------------------------------------------------
    def _upload(self, full_path: str) -> str:
        if not isinstance(full_path, (str, os.PathLike)) or not os.path.isfile(full_path):
            raise FileTransferError(f"upload: {full_path!r} is not a file")
        name = os.path.basename(os.fspath(full_path))
        endpoint = f"{self.server_url}/upload_file"
        token = self._token()
        errors = _transport_errors()
        for attempt in (0, 1):
            try:
                body = _MultipartFile([("agent_id", self.agent_id), ("signature", token), ("file_name", name)],
                                      "file", os.fspath(full_path), name)
            except OSError as exc:
                raise FileTransferError(f"upload: cannot read {full_path!r} ({exc.strerror or exc})") from None
            try:
                response = self._session.post(endpoint, data=body, headers={"Content-Type": body.content_type},
                                              stream=True, **self._request_kwargs(endpoint))
            except errors as exc:
                raise FileTransferError(
                    f"upload of {name} to {endpoint} failed after sending {body.sent} of {body.file_size} bytes: "
                    f"{_describe(exc)}") from None
            finally:
                body.close()
            with response:
                if response.status_code == 401 and attempt == 0:
                    token = self._fresh_token(token)
                    continue
                _check_status(response, f"upload of {name} to {endpoint}")
                url = self._uploaded(response, endpoint, name, body.file_size)
            with self._lock:
                self.counters["uploads"] += 1
                self.counters["bytes_up"] += body.file_size
            _log.info("%s uploaded %s (%d bytes) to %s", self.agent_id, name, body.file_size, self.server_url)
            return url
        raise FileTransferError(f"upload of {name} to {endpoint}: the server rejected a fresh token", status=401)

    @staticmethod
    def _uploaded(response: Any, endpoint: str, name: str, size: int) -> str:
        import json

        try:
            data = json.loads(read_limited(response, _REPLY_MAX).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FileTransferError(f"upload of {name} to {endpoint}: the reply is not a JSON object within "
                                    f"{_REPLY_MAX} bytes ({exc})") from None
        except _transport_errors() as exc:
            raise FileTransferError(f"upload of {name} to {endpoint}: the reply was cut ({_describe(exc)})") \
                from None
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url or len(url) > _URL_MAX:
            raise FileTransferError(f"upload of {name} to {endpoint}: the reply has no usable 'url'")
        try:
            scheme, _host = url_host(url)
        except ValueError as exc:
            raise FileTransferError(f"upload of {name} to {endpoint}: the returned url is malformed ({exc})") \
                from None
        if scheme not in ("http", "https"):
            raise FileTransferError(f"upload of {name} to {endpoint}: the returned url is not http(s)")
        reported = data.get("size")
        if isinstance(reported, int) and not isinstance(reported, bool) and reported != size:
            raise FileTransferError(f"upload of {name} to {endpoint}: the server stored {reported} bytes of "
                                    f"{size}")
        return url

    # -- download -------------------------------------------------------------------------------------------------
    def _prepare_download(self, url: str, save_path: str) -> str:
        try:
            scheme, _host = url_host(url)
        except ValueError as exc:
            raise FileTransferError(f"download: not a usable URL ({exc})") from None
        if scheme not in ("http", "https"):
            raise FileTransferError(f"download: {_shown(url)} is not an http(s) URL")
        if not self._trusted(url):
            err = FileTransferError(f"download of {_shown(url)} refused: the host is outside the trust domain; "
                                    "no token was sent")
            err.reported = True  # type: ignore[attr-defined]
            raise err
        try:
            return confine_path(save_path)
        except ValueError as exc:
            raise FileTransferError(f"download of {_shown(url)} refused: {exc}") from None

    def _download(self, url: str, target: str) -> str:
        token = self._token()
        errors = _transport_errors()
        full_url = with_auth_query(url, self.agent_id, token)
        for attempt in (0, 1):
            full_url = with_auth_query(url, self.agent_id, token)
            try:
                response = self._session.get(full_url, stream=True, headers={"Accept-Encoding": "identity"},
                                             **self._request_kwargs(url))
            except errors as exc:
                raise _with_url(FileTransferError(f"download of {_shown(url)} failed: {_describe(exc)}"),
                                full_url) from None
            with response:
                if response.status_code == 401 and attempt == 0:
                    token = self._fresh_token(token)
                    continue
                try:
                    _check_status(response, f"download of {_shown(url)}")
                    size = self._save(response, url, target)
                except FileTransferError as exc:
                    raise _with_url(exc, full_url) from None
            with self._lock:
                self.counters["downloads"] += 1
                self.counters["bytes_down"] += size
            _log.info("%s downloaded %s (%d bytes) to %s", self.agent_id, _shown(url), size, target)
            return full_url
        raise _with_url(FileTransferError(f"download of {_shown(url)}: the server rejected a fresh token",
                                          status=401), full_url)

    def _save(self, response: Any, url: str, target: str) -> int:
        """Stream the body into a temporary file beside ``target``, then fsync and rename it over ``target``."""
        expected = _content_length(response)
        cap = self.max_download
        if expected is not None and expected > cap:
            raise self._limit(url, expected)
        folder = os.path.dirname(target) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise FileTransferError(f"download of {_shown(url)}: cannot create {folder} ({exc.strerror})") \
                from None
        temp = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.part")
        received = 0
        done = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                for chunk in response.iter_content(chunk_size=CHUNK):
                    if not chunk:
                        continue
                    received += len(chunk)
                    if received > cap:
                        raise self._limit(url, received)
                    fh.write(chunk)
                if expected is not None and received != expected and not response.headers.get("Content-Encoding"):
                    raise FileTransferError(f"download of {_shown(url)}: the connection ended after {received} of "
                                            f"{expected} bytes")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, target)
            done = True
            _fsync_dir(folder)
            return received
        except FileTransferError:
            raise
        except _transport_errors() as exc:
            of = f" of {expected}" if expected is not None else ""
            raise FileTransferError(f"download of {_shown(url)} failed after {received}{of} bytes: "
                                    f"{_describe(exc)}; the partial file was removed") from None
        finally:
            if not done:
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    _log.warning("cannot remove the partial download %s: %s", temp, exc)

    def _limit(self, url: str, got: int) -> FileTransferError:
        crossing = LimitExceeded("file_transfer_max", self.max_download, f"download of {_shown(url)}", got)
        if self.on_limit is not None:
            self.on_limit(crossing)
        else:
            _log.warning("%s: %s", self.agent_id, crossing.message)
            publish(crossing, self.agent_id)
        err = FileTransferError(crossing.message)
        err.reported = True  # type: ignore[attr-defined]
        return err

    def __repr__(self) -> str:  # never the token
        return f"FileClient(agent_id={self.agent_id!r}, server_url={self.server_url!r})"


def _with_url(exc: FileTransferError, full_url: str) -> FileTransferError:
    exc.full_url = full_url  # type: ignore[attr-defined]  # the 0.1.99 return value of a failed download
    return exc


def _content_length(response: Any) -> Optional[int]:
    text = response.headers.get("Content-Length")
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def _describe(exc: BaseException) -> str:
    """A short reason for a transport error (never the request URL: it may carry the token)."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return ("the TLS certificate could not be verified; set AGENTCP_TLS_VERIFY=0 only for a test server you "
                "trust")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, (requests.exceptions.Timeout,)) or "timed out" in str(exc).lower():
        return "the server stalled (no data within the read timeout)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection dropped mid-transfer"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            return "connection refused"
        return "the connection dropped"
    text = _SIGNATURE_QUERY.sub(r"\1***", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text[:160]}"
