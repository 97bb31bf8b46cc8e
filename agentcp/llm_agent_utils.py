"""One chat request to an agent over ACP (api.md §12): :class:`LLMAgent` and 0.1.99's helpers.

:class:`LLMAgent` is the agent side of the local LLM gateway (``agentcp.llm_server``): it opens a session from the
calling identity to the target agent, sends the OpenAI request body as an ``llm`` block (plus a ``content`` block
with the last user text, so agents that only read text answer too), waits for the first answer of the target in
that session, and pulls a text stream when the answer is a stream announce. Every wait has a deadline; a request
can be cancelled from another thread (``offline()``, gateway shutdown), which also aborts a pull in progress.

Same names and parameters as agentcp 0.1.99's ``agentcp.llm_agent_utils``; no Flask: ``read_stream`` yields the
server-sent-event lines instead of building a Flask ``Response``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.parse
import uuid
from datetime import datetime
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

_log = logging.getLogger("agentcp.llm")

__all__ = ["AttrDict", "GatewayError", "LLMAgent", "fail_response", "format_date", "get_message_type",
           "get_vaild_json", "parse_stream_url", "parse_sse_line", "last_user_text"]


# --- 0.1.99 helpers ---------------------------------------------------------------------------------------------
class AttrDict(dict):
    """A dict whose keys are also attributes, recursively (a missing key raises ``AttributeError``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in list(self.items()):
            dict.__setitem__(self, key, _attr_wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = _attr_wrap(value)

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def model_dump(self, exclude_none: bool = True, **kwargs: Any) -> dict:
        """A plain dict copy (as pydantic's ``model_dump``); ``exclude_none`` drops keys whose value is None."""
        return _plain(self, exclude_none)


def _attr_wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, AttrDict):
        return AttrDict(value)
    if isinstance(value, list):
        return [_attr_wrap(v) for v in value]
    return value


def _plain(value: Any, exclude_none: bool) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v, exclude_none) for k, v in value.items() if not (exclude_none and v is None)}
    if isinstance(value, list):
        return [_plain(v, exclude_none) for v in value]
    return value


def format_date() -> str:
    """The local time as ``YYYY-mm-dd HH:MM:SS.mmm``."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def get_message_type(messages: list) -> Optional[str]:
    """The ``type`` of the first block of ``messages``, or None."""
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0].get("type")
    return None


def parse_stream_url(url0: str) -> tuple:
    """``(url without query, {name: value})`` of a stream URL (the last value wins for repeated names)."""
    parts = urllib.parse.urlsplit(url0 or "")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return base, dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))


def get_vaild_json(text: Any) -> Any:
    """``text`` parsed as JSON, or None if it is not JSON (dicts and lists are returned as they are)."""
    if isinstance(text, (dict, list)):
        return text
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def fail_response(content: Any) -> AttrDict:
    """``{"status": "error", "code": 400, "message": content}`` as an :class:`AttrDict`."""
    return AttrDict({"status": "error", "code": 400, "message": content})


# --- errors -----------------------------------------------------------------------------------------------------
class GatewayError(Exception):
    """A request that cannot be answered: ``status`` is the HTTP status, ``code`` OpenAI's error code."""

    def __init__(self, status: int, message: str, code: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _DEFAULT_CODES.get(status, "error")
        self.kind = kind or ("invalid_request_error" if 400 <= status < 500 else "api_error")

    def body(self) -> Dict[str, Any]:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


_DEFAULT_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                  411: "length_required", 413: "request_too_large", 429: "rate_limit_exceeded",
                  500: "internal_error", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}


# --- pure parsing -----------------------------------------------------------------------------------------------
def parse_sse_line(line: str) -> Tuple[str, Any]:
    """One line of a text-stream pull (messaging.md §4.4): ``("done", None)`` at ``event: done``, ``("skip",
    None)`` for blank, comment and other event lines, else ``("value", v)`` where ``v`` is the form-decoded JSON
    value, or the decoded text when it is not JSON."""
    line = line.rstrip("\r")
    if not line or line.startswith(":"):
        return "skip", None
    if line.startswith("event:"):
        return ("done", None) if line[len("event:"):].strip() == "done" else ("skip", None)
    value = line[len("data:"):] if line.startswith("data:") else line
    if value.startswith(" "):
        value = value[1:]
    text = urllib.parse.unquote_plus(value)
    try:
        return "value", json.loads(text)
    except ValueError:
        return "value", text


