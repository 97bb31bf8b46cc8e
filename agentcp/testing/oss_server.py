"""The file server (OSS) of the local network: sign-in, streamed upload and download (messaging.md §5, api.md §3.9).

:class:`~agentcp.testing.access_point.AccessPoint` mounts it at ``<base>/api/oss`` (``ap.oss``), so the agents of
the devserver and of the tests upload and download files locally::

    POST <base>/api/oss/sign_in         two-step challenge sign-in (the access point's, with its own token table)
    POST <base>/api/oss/sign_out
    POST <base>/api/oss/upload_file     multipart/form-data: agent_id, signature, file_name, file part "file"
                                        -> {"url", "file_id", "size", "md5"}
    GET  <url>?agent_id=..&signature=.. the file (Content-Length set), to any signed-in agent

Both directions stream: an upload goes from the socket to a file in :attr:`OssServer.storage_dir` as it arrives,
a download from that file to the socket, so a 1 GB transfer costs the server no more memory than a small one.

Fault controls: :meth:`OssServer.drop_after` (cut the next transfer after N body bytes),
:meth:`OssServer.stall_after` (pause the next transfer after N bytes until :meth:`OssServer.release`),
:meth:`OssServer.expire_tokens` (the next request gets 401), :meth:`OssServer.set_available` (503).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ._http import HttpError, HttpRequest, HttpResponse

logger = logging.getLogger("agentcp.testing.oss")

__all__ = ["OssServer", "StoredFile", "PREFIX"]

PREFIX = "/api/oss"
#: Bytes moved per read/write.
CHUNK = 256 * 1024
#: Largest upload accepted by default (413 beyond it).
MAX_UPLOAD = 8 << 30
#: Largest text field (agent_id, signature, file_name) and largest part header block.
MAX_FIELD = 64 * 1024
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_DISPOSITION_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_DISPOSITION_FILENAME = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file."""

    file_id: str
    name: str
    owner: str
    size: int
    md5: str
    sha256: str
    path: str


class _Cut(Exception):
    """A fault control cut the connection: nothing more is sent."""


class _Fault:
    """A one-shot transfer fault: ``drop`` or ``stall`` once ``after`` body bytes went through."""

    def __init__(self, kind: str, direction: str, after: int) -> None:
        self.kind = kind
        self.direction = direction
        self.after = after


class _Body:
    """The request body read from the socket, at most ``length`` bytes, with the transfer fault applied."""

    def __init__(self, owner: "OssServer", rfile: Any, length: int, fault: Optional[_Fault]) -> None:
        self._owner = owner
        self._rfile = rfile
        self.remaining = length
        self.read_bytes = 0
        self._fault = fault

    def read(self, n: int) -> bytes:
        n = min(n, self.remaining)
        if n <= 0:
            return b""
        fault = self._fault
        if fault is not None:
            n = min(n, max(0, fault.after - self.read_bytes))
            if n == 0:
                if self._owner._apply(fault, None):
                    raise _Cut()  # the handler cuts the socket once the partial upload is deleted
                self._fault = None
                n = min(CHUNK, self.remaining)
        data = self._rfile.read1(n) if hasattr(self._rfile, "read1") else self._rfile.read(n)
        if not data:
            raise HttpError(400, "the request body ended before its Content-Length")
        self.remaining -= len(data)
        self.read_bytes += len(data)
        return data

    def drain(self) -> None:
        """Read and discard the rest (so an error answer reaches a client that is still sending)."""
        while self.remaining > 0:
            self.read(CHUNK)


