"""``AgentID`` file methods: ``upload_file``, ``upload_file_async``, ``download_file`` (api.md §3.9).

The work is done by :class:`~agentcp.file.file_client.FileClient` (streamed, atomic, truthful); this mixin picks
the file server, keeps one client per file server (0.1.99 kept the first one and signed downloads from any other
domain with the wrong token), and wires in the agent's trust policy and limits:

* uploads go to ``AGENTCP_OSS_URL`` if set, else to the file server of the agent's access point
  (``https://oss.<domain>/api/oss``; the access point's own origin for an IP or ``localhost`` access point, as the
  devserver is);
* a download URL must be on a trusted host (trust.md rule 1): otherwise nothing is requested, no token goes
  anywhere, ``download_file`` returns None and the refusal is counted in ``status()["trust"]["refused"]["file"]``.
  The protocol has no public file URLs (every download carries ``agent_id`` and ``signature``), so there is no
  credential-free fallback;
* a relative ``file_path`` must stay inside the current directory (trust.md rule 5); absolute paths are the
  caller's choice;
* a download larger than ``aid.limits.file_transfer_max`` fails (the partial file is removed) and is counted in
  ``status()["trust"]["limits_crossed"]``.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import Any, Callable, Optional, Tuple

from agentcp.file.file_client import OSS_URL_ENV, TRANSFER_TIMEOUT, FileClient, file_server_url

__all__ = ["FilesMixin", "FileClient"]

_log = logging.getLogger("agentcp.file")


class FilesMixin:
    """File transfer for :class:`~agentcp.agentcp.AgentID` (uses its ``_lock``, ``trust``, ``limits``)."""

    # Provided by AgentID (declared for the type checker; no values here).
    id: str
    ap: str
    seed_password: str
    limits: Any
    _lock: Any
    _entry_url: Callable[[], str]
    _certs_dir: Callable[[], str]
    _check_trusted: Callable[[str, str], bool]
    _limit_crossed: Callable[[Any], None]

    #: File servers an agent keeps a signed-in client for at once (the least recently used one is closed).
    FILE_CLIENTS_MAX: int = 8
    #: (connect, read) seconds of file transfers: the read timeout bounds a stall, not the whole transfer.
    FILE_TIMEOUT: Tuple[float, float] = TRANSFER_TIMEOUT

    # --- which file server -----------------------------------------------------------------------------------
    def _upload_server(self) -> str:
        override = (os.environ.get(OSS_URL_ENV) or "").strip()
        return override.rstrip("/") if override else file_server_url(self._entry_url())

    def _download_server(self, url: str) -> str:
        """The file server that signs ``url``: one we already use on the same origin, else 0.1.99's rule."""
        origin = _origin(url)
        with self._lock:
            clients = list(getattr(self, "_file_clients", {}))
        for base in [self._upload_server()] + clients:
            if _origin(base) == origin:
                return base
        return file_server_url(url)

    def _file_client_for(self, server_url: str) -> FileClient:
        with self._lock:
            clients = self.__dict__.setdefault("_file_clients", OrderedDict())
            client = clients.get(server_url)
            evicted = None
            if client is None:
                client = FileClient(self._certs_dir(), self.seed_password, self.id, self.ap, server_url=server_url,
                                    timeout=self.FILE_TIMEOUT, check_trusted=self._check_trusted,
                                    on_limit=self._limit_crossed)
                clients[server_url] = client
                if len(clients) > self.FILE_CLIENTS_MAX:
                    _, evicted = clients.popitem(last=False)
            clients.move_to_end(server_url)
            client.seed_password = client.auth_client.seed_password = self.seed_password
            client.max_download = self.limits.file_transfer_max
            if server_url == self._upload_server():
                self.file_client = client
        if evicted is not None:
            evicted.close()
        return client

    # --- 0.1.99 API --------------------------------------------------------------------------------------------
    def upload_file(self, full_path) -> Optional[str]:
        """Upload a local file to the agent's file server; its URL, or None (the reason is logged, published
        through ``ErrorContext`` and kept in ``aid.file_client.last_error``). Streams: any size, constant memory."""
        try:
            server = self._upload_server()
        except ValueError as exc:
            _log.warning("%s: no usable file server (%s)", self.id, exc)
            return None
        return self._file_client_for(server).post_file(full_path)

    async def upload_file_async(self, full_path) -> Optional[str]:
        """:meth:`upload_file` without blocking the event loop (it runs in the loop's executor); needs no aiohttp."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.upload_file, full_path)

    def download_file(self, url, file_path) -> Optional[Tuple[str, Optional[str]]]:
        """Download ``url`` into ``file_path`` (atomically: the old file, if any, stays until the new one is
        complete). ``(url_with_auth_query, file_path)`` on success, ``(url_with_auth_query, None)`` if the transfer
        failed (no partial file is left), None if nothing was requested (untrusted host, a relative path leading
        outside the current directory, sign-in failed)."""
        try:
            server = self._download_server(url)
        except (ValueError, TypeError) as exc:
            _log.warning("%s: download refused: not a usable URL (%s)", self.id, exc)
            return None
        if not self._check_trusted(server, "file"):
            return None
        return self._file_client_for(server).download_file(url, file_path)


def _origin(url: str) -> Tuple[str, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
