"""Hostile-input attacks of issue 7 items 5-9 (the "bounds" part), for ``benchmarks/hostile.py``.

``attacks()`` returns ``[(name, run)]``; each ``run()`` plays one attack against a local dev network (the
devserver's pieces, in this process, with the agent's DEFAULT bounds and timing) and returns
``{"attack", "attacker got", "peak memory MB", "recovery s"}``. Peak memory is the growth of traced Python memory
during the attack, for the whole process: the client *and* the in-process attacker/fake server. Recovery is the
time from the end of the attack to the next normal message delivered (or the call returning). Each attack takes a
few seconds.

    python benchmarks/hostile_bounds.py      # prints the table of these attacks alone
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from agentcp.base.limits import DEFAULT_LIMITS, MiB

Result = Dict[str, Any]


# --- plumbing ----------------------------------------------------------------------------------------------------
class _Net:
    """A dev network (access point, CA, heartbeat, message and stream server) and two agents in one session."""

    def __init__(self, tmp: str) -> None:
        from agentcp import AgentCP
        from agentcp.testing.devserver import start_dev_network

        self.server, self.ap = start_dev_network(port=0)
        self.ms = self.ap.messages
        self.acp = AgentCP(tmp, seed_password="bench", run_proxy=False, ap_url=self.ap.url)
        self.alice = self.acp.create_aid("example.com", "alice")
        self.bob = self.acp.create_aid("example.com", "bob")
        self.sid = ""
        self.at_bob: List[str] = []
        self.cond = threading.Condition()

    def start(self, bob_handler: Optional[Callable[[dict], Any]] = None) -> "_Net":
        for agent in (self.alice, self.bob):
            agent.online()
        self.sid = self.alice.create_session("hostile", "")
        self.alice.invite_member(self.sid, self.bob.id)
        self.ms.wait_for(lambda: self.bob.id in self.ms.members(self.sid), 10)
        self.bob.add_message_handler(bob_handler or self._record)
        return self

    def _record(self, msg: dict) -> None:
        with self.cond:
            self.at_bob.append(str(self.bob.get_content_from_message(msg)))
            self.cond.notify_all()

    def delivered(self, text: str, timeout: float = 10.0) -> Optional[float]:
        """Send ``text`` alice -> bob (again every second until it arrives); seconds it took, or None."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            self.alice.send_message_content(self.sid, [self.bob.id], text)
            with self.cond:
                if self.cond.wait_for(lambda: text in self.at_bob, min(1.0, max(0.0, deadline - time.monotonic()))):
                    return time.monotonic() - started
        return None

    def stop(self) -> None:
        for agent in (self.alice, self.bob):
            agent.offline()
        self.server.stop()


@contextlib.contextmanager
def _network(bob_handler: Optional[Callable[[dict], Any]] = None) -> Iterator[_Net]:
    with tempfile.TemporaryDirectory() as tmp:
        net = _Net(tmp)
        try:
            yield net.start(bob_handler)
        finally:
            net.stop()


@contextlib.contextmanager
def _peak() -> Iterator[Dict[str, float]]:
    out: Dict[str, float] = {}
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        yield out
    finally:
        out["MB"] = (tracemalloc.get_traced_memory()[1] - base) / MiB
        tracemalloc.stop()


def _row(attack: str, got: str, peak: Dict[str, float], recovery: Optional[float]) -> Result:
    return {"attack": attack, "attacker got": got, "peak memory MB": round(peak.get("MB", 0.0), 1),
            "recovery s": None if recovery is None else round(recovery, 3)}


def _crossed(aid: Any, bound: str) -> int:
    return int(aid.status()["trust"]["limits_crossed"].get(bound, 0))


def _flood_connection(net: _Net, first: bytes, more: bytes, budget: int) -> int:
    conn = net.ms.connection(net.bob.id)
    sent, piece = 0, first
    while sent < budget and net.ms.send_raw(net.bob.id, piece, wait=2.0, connection=conn):
        sent += len(piece)
        piece = more
    return sent


def _closed_1009(net: _Net) -> bool:
    return (net.bob.id, 1009) in net.ms.close_codes