class _MultipartReader:
    """Streams the parts of a ``multipart/form-data`` body: constant memory whatever the part sizes."""

    def __init__(self, body: _Body, boundary: bytes) -> None:
        self._body = body
        # The body starts with "--boundary"; a CRLF in front makes every delimiter "\r\n--boundary".
        self._buf = b"\r\n"
        self._delim = b"\r\n--" + boundary
        self._done = False

    def _fill(self) -> bool:
        data = self._body.read(CHUNK)
        if not data:
            return False
        self._buf += data
        return True

    def _skip_to_first(self) -> None:
        while self._delim not in self._buf:
            if len(self._buf) > MAX_FIELD or not self._fill():  # a preamble of at most MAX_FIELD bytes
                raise HttpError(400, "multipart body has no opening boundary")
        self._buf = self._buf[self._buf.index(self._delim) + len(self._delim):]

    def parts(self) -> Iterator[Tuple[bytes, Iterator[bytes]]]:
        """``(header block, content chunks)`` per part; each content iterator must be consumed before the next."""
        self._skip_to_first()
        while True:
            while len(self._buf) < 2 and self._fill():
                pass
            if self._buf.startswith(b"--"):
                return
            while b"\r\n\r\n" not in self._buf:
                if len(self._buf) > MAX_FIELD or not self._fill():
                    raise HttpError(400, "multipart part header is missing or too long")
            head, _, self._buf = self._buf.partition(b"\r\n\r\n")
            yield head, self._content()

    def _content(self) -> Iterator[bytes]:
        keep = len(self._delim) - 1
        while True:
            at = self._buf.find(self._delim)
            if at >= 0:
                if at:
                    yield self._buf[:at]
                self._buf = self._buf[at + len(self._delim):]
                return
            if len(self._buf) > keep:
                yield self._buf[:-keep]
                self._buf = self._buf[-keep:]
            if not self._fill():
                raise HttpError(400, "multipart body ended inside a part")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def _safe_name(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f")
    return name if name not in ("", ".", "..") else "file"


class OssServer:
    """The fake file server; call :meth:`install` to mount it on a :class:`FakeACPServer`."""

    def __init__(self, server: Any, *, prefix: str = PREFIX, accept_any_issuer: bool = False,
                 server_auth: Optional[str] = None, storage_dir: Optional[str] = None,
                 max_upload: int = MAX_UPLOAD) -> None:
        from .access_point import AccessPoint

        self.server = server
        self.prefix = "/" + prefix.strip("/")
        # Sign-in is the access point's two-step flow (nonce signature verified) with its own token table.
        self._auth = AccessPoint(server, server_auth=server_auth, accept_any_issuer=accept_any_issuer)
        if storage_dir is None:
            storage_dir = tempfile.mkdtemp(prefix="agentcp-oss-")
            # Removed when this object goes away (or at exit): uploads of a test run do not pile up in /tmp.
            self._cleanup: Optional[weakref.finalize] = weakref.finalize(self, shutil.rmtree, storage_dir, True)
        else:
            os.makedirs(storage_dir, exist_ok=True)
            self._cleanup = None
        #: Where uploads are stored (one file per upload, named by its id).
        self.storage_dir = storage_dir
        self.max_upload = int(max_upload)
        self._lock = threading.Lock()
        self._files: Dict[str, StoredFile] = {}
        self._available = True
        self._fault: Optional[_Fault] = None
        self._release = threading.Event()
        #: Counters for tests.
        self.counters: Dict[str, int] = {"uploads": 0, "downloads": 0, "bytes_in": 0, "bytes_out": 0,
                                         "unauthorised": 0, "cut": 0, "stalls": 0, "refused": 0, "bad_requests": 0}
        #: Every request seen, as ``(method, path, agent_id)`` (never the token).
        self.requests: List[Tuple[str, str, str]] = []

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def url(self) -> str:
        """The file server base URL: ``<server base>/api/oss``."""
        return self.server.heartbeat_url + self.prefix

    def install(self) -> "OssServer":
        """Mount sign-in, sign-out, upload and download on the server; returns ``self``."""
        self.server.add_route("POST", f"{self.prefix}/sign_in", self._guard(self._auth.handle_sign_in))
        self.server.add_route("POST", f"{self.prefix}/sign_out", self._auth.handle_sign_out)
        http = self.server._http
        http.add_streaming_route("POST", f"{self.prefix}/upload_file", self._handle_upload)
        http.add_streaming_route("GET", f"{self.prefix}/files", self._handle_download)
        return self

    def close(self) -> None:
        """Release stalled transfers and delete the storage folder if this server created it."""
        self._release.set()
        if self._cleanup is not None:
            self._cleanup()

    # ------------------------------------------------------------------------------------------------ faults
    def drop_after(self, nbytes: Optional[int], direction: str = "any") -> None:
        """Cut the next transfer (``"upload"``, ``"download"`` or ``"any"``) after ``nbytes`` body bytes: the
        socket is shut down mid-way. ``None`` clears it. One-shot."""
        self._set_fault(None if nbytes is None else _Fault("drop", direction, int(nbytes)))

    def stall_after(self, nbytes: Optional[int], direction: str = "any") -> None:
        """Pause the next transfer after ``nbytes`` body bytes until :meth:`release` (at most 60 s), then go on."""
        self._release.clear()
        self._set_fault(None if nbytes is None else _Fault("stall", direction, int(nbytes)))

    def release(self) -> None:
        """End every stall: the paused transfers go on (if their client is still there)."""
        self._release.set()

    def _set_fault(self, fault: Optional[_Fault]) -> None:
        if fault is not None and fault.direction not in ("upload", "download", "any"):
            raise ValueError("direction must be 'upload', 'download' or 'any'")
        with self._lock:
            self._fault = fault

    def _take_fault(self, direction: str) -> Optional[_Fault]:
        with self._lock:
            fault = self._fault
            if fault is not None and fault.direction in (direction, "any"):
                self._fault = None
                return fault
        return None

    def _apply(self, fault: _Fault, sock: Optional[socket.socket]) -> bool:
        """Apply ``fault`` to a transfer on ``sock``; True if the connection is to be cut (a drop; ``sock`` is
        shut down here when given)."""
        if fault.kind == "stall":
            with self._lock:
                self.counters["stalls"] += 1
            self._release.wait(60.0)
            return False
        with self._lock:
            self.counters["cut"] += 1
        if sock is not None:
            _shutdown(sock)
        return True

    def expire_tokens(self) -> None:
        """Forget every file-server session: the next upload or download gets 401."""
        self._auth.expire_tokens()

    def set_available(self, available: bool) -> None:
        """``False``: sign-in, upload and download answer 503."""
        with self._lock:
            self._available = bool(available)

    def _check_available(self) -> None:
        with self._lock:
            available = self._available
            if not available:
                self.counters["refused"] += 1
        if not available:
            raise HttpError(503, "file server unavailable (OssServer fault control)")

    def _guard(self, handler: Any) -> Any:
        def guarded(request: HttpRequest) -> Any:
            self._check_available()  # the route table turns the HttpError into the 503 answer
            return handler(request)

        return guarded

    # ------------------------------------------------------------------------------------------------ views
    def files(self) -> List[StoredFile]:
        with self._lock:
            return list(self._files.values())

    def file_for_url(self, url: str) -> Optional[StoredFile]:
        """The stored file a download URL names, or None."""
        path = urllib.parse.urlsplit(url).path
        file_id = path[len(self.prefix + "/files/"):].split("/", 1)[0] if path.startswith(self.prefix) else ""
        with self._lock:
            return self._files.get(file_id)

    @property
    def sign_ins(self) -> int:
        """Successful sign-ins to the file server."""
        return self._auth.counters["sign_ins"]

    def _note(self, method: str, path: str, agent_id: str) -> None:
        with self._lock:
            self.requests.append((method, path, agent_id))
            del self.requests[:-1000]

    def _owner(self, token: str, agent_id: str) -> str:
        try:
            owner = self._auth._authorised({"signature": token})
        except HttpError:
            owner = ""
        if not owner or (agent_id and owner != agent_id):
            with self._lock:
                self.counters["unauthorised"] += 1
            raise HttpError(401, "unknown or expired signature")
        return owner

    # ------------------------------------------------------------------------------------------------ upload
    def _handle_upload(self, request: HttpRequest, handler: Any) -> Optional[HttpResponse]:
        try:
            return self._upload(request, handler)
        except _Cut:
            _shutdown(handler.connection)
            return None
        except HttpError as exc:
            if exc.status == 400:
                with self._lock:
                    self.counters["bad_requests"] += 1
            return HttpResponse(exc.status, {"error": exc.message})

    def _upload(self, request: HttpRequest, handler: Any) -> Optional[HttpResponse]:
        if request.path != f"{self.prefix}/upload_file":
            raise HttpError(404, f"no such endpoint: {request.path}")
        self._check_available()
        match = _BOUNDARY.search(request.header("content-type", "") or "")
        if not (request.header("content-type", "") or "").lower().startswith("multipart/form-data") or not match:
            raise HttpError(400, "expected multipart/form-data with a boundary")
        try:
            length = int(request.header("content-length", "") or "")
        except ValueError:
            raise HttpError(411, "Content-Length required") from None
        if length < 0:
            raise HttpError(400, "bad Content-Length")
        if length > self.max_upload:
            raise HttpError(413, f"upload larger than {self.max_upload} bytes")
        body = _Body(self, handler.rfile, length, self._take_fault("upload"))
        fields: Dict[str, str] = {}
        stored: Optional[Tuple[str, str, int, str, str]] = None  # (temp path, filename, size, md5, sha256)
        try:
            for head, content in _MultipartReader(body, match.group(1).encode("latin-1")).parts():
                name_match = _DISPOSITION_NAME.search(head)
                name = name_match.group(1).decode("utf-8", "replace") if name_match else ""
                if name == "file" and stored is None:
                    disposition = _DISPOSITION_FILENAME.search(head)
                    stored = self._store(content, disposition.group(1).decode("utf-8", "replace")
                                         if disposition else "")
                    continue
                value = b""
                for chunk in content:
                    value += chunk
                    if len(value) > MAX_FIELD:
                        raise HttpError(400, f"form field {name!r} is too long")
                fields[name] = value.decode("utf-8", "replace")
            body.drain()
            with self._lock:
                self.counters["bytes_in"] += body.read_bytes
            self._note("POST", request.path, fields.get("agent_id", ""))
            owner = self._owner(fields.get("signature", ""), fields.get("agent_id", ""))
            if stored is None:
                raise HttpError(400, "missing the file part 'file'")
            temp, filename, size, md5, sha256 = stored
            file_id = secrets.token_hex(12)
            name = _safe_name(fields.get("file_name") or filename)
            final = os.path.join(self.storage_dir, file_id)
            os.replace(temp, final)
            stored = None
            record = StoredFile(file_id, name, owner, size, md5, sha256, final)
            with self._lock:
                self._files[file_id] = record
                self.counters["uploads"] += 1
            url = f"{self.url}/files/{file_id}/{urllib.parse.quote(name)}"
            return HttpResponse(200, {"url": url, "file_id": file_id, "size": size, "md5": md5})
        finally:
            if stored is not None:
                try:
                    os.unlink(stored[0])
                except OSError:
                    pass

    def _store(self, content: Iterator[bytes], filename: str) -> Tuple[str, str, int, str, str]:
        fd, temp = tempfile.mkstemp(dir=self.storage_dir, prefix=".upload-")
        md5 = hashlib.md5(usedforsecurity=False)
        sha = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in content:
                    fh.write(chunk)
                    md5.update(chunk)
                    sha.update(chunk)
                    size += len(chunk)
        except BaseException:
            os.unlink(temp)
            raise
        return temp, filename, size, md5.hexdigest(), sha.hexdigest()

    # ------------------------------------------------------------------------------------------------ download
    def _handle_download(self, request: HttpRequest, handler: Any) -> Optional[HttpResponse]:
        try:
            return self._download(request, handler)
        except HttpError as exc:
            return HttpResponse(exc.status, {"error": exc.message})

    def _download(self, request: HttpRequest, handler: Any) -> HttpResponse:
        agent_id = (request.query.get("agent_id") or [""])[0]
        self._note("GET", request.path, agent_id)
        self._check_available()
        self._owner((request.query.get("signature") or [""])[0], agent_id)
        file_id = request.path[len(self.prefix + "/files/"):].split("/", 1)[0]
        with self._lock:
            record = self._files.get(file_id)
        if record is None:
            raise HttpError(404, "no such file")
        try:
            fh = open(record.path, "rb")
        except OSError:
            raise HttpError(404, "file is gone") from None
        fault = self._take_fault("download")
        sock = handler.connection

        def chunks() -> Iterator[bytes]:
            pending, sent = fault, 0
            try:
                while True:
                    want = CHUNK
                    if pending is not None:
                        want = min(want, pending.after - sent)
                        if want <= 0:
                            if self._apply(pending, sock):
                                return
                            pending, want = None, CHUNK
                    data = fh.read(want)
                    if not data:
                        break
                    sent += len(data)
                    with self._lock:
                        self.counters["bytes_out"] += len(data)
                    yield data
                with self._lock:
                    self.counters["downloads"] += 1
            finally:
                fh.close()

        return HttpResponse(200, stream=chunks(), content_type="application/octet-stream",
                            headers={"Content-Length": str(record.size),
                                     "Content-Disposition": f"attachment; filename*=UTF-8''"
                                                            f"{urllib.parse.quote(record.name)}"})
