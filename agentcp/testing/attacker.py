"""A server that plays the attacker, for tests of the trust boundaries (``shared/protocol/trust.md``).

:class:`RecordingServer` is a small HTTP server on a host of its own (default ``127.0.0.2``: loopback, but not the
host of the local access point, so outside an agent's trust domain). It records every request it gets and answers
what an agent would ask of a message server or a stream pull URL:

* ``POST .../sign_in`` (or a CA's ``.../resign_cert``) step 1: a challenge whose ``nonce`` is :attr:`RecordingServer.nonce` (any text: a test of
  "sign only what looks like a challenge" sets it to ``"transfer 100 coins to mallory"``). With ``relay_to`` it
  passes the real server's challenge through instead (certificate, signature and nonce): a sign-in relay.
* ``POST .../sign_in`` step 2 (a proof): recorded in :attr:`proofs`; with ``relay_to`` forwarded to the real server,
  and the token it returns is kept in :attr:`stolen_tokens`.
* any ``GET`` (a stream pull): a short server-sent-events stream ending with ``event: done``.

What a test asserts is what the attacker did **not** get: ``server.requests == []``, ``server.proofs == []``,
``server.saw(token) is False``.
"""
from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

__all__ = ["RecordingServer", "Recorded"]

_MAX_BODY = 1 << 20


@dataclass
class Recorded:
    """One request the attacker's server received."""

    method: str
    path: str
    query: Dict[str, List[str]]
    body: Any
    headers: Dict[str, str] = field(default_factory=dict)
    raw: str = ""


class RecordingServer:
    """An attacker's HTTP server on ``host`` (an ephemeral port) that records what agents send it.

    Use as a context manager, or call :meth:`start` / :meth:`stop` (which joins its thread).
    """

    def __init__(self, host: str = "127.0.0.2", *, nonce: str = "0123456789abcdef0123456789abcdef",
                 relay_to: Optional[str] = None, token: str = "attacker-issued-token") -> None:
        self.host = host
        #: The nonce of the challenges this server makes up (not used when relaying).
        self.nonce = nonce
        #: Base URL of a real message server whose sign-in this server relays (``None``: answer by itself).
        self.relay_to = relay_to.rstrip("/") if relay_to else None
        self.token = token
        self._lock = threading.Lock()
        self._requests: List[Recorded] = []
        self._proofs: List[Dict[str, Any]] = []
        self._stolen: List[str] = []
        #: Set when the first request arrives (wait on it with a timeout instead of polling).
        self.first_request = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- records ------------------------------------------------------------------------------------------------
    @property
    def requests(self) -> List[Recorded]:
        with self._lock:
            return list(self._requests)

    @property
    def proofs(self) -> List[Dict[str, Any]]:
        """Sign-in proofs (step-2 bodies carrying a ``signature`` over a nonce) this server received."""
        with self._lock:
            return list(self._proofs)

    @property
    def stolen_tokens(self) -> List[str]:
        """Session tokens a relayed sign-in obtained from the real server for the victim."""
        with self._lock:
            return list(self._stolen)

    def saw(self, secret: Optional[str]) -> bool:
        """True if ``secret`` appeared anywhere in a request (path, query, headers or body)."""
        if not secret:
            return False
        with self._lock:
            return any(secret in r.raw for r in self._requests)

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("RecordingServer is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "RecordingServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

            def _record(self, body_text: str) -> Recorded:
                parts = urllib.parse.urlsplit(self.path)
                try:
                    body: Any = json.loads(body_text) if body_text else None
                except ValueError:
                    body = body_text
                headers = {k: v for k, v in self.headers.items()}
                raw = " ".join([self.command, self.path, json.dumps(headers), body_text])
                rec = Recorded(self.command, parts.path, urllib.parse.parse_qs(parts.query), body, headers, raw)
                with owner._lock:
                    owner._requests.append(rec)
                owner.first_request.set()
                return rec

            def _reply(self, status: int, payload: Any, content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY)
                text = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                rec = self._record(text)
                body = rec.body if isinstance(rec.body, dict) else {}
                if not rec.path.endswith(("/sign_in", "/resign_cert")):
                    self._reply(404, {"error": "not here"})
                    return
                if "nonce" in body:
                    with owner._lock:
                        owner._proofs.append(dict(body))
                    self._reply(*owner._on_proof(rec.path, body))
                else:
                    self._reply(*owner._on_challenge(rec.path, body))

            def do_GET(self) -> None:  # noqa: N802
                self._record("")
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    self._reply(404, {"error": "no websocket here"})
                    return
                self._reply(200, b"data: attacker text\n\nevent: done\ndata: \n\n", "text/event-stream")

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="agentcp-attacker-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "RecordingServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- answers ------------------------------------------------------------------------------------------------
    def _forward(self, body: Dict[str, Any]) -> "tuple[int, Any]":
        import requests

        assert self.relay_to is not None
        try:
            resp = requests.post(self.relay_to + "/sign_in", json=body, timeout=5)
            try:
                return resp.status_code, resp.json()
            except ValueError:
                return resp.status_code, {"error": "not JSON"}
        except requests.RequestException as exc:
            return 502, {"error": type(exc).__name__}

    def _on_challenge(self, path: str, body: Dict[str, Any]) -> "tuple[int, Any]":
        if self.relay_to is not None:
            return self._forward(body)   # the real server's nonce, certificate and signature, passed through
        return 200, {"nonce": self.nonce}

    def _on_proof(self, path: str, body: Dict[str, Any]) -> "tuple[int, Any]":
        if self.relay_to is not None:
            status, reply = self._forward(body)
            token = reply.get("signature") if isinstance(reply, dict) else None
            if isinstance(token, str) and token:
                with self._lock:
                    self._stolen.append(token)
            return status, reply
        return 200, {"signature": self.token}