# --- the attacks -------------------------------------------------------------------------------------------------
def surrogate_poison() -> Result:
    """A peer's message id "\\ud800" echoed into a reply's ref_msg_id (issue 7 item 5)."""
    replies: List[Any] = []
    answered = threading.Event()
    with _network() as net:
        def answer(msg: dict) -> None:
            replies.append(net.bob.reply_message(msg, "re"))
            answered.set()

        net.bob.add_message_handler(answer)
        with _peak() as peak:
            net.ms.push(net.bob.id, "session_message", {
                "session_id": net.sid, "message_id": "\ud800", "sender": net.alice.id, "receiver": net.bob.id,
                "ref_msg_id": "", "timestamp": "1",
                "message": json.dumps([{"type": "content", "status": "success", "timestamp": 1, "content": "x"}])})
            answered.wait(5)
            net.bob.remove_message_handler(answer, "")
            net.ms.drop_all()  # a reconnect: nothing poisoned may be resent
            recovery = net.delivered("after the poison")
        failed = bool(replies) and replies[0].failed
        got = ("nothing: that one reply failed at the call (SendResult failed, 'cannot be encoded as UTF-8'); "
               "later messages flow" if failed and recovery is not None else "the agent was silenced")
        return _row("peer message_id '\\ud800' echoed in a reply", got, peak, recovery)


def endless_fragmented_message() -> Result:
    """One text message whose fragments never end, on the message channel (default bound 16 MiB)."""
    from agentcp.testing.message_server import OP_CONT, OP_TEXT, encode_frame

    with _network() as net:
        piece = b"x" * MiB
        with _peak() as peak:
            sent = _flood_connection(net, encode_frame(OP_TEXT, piece, fin=False),
                                     encode_frame(OP_CONT, piece, fin=False), budget=512 * MiB)
            recovery = net.delivered("after the endless message")
        got = (f"a 1009 close after {sent / MiB:.0f} MiB (ws_message_max = {DEFAULT_LIMITS.ws_message_max // MiB} MiB"
               f"), counted {_crossed(net.bob, 'ws_message_max')}x; reconnected"
               if _closed_1009(net) else f"{sent / MiB:.0f} MiB buffered, no close")
        return _row("endless fragmented WebSocket message", got, peak, recovery)


def huge_frame_header() -> Result:
    """A frame header announcing 2^40 bytes on the message channel, then filler."""
    with _network() as net:
        header = bytes([0x81, 127]) + (1 << 40).to_bytes(8, "big")
        with _peak() as peak:
            sent = _flood_connection(net, header, b"\0" * MiB, budget=256 * MiB)
            recovery = net.delivered("after the huge frame")
        got = (f"a 1009 close from the header alone ({sent / MiB:.0f} MiB of filler written before the close was "
               f"seen); reconnected" if _closed_1009(net) else f"{sent / MiB:.0f} MiB buffered, no close")
        return _row("frame header announcing 2^40 bytes", got, peak, recovery)


def far_file_offset() -> Result:
    """A file-stream chunk at offset 0xFFFFFFF0 (announced size 16 bytes)."""
    from agentcp.msg.websocket_file_receiver import download_file_via_websocket
    from agentcp.testing.hostile import HostileServer

    with tempfile.TemporaryDirectory() as tmp, HostileServer("far_offset") as srv, _peak() as peak:
        started = time.monotonic()
        ok = download_file_via_websocket(srv.url, os.path.join(tmp, "f.bin"), timeout=5, file_size=16)
        took = time.monotonic() - started
        left = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp))
    got = ("nothing: the download failed truthfully, no file left" if not ok and left == 0
           else f"download reported {ok}, {left} bytes on disk")
    return _row("file chunk at offset 0xFFFFFFF0", got, peak, took)


def _pull(attack: str, deadline: float) -> Tuple[Any, float, int, Dict[str, float]]:
    """``fetch_stream_message`` of an announce naming a hostile pull server: (text, seconds, bytes sent, peak)."""
    from agentcp.testing.hostile import HostileServer

    with tempfile.TemporaryDirectory() as tmp, HostileServer(attack, interval=0.1) as srv:
        agent = _offline_agent(tmp)
        agent.STREAM_PULL_TIMEOUTS = (5.0, 30.0, deadline)
        with _peak() as peak:
            started = time.monotonic()
            text = agent.fetch_stream_message(_announce(srv.url))
            took = time.monotonic() - started
        return text, took, srv.sent, peak


