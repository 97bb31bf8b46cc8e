"""The local LLM gateway: an OpenAI-compatible HTTP endpoint on 127.0.0.1 in front of ACP agents.

``POST /<target_aid>/chat/completions`` with ``Authorization: Bearer <key>`` becomes an ACP message from the
identity that owns the key to ``target_aid`` (:class:`agentcp.llm_agent_utils.LLMAgent`); the agent's answer, a
message or a text stream, comes back as an OpenAI ``chat.completion`` or as ``chat.completion.chunk`` server-sent
events, whichever the client asked for. ``GET /<target_aid>/models`` lists the agent as the one model.

Why the standard library's ``http.server``: the gateway serves one local user over loopback, a handful of requests
at a time, each of which waits seconds for an agent; a thread per connection is the simple, dependency-free fit,
and every bound is ours to set: connections (a semaphore; over it: 503), request bodies (1 MiB: 413), socket
timeouts, a per-request deadline, stream sizes. Keys are compared in constant time and never logged.

The pieces: pure OpenAI mapping functions (:func:`as_completion`, :func:`as_chunk`, :class:`ChunkCollector`),
:class:`Keyring` (keys ↔ AIDs), :class:`GatewayConfig` and :class:`LLMGateway` (the server, its threads, the
requests in flight). ``agentcp.llm_server`` holds the process-wide gateway behind 0.1.99's function names.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import re
import secrets
import selectors
import socket
import socketserver
import threading
import time
import urllib.parse
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from agentcp.llm_agent_utils import GatewayError, LLMAgent

_log = logging.getLogger("agentcp.llm")

__all__ = ["GatewayConfig", "Keyring", "LLMGateway", "ChunkCollector", "as_completion", "as_chunk",
           "chat_completion", "valid_aid"]

_AID = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){2,}$")


def valid_aid(text: Any) -> bool:
    """True for a syntactically valid AID (3 or more labels, at most 253 characters)."""
    return isinstance(text, str) and len(text) <= 253 and bool(_AID.match(text))


# --- OpenAI format (pure) ---------------------------------------------------------------------------------------
def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _as_object(content: Any) -> Optional[dict]:
    if isinstance(content, dict):
        return content
    if isinstance(content, str) and content.lstrip().startswith("{"):
        try:
            value = json.loads(content)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None


def _as_text(content: Any) -> str:
    """The text of an answer that is not OpenAI JSON: a ``{"text": ...}`` object's text, a string as it is,
    anything else as JSON."""
    obj = _as_object(content)
    if obj is not None and isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False)


def as_completion(content: Any, model: str, created: Optional[int] = None) -> Dict[str, Any]:
    """A ``chat.completion`` for an agent's answer: its own OpenAI JSON (``choices``) kept as it is, with the
    missing envelope fields filled in; any other answer becomes the assistant message's text."""
    created = int(time.time()) if created is None else created
    obj = _as_object(content)
    if obj is not None and isinstance(obj.get("choices"), list):
        out = dict(obj)
        out.setdefault("id", _new_id())
        out["object"] = "chat.completion"
        out.setdefault("created", created)
        out.setdefault("model", model)
        return out
    return {"id": _new_id(), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _as_text(content)},
                         "logprobs": None, "finish_reason": "stop"}]}


def as_chunk(value: Any, model: str, chunk_id: str, created: int, first: bool = False) -> Dict[str, Any]:
    """A ``chat.completion.chunk`` for one pulled stream value: an OpenAI chunk kept as it is (envelope filled
    in), any other value as a text delta (with the assistant role on the ``first`` chunk)."""
    obj = value if isinstance(value, dict) else None
    if obj is not None and isinstance(obj.get("choices"), list):
        out = dict(obj)
        out.setdefault("id", chunk_id)
        out["object"] = "chat.completion.chunk"
        out.setdefault("created", created)
        out.setdefault("model", model)
        return out
    delta: Dict[str, Any] = {"role": "assistant"} if first else {}
    delta["content"] = _as_text(value)
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def finish_chunk(model: str, chunk_id: str, created: int, reason: str = "stop") -> Dict[str, Any]:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}


