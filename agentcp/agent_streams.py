"""AgentID's streams (api.md §3.6, messaging.md §4): ``send_stream_message`` and the stream calls it needs.

A mixin of :class:`agentcp.agentcp.AgentID`, over :class:`agentcp.msg.stream_client.StreamClient`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional

from agentcp.base.limits import LimitExceeded, Limits
from agentcp.base.log import log_debug, log_error, log_exception, log_info, set_log_enabled  # noqa: F401
from agentcp.context.exceptions import AuthError, CredentialError, SDKError  # noqa: F401
from agentcp.message import AgentInstructionBlock, AssistantMessageBlock  # noqa: F401
from agentcp.msg.dispatcher import Dispatcher


_log = logging.getLogger("agentcp.agent")


class StreamsMixin:
    """Stream methods of :class:`~agentcp.agentcp.AgentID`."""

    # Provided by AgentID and MessagingMixin (declared for the type checker; no values here).
    id: str
    session_manager: Any
    HANDLER_TIMEOUT: float
    _lock: Any
    _dispatcher: Optional[Dispatcher]
    _publish: Callable[..., None]
    _session_manager: Callable[[], Any]
    _handler_calls: Callable[[dict], list]
    send_message: Callable[..., Any]
    get_content_array_from_message: Callable[[Any], Any]
    limits: Limits
    _msg_counters: Dict[str, int]
    _check_trusted: Callable[[str, str], bool]
    _limit_crossed: Callable[[LimitExceeded], None]

    # --- streams (messaging.md §4) ------------------------------------------------------------------------------
    #: Settings of the stream push sockets (``StreamClientConfig``; None: defaults).
    stream_config: Any = None
    #: ``fetch_stream_message``: connect timeout, longest wait between two lines, overall deadline (seconds).
    STREAM_PULL_TIMEOUTS = (5.0, 30.0, 600.0)

    def _stream_work(self) -> "_StreamWork":
        with self._lock:
            work = self.__dict__.get("_stream_work_state")
            if work is None:
                work = self.__dict__["_stream_work_state"] = _StreamWork()
        return work
    def _stream_client(self, session_id: str, push_url: str):
        sm = self.session_manager
        session = sm.get(session_id) if sm is not None else None
        return session.stream_client_map.get(push_url) if session is not None else None
    async def create_stream(self, session_id, to_aid_list, content_type: str = "text/event-stream",
                            ref_msg_id: str = ""):
        """Allocate a stream and connect its push socket: ``(push_url, pull_url)`` or ``(None, reason)``.

        Waits (without blocking the event loop) up to 5 s for the server's answer and up to 5 s for the socket.
        """
        sm = self._session_manager()
        if sm is None:
            return None, f"{self.id} is not online"
        if self.stream_config is not None:
            sm.stream_config = self.stream_config
        try:
            return await sm.create_stream(session_id, [str(a) for a in (to_aid_list or [])], content_type,
                                          ref_msg_id or "")
        except RuntimeError as exc:  # the session manager was stopped meanwhile (offline)
            return None, str(exc)
    def send_chunk_to_stream(self, session_id, stream_url, chunk, type="text/event-stream"):
        """Queue one text chunk on an open stream: a ``SendResult`` (``queued`` or ``failed``); False if the
        session or stream is unknown."""
        sm = self.session_manager
        if sm is None:
            return False
        return sm.send_chunk_to_stream(session_id, stream_url, chunk, type)
    def send_chunk_to_file_stream(self, session_id, push_url, offset: int, chunk: bytes):
        """Queue one file chunk (waits, bounded, while too much is unconfirmed): a ``SendResult``; a failed one
        was NOT sent. False if the session or stream is unknown."""
        sm = self.session_manager
        if sm is None:
            return False
        return sm.send_chunk_to_file_stream(session_id, push_url, offset, chunk)
    def close_stream(self, session_id, stream_url):
        """Send ``close_stream_req`` after the queued chunks, wait (bounded) for the server to confirm, close the
        socket and join its threads. True if every chunk was confirmed; False otherwise or if unknown."""
        sm = self.session_manager
        if sm is None:
            return False
        return sm.close_stream(session_id, stream_url)
    def check_stream_url_exists(self, push_url):
        """True if a stream pushed at ``push_url`` is open (0.1.99 looked in the wrong map: always False)."""
        sm = self.session_manager
        return bool(sm is not None and sm.check_stream_url_exists(push_url))
    async def send_stream_message(self, session_id: str, to_aid_list: list, response, type="text/event-stream",
                                  file_path: str = "", ref_msg_id: str = ""):
        """Stream ``response`` (or the file ``file_path`` when ``type == "file/binary"``) to ``to_aid_list``.

        Creates a stream, announces its pull URL in a ``session_message`` (block ``{"type": type, "status":
        "loading", "content": pull_url}``, ``"extra"``: file info for files), pushes the chunks, closes the stream.
        ``response``: an OpenAI-style stream, any iterable or async iterable of chunks (objects are sent as their
        JSON, e.g. with ``.choices[0].delta.content``; strings as they are). Never blocks the event loop.

        Returns True when the server confirmed every chunk; False if the announce could not be sent or chunks were
        not confirmed (logged and published); None if the stream could not be created (the receivers then get an
        ``error`` block with the reason); ``(False, "文件不存在")`` for a missing file. An exception raised by
        ``response`` propagates after the stream was closed.
        """
        import functools

        receivers = [str(a) for a in (to_aid_list or [])]
        is_file = type == "file/binary"
        if is_file and (not file_path or not os.path.isfile(file_path)):
            return False, "文件不存在"
        loop = asyncio.get_running_loop()
        push_url, pull_url = await self.create_stream(session_id, receivers, type, ref_msg_id)
        if push_url is None:
            reason = str(pull_url or "stream creation failed")
            _log.warning("%s: cannot create a stream in %s: %s", self.id, session_id, reason)
            block = {"type": "error", "status": "success", "timestamp": int(time.time() * 1000), "content": reason}
            await loop.run_in_executor(None, functools.partial(self.send_message, session_id, receivers, [block],
                                                               ref_msg_id or ""))
            return None
        block = {"type": type, "status": "loading", "timestamp": int(time.time() * 1000), "content": pull_url}
        if is_file:
            block["extra"] = _file_info(file_path)
        # ref_msg_id is carried on the announce too (0.1.99 dropped it), so the stream answers the right message.
        announce = await loop.run_in_executor(None, functools.partial(self.send_message, session_id, receivers,
                                                                      [block], ref_msg_id or ""))
        if not announce:
            await loop.run_in_executor(None, self.close_stream, session_id, push_url)
            return False
        pushed = False
        try:
            if is_file:
                pushed = await loop.run_in_executor(None, self._push_file, session_id, push_url, file_path)
            else:
                pushed = await self._push_text(session_id, push_url, response)
        finally:
            closed = await loop.run_in_executor(None, self.close_stream, session_id, push_url)
        return bool(pushed and closed)
    async def _push_text(self, session_id: str, push_url: str, response) -> bool:
        """Push every chunk of ``response``; False as soon as one is refused (the rest is not consumed)."""
        if response is None:
            return True

        def push(chunk) -> bool:
            if isinstance(chunk, (bytes, bytearray)):
                chunk = bytes(chunk).decode("utf-8", "replace")
            result = self.send_chunk_to_stream(session_id, push_url, chunk)
            if not result:
                _log.warning("%s: stream chunk refused (%s); not consuming the rest of the response", self.id,
                             getattr(result, "error", "unknown stream"))
                return False
            return True

        if isinstance(response, (str, bytes, bytearray)):
            return push(response)
        if hasattr(response, "__aiter__"):
            async for chunk in response:
                if not push(chunk):
                    return False
            return True
        if isinstance(response, (list, tuple)):
            return all(push(chunk) for chunk in response)
        # A blocking iterator (an OpenAI Stream reads the network): each next() runs off the event loop.
        loop = asyncio.get_running_loop()
        iterator = iter(response)
        end = object()
        while True:
            chunk = await loop.run_in_executor(None, next, iterator, end)
            if chunk is end:
                return True
            if not push(chunk):
                return False
    def _push_file(self, session_id: str, push_url: str, file_path: str) -> bool:
        """Worker thread: push the file in 16 KiB chunks, waiting for the window; False if the stream failed."""
        from agentcp.msg.stream_client import FILE_CHUNK_SIZE

        offset = 0
        with open(file_path, "rb") as fh:
            while True:
                data = fh.read(FILE_CHUNK_SIZE)
                if not data:
                    return True
                while True:
                    result = self.send_chunk_to_file_stream(session_id, push_url, offset, data)
                    if result:
                        break
                    client = self._stream_client(session_id, push_url)
                    # No room yet (the server is slow or away): try again while the stream is alive.
                    if client is None or client.failed is not None or not client.ws_is_running:
                        _log.warning("%s: file stream of %s stopped at byte %d: %s", self.id, file_path, offset,
                                     getattr(result, "error", "unknown stream"))
                        return False
                offset += len(data)
    def fetch_stream_message(self, message_data: dict) -> str:
        """Pull the text stream a ``text/event-stream`` announce points to: the concatenated
        ``choices[0].delta.content`` of its chunks (raw text for chunks that are not such JSON).

        Blocks until the stream ends (``event: done``) or its deadline (``STREAM_PULL_TIMEOUTS[2]``, measured on
        the whole call: a server that trickles bytes cannot stretch it). Returns a :class:`StreamText` (a ``str``):
        ``""`` for a message that is not a stream announce; otherwise what arrived, with ``.complete`` False and
        ``.error`` saying why when the stream did not end properly (deadline, error, the agent went offline, a
        line longer than ``limits.stream_chunk_max`` or more text than ``limits.stream_pull_max``). An incomplete
        pull is also logged, published and counted (``status()["messaging"]["stream_pulls_incomplete"]``).
        A pull URL outside the trust domain (trust.md rule 1: a peer chose it) is refused before anything is
        sent, so the agent's token never goes there; counted in ``status()["trust"]["refused"]["stream pull"]``.
        """
        import requests

        from agentcp.base.http import resolve_verify
        from agentcp.msg.stream_client import StreamError, signed_url

        if not isinstance(message_data, dict):
            return StreamText("")
        blocks = self.get_content_array_from_message(message_data)
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        pull_url = first.get("content")
        if first.get("type") != "text/event-stream" or not isinstance(pull_url, str) or not pull_url:
            return StreamText("")
        if not self._check_trusted(pull_url, "stream pull"):   # a peer named it: our token goes only to our network
            return StreamText("", complete=False, error="pull URL outside the trust domain")
        sm = self.session_manager
        client = sm.message_client_map.get(sm.server_url) if sm is not None else None
        auth = client.auth_client if client is not None else None
        url = signed_url(pull_url, self.id, auth.signature if auth is not None else None)
        shown = pull_url.split("?", 1)[0]
        connect, between, overall = self.STREAM_PULL_TIMEOUTS
        deadline = time.monotonic() + overall
        work = self._stream_work()
        pull = _SsePull(self.limits.stream_chunk_max, self.limits.stream_pull_max)
        error = ""
        try:
            with requests.get(url, stream=True, timeout=(connect, min(between, overall)),
                              headers={"Accept": "text/event-stream"},
                              verify=resolve_verify(auth.verify if auth is not None else None)) as resp:
                with work.lock:
                    work.responses.add(resp)
                    closing = work.closing
                if closing:  # offline() began while the request was in flight: it could not abort this one
                    _abort_response(resp)
                # The deadline holds even while a read waits: at the deadline the socket is cut under it.
                watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _abort_response, (resp,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    if resp.status_code != 200:
                        error = f"HTTP {resp.status_code}"
                    else:
                        error = self._read_pull(resp, pull, work, deadline, overall)
                finally:
                    watchdog.cancel()
                    watchdog.join()
                    with work.lock:
                        work.responses.discard(resp)
        except (requests.RequestException, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                error = f"no end within {overall:g} s"
        if pull.done:
            return StreamText(pull.text())
        if pull.crossed is not None:
            self._limit_crossed(pull.crossed)
            error = str(pull.crossed)
        from agentcp.msg.message_client import redact

        text = redact(f"{self.id}: pulling the stream {shown} stopped after {len(pull.parts)} chunk(s), "
                      f"returning what arrived, marked incomplete: {error}",
                      auth.signature if auth is not None else None)
        with self._lock:
            self._msg_counters["stream_pulls_incomplete"] = self._msg_counters.get("stream_pulls_incomplete", 0) + 1
        _log.warning("%s", text)
        err = StreamError(text)
        err.agent_id = self.id
        self._publish(err)
        return StreamText(pull.text(), complete=False, error=error)
    @staticmethod
    def _read_pull(resp, pull: "_SsePull", work: "_StreamWork", deadline: float, overall: float) -> str:
        """Feed what the server sends to ``pull`` until it is done; the reason it stopped otherwise."""
        raw = resp.raw
        read = getattr(raw, "read1", None) or raw.read  # read1: what has arrived, without waiting for more
        while True:
            if work.closing:
                return "agent went offline"
            if time.monotonic() >= deadline:
                return f"no end within {overall:g} s"
            try:
                data = read(65536, decode_content=True)  # as iter_lines did: a gzip'd reply is unpacked
            except Exception as exc:  # urllib3 wraps a socket cut at the deadline in several exception types
                if time.monotonic() >= deadline:
                    return f"no end within {overall:g} s"
                if work.closing:
                    return "agent went offline"
                return f"{type(exc).__name__}: {exc}"
            if not data:
                if time.monotonic() >= deadline:
                    return f"no end within {overall:g} s"
                return "agent went offline" if work.closing else "the stream ended without 'event: done'"
            if pull.feed(data):
                return ""
            if pull.crossed is not None:
                return str(pull.crossed)
    def _on_stream_announce(self, data: dict, block: dict) -> None:
        """Dispatcher worker: a stream announce runs its handlers off the dispatcher (they block while pulling the
        stream), each on a private event loop, in a bounded pool: at most ``limits.announce_workers`` threads, and
        at most ``limits.announce_queue_max`` announces waiting; beyond that an announce is dropped, counted and
        reported (0.1.99 started one thread per announce, without bound). Threads are joined by ``offline()``."""
        if not block.get("content"):
            _log.warning("%s: stream announce %s without a pull URL dropped", self.id, data.get("message_id"))
            return
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.stopped:
            return
        calls = self._handler_calls(data)
        if not calls:
            return
        work = self._stream_work()
        limits = self.limits
        job = (dispatcher, calls, self.HANDLER_TIMEOUT)
        with work.lock:
            work.ended = {t for t in work.ended if t.is_alive()}
            accepted = not work.closing and len(work.queue) < limits.announce_queue_max
            thread = None
            if accepted:
                work.queue.append(job)
                if len(work.threads) < limits.announce_workers:
                    thread = threading.Thread(target=work.serve, name=f"agentcp-stream-handler-{self.id}",
                                              daemon=True)
                    work.threads.add(thread)
        if thread is not None:
            thread.start()
        if not accepted:
            with self._lock:
                self._msg_counters["announces_dropped"] = self._msg_counters.get("announces_dropped", 0) + 1
            self._limit_crossed(LimitExceeded(
                "announce_queue_max", limits.announce_queue_max, f"stream announce {data.get('message_id')} from "
                f"{data.get('sender')}", got=f"{limits.announce_workers} handlers busy and the queue full; dropped"))
    def _stop_stream_work(self, timeout: float) -> None:
        """``offline()``: abort stream pulls in progress and join the stream handler threads (bounded)."""
        work = self.__dict__.get("_stream_work_state")
        if work is None:
            return
        with work.lock:
            work.closing = True
            work.queue.clear()  # announces not started: their handlers are not run (the agent goes offline)
            responses = list(work.responses)
            threads = list(work.threads | work.ended)
            work.ended.clear()
        for resp in responses:
            _abort_response(resp)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    _log.warning("%s: a stream handler is still running after %.0f s", self.id, timeout)
        with work.lock:
            work.closing = False


class StreamText(str):
    """What ``fetch_stream_message`` pulled: a ``str`` (0.1.99 compatible) that also says whether the stream
    ended properly (``complete``) and, if not, why (``error``)."""

    complete: bool
    error: str

    def __new__(cls, text: str = "", complete: bool = True, error: str = "") -> "StreamText":
        obj = super().__new__(cls, text)
        obj.complete = complete
        obj.error = error
        return obj


class _SsePull:
    """Bytes of a text pull -> SSE lines -> chunk texts, bounded per line and in total (pure, no I/O)."""

    def __init__(self, line_max: int, total_max: int) -> None:
        self.line_max = line_max
        self.total_max = total_max
        self.parts: List[str] = []
        self.total = 0
        self.done = False
        self.crossed: Any = None  # the LimitExceeded that stopped it
        self._line = bytearray()

    def feed(self, data: bytes) -> bool:
        """Take the next bytes; True once ``event: done`` arrived. Stops (``crossed``) at a bound."""
        from agentcp.base.limits import LimitExceeded

        start = 0
        while not self.done and self.crossed is None:
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if len(self._line) + len(piece) > self.line_max:
                self.crossed = LimitExceeded("stream_chunk_max", self.line_max, "stream pull",
                                             got=f"a line of more than {len(self._line) + len(piece)} bytes")
                self._line = bytearray()
                break
            self._line += piece
            if end < 0:
                break
            line, self._line = bytes(self._line), bytearray()
            before = len(self.parts)
            self.done = _sse_line(line.decode("utf-8", "replace"), self.parts)
            self.total += sum(len(p) for p in self.parts[before:])
            if self.total > self.total_max:
                self.crossed = LimitExceeded("stream_pull_max", self.total_max, "stream pull",
                                             got=f"{self.total} characters")
            start = end + 1
        return self.done

    def text(self) -> str:
        return "".join(self.parts)


class _StreamWork:
    """Stream handler threads and pulls in progress of one agent (so ``offline()`` can end and join them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: set = set()
        self.responses: set = set()
        self.closing = False
        #: Announces waiting for a pool thread: ``(dispatcher, calls, timeout)``.
        self.queue: deque = deque()
        #: Pool threads that left (no work) and were not joined yet.
        self.ended: set = set()

    def serve(self) -> None:
        """A pool thread: run queued announces until none is left, then end."""
        me = threading.current_thread()
        while True:
            with self.lock:
                if not self.queue:
                    self.threads.discard(me)  # no longer counts against the pool bound...
                    self.ended.add(me)  # ...but is still joined by offline()
                    return
                dispatcher, calls, timeout = self.queue.popleft()
            if not dispatcher.stopped:
                _run_stream_handlers(dispatcher, calls, timeout)
def _sse_line(line: str, parts: List[str]) -> bool:
    """Apply one line of a text pull (messaging.md §4.4) to ``parts``; True at ``event: done``."""
    line = line.rstrip("\r")
    if not line or line.startswith(":"):
        return False
    if line.startswith("event:"):
        return line[len("event:"):].strip() == "done"
    value = line[len("data:"):] if line.startswith("data:") else line
    if value.startswith(" "):
        value = value[1:]
    import urllib.parse

    text = urllib.parse.unquote_plus(value)
    try:
        obj = json.loads(text)
    except ValueError:
        parts.append(text)
        return False
    if isinstance(obj, dict):
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            first = choices[0] if isinstance(choices[0], dict) else {}
            delta = first.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            content = delta.get("content")
            if isinstance(content, str):
                parts.append(content)
        return False
    parts.append(text)  # JSON but not an object: kept as written, quotes included (0.1.99)
    return False
def _run_stream_handlers(dispatcher: Dispatcher, calls: list, timeout: float) -> None:
    """Run the handlers of a stream announce on this thread: sync ones directly, coroutines together on a
    private event loop (bounded by ``timeout``); errors are reported like any handler error."""
    coros = []
    for handler, args in calls:
        try:
            result = handler(*args)
        except Exception as exc:  # a handler's bug is reported, never retried
            dispatcher._report(handler, exc)
            continue
        if asyncio.iscoroutine(result) or hasattr(result, "__await__"):
            coros.append((handler, result))
    if not coros:
        return
    loop = asyncio.new_event_loop()
    try:
        async def together():
            return await asyncio.gather(*(c for _h, c in coros), return_exceptions=True)

        try:
            results = loop.run_until_complete(asyncio.wait_for(together(), timeout))
        except asyncio.TimeoutError:
            _log.warning("stream handler still running after %.0f s; cancelled", timeout)
            return
        for (handler, _coro), result in zip(coros, results):
            if isinstance(result, Exception):
                dispatcher._report(handler, result)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
def _abort_response(resp) -> None:
    """Wake a thread blocked reading ``resp`` (shutdown of its socket; closing alone would not wake it)."""
    import socket as _socket

    raw = getattr(resp, "raw", None)
    for path in (("_connection", "sock"), ("_fp", "fp", "raw", "_sock")):
        obj = raw
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "shutdown"):
            try:
                obj.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
            return
def _file_info(path: str) -> Dict[str, Any]:
    """``{"file_name", "file_size", "file_type", "exists", "error"}`` of ``path`` (never raises)."""
    kinds = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".gif": "gif", ".pdf": "pdf", ".zip": "zip",
             ".txt": "txt"}
    info: Dict[str, Any] = {"file_name": os.path.basename(path), "file_size": 0, "file_type": "unknown",
                            "exists": False, "error": ""}
    try:
        info["file_size"] = os.path.getsize(path)
        info["exists"] = True
        ext = os.path.splitext(path)[1].lower()
        info["file_type"] = kinds.get(ext, "binary" if ext else "unknown")
    except OSError as exc:
        info["error"] = str(exc)
    return info