def trickling_pull() -> Result:
    """A pull server that sends one byte every 100 ms; the deadline is 3 s."""
    text, took, _sent, peak = _pull("trickle", 3.0)
    got = (f"the call returned after {took:.2f} s (deadline 3 s), marked incomplete: {text.error}"
           if not getattr(text, "complete", True) else f"a complete text after {took:.1f} s")
    return _row("trickling stream pull (1 byte / 100 ms)", got, peak, took)


def endless_line_pull() -> Result:
    """A pull server that sends one line without end, as fast as the client reads (default bound 16 MiB)."""
    text, took, sent, peak = _pull("endless_line", 10.0)
    got = (f"the call returned after {sent / MiB:.0f} MiB, marked incomplete (stream_chunk_max)"
           if not getattr(text, "complete", True) else "a complete text")
    return _row("endless line on a stream pull", got, peak, took)


def three_hundred_announces() -> Result:
    """300 stream announces whose handlers block (pool of 8, queue of 64)."""
    release = threading.Event()
    counts = {"max_threads": 0, "calls": 0}
    lock = threading.Lock()

    def blocking(msg: dict) -> None:
        with lock:
            counts["calls"] += 1
            counts["max_threads"] = max(counts["max_threads"], sum(
                1 for t in threading.enumerate() if t.name.startswith("agentcp-stream-handler")))
        release.wait(10)

    with _network(blocking) as net:
        block = [{"type": "text/event-stream", "status": "loading", "timestamp": 1,
                  "content": net.ms.streams.pull_url(net.sid, "none")}]
        with _peak() as peak:
            for _ in range(300):
                net.alice.send_message(net.sid, [net.bob.id], block)
            deadline = time.monotonic() + 10
            while _crossed(net.bob, "announce_queue_max") < 300 - 8 - 64 and time.monotonic() < deadline:
                time.sleep(0.02)
            released = time.monotonic()
            release.set()
            while counts["calls"] < 8 + 64 and time.monotonic() < deadline + 5:
                time.sleep(0.02)
            recovery = time.monotonic() - released
        dropped = _crossed(net.bob, "announce_queue_max")
        return _row("300 stream announces", f"at most {counts['max_threads']} handler threads; {dropped} announces "
                    f"dropped and counted, {counts['calls']} handled", peak, recovery)


def flood_with_slow_handler() -> Result:
    """3,000 messages of 2 KB while the handler is blocked (backlog bound 1,000 messages)."""
    gate = threading.Event()
    got: List[str] = []
    done = threading.Event()
    n = 3000

    def slow(msg: dict) -> None:
        gate.wait(30)
        got.append(str(msg.get("message_id")))
        if len(got) == n:
            done.set()

    with _network(slow) as net:
        with _peak() as peak:
            for i in range(n):
                net.alice.send_message_content(net.sid, [net.bob.id], f"{i} " + "p" * 2000)
            taken = net.bob._msg_counters["received"]
            released = time.monotonic()
            gate.set()
            done.wait(30)
            recovery = time.monotonic() - released
        return _row("flood of 3,000 messages, blocked handler",
                    f"{taken} messages taken off the socket while blocked (bound 1,000); {len(got)}/{n} delivered "
                    f"after, none lost", peak, recovery)


def _offline_agent(tmp: str) -> Any:
    """An agent object that never goes online (a pull needs no connection)."""
    from agentcp import AgentCP
    from agentcp.testing.devserver import start_dev_network

    server, ap = start_dev_network(port=0)
    try:
        acp = AgentCP(tmp, seed_password="bench", run_proxy=False, ap_url=ap.url)
        return acp.create_aid("example.com", "puller")
    finally:
        server.stop()


def _announce(url: str) -> dict:
    return {"message_id": "m", "sender": "peer",
            "message": json.dumps([{"type": "text/event-stream", "content": url}])}


def attacks() -> List[Tuple[str, Callable[[], Result]]]:
    return [
        ("surrogate poison", surrogate_poison),
        ("endless fragmented message", endless_fragmented_message),
        ("2^40 frame header", huge_frame_header),
        ("far file offset", far_file_offset),
        ("trickling pull", trickling_pull),
        ("endless line pull", endless_line_pull),
        ("300 announces", three_hundred_announces),
        ("flood with a slow handler", flood_with_slow_handler),
    ]


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    print("| attack | what the attacker got | peak memory MB | recovery s |\n|---|---|---|---|")
    for _name, run in attacks():
        r = run()
        print(f"| {r['attack']} | {r['attacker got']} | {r['peak memory MB']} | {r['recovery s']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
