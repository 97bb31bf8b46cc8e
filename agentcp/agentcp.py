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
import json
import logging
import os
import re
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, cast

from agentcp.ap.ap_client import ApClient, ap_api_base
from agentcp.base.backoff import PERMANENT_ERROR_BACKOFF, RECONNECT_BACKOFF, Backoff
from agentcp.base.html_util import parse_html
from agentcp.base.names import check_aid, is_valid_aid, resolve_inside
from agentcp.base.http import release_idle_threads
from agentcp.base.shared_timer import TIMER, TimerHandle
from agentcp.base.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from agentcp.base.trust import RefusalLog, TrustPolicy, UntrustedHostError
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
from agentcp.context import ErrorContext, exceptions  # noqa: F401  (re-exported, as 0.1.99 did)
from agentcp.context.exceptions import AuthError, CredentialError, SDKError  # noqa: F401
from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.agent_files import FileClient, FilesMixin  # noqa: F401  (FileClient re-exported, as 0.1.99 did)
from agentcp.agent_messaging import MessagingMixin
from agentcp.agent_streams import StreamsMixin
from agentcp.history import HistoryMixin
from agentcp import llm_server
from agentcp.llm_server import (  # noqa: F401  (re-exported, as 0.1.99 did)
    add_llm_aid, add_llm_api_key, get_base_url, get_llm_api_key, llm_request, llm_server_is_running, run_server,
    shutdown_server,
)
from agentcp.message import AgentInstructionBlock, AssistantMessageBlock  # noqa: F401
from agentcp.msg.dispatcher import Dispatcher
from agentcp.msg.message_client import MessageClientConfig
from agentcp.msg.session_manager import SessionManager  # noqa: F401  (re-exported, as 0.1.99 did)

_log = logging.getLogger("agentcp.agent")

__all__ = ["AgentCP", "AgentID", "AP_URL_ENV"]

#: Environment variable that points every AID at one access point, e.g. ``http://127.0.0.1:8765``.
AP_URL_ENV = "AGENTCP_AP_URL"


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


class _Stopping:
    """What ``offline()`` detached from the agent and still has to join and close."""

    __slots__ = ("thread", "sm", "dispatcher", "hb", "ap")

    def __init__(self, thread, sm, dispatcher, hb, ap) -> None:
        self.thread, self.sm, self.dispatcher, self.hb, self.ap = thread, sm, dispatcher, hb, ap


def _in_sdk_thread() -> bool:
    """True on one of the SDK's own threads (handler workers and their asyncio loop, heartbeat callbacks, stream
    handlers, connection threads): every thread the SDK starts is named ``agentcp-...``. A callback running there
    must not wait in ``offline()`` for threads that wait for it."""
    return threading.current_thread().name.startswith("agentcp-")


def _is_guest_request(agent_name: str) -> bool:
    # 0.1.99 treated any name starting with "guest" (e.g. "guesthouse") as a guest request (D-A2).
    return agent_name == "guest" or re.match(r"^guest[_\-.0-9]", agent_name) is not None


# ==================================================================================================================
# _AgentCP: shutdown flag, signals, serve_forever
# ==================================================================================================================


