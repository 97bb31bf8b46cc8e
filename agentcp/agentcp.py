"""``AgentCP`` (identities, process lifetime) and ``AgentID`` (one agent: online/offline, profile, handlers).

Drop-in for agentcp 0.1.99 (api.md §2, §3): same constructors, names and on-disk layout. What changed:

* ``AgentID.online()`` never gives up: if the access point or the heartbeat server is unreachable it keeps trying
  in the background with capped, jittered backoff and becomes online when they return. ``offline()`` stops and
  joins everything it started. ``status()`` reports the state and the heartbeat statistics.
* Every identity write is atomic; a failure never deletes an identity; a wrong seed password is a clear
  :class:`~agentcp.context.exceptions.CredentialError`; a stored certificate that is still valid loads without
  network access (renewal is retried in the background).
* ``AGENTCP_AP_URL`` (or ``AgentCP(..., ap_url=...)``) points every AID at another access point.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

from agentcp.ap.ap_client import ApClient, ap_api_base
from agentcp.base.backoff import PERMANENT_ERROR_BACKOFF, RECONNECT_BACKOFF, Backoff
from agentcp.base.html_util import parse_html
from agentcp.base.log import log_debug, log_error, log_exception, log_info, set_log_enabled  # noqa: F401
from agentcp.ca.ca_client import CAClient
from agentcp.ca.ca_root import CARoot
from agentcp.ca.identity_store import (
    IdentityStore,
    atomic_write,
    decrypt_private_key,
    hash_seed_password,
    public_key_pem,
)
from agentcp.base.reporting import publish
from agentcp.context import ErrorContext, exceptions
from agentcp.context.exceptions import AuthError, CredentialError, SDKError  # noqa: F401
from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.history import HistoryMixin
from agentcp.message import AgentInstructionBlock, AssistantMessageBlock  # noqa: F401
from agentcp.msg.dispatcher import Dispatcher, call_arity, is_coroutine_handler
from agentcp.msg.message_client import MessageClientConfig, SendResult, SendStatus
from agentcp.msg.session_manager import SessionManager, to_plain

_log = logging.getLogger("agentcp.agent")

__all__ = ["AgentCP", "AgentID", "AP_URL_ENV"]

#: Environment variable that points every AID at one access point, e.g. ``http://127.0.0.1:8765``.
AP_URL_ENV = "AGENTCP_AP_URL"

_proxy_notice_logged = False


def _last_two_labels(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def _validate_override(url: Optional[str]) -> Optional[str]:
    if url is None:
        return None
    url = str(url).strip()
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"access point URL must start with http:// or https:// (got {url!r})")
    return url.rstrip("/")


def _env_override() -> Optional[str]:
    return _validate_override(os.environ.get(AP_URL_ENV))


def entry_url(aid_or_domain: str, override: Optional[str] = None) -> str:
    """The access point entry URL for an AID or domain: the override, else ``https://acp3.<last two labels>``."""
    if override:
        return override
    return "https://acp3." + _last_two_labels(aid_or_domain)


def _is_guest_request(agent_name: str) -> bool:
    # 0.1.99 treated any name starting with "guest" (e.g. "guesthouse") as a guest request (D-A2).
    return agent_name == "guest" or re.match(r"^guest[_\-.0-9]", agent_name) is not None


# ==================================================================================================================
# _AgentCP: shutdown flag, signals, serve_forever
# ==================================================================================================================


class _AgentCP(abc.ABC):
    """Process lifetime: ``shutdown_flag``, ``register_signal_handler``, ``signal_handle``, ``serve_forever``."""

    def __init__(self) -> None:
        self.shutdown_flag = threading.Event()
        self.exit_hook_func: Optional[Callable[[Any, Any], Any]] = None

    def register_signal_handler(self, exit_hook_func=None) -> None:
        """Install SIGTERM/SIGINT handlers that set ``shutdown_flag`` (and call ``exit_hook_func(signum, frame)``)."""
        self.exit_hook_func = exit_hook_func
        try:
            signal.signal(signal.SIGTERM, self.signal_handle)
            signal.signal(signal.SIGINT, self.signal_handle)
        except (ValueError, OSError, AttributeError) as exc:  # not the main thread, or no such signal
            _log.warning("cannot install signal handlers: %s", exc)

    def signal_handle(self, signum, frame) -> None:
        self.shutdown_flag.set()
        hook = self.exit_hook_func
        if hook is not None:
            try:
                hook(signum, frame)
            except Exception:
                _log.exception("exit hook raised")

    def serve_forever(self) -> None:
        """Block until ``shutdown_flag`` is set (returns at once when it is)."""
        if os.name == "posix":
            # A plain wait; signals still interrupt it on POSIX (Ctrl-C raises KeyboardInterrupt unless a handler
            # was registered, as in 0.1.99).
            while not self.shutdown_flag.wait():
                pass
        else:  # Windows: a lock wait cannot be interrupted by Ctrl-C, so wake regularly
            while not self.shutdown_flag.wait(0.5):
                pass


# ==================================================================================================================
# AgentCP
# ==================================================================================================================