def chunk_finished(chunk: Dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


class ChunkCollector:
    """Folds chunks into one ``chat.completion`` (text of the first choice, its finish reason, usage)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.parts: List[str] = []
        self.reasoning: List[str] = []
        self.finish_reason: Optional[str] = None
        self.usage: Any = None
        self.first = True

    def add(self, value: Any) -> None:
        chunk = as_chunk(value, self.model, "", 0, self.first)
        self.first = False
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            if isinstance(delta.get("content"), str):
                self.parts.append(delta["content"])
            if isinstance(delta.get("reasoning_content"), str):
                self.reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def completion(self) -> Dict[str, Any]:
        out = as_completion("".join(self.parts), self.model)
        choice = out["choices"][0]
        choice["finish_reason"] = self.finish_reason or "stop"
        if self.reasoning:
            choice["message"]["reasoning_content"] = "".join(self.reasoning)
        if self.usage is not None:
            out["usage"] = self.usage
        return out


def sse(obj: Any) -> str:
    """One server-sent event line pair for ``obj`` (``[DONE]`` as it is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


# --- keys -------------------------------------------------------------------------------------------------------
class Keyring:
    """Bearer keys ↔ AIDs. An AID may hold several keys (the newest is its ``key_for``); a key belongs to one
    AID. Lookups hash the presented key first and compare with ``hmac.compare_digest``. Thread-safe."""

    MIN_KEY, MAX_KEY = 16, 512

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_aid: Dict[str, str] = {}
        self._by_digest: Dict[bytes, Tuple[str, str]] = {}

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    @classmethod
    def acceptable(cls, key: Any) -> bool:
        """A key we accept: a str of 16-512 printable, non-space ASCII characters."""
        return (isinstance(key, str) and cls.MIN_KEY <= len(key) <= cls.MAX_KEY
                and all(33 <= ord(c) < 127 for c in key))

    def key_for(self, aid_str: str, create: bool = True) -> Optional[str]:
        """The key of ``aid_str``; a new random one (64 hex characters) if it has none and ``create``."""
        with self._lock:
            key = self._by_aid.get(aid_str)
            if key is None and create:
                key = secrets.token_hex(32)
                self._by_aid[aid_str] = key
                self._by_digest[self._digest(key)] = (key, aid_str)
            return key

    def add(self, aid_str: str, key: str) -> bool:
        """Give ``aid_str`` the key ``key`` (its keys so far stay valid); False if the key is unacceptable or
        belongs to another AID."""
        if not self.acceptable(key):
            return False
        digest = self._digest(key)
        with self._lock:
            owner = self._by_digest.get(digest)
            if owner is not None and owner[1] != aid_str:
                return False
            self._by_digest[digest] = (key, aid_str)
            self._by_aid[aid_str] = key
            return True

    def owner(self, presented: Any) -> Optional[str]:
        """The AID the presented key belongs to, or None."""
        if not isinstance(presented, str) or not presented or len(presented) > self.MAX_KEY:
            return None
        with self._lock:
            entry = self._by_digest.get(self._digest(presented))
        if entry is None or not hmac.compare_digest(entry[0].encode(), presented.encode("utf-8", "replace")):
            return None
        return entry[1]

    def maps(self) -> Tuple[Dict[str, str], Dict[str, str]]:
        """Copies of 0.1.99's two maps: AID → key (newest) and key → AID."""
        with self._lock:
            return dict(self._by_aid), {key: aid for key, aid in self._by_digest.values()}


def authenticate(keyring: Keyring, resolve: Callable[[str], Any], key: Optional[str]) -> Any:
    """The ``AgentID`` that owns ``key``. ``GatewayError`` 401 for a wrong key, 503 if that identity is not
    loaded in this process."""
    aid_str = keyring.owner(key)
    if aid_str is None:
        raise GatewayError(401, "Unauthorized: missing or wrong API key (use the key of get_llm_api_key())",
                           "invalid_api_key")
    owner = resolve(aid_str)
    if owner is None:
        raise GatewayError(503, f"the agent {aid_str} that owns this key is not loaded in this process",
                           "agent_offline")
    return owner


# --- the request (no HTTP) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatewayConfig:
    """Bounds of the gateway. Times in seconds."""

    #: Wait for the target agent's first answer (0.1.99: 60 s).
    reply_timeout: float = 60.0
    #: Whole request, including a streamed answer.
    request_deadline: float = 600.0
    #: Stream pull: connect timeout and longest silence between two stream lines.
    pull_connect_timeout: float = 5.0
    pull_idle_timeout: float = 30.0
    #: Socket reads and writes on client connections (also how long an idle keep-alive connection stays).
    socket_timeout: float = 30.0
    #: Largest request body accepted (bytes).
    max_body: int = 1 << 20
    #: Most client connections served at once (more are answered 503 at once).
    max_connections: int = 32
    #: ``shutdown()`` waits this long for requests in flight to end.
    join_timeout: float = 10.0


Answer = Union[Dict[str, Any], Iterator[str]]


def chat_completion(agent: LLMAgent, body: Any, config: GatewayConfig,
                    deadline: Optional[float] = None) -> Answer:
    """Run one chat request through ``agent``: a ``chat.completion`` dict, or (``"stream": true``) an iterator of
    SSE strings that ends with ``data: [DONE]``. Raises ``GatewayError`` for anything that stops it before the
    first byte; a failure during a stream becomes an ``error`` event. The iterator closes ``agent`` when it ends
    (or is closed); otherwise ``agent`` is closed before this returns."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    if not isinstance(body.get("messages"), list):
        raise GatewayError(400, "'messages' must be a list", "invalid_messages")
    deadline = time.monotonic() + config.request_deadline if deadline is None else deadline
    requested = body.get("model")
    model = requested if isinstance(requested, str) and requested else str(agent.llm_agent)
    agent.PULL_TIMEOUTS = (config.pull_connect_timeout, config.pull_idle_timeout)
    streamed = False
    try:
        agent.send(body)
        kind, content = agent.wait_reply(min(config.reply_timeout, max(0.0, deadline - time.monotonic())))
        if body.get("stream") is True:
            if kind == "message":
                values: Iterator[Any] = iter([_message_text(content, model)])
            else:
                values = agent.iter_stream(content, deadline)
            # The first chunk is pulled before the 200 goes out: a stream that cannot be read is an HTTP error.
            first = next(values, _END)
            streamed = True
            return _events(agent, first, values, model)
        if kind == "message":
            return as_completion(content, model)
        collector = ChunkCollector(model)
        for value in agent.iter_stream(content, deadline):
            collector.add(value)
        return collector.completion()
    finally:
        if not streamed:
            agent.close()


_END = object()


def _message_text(content: Any, model: str) -> str:
    """The assistant text of a message answer (the same text ``as_completion`` gives)."""
    message = as_completion(content, model)["choices"][0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else ""


def _events(agent: LLMAgent, first: Any, values: Iterator[Any], model: str) -> Iterator[str]:
    chunk_id, created = _new_id(), int(time.time())
    try:
        finished = False
        value, is_first = first, True
        try:
            while value is not _END:
                chunk = as_chunk(value, model, chunk_id, created, is_first)
                is_first = False
                finished = finished or chunk_finished(chunk)
                yield sse(chunk)
                value = next(values, _END)
        except GatewayError as exc:  # the 200 went out already: the failure becomes an error event
            _log.warning("%s -> %s: stream failed: %s", agent.aid.id, agent.llm_agent, exc.message)
            yield sse(exc.body())
            return
        if not finished:
            yield sse(finish_chunk(model, chunk_id, created))
        yield sse("[DONE]")
    finally:
        close = getattr(values, "close", None)
        if close is not None:
            close()  # the pull's connection closes now, not when the generator is collected
        agent.close()


# --- HTTP -------------------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "agentcp-llm-gateway"
    sys_version = ""
    server: "_Server"
    responded = False  # this request's status line was sent (a failure after it cannot become a 500)

    def setup(self) -> None:
        # Per connection (typeshed declares it a class variable; StreamRequestHandler reads it from the instance).
        self.timeout = self.server.gateway.config.socket_timeout  # type: ignore[misc]
        super().setup()
        try:  # each event must leave at once (no Nagle delay between small writes)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        _log.debug("gateway %s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors the base class raises (malformed request line, headers too long): as OpenAI JSON."""
        self.close_connection = True
        try:
            self.server.gateway.write_json(self, code, GatewayError(code, message or explain or "bad request").body())
        except OSError:
            pass

    def _dispatch(self) -> None:
        self.server.gateway.handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch


class _Server(http.server.HTTPServer):
    """One thread per connection, at most ``max_connections`` at a time, all tracked for ``shutdown``."""

    allow_reuse_address = True

    def __init__(self, gateway: "LLMGateway", port: int) -> None:
        self.gateway = gateway
        self._slots = threading.BoundedSemaphore(gateway.config.max_connections)
        self._conn_lock = threading.Lock()
        self._conns: Dict[socket.socket, threading.Thread] = {}
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn(): it may wait for DNS
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.gateway.count("rejected_busy")
            _reject_busy(request)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve, args=(request, client_address), daemon=True,
                                  name="agentcp-llm-request")
        with self._conn_lock:
            self._conns[request] = thread
        thread.start()

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except (OSError, ValueError) as exc:  # the client went away mid-request
            _log.debug("gateway connection from %s ended: %s", client_address, exc)
        except Exception:  # a bug of ours: reported, the connection closed, the server goes on
            self.gateway.count("errors")
            _log.exception("gateway: request from %s failed", client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._conns.pop(request, None)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.gateway.count("errors")
        _log.exception("gateway: error on a connection from %s", client_address)

    def close_connections(self, how: int) -> List[threading.Thread]:
        """Shut down the client sockets (``how``: ``socket.SHUT_RD`` wakes idle readers; writes still work)."""
        with self._conn_lock:
            items = list(self._conns.items())
        for sock, _thread in items:
            try:
                sock.shutdown(how)
            except OSError:
                pass
        return [thread for _sock, thread in items]


def _reject_busy(request: socket.socket) -> None:
    body = json.dumps(GatewayError(503, "the gateway is busy: too many connections").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        request.settimeout(0.5)
        request.sendall(head + body)
    except OSError:
        pass


class LLMGateway:
    """The HTTP server on ``127.0.0.1:port`` (0: a free port), run by one thread; ``shutdown`` ends everything.

    ``keyring`` says which AID a key belongs to; ``resolve(aid_str)`` gives that AID's ``AgentID`` (or None).
    """

    def __init__(self, keyring: Keyring, resolve: Callable[[str], Any], port: int = 0,
                 config: Optional[GatewayConfig] = None) -> None:
        self.keyring = keyring
        self.resolve = resolve
        self.config = config or GatewayConfig()
        self._lock = threading.Lock()
        self._inflight: "weakref.WeakSet[LLMAgent]" = weakref.WeakSet()
        self._closing = False
        self.counters: Dict[str, int] = {"requests": 0, "completions": 0, "streams": 0, "unauthorized": 0,
                                         "rejected_busy": 0, "errors": 0}
        self._server = _Server(self, port)  # binds now: a port in use raises OSError here
        self.port: int = self._server.server_port
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, name="agentcp-llm-gateway", daemon=True)
        self._thread.start()
        _log.info("LLM gateway listening on http://127.0.0.1:%d", self.port)

    def _accept_loop(self) -> None:
        """Accept connections until ``shutdown`` writes to the wake-up socket (no polling interval)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                for key, _events in selector.select():
                    if key.fileobj is self._server.socket and not self._closing:
                        # accept, then process_request (a thread); socketserver's own step, not in typeshed
                        self._server._handle_request_noblock()  # type: ignore[attr-defined]

    # -- state --
    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def base_url(self, target_aid: str) -> str:
        return f"http://127.0.0.1:{self.port}/{target_aid}"

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    def status(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self.counters, port=self.port, running=self.running, in_flight=len(self._inflight))

    # -- lifecycle --
    def cancel_agent(self, aid: Any, reason: str) -> int:
        """Cancel the requests in flight sent by the identity ``aid`` (its ``offline()``); how many."""
        with self._lock:
            mine = [a for a in self._inflight if a.aid is aid]
        for agent in mine:
            agent.cancel(reason)
        return len(mine)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, cancel the requests in flight (they answer 503), join every thread; idempotent."""
        timeout = self.config.join_timeout if timeout is None else timeout
        with self._lock:
            self._closing = True
            inflight = list(self._inflight)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already woken (a second shutdown)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)  # the accept loop ends at once: no new connections from here on
        for agent in inflight:
            agent.cancel("the LLM gateway is shutting down")
        deadline = time.monotonic() + timeout
        threads = self._server.close_connections(socket.SHUT_RD)  # idle keep-alive readers see EOF
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self._server.close_connections(socket.SHUT_RDWR) if t.is_alive()]
        for thread in stuck:  # a client that stopped reading: its write fails now
            if thread is not threading.current_thread():
                thread.join(1.0)
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()
        if any(t.is_alive() for t in stuck):
            _log.warning("LLM gateway: a request thread was still running after shutdown")
        _log.info("LLM gateway on port %d stopped", self.port)

    # -- requests --
    def handle(self, h: _Handler) -> None:
        """One HTTP request: route, authenticate, run, answer (errors as OpenAI JSON)."""
        self.count("requests")
        h.responded = False
        try:
            self._handle(h)
        except GatewayError as exc:
            self.count("unauthorized" if exc.status == 401 else f"status_{exc.status}")
            self.write_json(h, exc.status, exc.body(), close=exc.status in (401, 404, 405, 411, 413))
        except OSError:
            raise  # the client went away (the connection thread ends it)
        except Exception as exc:  # a bug of ours: reported and answered 500 (if nothing was sent yet)
            self.count("errors")
            _log.exception("LLM gateway: %s %s failed", h.command, urllib.parse.urlsplit(h.path).path[:200])
            if not getattr(h, "responded", False):
                self.write_json(h, 500, GatewayError(500, f"internal error: {type(exc).__name__}").body(),
                                close=True)
            h.close_connection = True

    def _handle(self, h: _Handler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        parts = [p for p in path.split("/") if p]
        if len(parts) == 3 and parts[1:] == ["chat", "completions"]:
            route = "chat"
        elif len(parts) == 2 and parts[1] == "models":
            route = "models"
        else:
            raise GatewayError(404, f"no such endpoint: {h.command} {path[:200]}", "unknown_url")
        if (route, h.command) not in (("chat", "POST"), ("models", "GET")):
            raise GatewayError(405, f"{h.command} is not allowed on {path[:200]}")
        owner = self._authenticate(h)
        target = parts[0]
        if not valid_aid(target):
            raise GatewayError(404, f"{target[:100]!r} is not an agent id", "model_not_found")
        if route == "models":
            self.write_json(h, 200, {"object": "list", "data": [
                {"id": target, "object": "model", "created": 0, "owned_by": target}]})
            return
        body = self._read_body(h)
        if self._closing:
            raise GatewayError(503, "the LLM gateway is shutting down")
        agent = LLMAgent(target, owner)
        with self._lock:
            self._inflight.add(agent)
        try:
            answer = chat_completion(agent, body, self.config)
            if isinstance(answer, dict):
                self.count("completions")
                self.write_json(h, 200, answer)
            else:
                self.count("streams")
                self._write_events(h, answer)
        finally:
            with self._lock:
                self._inflight.discard(agent)

    def _authenticate(self, h: _Handler) -> Any:
        scheme, _, key = h.headers.get("Authorization", "").partition(" ")
        return authenticate(self.keyring, self.resolve, key.strip() if scheme.lower() == "bearer" else None)

    def _read_body(self, h: _Handler) -> Any:
        if h.headers.get("Transfer-Encoding"):
            raise GatewayError(411, "chunked request bodies are not accepted: send Content-Length")
        raw_length = h.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            raise GatewayError(411, "Content-Length is required")
        length = int(raw_length)
        if length > self.config.max_body:
            raise GatewayError(413, f"request body of {length} bytes exceeds {self.config.max_body} bytes")
        data = h.rfile.read(length)
        if len(data) != length:
            raise GatewayError(400, "the request body ended early")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise GatewayError(400, "the request body is not JSON", "invalid_json") from None

    # -- writing --
    def write_json(self, h: _Handler, status: int, obj: Any, close: bool = False) -> None:
        payload = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        h.responded = True
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        if close:
            h.close_connection = True
            h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
        h.wfile.flush()

    def _write_events(self, h: _Handler, events: Iterator[str]) -> None:
        h.responded = True
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for event in events:
                data = event.encode("utf-8")
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError as exc:  # the client went away: stop pulling (closing the iterator closes the agent)
            h.close_connection = True
            _log.debug("gateway: client left during a stream: %s", exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