class _AgentCP(abc.ABC):  # noqa: B024 (0.1.99: an abc.ABC base without abstract methods; kept for isinstance)
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
        if run_proxy:
            try:
                self.run_llm_proxy(port)
            except OSError as exc:  # the agents work without it; get_llm_url() says it is not running
                _log.error("the local LLM gateway could not listen on 127.0.0.1:%s: %s", port, exc)

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
        check_aid(aid, field="agent_id")  # a DNS name: never a path outside the identity folder (trust.md rule 5)
        if len(aid.split(".")) < 3:
            raise RuntimeError(f"加载aid错误,请检查传入aid (AID load error: {aid!r} needs at least 3 labels)")
        return self._use_ca(self._entry_url(aid))

    # --- identities ---------------------------------------------------------------------------------------------
    def load_aid(self, agent_id: str) -> Optional["AgentID"]:
        """The stored identity ``agent_id`` as an :class:`AgentID` (not online), or ``None`` if it is missing or
        its certificate expired and cannot be renewed. A valid stored certificate needs no network.

        Raises ``TypeError`` for a non-string, ``ValueError`` for an AID that is not a DNS name (``/``, ``..``,
        NUL, ... — it could name a path outside the identity folder), ``RuntimeError`` for an AID with fewer than 3
        labels and :class:`CredentialError` when the seed password is wrong (the key cannot be decrypted), the key
        file is damaged, or key and certificate do not match.
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

    def create_aid(self, ap: str, agent_name: str) -> Optional["AgentID"]:
        """Create ``<agent_name>.<last two labels of ap>`` with the CA (or load it if it exists).

        Raises ``RuntimeError`` with the CA's reason on refusal or when the CA is unreachable, and ``ValueError``
        (before any network traffic) for a name that is not a DNS name: empty, ``/``, ``\\``, NUL, ``..``, labels
        other than ``a-z``, ``0-9`` and ``-`` (upper case is folded to lower case for a new identity; an identity
        already on disk is loaded under the name it was stored with).
        """
        if not isinstance(agent_name, str):
            raise TypeError(f"agent_name must be a string, got {type(agent_name).__name__}")
        if not isinstance(ap, str):
            raise TypeError(f"ap must be a domain string like 'agentunion.cn', got {type(ap).__name__}")
        if _is_guest_request(agent_name):
            return self.get_guest_aid(ap)
        check_aid(agent_name, field="agent_name")  # path-safe; a new identity is held to the strict rule below
        domain = _last_two_labels(ap)
        aid = agent_name if agent_name.endswith("." + domain) else f"{agent_name}.{domain}"
        store = self.store
        if not (is_valid_aid(aid) and store.exists(aid) and store.has_cert(aid) and store.has_key(aid)):
            aid = check_aid(aid, field="new AID", strict=True)  # a new identity: trust.md rule 5 exactly
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

    def get_guest_aid(self, ep_url: str) -> Optional["AgentID"]:
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

    def save_aid_info(self, agent_id: str, seed_password: str, private_key: str, cert: str) -> None:
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

    def get_aid(self, aid_str: str) -> Optional["AgentID"]:
        return self.aid_map.get(aid_str)

    # --- the local LLM gateway (agentcp.llm_server) --------------------------------------------------------------
    def run_llm_proxy(self, port) -> None:
        """Start the process's OpenAI-compatible gateway on 127.0.0.1:``port`` (0: free) unless it runs."""
        llm_server.run_server(self.debug, port, owner=self)

    def get_llm_url(self, target_aid: str) -> str:
        """``http://127.0.0.1:<port>/<target_aid>``: the ``base_url`` of an OpenAI client for that agent."""
        return llm_server.get_base_url(None, target_aid)

    def get_llm_api_key(self, aid_str: str) -> str:
        """The bearer key with which a client calls as ``aid_str`` (made on first request)."""
        return llm_server.get_llm_api_key(aid_str)

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
        llm_server.release_server(self)
        return None


# ==================================================================================================================
# AgentID
# ==================================================================================================================


