"""Access point client: sign-in, ``get_accesspoint_config`` and the public-data endpoints (liveness.md §1.4, §1.6).

Sign-in and every authorised POST go through :class:`~agentcp.base.auth_client.AuthClient`, so each request has
a timeout, a 401 re-signs in once and resends with the fresh token (D-A4), and a failed sign-in is not silently
followed by a request with a null token (D-A3).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional

from agentcp.base.client import IClient
from agentcp.base.http import DEFAULT_TIMEOUT
from agentcp.base.limits import DEFAULT_LIMITS
from agentcp.base.names import InvalidNameError, resolve_inside
from agentcp.context.exceptions import AuthError, TransientAuthError

_log = logging.getLogger("agentcp.ap")

__all__ = ["ApClient", "ap_api_base"]


def ap_api_base(server_url: str) -> str:
    base = (server_url or "").rstrip("/")
    return base if base.endswith("/api/accesspoint") else base + "/api/accesspoint"


def _inside(root: str, path: str) -> bool:
    try:
        resolve_inside(root, path)
        return True
    except InvalidNameError:
        return False


class ApClient(IClient):
    """``ApClient(agent_id, server_url, aid_path, seed_password)``: ``server_url`` is the entry URL
    (``https://acp3.<domain>`` or an ``AGENTCP_AP_URL`` override); ``aid_path`` is the certs directory and
    ``seed_password`` the hashed seed."""

    def __init__(self, agent_id: str, server_url: str, aid_path: str, seed_password: str, *,
                 timeout=DEFAULT_TIMEOUT, verify=None, limits=DEFAULT_LIMITS, on_limit=None) -> None:
        from agentcp.base.auth_client import AuthClient

        self.agent_id = agent_id
        self.server_url = ap_api_base(server_url)
        self.aid_path = aid_path
        self.seed_password = seed_password
        self.timeout = timeout
        self.verify = verify
        self.heartbeat_server = ""
        self.message_server = ""
        self.config: Dict[str, Any] = {}
        #: Largest reply body (``Limits.http_reply_max``) and largest public file downloaded.
        self.max_reply = limits.http_reply_max
        self.max_file = limits.public_file_max
        self.auth_client = AuthClient(agent_id, self.server_url, aid_path, seed_password, timeout=timeout,
                                      verify=verify, max_reply=limits.http_reply_max, on_limit=on_limit)

    # --- IClient ------------------------------------------------------------------------------------------------
    def get_headers(self) -> Dict[str, str]:
        return self.auth_client.get_headers()

    def current_signature(self) -> Optional[str]:
        return self.auth_client.signature

    def _http_session(self):
        return self.auth_client._abortable  # one session: abort() also cuts uploads and downloads short

    def abort(self) -> None:
        """Make a request of this client that another thread is blocked in (sign-in, config, data, files) fail at
        once, e.g. during ``offline()``. The client stays usable."""
        self.auth_client.abort()

    @property
    def signature(self) -> Optional[str]:
        return self.auth_client.signature

    def sign_in(self) -> bool:
        """One sign-in attempt; True on success (the error is in ``auth_client.last_error``)."""
        try:
            self.auth_client.sign_in_once()
            return True
        except AuthError as exc:
            _log.warning("access point sign-in of %s failed: %s", self.agent_id, exc)
            return False

    def sign_out(self) -> None:
        self.auth_client.sign_out()

    # --- connect ------------------------------------------------------------------------------------------------
    def connect(self) -> Dict[str, Any]:
        """Sign in and fetch the config; raises :class:`AuthError` (transient or permanent) on failure."""
        self.auth_client.sign_in_once()
        config = self.fetch_config()
        if not self.heartbeat_server:
            raise TransientAuthError(
                f"the access point {self.server_url} returned no heartbeat_server in its config"
            )
        return config

    def initialize(self) -> None:
        """0.1.99: sign in, then get the config. Never raises; failures are logged."""
        try:
            self.connect()
        except AuthError as exc:
            _log.warning("access point of %s: %s", self.agent_id, exc)

    def fetch_config(self) -> Dict[str, Any]:
        """POST ``get_accesspoint_config``; ``config`` may be an object or a JSON string. Raises AuthError."""
        reply = self.auth_client.post_json("get_accesspoint_config", {})
        config = reply.get("config")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                raise TransientAuthError("get_accesspoint_config: config is a string that is not JSON") from None
        if not isinstance(config, dict):
            raise TransientAuthError("get_accesspoint_config: reply has no config object")
        self.config = config
        if config.get("heartbeat_server"):
            self.heartbeat_server = str(config["heartbeat_server"])
        if config.get("message_server"):
            self.message_server = str(config["message_server"])
        return config

    def get_entrypoint_config(self) -> None:
        try:
            self.fetch_config()
        except AuthError as exc:
            _log.warning("get_accesspoint_config for %s failed: %s", self.agent_id, exc)

    def get_heartbeat_server(self) -> str:
        return self.heartbeat_server

    def get_message_server(self) -> str:
        return self.message_server

    # --- data endpoints -----------------------------------------------------------------------------------------
    def _data(self, endpoint: str, payload: Dict[str, Any], default=None):
        try:
            reply = self.auth_client.post_json(endpoint, payload)
        except AuthError as exc:
            _log.warning("%s for %s failed: %s", endpoint, self.agent_id, exc)
            return default
        data = reply.get("data", default)
        return default if data is None else data

    def post_private_data(self, data):
        return self._data("post_agent_private_data", {"data": data})

    def get_all_public_data(self) -> list:
        data = self._data("get_all_public_data", {}, [])
        return data if isinstance(data, list) else []

    def get_agent_list(self):
        return self._data("get_agent_list", {})

    def get_agent_public_data(self, agentid):
        return self._data("get_agent_public_data", {"agent_id": agentid})

    def get_agent_private_data(self):
        return self._data("get_agent_private_data", {})

    def get_agent_profile(self, agentid) -> Optional[dict]:
        """GET ``https://<agentid>/agentprofile.json``; the dict or ``None``."""
        resp = self.get_request(f"https://{agentid}/agentprofile.json")
        if resp is None:
            return None
        try:
            data = resp.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def delete_public_file(self, file_name: str) -> None:
        self._data("delete_public_file", {"file_name": file_name})

    # --- public files -------------------------------------------------------------------------------------------
    @staticmethod
    def _file_list(root: str) -> List[Dict[str, Any]]:
        items = []
        for dirpath, _dirs, files in os.walk(root):
            for name in sorted(files):
                if name == "temp.json" or name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not _inside(root, path):
                    continue  # a link out of the public folder is not the agent's public data
                try:
                    st = os.stat(path)
                    h = hashlib.sha256()
                    with open(path, "rb") as fh:
                        for chunk in iter(lambda: fh.read(65536), b""):
                            h.update(chunk)
                except OSError:
                    continue
                items.append({
                    "full_path": path,
                    "size": st.st_size,
                    "last_modified": int(st.st_mtime * 1000),
                    "sha256": h.hexdigest(),  # of the content (0.1.99 hashed the path string, D-A7)
                })
        return items

    @staticmethod
    def _name_of(item) -> str:
        if isinstance(item, dict):
            return str(item.get("full_path") or item.get("file_name") or item.get("name") or "")
        return str(item)

    def _local_path(self, root: str, name: str) -> Optional[str]:
        try:
            return resolve_inside(root, name)
        except InvalidNameError as exc:
            _log.warning("ignoring a file the access point named: %s", exc)
            return None

    def _upload(self, path: str) -> bool:
        import requests

        url = f"{self.server_url}/upload_file"
        try:
            size = os.path.getsize(path)
        except OSError:
            return False
        connect, read = self.timeout if isinstance(self.timeout, (tuple, list)) else (self.timeout, self.timeout)
        # The whole-request deadline grows with the file (at least 64 KiB/s), so a large upload is not cut short.
        timeout = (connect, float(read) + size / 65536.0)
        for attempt in (0, 1):
            try:
                with open(path, "rb") as fh:
                    resp = self._file_request(
                        "POST", url, timeout, max_bytes=self.max_reply, bound="http_reply_max",
                        data={"agent_id": self.agent_id, "signature": self.auth_client.signature or "",
                              "file_name": os.path.basename(path)},
                        files={"file": (os.path.basename(path), fh)},
                    )
            except (OSError, ValueError, requests.RequestException) as exc:
                _log.warning("upload of %s failed: %s", os.path.basename(path), type(exc).__name__)
                return False
            if resp.status_code == 401 and attempt == 0 and self.sign_in():
                continue
            return 200 <= resp.status_code < 300
        return False

    def _file_request(self, method: str, url: str, timeout, *, max_bytes: int, bound: str, **kwargs):
        from agentcp.base.http import request_limited

        return request_limited(self._http_session(), method, url, timeout=timeout, verify=self.verify,
                               max_bytes=max_bytes, bound=bound, **kwargs)

    def _download(self, root: str, name: str) -> bool:
        import requests

        from agentcp.ca.identity_store import atomic_write

        target = self._local_path(root, name)
        if target is None:
            return False
        url = f"{self.server_url}/download_file"
        for attempt in (0, 1):
            params = {"file_name": name, "agent_id": self.agent_id, "signature": self.auth_client.signature or ""}
            try:
                resp = self._file_request("GET", url, self.timeout, max_bytes=self.max_file,
                                          bound="public_file_max", params=params)
            except (ValueError, requests.RequestException) as exc:
                _log.warning("download of %s failed: %s", name, exc if isinstance(exc, ValueError)
                             else type(exc).__name__)
                return False
            if resp.status_code == 401 and attempt == 0 and self.sign_in():
                continue
            if not 200 <= resp.status_code < 300:
                return False
            # Resolved again right before writing: a symlink planted meanwhile must not redirect the write.
            target = self._local_path(root, name)
            if target is None:
                return False
            atomic_write(target, resp.content)
            return True
        return False

    def sync_public_files(self, file_path) -> bool:
        """Send the list of files under ``file_path``; upload/download what the server asks for.

        Names the server returns are confined to ``file_path`` (``..``, absolute paths elsewhere and symlinks that
        point out are refused and logged).
        """
        if not os.path.isdir(file_path):
            _log.warning("public directory %s does not exist", file_path)
            return False
        try:
            reply = self.auth_client.post_json("sync_public_files", {"file_list": self._file_list(file_path)})
        except AuthError as exc:
            _log.warning("sync_public_files for %s failed: %s", self.agent_id, exc)
            return False
        ok = True
        for item in reply.get("need_upload_files") or []:
            path = self._local_path(file_path, self._name_of(item))
            ok = bool(path and os.path.isfile(path) and self._upload(path)) and ok
        for item in reply.get("need_download_files") or []:
            ok = self._download(file_path, self._name_of(item)) and ok
        return ok