def last_user_text(body: Dict[str, Any]) -> str:
    """The text of the last ``user`` message of a chat request (text parts joined), or ``""``."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content
                           if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        return ""
    return ""


def bounded_lines(chunks: Iterable[bytes], max_line: int) -> Iterator[str]:
    """Split a byte stream into text lines; a line longer than ``max_line`` bytes raises ``GatewayError``."""
    buf = bytearray()
    for chunk in chunks:
        if not chunk:
            continue
        start = len(buf)
        buf.extend(chunk)
        cut = buf.find(b"\n", start)
        while cut >= 0:
            yield bytes(buf[:cut]).decode("utf-8", "replace")
            del buf[:cut + 1]
            cut = buf.find(b"\n")
        if len(buf) > max_line:
            raise GatewayError(502, f"a stream line is longer than {max_line} bytes", "stream_too_large")
    if buf:
        yield bytes(buf).decode("utf-8", "replace")


def _arriving(resp) -> Iterator[bytes]:
    """The body of a streamed ``requests`` response in pieces as they arrive (``iter_content(n)`` waits for n
    bytes of a close-delimited body, which would hold back the chunks of a live stream)."""
    raw = resp.raw
    read1: Optional[Callable[[int], bytes]]
    if hasattr(raw, "read1"):  # urllib3 2
        def decoded_read1(n: int) -> bytes:
            return raw.read1(n, decode_content=True)
        read1 = decoded_read1
    else:
        read1 = getattr(getattr(raw, "_fp", None), "read1", None)  # urllib3 1: http.client's response
    if read1 is None:  # an unusual transport: correct, only not as prompt
        yield from resp.iter_content(512)
        return
    while True:
        data = read1(8192)
        if not data:
            return
        yield data


# --- one request ------------------------------------------------------------------------------------------------
class LLMAgent:
    """One chat request from the identity ``aid`` (an ``AgentID``) to the agent ``llm_agent`` (an AID string).

    Blocking steps (:meth:`send`, :meth:`wait_reply`, :meth:`iter_stream`) run on the caller's thread, each with
    a deadline; :meth:`cancel` (any thread) makes them raise ``GatewayError(503)`` at once; :meth:`close` leaves
    the session. ``chat_create`` is 0.1.99's one-call form.
    """

    #: Seconds to wait for the target's first answer (0.1.99: 60 s).
    REPLY_TIMEOUT: float = 60.0
    #: Stream pull: connect timeout, longest silence between two lines (seconds).
    PULL_TIMEOUTS: Tuple[float, float] = (5.0, 30.0)
    #: Longest stream line and most stream bytes accepted from the stream server.
    MAX_LINE: int = 1 << 20
    MAX_STREAM_BYTES: int = 16 << 20

    def __init__(self, llm_agent, aid) -> None:
        self.llm_agent = str(llm_agent)
        self.aid = aid
        self.session_id: Optional[str] = None
        self._lock = threading.Lock()
        self._answered = threading.Event()
        self._reply: Optional[dict] = None
        self._cancelled: Optional[str] = None
        self._response: Any = None  # the stream pull in progress (aborted by cancel)

    # -- steps --
    def send(self, body: Dict[str, Any], trace_id: str = "") -> str:
        """Open a session with the target and send the request; the session id. Raises ``GatewayError``."""
        aid = self.aid
        if getattr(aid, "session_manager", None) is None:
            raise GatewayError(503, f"the calling agent {aid.id} is not online", "agent_offline")
        self._check_cancelled()
        session_id = aid.create_session("llm request", "")
        if not session_id:
            self._fail(502, f"{aid.id} could not open a session (the message server did not answer)")
        self.session_id = session_id
        # Before the invite: an offline target is reported as a synthetic message into this session.
        aid.add_message_handler(self._on_message, session_id)
        if not aid.invite_member(session_id, self.llm_agent):
            self._fail(502, f"{aid.id} could not invite {self.llm_agent}")
        now = int(time.time() * 1000)
        blocks: List[Dict[str, Any]] = [{"type": "llm", "status": "success", "timestamp": now, "content": body,
                                         "trace_id": trace_id or uuid.uuid4().hex}]
        text = last_user_text(body)
        if text:  # agents that read text (get_content_from_message) answer too; llm agents read blocks[0]
            blocks.append({"type": "content", "status": "success", "timestamp": now, "content": text})
        result = aid.send_message(session_id, [self.llm_agent], blocks)
        if not result:
            self._fail(502, f"sending the request to {self.llm_agent} failed: "
                            f"{getattr(result, 'error', '') or 'not sent'}")
        return session_id

    def wait_reply(self, timeout: float) -> Tuple[str, Any]:
        """The target's first answer as ``("message", content)`` or ``("stream", pull_url)``.

        Raises ``GatewayError``: 504 if nothing came within ``timeout`` seconds, 404 if the target is not online,
        400 for an ``error`` answer (as 0.1.99), 503 if cancelled.
        """
        if not self._answered.wait(max(0.0, timeout)):
            raise GatewayError(504, f"{self.llm_agent} did not answer within {timeout:.3g} s")
        self._check_cancelled()
        msg = self._reply or {}
        kind, content = self.parse_message(msg)
        if kind == "error":
            if "message_id" not in msg:  # the SDK's synthetic notice: the server said the target is offline
                raise GatewayError(404, f"agent {self.llm_agent} is not online ({content})", "model_not_found")
            raise GatewayError(400, f"{self.llm_agent} answered with an error: {content}", "agent_error")
        if kind == "text/event-stream":
            if not isinstance(content, str) or not content:
                raise GatewayError(502, f"{self.llm_agent} announced a stream without a URL")
            return "stream", content
        return "message", content

    def iter_stream(self, pull_url: str, deadline: Optional[float] = None) -> Iterator[Any]:
        """Pull the text stream at ``pull_url``: each chunk's JSON value (or its text when not JSON), as it
        arrives, until ``event: done``. ``deadline`` is a ``time.monotonic()`` value. Raises ``GatewayError``."""
        import requests
        import urllib3

        from agentcp.base.http import resolve_verify
        from agentcp.msg.stream_client import signed_url

        sm = getattr(self.aid, "session_manager", None)
        client = sm.message_client_map.get(sm.server_url) if sm is not None else None
        auth = client.auth_client if client is not None else None
        url = signed_url(pull_url, self.aid.id, getattr(auth, "signature", None))
        shown = pull_url.split("?", 1)[0]
        connect, idle = self.PULL_TIMEOUTS
        total = 0
        self._check_cancelled()
        try:
            headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
            with requests.get(url, stream=True, timeout=(connect, idle), headers=headers,
                              verify=resolve_verify(getattr(auth, "verify", None))) as resp:
                with self._lock:
                    self._response = resp
                try:
                    self._check_cancelled()
                    if resp.status_code != 200:
                        raise GatewayError(502, f"pulling the stream {shown} failed: HTTP {resp.status_code}")
                    for line in bounded_lines(_arriving(resp), self.MAX_LINE):
                        self._check_cancelled()
                        if deadline is not None and time.monotonic() > deadline:
                            raise GatewayError(504, f"the stream of {self.llm_agent} did not end in time")
                        total += len(line)
                        if total > self.MAX_STREAM_BYTES:
                            raise GatewayError(502, f"the stream of {self.llm_agent} exceeds "
                                                    f"{self.MAX_STREAM_BYTES} bytes", "stream_too_large")
                        kind, value = parse_sse_line(line)
                        if kind == "done":
                            return
                        if kind == "value" and value != "[DONE]":
                            yield value
                    self._check_cancelled()
                    raise GatewayError(502, f"the stream {shown} ended without 'event: done'")
                finally:
                    with self._lock:
                        self._response = None
        except (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout) as exc:
            self._check_cancelled()
            raise GatewayError(504, f"the stream {shown} went silent ({type(exc).__name__})") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            self._check_cancelled()
            raise GatewayError(502, f"pulling the stream {shown} failed: {type(exc).__name__}") from None

    def cancel(self, reason: str) -> None:
        """Make the waits of this request raise ``GatewayError(503, reason)`` now (any thread)."""
        from agentcp.agent_streams import _abort_response

        with self._lock:
            if self._cancelled is None:
                self._cancelled = reason
            resp = self._response
        self._answered.set()
        if resp is not None:
            _abort_response(resp)

    def close(self) -> None:
        """Stop listening and leave the session (idempotent; never raises)."""
        session_id, self.session_id = self.session_id, None
        if not session_id:
            return
        try:
            self.aid.remove_message_handler(self._on_message, session_id)
            self.aid.close_session(session_id)
        except Exception as exc:  # cleanup must not hide the answer; the session is left to the server
            _log.warning("%s: leaving llm session %s failed: %s", self.aid.id, session_id, exc)

    # -- 0.1.99 API --
    def parse_message(self, reply_msg) -> Tuple[Optional[str], Any]:
        """``(type, content)`` of the answer block of ``reply_msg``: its first ``llm``/``content``/``text``
        block, else its first block; ``(None, None)`` for a message without blocks."""
        try:
            blocks = self.aid.get_content_array_from_message(reply_msg)
        except AttributeError:
            blocks = []
        blocks = [b for b in blocks if isinstance(b, dict)]
        if not blocks:
            return None, None
        first = blocks[0]
        if first.get("type") not in ("error", "text/event-stream"):
            first = next((b for b in blocks if b.get("type") in ("llm", "content", "text")), first)
        return first.get("type"), first.get("content")

    def read_stream(self, content) -> Iterator[str]:
        """The stream at the pull URL ``content`` as server-sent events ``data: <json>\\n\\n`` (one per JSON
        chunk, as 0.1.99's proxy re-emitted them)."""
        for value in self.iter_stream(content):
            if not isinstance(value, str):
                yield f"data: {json.dumps(value, ensure_ascii=False)}\n\n"

    async def chat_create(self, open_ai_message_body, trace_id: str = ""):
        """0.1.99's one call: send the request and wait (without blocking the event loop) for the answer.

        Returns an :class:`AttrDict` of the answer's JSON (a text answer becomes a ``chat.completion``), an
        iterator of server-sent events (``read_stream``) for a stream answer, or ``fail_response(reason)``.
        """
        loop = asyncio.get_running_loop()

        def run():
            try:
                self.send(open_ai_message_body, trace_id)
                return self.wait_reply(self.REPLY_TIMEOUT)
            except GatewayError as exc:
                return "error", exc.message

        kind, content = await loop.run_in_executor(None, run)
        if kind == "error":
            self.close()
            return fail_response(content)
        if kind == "stream":
            return self._closing(self.read_stream(content))
        self.close()
        from agentcp.llm_gateway import as_completion

        model = open_ai_message_body.get("model") if isinstance(open_ai_message_body, dict) else None
        return AttrDict(as_completion(content, model or self.llm_agent))

    def _closing(self, events: Iterator[str]) -> Iterator[str]:
        try:
            yield from events
        finally:
            self.close()

    # -- internals --
    def _on_message(self, msg) -> None:
        """Session handler (dispatcher thread): keep the target's first message."""
        if not isinstance(msg, dict) or msg.get("sender") != self.llm_agent:
            return
        with self._lock:
            if self._reply is not None:
                return
            self._reply = msg
        self._answered.set()

    def _fail(self, status: int, message: str) -> None:
        """Raise for a failed step; a cancelled request (offline() raced it) says why it was cancelled."""
        self._check_cancelled()
        raise GatewayError(status, message)

    def _check_cancelled(self) -> None:
        reason = self._cancelled
        if reason is not None:
            raise GatewayError(503, reason, "unavailable")
