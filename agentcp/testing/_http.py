"""HTTP side of the fake server: request/response types, a route table and a listener that can be closed and re-bound.

The listening socket is served by the shared :class:`~agentcp.testing._loop.IOLoop` (accept only); every connection
gets its own daemon thread, tracked so that :meth:`HttpFrontend.close` can unblock and join all of them.
"""
from __future__ import annotations

import json
import logging
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from agentcp.base.log import redact_secrets

from ._loop import IOLoop

logger = logging.getLogger("agentcp.testing")

__all__ = ["HttpRequest", "HttpResponse", "HttpError", "RouteHandler", "UpgradeHandler", "StreamingHandler",
           "HttpFrontend"]

#: Largest request body accepted (anything bigger gets 413): sign-in bodies are a few kilobytes.
MAX_BODY_BYTES = 1 << 20


class HttpError(Exception):
    """Raise from a route handler to answer ``status`` with the JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request as seen by a route handler."""

    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]  # lower-case names
    body: bytes
    client_address: Tuple[str, int]

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """Return header ``name`` (case-insensitive) or ``default``."""
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        """Parse the body as UTF-8 JSON; raise :class:`HttpError` 400 if it is not."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"body is not valid JSON: {exc}") from exc

    def json_object(self) -> Dict[str, Any]:
        """Parse the body as a JSON object; raise :class:`HttpError` 400 if it is anything else."""
        value = self.json()
        if not isinstance(value, dict):
            raise HttpError(400, "body must be a JSON object")
        return value


@dataclass
class HttpResponse:
    """What a route handler answers.

    ``body``: ``bytes`` are sent as is, ``str`` as UTF-8 text, anything else (dict, list, None) as JSON.
    """

    status: int = 200
    body: Any = None
    headers: Dict[str, str] = field(default_factory=dict)
    content_type: Optional[str] = None
    #: An iterable of ``bytes`` sent piece by piece as they come (no Content-Length; the connection closes at the
    #: end, as HTTP/1.0 allows). Used for server-sent events. ``body`` is ignored when this is set.
    stream: Optional[Iterable[bytes]] = None

    def encode(self) -> Tuple[bytes, str]:
        """Return ``(payload, content_type)``."""
        if isinstance(self.body, bytes):
            return self.body, self.content_type or "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode("utf-8"), self.content_type or "text/plain; charset=utf-8"
        payload = json.dumps({} if self.body is None else self.body).encode("utf-8")
        return payload, self.content_type or "application/json"


#: A route handler: takes the request, returns an :class:`HttpResponse` or a ``(status, body)`` tuple.
RouteHandler = Callable[[HttpRequest], Union[HttpResponse, Tuple[int, Any]]]


#: Takes over a connection that asked for ``Upgrade`` (e.g. a WebSocket): ``(request, sock, rfile)``; it answers the
#: handshake itself and returns when the connection is finished (the frontend then closes the socket).
UpgradeHandler = Callable[[HttpRequest, socket.socket, Any], None]

#: Serves a request whose body it reads itself from ``handler.rfile`` (``request.body`` is empty): ``(request,
#: handler)``, where ``handler`` is the connection's ``BaseHTTPRequestHandler`` (``rfile``, ``connection``). It
#: returns the response to send, or None if it answered (or cut the connection) itself.
StreamingHandler = Callable[[HttpRequest, Any], Optional[HttpResponse]]


class _Handler(BaseHTTPRequestHandler):
    """Parses one request (HTTP/1.0: one request per connection) and hands it to the frontend's route table."""

    server_version = "FakeACP/0.2"
    # HTTP/1.0 closes the connection after each response, so no thread lingers on an idle keep-alive connection.
    protocol_version = "HTTP/1.0"

    server: "_HTTPServer"

    def _handle(self) -> None:
        frontend = self.server.frontend
        streaming = frontend.streaming_handler(self.command, urllib.parse.urlsplit(self.path).path)
        if streaming is not None:  # it reads the body itself, however large (file uploads): not held in memory
            self.close_connection = True
            response = streaming(self._request(b""), self)
            if response is not None:
                self._write(response)
            return
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text else 0
        except ValueError:
            self._write(HttpResponse(400, {"error": "bad Content-Length"}))
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._write(HttpResponse(413, {"error": "body too large"}))
            return
        request = self._request(self.rfile.read(length) if length else b"")
        upgrade = frontend.upgrade_handler(request)
        if upgrade is not None:
            self.close_connection = True
            upgrade(request, self.connection, self.rfile)
            return
        self._write(frontend.dispatch(request))

    def _request(self, body: bytes) -> HttpRequest:
        split = urllib.parse.urlsplit(self.path)
        return HttpRequest(
            method=self.command,
            path=split.path,
            query=urllib.parse.parse_qs(split.query),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            client_address=(str(self.client_address[0]), int(self.client_address[1])),
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def _write(self, response: HttpResponse) -> None:
        if response.stream is not None:
            self._write_stream(response)
            return
        payload, content_type = response.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _write_stream(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type or "application/octet-stream")
        self.send_header("Cache-Control", "no-cache")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            # Each piece must leave at once (an event stream is read as it is written).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        pieces = iter(response.stream)  # type: ignore[arg-type]
        try:
            for piece in pieces:
                self.wfile.write(piece)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a generator's cleanup runs even when the client went away

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        # The request line carries the clients' tokens in query strings (stream pulls, downloads): never log them.
        logger.debug("http %s %s", self.address_string(), redact_secrets(format % args))


class _Connection:
    """A connection being served; ``sock`` becomes the TLS socket once wrapped."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose per-connection threads are tracked by the frontend (and TLS-wrapped there)."""

    daemon_threads = True
    allow_reuse_address = True  # re-binding the same port after "refuse" must work despite TIME_WAIT
    request_queue_size = 64

    def __init__(self, address: Tuple[str, int], frontend: "HttpFrontend") -> None:
        self.frontend = frontend
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can take seconds in some sandboxes.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.frontend._spawn(self, request, client_address)


class HttpFrontend:
    """Route table plus a listening socket served by ``loop``; connections run on tracked daemon threads."""

    def __init__(
        self,
        loop: IOLoop,
        host: str,
        tls_context: Optional[ssl.SSLContext] = None,
        io_timeout: float = 10.0,
        port: int = 0,
    ) -> None:
        self._loop = loop
        self._host = host
        #: TLS context for HTTPS (set before the first connection); ``None`` serves plain HTTP.
        self.tls_context = tls_context
        self._io_timeout = io_timeout
        self._routes: Dict[Tuple[str, str], RouteHandler] = {}
        self._upgrades: Dict[str, UpgradeHandler] = {}
        self._streaming: Dict[Tuple[str, str], StreamingHandler] = {}
        self._lock = threading.Lock()
        self._server: Optional[_HTTPServer] = None
        self._port = int(port)  # 0: ephemeral, chosen at the first listen() and kept for re-binds
        self._closing = False
        self._threads: Set[threading.Thread] = set()
        self._conns: Set[_Connection] = set()

    # -- routes ----------------------------------------------------------------------------------------------------

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Route ``method`` requests for exactly ``path`` to ``handler`` (replacing any previous handler)."""
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        with self._lock:
            self._routes[(method.upper(), path)] = handler

    def remove_route(self, method: str, path: str) -> None:
        """Remove a route; unknown routes are ignored."""
        with self._lock:
            self._routes.pop((method.upper(), path), None)

    def add_upgrade(self, path: str, handler: UpgradeHandler) -> None:
        """Hand GET requests for exactly ``path`` carrying ``Upgrade: websocket`` to ``handler`` (takes the socket)."""
        if not path.startswith("/"):
            raise ValueError(f"upgrade path must start with '/': {path!r}")
        with self._lock:
            self._upgrades[path] = handler

    def add_streaming_route(self, method: str, path: str, handler: StreamingHandler) -> None:
        """Hand ``method`` requests for ``path`` and every path below it to ``handler`` before the body is read."""
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        with self._lock:
            self._streaming[(method.upper(), path.rstrip("/"))] = handler

    def streaming_handler(self, method: str, path: str) -> Optional[StreamingHandler]:
        """The streaming handler of the longest registered prefix of ``path``, or None."""
        with self._lock:
            found = [(len(p), h) for (m, p), h in self._streaming.items()
                     if m == method.upper() and (path == p or path.startswith(p + "/"))]
        return max(found, key=lambda item: item[0])[1] if found else None

    def upgrade_handler(self, request: HttpRequest) -> Optional[UpgradeHandler]:
        """The upgrade handler for ``request``, or None if it is a plain HTTP request."""
        if request.method.upper() != "GET" or (request.header("upgrade") or "").lower() != "websocket":
            return None
        with self._lock:
            return self._upgrades.get(request.path)

    def dispatch(self, request: HttpRequest) -> HttpResponse:
        """Run the handler for ``request``: 404 for unknown paths, 405 for a known path with another method."""
        with self._lock:
            handler = self._routes.get((request.method.upper(), request.path))
            path_known = any(path == request.path for _method, path in self._routes)
        if handler is None:
            if path_known:
                return HttpResponse(405, {"error": f"method {request.method} not allowed on {request.path}"})
            return HttpResponse(404, {"error": f"no such endpoint: {request.path}"})
        try:
            result = handler(request)
        except HttpError as exc:
            return HttpResponse(exc.status, {"error": exc.message})
        except Exception as exc:
            logger.exception("route %s %s failed", request.method, request.path)
            return HttpResponse(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        if isinstance(result, HttpResponse):
            return result
        if isinstance(result, tuple) and len(result) == 2:
            return HttpResponse(int(result[0]), result[1])
        logger.error("route %s %s returned %r; expected HttpResponse or (status, body)", request.method,
                     request.path, result)
        return HttpResponse(500, {"error": "route handler returned an invalid value"})

    # -- listener --------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (kept while the listener is closed, so it can be re-bound)."""
        return self._port

    @property
    def listening(self) -> bool:
        """True while the listening socket is open."""
        return self._server is not None

    def listen(self) -> int:
        """Open the listening socket (on the previous port if there was one) and return the port. Idempotent."""

        def bind() -> int:
            if self._server is None:
                server = _HTTPServer((self._host, self._port), self)
                server.timeout = 0  # handle_request() must never wait: the loop only calls it when readable
                self._server = server
                self._port = int(server.server_address[1])
                self._loop.add_reader(server.socket, lambda _sock: server.handle_request())
                logger.debug("http listening on %s:%d", self._host, self._port)
            return self._port

        return self._loop.call(bind)

    def close_listener(self) -> None:
        """Close the listening socket: new connections are refused; connections in progress finish. Idempotent."""

        def close() -> None:
            server, self._server = self._server, None
            if server is not None:
                self._loop.remove_reader(server.socket)
                server.server_close()
                logger.debug("http listener on port %d closed", self._port)

        self._loop.call(close)

    def close(self, timeout: float = 1.0) -> None:
        """Close the listener, cut every open connection and join the connection threads."""
        self.close_listener()
        with self._lock:
            self._closing = True
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            try:
                # shutdown (not close) wakes a handler blocked in recv without racing it for the descriptor.
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("http connection thread %s did not finish", thread.name)

    # -- connections -----------------------------------------------------------------------------------------------

    def _spawn(self, server: _HTTPServer, sock: socket.socket, address: Any) -> None:
        conn = _Connection(sock)
        thread = threading.Thread(
            target=self._serve, args=(server, conn, address), name=f"fakeacp-http-{address[1]}", daemon=True
        )
        with self._lock:
            if self._closing:
                sock.close()
                return
            self._conns.add(conn)
            self._threads.add(thread)
        thread.start()

    def _serve(self, server: _HTTPServer, conn: _Connection, address: Any) -> None:
        try:
            conn.sock.settimeout(self._io_timeout)
            tls = self.tls_context
            if tls is not None:
                with self._lock:
                    # Wrapped without handshaking, under the lock, so close() always sees the socket that is in use.
                    conn.sock = tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
                    closing = self._closing
                if closing:
                    return
                conn.sock.do_handshake()
            _Handler(conn.sock, address, server)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("http connection from %s ended: %s", address, exc)
        except Exception:
            logger.exception("http connection from %s failed", address)
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