class AgentID(HistoryMixin, MessagingMixin, StreamsMixin, FilesMixin):
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
        self.heartbeat_client: Optional[HeartbeatClient] = None
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
        self._renewal: Optional[TimerHandle] = None  # the next certificate check on the shared timer
        self._online_since: Optional[float] = None
        self.on_state_change: Optional[Callable[[str, str], Any]] = None
        self.message_config: Optional[MessageClientConfig] = None
        self._dispatcher: Optional[Dispatcher] = None
        self._msg_counters: Dict[str, int] = {"history_errors": 0, "send_failures": 0, "received": 0}
        self._msg_logged: set = set()
        # Sessions of the last SessionManager, re-joined by the next online() (offline() keeps them here).
        self._remembered_sessions: Dict[str, Any] = {}
        #: The SessionManager offline() is stopping (running handlers may still reply through it).
        self._retiring_sm: Any = None
        self._forgotten_sessions: set = set()
        # Notified on every phase change and heartbeat state change: wait_online() sleeps on it (no polling).
        # Innermost lock: it is taken with self._lock held, and never the other way round.
        self._state_cond = threading.Condition(threading.Lock())
        #: Bounds on what servers and peers can make this agent hold or wait for (trust.md rule 4).
        self.limits: Limits = DEFAULT_LIMITS
        # Secrets refused to hosts outside the trust domain, by purpose (trust.md rule 1), and bounds crossed.
        self._trust_refusals = RefusalLog()
        self._limit_crossings: Dict[str, int] = {}
        # Access point clients of connection attempts in flight (offline() aborts them), and the threads that
        # finish an offline() called from a callback (joined by the next online()/offline()).
        self._connecting_aps: set = set()
        self._reapers: List[threading.Thread] = []

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

    # --- trust and bounds (trust.md) ----------------------------------------------------------------------------
    @property
    def trust(self) -> TrustPolicy:
        """The hosts this agent may send secrets to: its access point's domain, the servers of its config and
        ``AGENTCP_TRUSTED_HOSTS`` (trust.md §2). Recomputed from the current config (cheap, pure)."""
        with self._lock:
            config_hosts = [h for h in (self.heartbeat_server, self.message_server) if h]
        return TrustPolicy.from_ap_url(self._entry_url(), config_hosts)

    def _check_trusted(self, url: str, purpose: str) -> bool:
        """True if secrets may go to ``url``; otherwise the refusal is counted, logged once per host, published
        through ``ErrorContext``, and False is returned."""
        try:
            self.trust.check(url, purpose)
            return True
        except UntrustedHostError as err:
            self._trust_refusals.refuse(err)
            publish(err, self.id)
            return False

    def _limit_crossed(self, err: LimitExceeded) -> None:
        """Count one crossing of a bound (trust.md rule 4) for ``status()``; log it and publish it."""
        with self._lock:
            self._limit_crossings[err.bound] = self._limit_crossings.get(err.bound, 0) + 1
        _log.warning("%s: %s", self.id, err.message)
        publish(err, self.id)

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
            self._join_reapers()
            llm_server.add_llm_aid(self)  # a caller of the local LLM gateway (api.md §3.9)
            with self._lock:
                running = self._conn_thread is not None and self._conn_thread.is_alive()
                if self._phase == "started":  # online (the connect thread ended; renewal runs on the timer)
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
                        target=self._run, args=(self._stop,), name=f"agentcp-online-{self.id}", daemon=True
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
        """Stop everything ``online()`` started, join its threads and sign out. Idempotent; never raises.

        Called from a callback of the SDK (a sync or async message handler, a stream handler, ``on_state_change``,
        a heartbeat ``on_event``: any of the SDK's own threads), it returns at once instead of waiting for the
        callback that called it: the stop takes effect now (no new handler or callback starts, a request in
        flight is aborted) and the joins and sign-outs finish on a short-lived reaper thread after the callback
        returns. That thread is joined by the next ``online()``/``offline()`` of an application thread, or at
        interpreter exit. No callback runs after the shutdown has completed.
        """
        try:
            stopping = self._halt()
            if _in_sdk_thread():
                reaper = threading.Thread(target=self._finish_offline, args=(stopping,),
                                          name=f"agentcp-offline-{self.id}")  # not a daemon: joined at exit
                with self._lock:
                    self._reapers = [t for t in self._reapers if t.is_alive()] + [reaper]
                reaper.start()
                return
            self._join_reapers()
            self._finish_offline(stopping)
        except Exception:
            _log.exception("offline() of %s failed", self.id)

    def _join_reapers(self) -> None:
        """Wait for the shutdowns that ``offline()`` left to reaper threads (not from an SDK thread: a callback
        that called ``offline()`` and then ``online()`` must not wait for its own reaper)."""
        if _in_sdk_thread():
            with self._lock:
                self._reapers = [t for t in self._reapers if t.is_alive()]
            return
        with self._lock:
            reapers, self._reapers = self._reapers, []
        for reaper in reapers:
            reaper.join()

    def _halt(self) -> "_Stopping":
        """The non-blocking half of ``offline()``: stop, detach every component, abort requests in flight, and
        make sure no new handler or heartbeat callback starts."""
        with self._lock:
            self._stop.set()
            self._wake.set()
            # Components are installed under this lock only while the stop is not set, so after it they are final.
            thread, self._conn_thread = self._conn_thread, None
            renewal, self._renewal = self._renewal, None
            connecting, self._connecting_aps = list(self._connecting_aps), set()
            sm, self.session_manager = self.session_manager, None
            if sm is not None:
                self._remember_sessions(sm)
            self._retiring_sm = sm  # sends of handlers still running go out through it until it stops
            dispatcher, self._dispatcher = self._dispatcher, None
            hb, self.heartbeat_client = self.heartbeat_client, None
            ap, self.ap_client = self.ap_client, None
            self.is_online_success = False
            self._online_since = None
            self._set_phase("offline")
        self._attempted.set()  # an online() waiting for the first attempt returns now
        for client in connecting + ([ap] if ap is not None else []):
            client.abort()  # an access point that trickles its reply must not hold offline() (trust.md rule 4)
        TIMER.cancel(renewal)  # no certificate check starts after this
        abort_ca = getattr(self.ca_client, "abort", None)
        if (thread is not None or renewal is not None) and abort_ca is not None:
            abort_ca()  # a certificate renewal in flight on the connect thread or the shared timer
        llm_server.agent_offline(self)  # its LLM gateway requests in flight answer 503 now
        if dispatcher is not None:
            dispatcher.halt()
        if hb is not None:
            hb.halt()
        return _Stopping(thread, sm, dispatcher, hb, ap)

    def _finish_offline(self, stopping: "_Stopping") -> None:
        """The blocking half of ``offline()``: join what ``_halt`` stopped, close connections, sign out."""
        try:
            thread = stopping.thread
            if thread is not None and thread is not threading.current_thread():
                # It wakes on the stop at every wait, and its HTTP requests were aborted (or end at their deadline).
                thread.join()
            # Handlers first: running ones finish (and may still reply); then the message connection closes.
            if stopping.dispatcher is not None:
                stopping.dispatcher.stop(self.JOIN_TIMEOUT)
            self._stop_stream_work(self.JOIN_TIMEOUT)  # stream handlers and pulls (their own threads)
            sm = stopping.sm
            try:
                if sm is not None:
                    sm.stop()
            finally:
                with self._lock:
                    if self._retiring_sm is sm:
                        self._retiring_sm = None
            self._flush_history()  # messages sent and received up to now are on disk when offline() returns
            TIMER.join_if_idle()  # the shared timer thread ends with the last online agent
            hb = stopping.hb
            if hb is not None:
                hb.offline()
                hb.sign_out()
            ap = stopping.ap
            if ap is not None:
                ap.sign_out()
                ap.auth_client.close()
            release_idle_threads()
        except Exception:
            _log.exception("offline() of %s failed", self.id)

    def status(self) -> Dict[str, Any]:
        """A snapshot: ``state`` (offline/connecting/online/reconnecting/stopped), access point and heartbeat.

        Also ``trust`` (secrets refused to untrusted hosts by purpose, bounds crossed) and ``server_auth`` (how
        each server signed in to proved itself, by URL: ``verified``, ``unauthenticated``, ``host-mismatch``).
        """
        with self._lock:
            hb = self.heartbeat_client
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
        with self._lock:
            crossings = dict(self._limit_crossings)
        snap["trust"] = {"refused": self._trust_refusals.snapshot(), "limits_crossed": crossings}
        snap["server_auth"] = self._server_auth_states(sm)
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

    def _server_auth_states(self, sm) -> Dict[str, Optional[str]]:
        """How each server this agent signed in to proved itself (trust.md rule 3), by server URL: "verified",
        "unauthenticated" (no signature), "host-mismatch" (a trusted certificate not naming it) or None."""
        with self._lock:
            clients = [self.ap_client, self.heartbeat_client]
        auths = [getattr(c, "auth_client", None) for c in clients]
        if sm is not None:
            with sm.lock:
                auths += [getattr(c, "auth_client", None) for c in sm.message_client_map.values()]
        return {a.server_url: a.server_auth_state for a in auths if a is not None and getattr(a, "server_url", None)}

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

    def _run(self, stop: threading.Event) -> None:
        try:
            self._connect_loop(stop)
        finally:
            if stop is self._stop:  # a loop that offline() already replaced must not wake the next online()
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
                if stop.is_set():  # offline() aborted the attempt: not a failure of the access point
                    _log.debug("%s: connection attempt ended by offline() (%s)", self.id, exc)
                    break
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
        # Connected (or stopped): the certificate is looked after on the shared timer until offline(); this
        # thread ends here (one thread per agent less while it is online).
        if not stop.is_set():
            self._renewal_tick(stop)

    def _renewal_tick(self, stop: threading.Event) -> None:
        """On the shared timer (first from the connect thread): renew the certificate if due, schedule the next
        check unless ``offline()`` began."""
        self._maybe_renew()
        with self._lock:
            if stop.is_set() or self._stop is not stop:
                return
            self._renewal = TIMER.call_later(self.RENEWAL_CHECK_INTERVAL, lambda: self._renewal_tick(stop))

    def _connect_once(self, stop: threading.Event) -> None:
        with self._lock:
            self._ap_attempts += 1
        certs = self._certs_dir()
        ap = self._new_ap_client(certs)
        with self._lock:
            if stop.is_set():
                return
            self._connecting_aps.add(ap)  # offline() aborts it while it signs in or fetches the config
        try:
            ap.connect()
        except BaseException:
            ap.auth_client.close()
            raise
        finally:
            with self._lock:
                self._connecting_aps.discard(ap)
        with self._lock:
            if stop.is_set():
                ap.sign_out()
                ap.auth_client.close()
                return
            old_ap, self.ap_client = self.ap_client, ap
            self.heartbeat_server = ap.heartbeat_server
            self.message_server = ap.message_server
            hb = HeartbeatClient(self.id, ap.heartbeat_server, certs, self.seed_password)
            hb.auth_client.max_reply = self.limits.http_reply_max
            hb.auth_client.on_limit = self._limit_crossed
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
        """A UDP invite from the heartbeat: join the session (0.1.99 auto-accepted every invite).

        A datagram is forgeable, so it is only a hint (trust.md §1): it is acted on only if that sends nothing
        secret to anyone new. An invite without a session id is ignored; one naming a message server outside the
        trust domain is refused (counted under ``status()["trust"]["refused"]["invite"]``), so the agent never
        signs in there; one that would need more than ``limits.message_clients_max`` message clients is refused
        and counted under ``limits_crossed``. Nothing refused is retried.
        """
        session_id = str(getattr(invite, "SessionId", "") or "")
        if not session_id:
            _log.info("%s: UDP invite without a session id ignored", self.id)
            return
        sm = self.session_manager
        if sm is None:
            _log.warning("%s: invite to session %s arrived while messaging is not running; ignored", self.id,
                         session_id)
            return
        try:
            session = sm.join_session(invite)
        except (UntrustedHostError, LimitExceeded) as exc:  # counted and logged once where it was refused
            _log.debug("%s: invite to session %s refused: %s", self.id, session_id, exc)
            return
        except RuntimeError as exc:  # offline() stopped the session manager while the invite was on its way
            _log.info("%s: invite to session %s ignored: %s", self.id, session_id, exc)
            return
        self._history("create_session", self.id, session.session_id, "", "", "public")

    # --- the local LLM gateway (api.md §3.9) --------------------------------------------------------------------
    def get_llm_url(self, target_aid: str) -> str:
        """``http://127.0.0.1:<port>/<target_aid>``: an OpenAI client's ``base_url`` for that agent."""
        return llm_server.get_base_url(self, target_aid)

    def get_llm_api_key(self) -> str:
        """The bearer key with which OpenAI clients call as this identity (64 hex characters)."""
        llm_server.add_llm_aid(self)
        return llm_server.get_llm_api_key(self.id)

    def add_llm_api_key(self, aid_str: str, llm_api_key: str) -> bool:
        """Accept ``llm_api_key`` as a key of this identity; False if ``aid_str`` is not this identity, or the key
        is unusable (see ``llm_server.add_llm_api_key``)."""
        return aid_str == self.id and llm_server.add_llm_api_key(self, llm_api_key)

    # --- access point -------------------------------------------------------------------------------------------
    def init_ap_client(self) -> None:
        """Create the access point client, sign in and fetch the config (one attempt; failures are logged)."""
        ap = self._new_ap_client(self._certs_dir())
        ap.initialize()
        with self._lock:
            self.ap_client = ap
            if ap.heartbeat_server:
                self.heartbeat_server = ap.heartbeat_server
            if ap.message_server:
                self.message_server = ap.message_server

    def _new_ap_client(self, certs: str) -> ApClient:
        return ApClient(self.id, self._entry_url(), certs, self.seed_password, limits=self.limits,
                        on_limit=self._limit_crossed)

    def _ap(self) -> ApClient:
        if self.ap_client is None:
            self.init_ap_client()
        return cast(ApClient, self.ap_client)  # init_ap_client() always sets it

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
        """Delete ``file_path`` (relative to the public directory, or absolute inside it) locally and on the access
        point. ``ValueError`` for a name outside the public directory once ``..`` and symlinks are resolved (0.1.99
        deleted whatever the name pointed at, including the agent's own key)."""
        path = resolve_inside(self.public_data_path, file_path, field="public file name")
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
