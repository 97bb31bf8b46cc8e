"""Hostile-input attacks of issue 7 owned by "harden" (items 10-13), for ``benchmarks/hostile.py``.

Each attack runs against a local dev network (``agentcp.testing.devserver.start_dev_network``) over real sockets
and returns ``{"attack", "attacker got", "peak memory MB", "recovery s"}``; each takes a few seconds.

    python benchmarks/hostile_harden.py      # runs them all and prints one table
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Tuple

from agentcp import AgentCP
from agentcp.base.backoff import Backoff
from agentcp.msg.message_client import MessageClientConfig
from agentcp.testing.devserver import start_dev_network

MB = 1024 * 1024
FAST = Backoff(base=0.05, cap=0.3)


class _Network:
    """A dev network, a data folder and an AgentCP for one attack; everything is stopped on exit."""

    def __enter__(self) -> "_Network":
        self.server, self.ap = start_dev_network(port=0, next_beat_ms=1000)
        self.tmp = tempfile.mkdtemp(prefix="agentcp-hostile-")
        self.acp = AgentCP(self.tmp, seed_password="bench", run_proxy=False, ap_url=self.ap.url)
        self.agents: List[Any] = []
        return self

    def agent(self, name: str):
        aid = self.acp.create_aid("example.com", name)
        aid.RECONNECT_BACKOFF = FAST
        aid.message_config = MessageClientConfig(ping_interval=0.5, reconnect_backoff=FAST,
                                                 immediate_reconnect_gap=0.0)
        self.agents.append(aid)
        return aid

    def __exit__(self, *exc: Any) -> None:
        for aid in self.agents:
            aid.offline()
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _measure(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """``fn()`` and the peak of Python memory allocated while it ran, in MB (tracemalloc)."""
    tracemalloc.start()
    try:
        result = fn()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak / MB


def _come_back(aid) -> float:
    """Seconds until the agent is online again once the attacker stopped."""
    started = time.monotonic()
    aid.online()
    aid.wait_online(10)
    return time.monotonic() - started


def trickling_ap_during_offline() -> Dict[str, Any]:
    with _Network() as net:
        aid = net.agent("alice")
        net.ap.set_trickle(0.1)  # one byte per 100 ms: no per-read timeout ever fires
        aid.ONLINE_WAIT = 0.5

        def attack() -> float:
            aid.online()  # returns while the sign-in is being trickled
            started = time.monotonic()
            aid.offline()
            return time.monotonic() - started

        took, peak = _measure(attack)
        net.ap.set_trickle(None)
        recovery = _come_back(aid)
        return {"attack": "access point trickles its sign-in reply during offline()",
                "attacker got": f"offline() held {took * 1000:.0f} ms (0.1.99: 38 s)",
                "peak memory MB": round(peak, 1), "recovery s": round(recovery, 2)}


def huge_sign_in_reply() -> Dict[str, Any]:
    with _Network() as net:
        aid = net.agent("alice")
        net.ap.set_oversized_reply(300 * MB)
        aid.ONLINE_WAIT = 5.0

        def attack() -> Dict[str, int]:
            aid.online()  # the first attempt fails at the cap
            return aid.status()["trust"]["limits_crossed"]

        crossed, peak = _measure(attack)
        net.ap.set_oversized_reply(None)
        recovery = _come_back(aid)
        return {"attack": "300 MB sign-in reply from the access point",
                "attacker got": f"1 MiB read, then refused (http_reply_max crossed {crossed.get('http_reply_max', 0)}x;"
                                " 0.1.99: +812 MB)",
                "peak memory MB": round(peak, 1), "recovery s": round(recovery, 2)}


def dotdot_file_name() -> Dict[str, Any]:
    with _Network() as net:
        aid = net.agent("alice")
        key = os.path.join(net.acp.aid_path, aid.id, "private", "certs", f"{aid.id}.key")
        refused = 0

        def attack() -> None:
            nonlocal refused
            for name in (f"../private/certs/{aid.id}.key", key):
                try:
                    aid.delete_public_file(name)
                except ValueError:
                    refused += 1
            os.symlink(key, os.path.join(aid.public_data_path, "innocent.txt"))
            try:
                aid.delete_public_file("innocent.txt")
            except ValueError:
                refused += 1

        _none, peak = _measure(attack)
        recovery = 0.0  # nothing to recover: the agent never stopped working
        got = "nothing: key intact" if os.path.exists(key) else "THE AGENT'S KEY WAS DELETED"
        return {"attack": "delete_public_file('../private/certs/<aid>.key'), absolute path, symlink",
                "attacker got": f"{got} ({refused}/3 refused; 0.1.99: key deleted)",
                "peak memory MB": round(peak, 1), "recovery s": round(recovery, 2)}


def offline_from_async_handler() -> Dict[str, Any]:
    with _Network() as net:
        a, b = net.agent("alice"), net.agent("bob")
        a.online()
        b.online()
        sid = a.create_session("chat", "")
        a.invite_member(sid, b.id)
        joined = time.monotonic() + 5
        while (b.session_manager is None or b.session_manager.get(sid) is None) and time.monotonic() < joined:
            time.sleep(0.01)
        took: List[float] = []
        done = threading.Event()

        async def handler(msg):
            started = time.monotonic()
            b.offline()
            took.append(time.monotonic() - started)
            await asyncio.sleep(0)  # the loop is alive
            done.set()

        b.add_message_handler(handler)

        def attack() -> None:
            a.send_message_content(sid, [b.id], "please stop")
            done.wait(40)

        _none, peak = _measure(attack)
        started = time.monotonic()
        b.offline()  # joins the shutdown the handler left to its reaper
        b.online()
        b.wait_online(10)
        recovery = time.monotonic() - started
        call = f"{took[0] * 1000:.0f} ms" if took else "never returned"
        return {"attack": "peer message whose async handler calls offline()",
                "attacker got": f"offline() returned in {call} (0.1.99-style wait: 30 s, loop frozen)",
                "peak memory MB": round(peak, 1), "recovery s": round(recovery, 2)}


def attacks() -> List[Tuple[str, Callable[[], Dict[str, Any]]]]:
    return [
        ("trickling access point during offline()", trickling_ap_during_offline),
        ("300 MB sign-in reply", huge_sign_in_reply),
        ("../ file name", dotdot_file_name),
        ("offline() from an async handler", offline_from_async_handler),
    ]


def main() -> None:
    rows = [fn() for _name, fn in attacks()]
    keys = ["attack", "attacker got", "peak memory MB", "recovery s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