class AgentCP(_AgentCP):
    """Owns the data directory, the identity store and the shutdown flag.

    ``ap_url`` (keyword-only, new) or the ``AGENTCP_AP_URL`` environment variable points every AID at that
    access point instead of ``https://acp3.<domain>``.
    """

    def __init__(
        self,
        agent_data_path,
        certificate_path: str = "",
        seed_password: str = "",
        debug=False,
        log_level: int = logging.INFO,
        port: int = 0,
        run_proxy: bool = True,
        *,
        ap_url: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not agent_data_path:
            raise Exception("agent_data_path 不能为空 (agent_data_path must not be empty)")
        self.app_path = os.path.join(agent_data_path, "agentcp")
        self.seed_password = hash_seed_password(seed_password)
        self.aid_path = os.path.join(certificate_path or self.app_path, "AIDs")
        os.makedirs(self.aid_path, exist_ok=True)
        self.debug = debug
        if debug:
            set_log_enabled(True, log_level)
        self.ap_url = _validate_override(ap_url) or _env_override()
        self.port = port
        self.run_proxy = run_proxy
        self.ca_client: Optional[CAClient] = None
        self.ep_url: Optional[str] = None
        self.aid_map: Dict[str, "AgentID"] = {}
        self.exit_hook_func = None
        self._agents: "weakref.WeakSet[AgentID]" = weakref.WeakSet()
        global _proxy_notice_logged
        if run_proxy and not _proxy_notice_logged:
            _proxy_notice_logged = True
            _log.debug("the local LLM proxy (run_proxy/port) is not part of this release; nothing was started")

    # --- addressing ---------------------------------------------------------------------------------------------
    @property
    def store(self) -> IdentityStore:
        return IdentityStore(self.aid_path)

    def _entry_url(self, aid_or_domain: str) -> str:
        return entry_url(aid_or_domain, self.ap_url)

    def _use_ca(self, entry: str) -> CAClient:
        self.ca_client = CAClient(entry, self.aid_path, self.seed_password)
        self.ep_url = entry
        return self.ca_client

    def __build_url(self, aid: str) -> CAClient:
        if len(aid.split(".")) < 3:
            raise RuntimeError(f"加载aid错误,请检查传入aid (AID load error: {aid!r} needs at least 3 labels)")
        return self._use_ca(self._entry_url(aid))

    # --- identities ---------------------------------------------------------------------------------------------
    def load_aid(self, agent_id: str) -> "AgentID":
        """The stored identity ``agent_id`` as an :class:`AgentID` (not online), or ``None`` if it is missing or
        its certificate expired and cannot be renewed. A valid stored certificate needs no network.

        Raises ``RuntimeError`` for an AID with fewer than 3 labels and :class:`CredentialError` when the seed
        password is wrong (the key cannot be decrypted) or key and certificate do not match.
        """
        ca = self.__build_url(agent_id)
        store = ca.store
        if not store.exists(agent_id):
            _log.error("identity %s not found in %s", agent_id, self.aid_path)
            return None
        if not store.has_key(agent_id):
            _log.error("identity %s has no private key (%s)", agent_id, store.key_path(agent_id))
            return None
        key = store.load_key(agent_id, self.seed_password)  # CredentialError: wrong seed password
        try:
            cert = store.load_cert(agent_id)
        except CredentialError as exc:
            _log.error("%s", exc)
            return None
        if public_key_pem(key) != public_key_pem(cert):
            raise CredentialError(
                f"the private key and the certificate of {agent_id} do not belong together "
                f"({store.certs_dir(agent_id)})"
            )
        try:
            if not ca.resign_csr(agent_id):
                return None
            agent = AgentID(agent_id, self.app_path, self.seed_password, ca, self.ep_url, debug=self.debug)
        except (OSError, ValueError) as exc:
            _log.error("loading %s failed: %s", agent_id, exc)
            return None
        self._agents.add(agent)
        return agent

    def create_aid(self, ap: str, agent_name: str) -> "AgentID":
        """Create ``<agent_name>.<last two labels of ap>`` with the CA (or load it if it exists).

        Raises ``RuntimeError`` with the CA's reason on refusal or when the CA is unreachable.
        """
        if _is_guest_request(agent_name):
            return self.get_guest_aid(ap)
        domain = _last_two_labels(ap)
        aid = agent_name if agent_name.endswith("." + domain) else f"{agent_name}.{domain}"
        ca = self._use_ca(self._entry_url(domain))
        if ca.store.exists(aid) and ca.store.has_cert(aid) and ca.store.has_key(aid):
            return self.load_aid(aid)
        from agentcp.ca.ca_client import CAError

        try:
            ca.create_identity(aid)
        except CAError as exc:
            if exc.transient and exc.status == 0:
                raise RuntimeError(f"send csr to server error: {exc}") from None
            raise RuntimeError(str(exc)) from None
        return self.load_aid(aid)

    def get_guest_aid(self, ep_url: str) -> "AgentID":
        """A guest identity for the domain ``ep_url`` (a stored valid one is reused; nothing is deleted)."""
        ca = self._use_ca(self._entry_url(ep_url))
        guest = ca.get_guest_aid()
        if not guest:
            raise RuntimeError("获取guest aid失败 (failed to get guest aid)")
        if len(guest.split(".")) < 3:
            raise RuntimeError(f"获取guest aid失败 (the CA returned an unusable guest AID {guest!r})")
        return self.load_aid(guest)

    def get_aid_list(self) -> list:
        """Stored identities: directories of ``aid_path`` with at least 3 dot-separated labels, sorted."""
        return self.store.list_aids()

    def read_private_key(self, agent_id: str) -> str:
        """The key PEM encrypted with the current seed; ``""`` if it cannot be read."""
        ca = self.__build_url(agent_id)
        return ca.load_private_key_str(agent_id, self.seed_password)

    def read_certificate_pem(self, agent_id: str) -> str:
        ca = self.__build_url(agent_id)
        return ca.load_certificate_pem(agent_id)

    def set_seed_password(self, seed_password: str) -> None:
        """Use ``seed_password`` for the next load/create (nothing on disk changes)."""
        self.seed_password = hash_seed_password(seed_password)

    def modify_seed_password(self, seed_password: str) -> None:
        """Re-encrypt every stored key with ``seed_password`` and use it from now on.

        Keys are rewritten atomically; a key that the current seed cannot decrypt is left unchanged (logged).
        Raises :class:`CredentialError` if there are keys and none of them could be decrypted (nothing changed).
        """
        new_hex = hash_seed_password(seed_password)
        results = self.store.reencrypt_keys(self.seed_password, new_hex)
        changed = [aid for aid, status in results.items() if status == "ok"]
        failed = {aid: status for aid, status in results.items() if status not in ("ok", "no key")}
        if failed and not changed:
            raise CredentialError(
                "wrong seed password: none of the stored keys could be decrypted with the current seed "
                f"password; nothing was changed ({', '.join(sorted(failed))})"
            )
        for aid, status in failed.items():
            _log.warning("key of %s left unchanged: %s", aid, status)
        self.seed_password = new_hex
        if self.ca_client is not None:
            self.ca_client.seed_password = new_hex
        for agent in list(self._agents):
            agent._update_seed_password(new_hex)
        _log.info("seed password changed for %d identit%s", len(changed), "y" if len(changed) == 1 else "ies")

    def save_aid_info(self, agent_id: str, seed_password: str, private_key: str, cert: str) -> "AgentID":
        """Import an identity: decrypt ``private_key`` with ``seed_password``, store it encrypted with the current
        seed, and store ``cert``. Raises :class:`CredentialError` if the password is wrong. Returns ``None``."""
        key = decrypt_private_key(private_key, hash_seed_password(seed_password), aid=agent_id)
        ca = self.__build_url(agent_id)
        ca.store.save_identity(agent_id, key, cert, self.seed_password)
        return None

    def get_agent_data_path(self):
        return self.app_path

    # --- handlers -----------------------------------------------------------------------------------------------
    def add_message_handler(self, handler, aid_str: str) -> None:
        """Create or load ``aid_str``, bring it online and register ``handler`` on it."""
        if not aid_str or len(aid_str.split(".")) < 3:
            raise ValueError(f"invalid AID {aid_str!r}: expected name.domain.tld")
        name, _, ap = aid_str.partition(".")
        agent = self.create_aid(ap, name)
        if agent is None:
            raise RuntimeError(f"cannot create or load {aid_str}")
        agent.online()
        self.aid_map[aid_str] = agent
        agent.add_message_handler(handler, from_acp=True)

    def message_handler(self, aid_str):
        def decorator(func):
            self.add_message_handler(func, aid_str)
            return func

        return decorator

    def get_aid(self, aid_str: str) -> "AgentID":
        return self.aid_map.get(aid_str)

    # --- LLM proxy (not in this release) ------------------------------------------------------------------------
    def run_llm_proxy(self, port) -> None:
        _log.debug("the local LLM proxy is not part of this release; run_llm_proxy(%s) does nothing", port)

    def get_llm_url(self, target_aid: str):
        raise NotImplementedError("the local LLM proxy is not part of this release of agentcp")

    def get_llm_api_key(self, aid_str: str):
        raise NotImplementedError("the local LLM proxy is not part of this release of agentcp")

    # --- context manager ----------------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.shutdown_flag.set()
        agents = list(self.aid_map.values()) + [a for a in list(self._agents) if a not in self.aid_map.values()]
        for agent in agents:
            try:
                agent.offline()
            except Exception:
                _log.exception("offline() of %s failed", agent)
        return None


# ==================================================================================================================
# AgentID
# ==================================================================================================================


class AgentID(HistoryMixin):
    """One agent identity. Obtained from ``AgentCP.load_aid``/``create_aid``/``get_guest_aid``."""

    #: How long ``online()`` waits for the first connection attempt before returning (seconds).
    ONLINE_WAIT: float = 30.0
    #: How long ``online()`` additionally waits for the first heartbeat reply once signed in (seconds).
    HEARTBEAT_WAIT: float = 3.0
    #: Waits between access point attempts while it is unreachable / refuses permanently.
    RECONNECT_BACKOFF: Backoff = RECONNECT_BACKOFF
    PERMANENT_BACKOFF: Backoff = PERMANENT_ERROR_BACKOFF
    #: How often a connected agent checks whether its certificate is due for renewal (seconds).
    RENEWAL_CHECK_INTERVAL: float = 600.0
    #: ``offline()`` waits at most this long for running handlers to finish (the connect thread is always joined:
    #: it wakes on the stop, and an HTTP call in flight ends within its timeout).
    JOIN_TIMEOUT: float = 30.0
    #: How long ``online()`` additionally waits for the message-server connection (seconds).
    MESSAGE_WAIT: float = 3.0
    #: Settings of the message-server connection (ping interval, outbox size, backoff, ...); None: defaults.
    MESSAGE_CONFIG: Optional[MessageClientConfig] = None
    #: Handler threads (messages of one session are handled in order, sessions concurrently).
    HANDLER_WORKERS: int = 4
    #: An async handler still running after this many seconds is cancelled (as in 0.1.99).
    HANDLER_TIMEOUT: float = 60.0

    def __init__(self, id: str, app_path: str, seed_password: str, ca_client, ep_url, debug=False) -> None:
        self.id = id
        self.ap = _last_two_labels(id)
        self.name = ""
        self.avaUrl = ""
        self.description = ""
        self.ep_url = ep_url
        self.seed_password = seed_password
        self.ca_client = ca_client
        self.app_path = app_path
        self.ap_client: Optional[ApClient] = None
        self.heartbeat_client = None
        self.session_manager = None
        self.db_manager = None
        self.file_client = None
        self.is_online_success = False
        self.message_handlers: List[Callable] = []
        self.message_handlers_session_map: Dict[str, Callable] = {}
        self.message_handlers_router_map: Dict[str, Callable] = {}
        self.message_from_acp = False
        base = os.path.join(app_path, "AIDs", id)
        self.public_data_path = os.path.join(base, "public")
        self.private_data_path = os.path.join(base, "private")
        self.ca_root_path = os.path.join(app_path, "Certs", "root")
        for path in (self.public_data_path, os.path.join(self.private_data_path, "data"), self.ca_root_path):
            os.makedirs(path, exist_ok=True)
        CARoot().set_ca_root_crt(self.ca_root_path)
        self.thread_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"agentcp-{id}")  # lazy threads
        self.debug = debug
        self.message_server = ""
        self.heartbeat_server = ""
        # connection machinery
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._attempted = threading.Event()
        self._conn_thread: Optional[threading.Thread] = None
        self._phase = "offline"  # offline | connecting | started
        self._ap_attempts = 0
        self._ap_failures = 0
        self._last_error: Optional[str] = None
        self._published_error: Optional[str] = None
        self._next_renewal_check = 0.0
        self._online_since: Optional[float] = None
        self.on_state_change: Optional[Callable[[str, str], Any]] = None
        self.message_config: Optional[MessageClientConfig] = None
        self._dispatcher: Optional[Dispatcher] = None
        self._msg_counters: Dict[str, int] = {"history_errors": 0, "send_failures": 0, "received": 0}
        self._msg_logged: set = set()
        # Sessions of the last SessionManager, re-joined by the next online() (offline() keeps them here).
        self._remembered_sessions: Dict[str, Any] = {}
        self._forgotten_sessions: set = set()
        # Notified on every phase change and heartbeat state change: wait_online() sleeps on it (no polling).
        # Innermost lock: it is taken with self._lock held, and never the other way round.
        self._state_cond = threading.Condition(threading.Lock())

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"AgentId(aid={self.id})"

    # --- paths --------------------------------------------------------------------------------------------------
    def _certs_dir(self) -> str:
        if self.ca_client is not None:
            return self.ca_client.get_aid_certs_path(self.id)
        return os.path.join(self.private_data_path, "certs")

    def _entry_url(self) -> str:
        return self.ep_url or entry_url(self.id, _env_override())

    def get_agent_public_path(self):
        return self.public_data_path

    def get_agent_private_path(self):
        return self.private_data_path

    def get_app_path(self):
        return self.public_data_path  # sic: 0.1.99 returns the public path

    def _update_seed_password(self, new_hex: str) -> None:
        self.seed_password = new_hex
        if self.ca_client is not None:
            self.ca_client.seed_password = new_hex
        for client in (self.ap_client, self.heartbeat_client):
            if client is None:
                continue
            if hasattr(client, "seed_password"):
                client.seed_password = new_hex
            auth = getattr(client, "auth_client", None)
            if auth is not None:
                auth.seed_password = new_hex

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def online(self) -> None:
        """Bring the agent online; never raises. ``is_online_success`` tells whether it got there.

        The first attempt runs before this returns. If the access point is unreachable, the agent keeps trying in
        the background and becomes online when it returns; the heartbeat client heals heartbeat faults itself.
        """
        try:
            with self._lock:
                running = self._conn_thread is not None and self._conn_thread.is_alive()
                if running and self._phase == "started":
                    return
                self._attempted.clear()
                if running:
                    self._wake.set()  # try again now
                else:
                    self._stop = threading.Event()
                    self._wake.clear()
                    self._ap_failures = 0
                    self._set_phase("connecting")
                    self._conn_thread = threading.Thread(
                        target=self._run, name=f"agentcp-online-{self.id}", daemon=True
                    )
                    self._conn_thread.start()
            self._attempted.wait(self.ONLINE_WAIT)
            hb = self.heartbeat_client
            if hb is not None and hasattr(hb, "wait_online"):
                hb.wait_online(self.HEARTBEAT_WAIT)
            sm = self.session_manager
            client = sm.message_client_map.get(sm.server_url) if sm is not None else None
            if client is not None:
                client.wait_connected(self.MESSAGE_WAIT)  # ready to receive when online() returns
        except Exception as exc:  # never raises (0.1.99 contract)
            _log.exception("online() of %s failed unexpectedly", self.id)
            self._publish(SDKError(f"online() of {self.id} failed: {exc}"))

    def offline(self) -> None:
        """Stop everything ``online()`` started, join its threads and sign out. Idempotent; never raises."""
        try:
            with self._lock:
                self._stop.set()
                self._wake.set()
                thread = self._conn_thread
            self._attempted.set()  # an online() waiting for the first attempt returns now
            if thread is not None and thread is not threading.current_thread():
                # The connect loop wakes on the stop at every wait; an HTTP call in flight ends within its timeout.
                thread.join()
            with self._lock:
                sm, self.session_manager = self.session_manager, None
                if sm is not None:
                    self._remember_sessions(sm)
                dispatcher, self._dispatcher = self._dispatcher, None
                hb, self.heartbeat_client = self.heartbeat_client, None
                ap, self.ap_client = self.ap_client, None
                self._conn_thread = None
                self.is_online_success = False
                self._online_since = None
                self._set_phase("offline")
            # Handlers first: nothing new starts, running ones finish; then the message connection closes.
            if dispatcher is not None:
                dispatcher.stop(self.JOIN_TIMEOUT)
            self._stop_stream_work(self.JOIN_TIMEOUT)  # stream handlers and pulls (their own threads)
            if sm is not None:
                sm.stop()
            if hb is not None:
                hb.offline()
                hb.sign_out()
            if ap is not None:
                ap.sign_out()
                ap.auth_client.close()
        except Exception:
            _log.exception("offline() of %s failed", self.id)

    def status(self) -> Dict[str, Any]:
        """A snapshot: ``state`` (offline/connecting/online/reconnecting/stopped), access point and heartbeat."""
        with self._lock:
            hb = self.heartbeat_client
            ap = self.ap_client
            phase = self._phase
            snap: Dict[str, Any] = {
                "aid": self.id,
                "is_online_success": self.is_online_success,
                "access_point": {
                    "url": ap_api_base(self._entry_url()),
                    "connected": phase == "started",
                    "attempts": self._ap_attempts,
                    "consecutive_failures": self._ap_failures,
                    "last_error": self._last_error,
                },
                "heartbeat_server": self.heartbeat_server,
                "message_server": self.message_server,
            }
            sm = self.session_manager
        client = None
        if sm is not None:
            client = sm.message_client_map.get(sm.server_url)
        snap["messaging"] = None if client is None else dict(client.stats(), **self._msg_counters)
        if phase == "started" and hb is not None:
            snap["state"] = hb.state
            try:
                snap["heartbeat"] = hb.stats()
            except Exception as exc:  # stats must never break status()
                snap["heartbeat"] = {"error": str(exc)}
        else:
            snap["state"] = "connecting" if phase == "connecting" else "offline"
            snap["heartbeat"] = None
        snap["online"] = snap["state"] == "online"
        return snap

    @property
    def state(self) -> str:
        return self.status()["state"]

    def wait_online(self, timeout: Optional[float] = None) -> bool:
        """Block until the heartbeat is online (True), ``timeout`` passes or ``offline()`` is called (False).

        Before the first ``online()`` it waits for one (from another thread). Woken by phase and heartbeat state
        changes, not by polling.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state_cond:
            while True:
                hb = self.heartbeat_client
                if hb is not None and self._phase == "started":
                    if hb.wait_online(0):  # the heartbeat sets its event before it reports the state change
                        return True
                elif self._stop.is_set() and self._phase == "offline":
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._state_cond.wait(left)

    def _notify_state(self) -> None:
        with self._state_cond:
            self._state_cond.notify_all()

    # --- connect loop -------------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        old, self._phase = self._phase, phase
        if old != phase:
            _log.debug("%s: %s -> %s", self.id, old, phase)
        self._notify_state()

    def _publish(self, err: SDKError) -> None:
        publish(err, self.id)

    def _run(self) -> None:
        try:
            self._connect_loop(self._stop)
        finally:
            self._attempted.set()  # also when stopped in a backoff wait: online() must not wait for a dead loop
            self._notify_state()

    def _connect_loop(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                self._connect_once(stop)
                self._attempted.set()
                break
            except Exception as exc:
                failures += 1
                permanent = bool(getattr(exc, "permanent", False))
                with self._lock:
                    self._ap_failures = failures
                    self._last_error = str(exc)
                text = str(exc)
                if text != self._published_error:
                    self._published_error = text
                    level = logging.ERROR if permanent else logging.WARNING
                    _log.log(level, "%s: access point not available (%s); retrying in the background", self.id, exc)
                    self._publish(exc if isinstance(exc, SDKError) else SDKError(f"online of {self.id}: {exc}"))
                self._attempted.set()
                policy = self.PERMANENT_BACKOFF if permanent else self.RECONNECT_BACKOFF
                wait = policy.delay(failures - 1)
                self._wake.wait(wait)
                self._wake.clear()
        # Connected (or stopped): look after the certificate until offline().
        while not stop.is_set():
            self._maybe_renew()
            self._wake.wait(self.RENEWAL_CHECK_INTERVAL)
            self._wake.clear()

    def _connect_once(self, stop: threading.Event) -> None:
        with self._lock:
            self._ap_attempts += 1
        certs = self._certs_dir()
        ap = ApClient(self.id, self._entry_url(), certs, self.seed_password)
        try:
            ap.connect()
        except BaseException:
            ap.auth_client.close()
            raise
        with self._lock:
            if stop.is_set():
                ap.sign_out()
                ap.auth_client.close()
                return
            old_ap, self.ap_client = self.ap_client, ap
            self.heartbeat_server = ap.heartbeat_server
            self.message_server = ap.message_server
            hb = HeartbeatClient(self.id, ap.heartbeat_server, certs, self.seed_password)
            hb.set_on_recv_invite(self._on_invite)
            hb.on_state_change = self._on_heartbeat_state
            try:
                hb.online()  # non-blocking; signs in and heals in its own threads
            except BaseException:
                ap.sign_out()
                raise
            self.heartbeat_client = hb
            self._start_messaging(ap.message_server, certs)
            self._set_phase("started")
            self.is_online_success = True
            self._ap_failures = 0
            self._last_error = None
            self._published_error = None
            self._online_since = time.monotonic()
        if old_ap is not None and old_ap is not ap:
            old_ap.sign_out()
        _log.info("%s connected to access point %s; heartbeat via %s", self.id, ap.server_url, ap.heartbeat_server)

    def _maybe_renew(self) -> None:
        """Renew the certificate if it is due; failure is logged and retried later (never fatal here)."""
        now = time.monotonic()
        if self.ca_client is None or now < self._next_renewal_check:
            return
        self._next_renewal_check = now + self.RENEWAL_CHECK_INTERVAL
        try:
            if self.ca_client.renewal_due(self.id):
                self.ca_client.renew(self.id)
        except Exception as exc:
            _log.warning("certificate renewal of %s failed (%s); will retry later", self.id, exc)

    def _on_heartbeat_state(self, old: str, new: str) -> None:
        _log.debug("%s heartbeat %s -> %s", self.id, old, new)
        self._notify_state()
        callback = self.on_state_change
        if callback is not None:
            try:
                callback(old, new)
            except Exception:
                _log.exception("on_state_change callback of %s raised", self.id)

    def _on_invite(self, invite) -> None:
        """A UDP invite from the heartbeat: join the session (0.1.99 auto-accepted every invite)."""
        sm = self.session_manager
        if sm is None:
            _log.warning("%s: invite to session %s arrived while messaging is not running; ignored", self.id,
                         getattr(invite, "SessionId", "?"))
            return
        session = sm.join_session(invite)
        self._history("create_session", self.id, session.session_id, "", "", "public")

    # --- access point -------------------------------------------------------------------------------------------
    def init_ap_client(self) -> None:
        """Create the access point client, sign in and fetch the config (one attempt; failures are logged)."""
        ap = ApClient(self.id, self._entry_url(), self._certs_dir(), self.seed_password)
        ap.initialize()
        with self._lock:
            self.ap_client = ap
            if ap.heartbeat_server:
                self.heartbeat_server = ap.heartbeat_server
            if ap.message_server:
                self.message_server = ap.message_server

    def _ap(self) -> ApClient:
        if self.ap_client is None:
            self.init_ap_client()
        return self.ap_client

    def get_online_status(self, aids):
        """Online state of ``aids`` from the heartbeat server; ``[]`` when offline or unknown."""
        hb = self.heartbeat_client
        if hb is None:
            _log.warning("get_online_status: %s is not online", self.id)
            return []
        return hb.get_online_status(aids)

    def get_all_public_data(self):
        return self._ap().get_all_public_data()

    def get_agent_list(self):
        return self._ap().get_agent_list()

    def get_agent_public_data(self):
        return self._ap().get_agent_public_data(self.id)

    def get_agent_profile(self, aid_str):
        return self._ap().get_agent_profile(aid_str)

    def sync_public_files(self) -> bool:
        return self._ap().sync_public_files(self.public_data_path)

    def delete_public_file(self, file_path: str) -> None:
        path = file_path if os.path.isabs(file_path) else os.path.join(self.public_data_path, file_path)
        try:
            os.remove(path)
        except OSError as exc:
            _log.warning("cannot delete %s: %s", path, exc)
        self._ap().delete_public_file(path)

    # --- profile ------------------------------------------------------------------------------------------------
    def get_aid_info(self) -> Dict[str, str]:
        return {"aid": self.id, "name": self.name, "description": self.description, "avaUrl": self.avaUrl,
                "ep_url": self.ep_url}

    def get_publisher_info(self) -> Dict[str, str]:
        return {"publisherAid": self.id, "organization": self.ap, "certificationSignature": self.ap}

    _DEFAULT_AVATAR = "https://www.agentunion.cn/images/default_agent.png"

    @staticmethod
    def _validate_profile(data) -> None:
        def need(obj, key, kind, where="json_data"):
            if not isinstance(obj, dict) or key not in obj:
                raise Exception(f"{where} is missing {key!r}")
            if kind is not None and not isinstance(obj[key], kind):
                raise Exception(f"{where}[{key!r}] must be {kind.__name__}")
            return obj[key]

        if not isinstance(data, dict):
            raise Exception("json_data must be a dict")
        need(data, "publisherInfo", dict)
        for key in ("version", "lastUpdated", "name", "description"):
            need(data, key, str)
        caps = need(data, "capabilities", dict)
        for key in ("core", "extended"):
            need(caps, key, None, "capabilities")
        need(data, "llm", dict)
        refs = need(data, "references", dict)
        for key in ("knowledgeBases", "tools", "companyInfo", "productInfo"):
            need(refs, key, None, "references")
        auth = need(data, "authorization", dict)
        for key in ("modes", "fee", "description", "sla"):
            need(auth, key, None, "authorization")
        for section in ("input", "output"):
            part = need(data, section, dict)
            for key in ("types", "formats", "examples", "semantics", "compatibleAids"):
                need(part, key, None, section)
        for key, kind in (("supportStream", bool), ("supportAsync", bool), ("permission", list)):
            need(data, key, kind)

    def create_agent_profile(self, json_data, supportDiscover=True) -> None:
        """Validate ``json_data`` and write ``agentprofile.json``, ``index.html`` and ``config.json`` (if absent)
        to the public directory (atomically). Raises ``Exception`` naming the first invalid field."""
        ava = json_data.get("avaUrl") if isinstance(json_data, dict) else None
        if isinstance(json_data, dict) and not (isinstance(ava, str) and ava.startswith(("http://", "https://"))):
            json_data["avaUrl"] = self._DEFAULT_AVATAR
        self._validate_profile(json_data)
        os.makedirs(self.public_data_path, exist_ok=True)
        config_path = os.path.join(self.public_data_path, "config.json")
        if not os.path.exists(config_path):
            atomic_write(config_path, json.dumps({"homepage": "index.html", "supportDiscover": supportDiscover}))
        atomic_write(os.path.join(self.public_data_path, "agentprofile.json"), json.dumps(json_data))
        atomic_write(os.path.join(self.public_data_path, "index.html"), parse_html(json_data))

    def get_my_profile_data(self):
        try:
            with open(os.path.join(self.public_data_path, "agentprofile.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def update_aid_info(self, aid, avaUrl, name, description):
        return True

    # --- handlers -----------------------------------------------------------------------------------------------
    def message_handler(self, router: str = ""):
        """Decorator: ``@aid.message_handler()`` registers the function (``router="cmd"`` for instructions)."""

        def decorator(func):
            self.add_message_handler(func, router=router)
            return func

        return decorator

    def add_message_handler(self, handler, session_id: str = "", router: str = "", from_acp: bool = False) -> None:
        if from_acp:
            self.message_from_acp = True
        if not session_id and not router:
            self.message_handlers.append(handler)
        elif session_id:
            self.message_handlers_session_map[session_id] = handler
        else:
            self.message_handlers_router_map[router] = handler

    def remove_message_handler(self, handler, session_id) -> None:
        if session_id == "" or session_id is None:
            if handler in self.message_handlers:
                self.message_handlers.remove(handler)
            return
        self.message_handlers_session_map.pop(session_id, None)

    # --- message parsing (pure) ---------------------------------------------------------------------------------
    def get_sender_from_message(self, message):
        return message.get("sender") if isinstance(message, dict) else None

    def get_session_id_from_message(self, message):
        return message.get("session_id") if isinstance(message, dict) else None

    def get_receiver_from_message(self, message):
        return message.get("receiver") if isinstance(message, dict) else None

    def get_content_array_from_message(self, message):
        raw = message.get("message")  # AttributeError for a non-dict, as in 0.1.99
        if isinstance(raw, str):
            if not raw.strip():
                return []
            try:
                decoded = json.loads(raw)
            except ValueError:
                _log.warning("message content of %s is not JSON", message.get("message_id", "?"))
                return []
            if isinstance(decoded, list) and decoded:
                return decoded
            return [decoded]
        if isinstance(raw, list) and raw:
            return raw
        return []

    def get_content_from_message(self, message, message_type="content"):
        blocks = self.get_content_array_from_message(message)
        for wanted in ([message_type, "text"] if message_type == "content" else [message_type]):
            for block in blocks:
                if isinstance(block, dict) and block.get("type") == wanted:
                    content = block.get("content")
                    if isinstance(content, str):
                        try:
                            decoded = json.loads(content)
                        except ValueError:
                            return content
                        if isinstance(decoded, dict) and "text" in decoded:
                            return decoded["text"]
                        return content
                    if isinstance(content, dict) and "text" in content:
                        return content["text"]
                    return content
        return None

    # --- messaging: plumbing ------------------------------------------------------------------------------------
    def _db(self):
        """The history database (``DBManager``), opened on first use; None if it cannot be opened (logged)."""
        db = self.db_manager
        if db is not None:
            return db
        try:
            from agentcp.db.db_mananger import DBManager

            db = DBManager(self.private_data_path, self.id)
        except Exception as exc:  # history must never break messaging
            self._count_history_error("open", exc)
            return None
        self.db_manager = db
        return db

    def _count_history_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._msg_counters["history_errors"] += 1
            first = what not in self._msg_logged
            self._msg_logged.add(what)
        if first:
            _log.warning("%s: message history %s failed (%s: %s); messaging goes on without it", self.id, what,
                         type(exc).__name__, exc)
        else:
            _log.debug("%s: message history %s failed: %s", self.id, what, exc)

    def _history(self, method: str, *args) -> None:
        """Call ``self.db_manager.<method>(*args)`` defensively: failures are logged once and counted."""
        db = self._db()
        fn = getattr(db, method, None) if db is not None else None
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # history must never break messaging
            self._count_history_error(method, exc)

    def _start_messaging(self, message_server: str, certs: str) -> None:
        """Lock held, from the connect thread: open the message-server connection now (not on first send)."""
        if not message_server:
            _log.error("%s: the access point config has no message_server; messaging is unavailable", self.id)
            return
        old = self.session_manager
        if old is not None and old.server_url == message_server.rstrip("/"):
            return
        config = self.message_config or self.MESSAGE_CONFIG or MessageClientConfig()
        # The history restores ownership of sessions on demand (after a restart), so open it now.
        sm = SessionManager(self.id, message_server, certs, self.seed_password, self._db(), config=config)
        sm.set_on_message_receive(self._on_incoming)
        sm.set_on_session_message_ack(self._on_message_ack)
        sm.set_on_invite_ack(self._on_invite_ack)
        sm.on_invite = self._on_ws_invite_joined
        if old is not None:  # a new message server (config changed): carry the sessions over
            self._remember_sessions(old)
            old.stop()
        # Sessions of the previous online() (or the old server) are re-joined when the new connection opens.
        sm.forgotten.update(self._forgotten_sessions)
        remembered, self._remembered_sessions = self._remembered_sessions, {}
        if remembered:
            sm.adopt_sessions(remembered.values())
        if self._dispatcher is None or self._dispatcher.stopped:
            self._dispatcher = Dispatcher(f"agentcp-handlers-{self.id}", self.HANDLER_WORKERS, self.HANDLER_TIMEOUT,
                                          agent_id=self.id)
        self.session_manager = sm
        sm.start()

    def _remember_sessions(self, sm: SessionManager) -> None:
        """Lock held: keep ``sm``'s sessions (and the ones it forgot) for the next SessionManager."""
        with sm.lock:
            self._remembered_sessions.update(sm.sessions)
            self._forgotten_sessions = set(sm.forgotten)

    def _session_manager(self) -> Optional[SessionManager]:
        sm = self.session_manager
        if sm is None and not self._stop.is_set() and not self.is_online_success and self._phase == "offline":
            self.online()  # 0.1.99 went online on demand
            sm = self.session_manager
        return sm

    def _on_ws_invite_joined(self, session) -> None:
        self._history("create_session", self.id, session.session_id, "", "", "public")

    def _submit(self, session_id: str, work) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.submit(session_id, work)

    def _on_incoming(self, data: dict) -> None:
        """Reader thread: queue the message for its session (history, ping reply, handlers run there)."""
        with self._lock:
            self._msg_counters["received"] += 1
        self._submit(str(data.get("session_id") or ""), lambda: self._handle_incoming(data))

    def _handle_incoming(self, data: dict) -> None:
        self._history("save_message", dict(data))
        try:
            blocks = self.get_content_array_from_message(data)
        except AttributeError:
            blocks = []
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        if first.get("type") == "ping":
            self.reply_message(data, {"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                                      "content": "ping_result"})
            return
        if first.get("type") == "text/event-stream":
            self._on_stream_announce(data, first)  # its handlers pull the stream: a thread of their own
            return
        self._dispatch(data)

    def _dispatch(self, data: dict) -> None:
        """0.1.99's first-match rule: session handler, else router handler, else every global handler."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.stopped:
            return
        calls = self._handler_calls(data)
        self._dispatch_calls(dispatcher, calls, [(h, a) for h, a in calls if is_coroutine_handler(h)])

    def _handler_calls(self, data: dict) -> list:
        """The handlers ``data`` goes to (first-match rule) with their arguments, by parameter count."""
        session_handler = self.message_handlers_session_map.get(str(data.get("session_id") or ""))
        if session_handler is not None:
            handlers = [session_handler]
        else:
            instruction = data.get("instruction")
            router = instruction.get("cmd") if isinstance(instruction, dict) else None
            routed = self.message_handlers_router_map.get(router) if isinstance(router, str) else None
            handlers = [routed] if routed is not None else list(self.message_handlers)
        calls = []
        for handler in handlers:
            arity = call_arity(handler)
            if arity == 1:
                args = [data]
            elif arity == 2 or arity == -1:
                args = [self, data]
            else:
                _log.warning("%s: message handler %r takes %s parameters (1 or 2 expected); not called", self.id,
                             handler, arity)
                continue
            calls.append((handler, args))
        return calls

    def _dispatch_calls(self, dispatcher: Dispatcher, calls: list, async_calls: list) -> None:
        for handler, args in calls:
            if not is_coroutine_handler(handler):
                dispatcher.call_handler(handler, args)
        if len(async_calls) == 1:
            dispatcher.call_handler(*async_calls[0])
        elif async_calls:
            async def gather_all():
                results = await asyncio.gather(*(h(*a) for h, a in async_calls), return_exceptions=True)
                for (handler, _args), result in zip(async_calls, results):
                    if isinstance(result, Exception):
                        dispatcher._report(handler, result)

            dispatcher.run_coroutine(gather_all())

    def _synthesize_offline(self, session_id: str, offline_aid: str) -> None:
        """0.1.99's synthetic error message for an offline receiver (no ``message_id``), into the handlers."""
        block = {"type": "error", "status": "success", "timestamp": int(time.time() * 1000),
                 "content": f"该模型的服务商{offline_aid}不在线 (provider {offline_aid} is not online)", "extra": ""}
        data = {"session_id": session_id, "ref_msg_id": "", "sender": offline_aid, "receiver": self.id,
                "message": json.dumps([block])}
        self._submit(session_id, lambda: self._dispatch(data))

    def _on_message_ack(self, data: dict) -> None:
        if str(data.get("status_code")) == "404":
            offline = data.get("offline_receivers")
            for aid in offline if isinstance(offline, list) else []:
                self._synthesize_offline(str(data.get("session_id") or ""), str(aid))

    def _on_invite_ack(self, data: dict) -> None:
        if str(data.get("status_code")) == "404":
            self._synthesize_offline(str(data.get("session_id") or ""), str(data.get("acceptor_id") or ""))

    @staticmethod
    def _blocks(message) -> list:
        """0.1.99's normalisation of ``message`` into a block list (dataclasses become dicts, also nested)."""
        if message is None or (isinstance(message, str) and message == ""):
            return []
        if isinstance(message, str):
            return [{"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                     "content": message}]
        if isinstance(message, dict) or (dataclasses.is_dataclass(message) and not isinstance(message, type)):
            return [to_plain(message)]
        if isinstance(message, (list, tuple)):
            return [to_plain(block) for block in message]
        raise TypeError(f"unsupported message type {type(message).__name__}: pass a str, a block (dict or "
                        "AssistantMessageBlock) or a list of blocks")

    def _failed(self, error: str, message_id: str = "") -> SendResult:
        with self._lock:
            self._msg_counters["send_failures"] += 1
        _log.warning("%s: send failed: %s", self.id, error)
        err = exceptions.SendMsgError(error)
        err.agent_id = self.id
        self._publish(err)
        return SendResult(SendStatus.FAILED, message_id, error)

    # --- messaging: 0.1.99 API --------------------------------------------------------------------------------
    def send_message(self, sessionId: str, to_aid_list: list, message, ref_msg_id: str = "", message_id: str = "",
                     agent_cmd_block: AgentInstructionBlock = None, insert_message: bool = True):
        """Send ``message`` into session ``sessionId`` to ``to_aid_list``; a :class:`SendResult`.

        The result is truthy unless the message failed (not online, outbox full, refused, empty); ``.status``
        says ``delivered`` (the server acked it), ``sent`` (written, ack pending), ``queued`` (waiting for the
        reconnect; it goes out in order) or ``failed`` (with ``.error``). It compares equal to True/False.
        """
        blocks = self._blocks(message)
        instruction = to_plain(agent_cmd_block) if agent_cmd_block is not None else None
        if not blocks and instruction is None:
            return self._failed(f"empty message to session {sessionId}: nothing sent", message_id)
        if not sessionId:
            return self._failed("send_message needs a session id", message_id)
        sm = self._session_manager()
        if sm is None:
            return self._failed(f"{self.id} is not online (no message server connection)", message_id)
        receivers = [str(a) for a in (to_aid_list or [])]
        try:
            result = sm.send_msg(sessionId, blocks, ";".join(receivers), ref_msg_id or "", message_id or "",
                                 instruction)
        except RuntimeError as exc:  # the session manager was stopped meanwhile (offline)
            return self._failed(str(exc), message_id)
        if result is None:
            return self._failed(f"empty message to session {sessionId}: nothing sent", message_id)
        if result.status is SendStatus.FAILED:
            return self._failed(result.error or "send failed", result.message_id)
        if insert_message:
            self._history("save_message", {
                "session_id": sessionId, "message_id": result.message_id, "sender": self.id,
                "receiver": receivers, "ref_msg_id": ref_msg_id or "", "instruction": instruction,
                "message": json.dumps(blocks)})
        return result

    def send_message_content(self, session_id: str, to_aid_list: list, llm_content: str, ref_msg_id: str = "",
                             message_id: str = ""):
        """One ``content`` block with ``llm_content``; None if the session id or the text is empty."""
        if not session_id or not llm_content:
            return None
        block = {"type": "content", "status": "success", "timestamp": int(time.time() * 1000),
                 "content": llm_content}
        return self.send_message(session_id, to_aid_list, [block], ref_msg_id, message_id)

    def reply_message(self, msg: dict, message):
        """Answer ``msg`` in its session, to its sender, referring to its id; False if it has no session id."""
        session_id = msg.get("session_id") if isinstance(msg, dict) else None
        if not session_id:
            return False
        sender = msg.get("sender")
        return self.send_message(session_id, [sender] if sender else [], message, msg.get("message_id", "") or "")

    def create_session(self, name, subject, *, type="public"):
        """Create a session (this agent owns it): its id, or None if the server did not confirm in time."""
        sm = self._session_manager()
        if sm is None:
            _log.error("create_session: %s is not online", self.id)
            return None
        try:
            session = sm.create_session(name, subject, type)
        except RuntimeError as exc:
            _log.error("create_session of %s failed: %s", self.id, exc)
            return None
        if session is None:
            err = exceptions.CreateSessionError(f"create_session of {self.id} failed (no answer from the server)")
            err.agent_id = self.id
            self._publish(err)
            return None
        self._history("create_session", self.id, session.session_id, session.identifying_code, name, type)
        return session.session_id

    def invite_member(self, session_id, to_aid):
        """Invite ``to_aid`` into ``session_id``; True if the invite was sent or queued."""
        sm = self._session_manager()
        if sm is None:
            _log.error("invite_member: %s is not online", self.id)
            return False
        ok = sm.invite_member(session_id, to_aid)
        if ok:
            self._history("invite_member", self.id, session_id, to_aid)
        return ok

    def get_session_member_list(self, session_id):
        """Members of ``session_id``: dicts with ``session_id``, ``aid`` (and ``agent_id``, ``role`` when the
        server says); from the server when it answers, else from the local history."""
        sm = self.session_manager
        members = sm.get_member_list(session_id) if sm is not None else None
        if members is not None:
            return [dict(m, session_id=session_id, aid=m.get("agent_id", "")) for m in members]
        db = self._db()
        if db is None:
            return []
        try:
            return [dict(row) for row in db.get_session_member_list(session_id)]
        except Exception as exc:  # history must never break messaging
            self._count_history_error("get_session_member_list", exc)
            return []

    def close_session(self, session_id):
        """Leave ``session_id`` and forget it (as 0.1.99); False if unknown. While offline it is only forgotten
        (it is not re-joined at the next online())."""
        sm = self.session_manager
        if sm is None:
            with self._lock:
                known = self._remembered_sessions.pop(session_id, None) is not None
                self._forgotten_sessions.add(session_id)
            return None if known else False
        if not sm.close_session(session_id):
            return False
        return None

    def delete_session(self, session_id):
        """``close_session`` plus deleting the session's local history; the history delete's result."""
        self.close_session(session_id)
        db = self._db()
        if db is None:
            return False
        try:
            return bool(db.delete_session(session_id))
        except Exception as exc:  # history must never break messaging
            self._count_history_error("delete_session", exc)
            return False

    def quick_send_message(self, to_aid: str, message, asnyc_message_result, insert_message: bool = True):
        """Create a "quick session", invite ``to_aid``, send ``message``; the session id.

        If ``asnyc_message_result`` is given it is called (awaited if it returns an awaitable) with the first
        message that arrives in that session, once. Raises ``Exception`` if the session cannot be created.
        """
        session_id = self.create_session("quick session", "")
        if not session_id:
            raise Exception("failed to create session")
        self.invite_member(session_id, to_aid)
        if asnyc_message_result is not None:
            self._one_shot(session_id, asnyc_message_result)
        self.send_message(session_id, [to_aid], message, insert_message=insert_message)
        return session_id

    def _one_shot(self, session_id: str, callback) -> None:
        fired = threading.Event()

        def once(reply):
            if fired.is_set():
                return None
            fired.set()
            self.remove_message_handler(once, session_id)
            return callback(reply)  # an awaitable is awaited by the dispatcher

        self.add_message_handler(once, session_id)

    def quick_send_message_content(self, to_aid: str, message_content: str, asnyc_message_result):
        """As :meth:`quick_send_message` with one ``content`` block; returns ``send_message_content``'s result."""
        session_id = self.create_session("quick session", "")
        if not session_id:
            raise Exception("failed to create session")
        self.invite_member(session_id, to_aid)
        if asnyc_message_result is not None:
            self._one_shot(session_id, asnyc_message_result)
        return self.send_message_content(session_id, [to_aid], message_content)

    # The names agents in the wild call (three s's; api.md §13).
    quick_send_messsage = quick_send_message
    quick_send_messsage_content = quick_send_message_content

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

        Blocks until the stream ends (``event: done``), with an overall deadline (``STREAM_PULL_TIMEOUTS``).
        Returns ``""`` for a message that is not a stream announce, and on errors (logged and published), and
        when the agent goes offline meanwhile.
        """
        import requests

        from agentcp.base.http import resolve_verify
        from agentcp.msg.stream_client import StreamError, signed_url

        if not isinstance(message_data, dict):
            return ""
        blocks = self.get_content_array_from_message(message_data)
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        pull_url = first.get("content")
        if first.get("type") != "text/event-stream" or not isinstance(pull_url, str) or not pull_url:
            return ""
        sm = self.session_manager
        client = sm.message_client_map.get(sm.server_url) if sm is not None else None
        auth = client.auth_client if client is not None else None
        url = signed_url(pull_url, self.id, auth.signature if auth is not None else None)
        shown = pull_url.split("?", 1)[0]
        connect, between, overall = self.STREAM_PULL_TIMEOUTS
        deadline = time.monotonic() + overall
        work = self._stream_work()
        parts: List[str] = []
        done = False
        error = ""
        try:
            with requests.get(url, stream=True, timeout=(connect, between), headers={"Accept": "text/event-stream"},
                              verify=resolve_verify(auth.verify if auth is not None else None)) as resp:
                with work.lock:
                    work.responses.add(resp)
                try:
                    if resp.status_code != 200:
                        error = f"HTTP {resp.status_code}"
                    else:
                        for raw in resp.iter_lines():
                            if work.closing or time.monotonic() > deadline:
                                error = "agent went offline" if work.closing else f"no end within {overall:.0f} s"
                                break
                            if _sse_line(raw.decode("utf-8", "replace"), parts):
                                done = True
                                break
                        else:
                            error = "the stream ended without 'event: done'"
                finally:
                    with work.lock:
                        work.responses.discard(resp)
        except (requests.RequestException, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if done:
            return "".join(parts)
        from agentcp.msg.message_client import redact

        text = redact(f"{self.id}: pulling the stream {shown} failed after {len(parts)} chunk(s): {error}",
                      auth.signature if auth is not None else None)
        _log.warning("%s", text)
        err = StreamError(text)
        err.agent_id = self.id
        self._publish(err)
        return ""

    def _on_stream_announce(self, data: dict, block: dict) -> None:
        """Dispatcher worker: a stream announce runs its handlers on a thread of its own, as in 0.1.99 (they block
        while pulling the stream), with a private event loop, tracked and joined by ``offline()``."""
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

        def run() -> None:
            try:
                if not dispatcher.stopped:
                    _run_stream_handlers(dispatcher, calls, self.HANDLER_TIMEOUT)
            finally:
                with work.lock:
                    work.threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"agentcp-stream-handler-{self.id}", daemon=True)
        with work.lock:
            work.threads.add(thread)
        thread.start()

    def _stop_stream_work(self, timeout: float) -> None:
        """``offline()``: abort stream pulls in progress and join the stream handler threads (bounded)."""
        work = self.__dict__.get("_stream_work_state")
        if work is None:
            return
        with work.lock:
            work.closing = True
            responses = list(work.responses)
            threads = list(work.threads)
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


class _StreamWork:
    """Stream handler threads and pulls in progress of one agent (so ``offline()`` can end and join them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: set = set()
        self.responses: set = set()
        self.closing = False


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
            delta = first.get("delta") if isinstance(first.get("delta"), dict) else {}
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
