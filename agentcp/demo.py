"""``python -m agentcp demo``: watch a client heal every fault, live.

Starts an embedded local ACP network (:class:`~agentcp.testing.FakeACPServer` with its access point and CA),
creates an identity in a temporary folder with ``AgentCP.create_aid``, brings it online with ``AgentID.online()``,
then injects the faults one by one and prints a timeline of what the client noticed
and when (milliseconds since the fault), as the server saw it. Exits 0 when every fault healed.

The fault scenarios live here as plain functions so that ``benchmarks/fault_matrix.py`` measures exactly what
the demo shows.
"""
from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TextIO, Tuple

from agentcp.heartbeat.heartbeat_client import HeartbeatClient
from agentcp.heartbeat.liveness import Event
from agentcp.msg.message_serialize import HeartbeatMessageResp, to_bytes

if TYPE_CHECKING:  # the testing package loads only when the demo runs
    from agentcp.testing.fake_server import FakeACPServer

DEMO_AID = "demo.agentcp.local"


@dataclass
class FaultResult:
    """What one fault did, in seconds since it was injected (None: did not happen)."""

    name: str
    detected: Optional[float] = None
    signed_in: Optional[float] = None
    recovered: Optional[float] = None  # first beat the server accepted after the fault (or after it ended)
    healed: bool = False
    extra: Dict[str, float] = field(default_factory=dict)


class Watcher:
    """Collects the client's timeline events (pushed by ``on_event``) for one fault at a time."""

    def __init__(self, client: HeartbeatClient) -> None:
        self.events: "queue.Queue[Event]" = queue.Queue()
        client.on_event = self.events.put

    def drain(self) -> List[Event]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def until(self, kind: str, timeout: float) -> List[Event]:
        """Events up to and including the first of ``kind`` (or all that came within ``timeout``)."""
        out: List[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out + self.drain()
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                return out
            out.append(event)
            if event.kind == kind:
                return out + self.drain()


def _first_accepted_after(server: "FakeACPServer", aid: str, since: float, timeout: float) -> Optional[float]:
    """Monotonic time of the first heartbeat the server accepted after ``since`` (waits up to ``timeout``)."""
    try:
        return server.wait_for_beats(1, agent_id=aid, valid=True, timeout=timeout, since=since)[0].t
    except TimeoutError:
        return None


def _collect(result: FaultResult, watcher: Watcher, t0: float, events: List[Event]) -> None:
    for ev in events:
        if ev.t < t0:
            continue
        if ev.kind == "fault" and result.detected is None:
            result.detected = ev.t - t0
        elif ev.kind == "signed_in" and result.signed_in is None:
            result.signed_in = ev.t - t0


def run_fault(
    name: str,
    server: "FakeACPServer",
    client: HeartbeatClient,
    watcher: Watcher,
    inject: Callable[[], Any],
    *,
    heal: Optional[Callable[[], None]] = None,
    heal_after: float = 0.0,
    expect_fault: bool = True,
    timeout: float = 30.0,
    printer: Optional[Callable[[str], None]] = None,
) -> FaultResult:
    """Inject a fault, optionally undo it after ``heal_after`` s, and measure detection and recovery."""
    watcher.drain()
    result = FaultResult(name)
    t0 = time.monotonic()
    inject()
    healed_at = t0
    if heal is not None:
        time.sleep(max(0.0, t0 + heal_after - time.monotonic()))
        heal()
        healed_at = time.monotonic()
        result.extra["healed_at"] = healed_at - t0
    if expect_fault:
        accepted = _first_accepted_after(server, client.agent_id, healed_at, timeout)
        result.recovered = None if accepted is None else accepted - t0
        # Timeline events reach us on the client's callback thread, a hair after the server saw the beat.
        events = watcher.until("recovered", 2.0) if accepted is not None else watcher.drain()
    else:
        time.sleep(min(timeout, 1.0))
        events = watcher.drain()
    _collect(result, watcher, t0, events)
    if expect_fault:
        result.healed = result.recovered is not None and client.state == "online"
    else:
        result.healed = result.detected is None and client.state == "online"
    if printer is not None:
        printer(format_result(result))
    return result


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def format_result(r: FaultResult) -> str:
    status = "healed" if r.healed else "NOT HEALED"
    return (f"  {r.name:<44} detected {_ms(r.detected):>9}  re-signed-in {_ms(r.signed_in):>9}  "
            f"recovered {_ms(r.recovered):>9}  {status}")


def _close_under(client: HeartbeatClient) -> None:
    """Close the client's heartbeat socket behind its back (a fault the client must notice)."""
    sock = client.udp_socket
    if sock is not None:
        sock.close()


def spoofed_401(server: "FakeACPServer", client: HeartbeatClient, count: int = 10) -> Callable[[], None]:
    def inject() -> None:
        resp = HeartbeatMessageResp()
        resp.NextBeat = 401
        for _ in range(count):
            server.inject(to_bytes(resp), ("127.0.0.1", client.local_port), spoof=True)
    return inject


def garbage(server: "FakeACPServer", client: HeartbeatClient, count: int = 100) -> Callable[[], None]:
    def inject() -> None:
        for i in range(count):
            server.inject(bytes([0, 1, 1, 2, 0]) + b"\xff" * (i % 7), ("127.0.0.1", client.local_port),
                          spoof=False)
    return inject


def run_demo(interval: float = 1.0, out: TextIO = sys.stdout, quick: bool = False) -> int:
    """Create an identity and bring it online through AgentCP/AgentID, as an agent script would, then break
    things one by one and print how the heartbeat healed each fault.

    ``quick=True`` skips the two faults that take seconds by design (a silent server, sign-in down for 3 s):
    a smoke test of an installed package in a few seconds."""
    from agentcp import AgentCP
    from agentcp.testing.devserver import start_dev_network

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    started = time.monotonic()
    # The real-world floor is 5 s; a lower floor (1 s by default) keeps the demo short. Restored at the end.
    saved_floor = HeartbeatClient.MIN_INTERVAL
    HeartbeatClient.MIN_INTERVAL = min(interval, saved_floor)
    server, access_point = start_dev_network(port=0, next_beat_ms=int(interval * 1000), signed=True,
                                             open_network=False)
    aid = None
    results: List[FaultResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="agentcp-demo-") as tmp:
            say(f"agentcp demo: local ACP network at {access_point.url} (heartbeat UDP {server.udp_port}), "
                f"NextBeat {interval * 1000:.0f} ms")
            acp = AgentCP(tmp, seed_password="demo seed", ap_url=access_point.url, run_proxy=False)
            agent = aid = acp.create_aid("agentcp.local", "demo")
            if agent is None:
                say("could not create the demo identity (see the log above)")
                return 1
            say(f"created identity {agent.id} in {tmp}")
            agent.online()
            client = agent.heartbeat_client
            if not agent.is_online_success or client is None or not client.wait_online(10):
                say(f"agent did not come online: {agent.status()!r}")
                return 1
            say(f"online after {1000 * (time.monotonic() - started):.0f} ms; injecting faults one by one\n")
            watcher = Watcher(client)
            # (slow, fault): --quick skips the slow ones (each waits for a timeout by design).
            faults: List[Tuple[bool, Callable[[], FaultResult]]] = [
                (False, lambda: run_fault("server restart (sessions lost, 401)", server, client, watcher,
                                          server.restart, printer=say)),
                (False, lambda: run_fault("server back on a new UDP port", server, client, watcher,
                                          lambda: server.restart(move_port=True), printer=say)),
                (False, lambda: run_fault("client socket closed under it", server, client, watcher,
                                          lambda: _close_under(client), printer=say)),
                (True, lambda: run_fault("server silent for a while", server, client, watcher, server.go_silent,
                                         heal=server.resume, heal_after=interval + 4 * client.REPLY_TIMEOUT,
                                         printer=say)),
                (True, lambda: run_fault("sign-in down 3 s + restart", server, client, watcher,
                                         lambda: (server.set_sign_in("503"), server.restart()),
                                         heal=lambda: server.set_sign_in("ok"), heal_after=3.0, printer=say)),
                (False, lambda: run_fault("10 spoofed 401s from another address", server, client, watcher,
                                          spoofed_401(server, client), expect_fault=False, printer=say)),
                (False, lambda: run_fault("100 garbage datagrams", server, client, watcher,
                                          garbage(server, client), expect_fault=False, printer=say)),
            ]
            results = [run() for slow, run in faults if not (quick and slow)]
            stats = client.stats()
            t0 = time.monotonic()
            agent.offline()
            aid = None
            say(f"\noffline() took {1000 * (time.monotonic() - t0):.1f} ms (every thread joined); "
                f"beats sent {stats['beats_sent']}, reconnects {stats['reconnects']}, "
                f"malformed datagrams dropped {stats['malformed']}")
    finally:
        if aid is not None:
            aid.offline()
        server.stop()
        HeartbeatClient.MIN_INTERVAL = saved_floor
    failed = [r.name for r in results if not r.healed]
    if failed:
        say("NOT healed: " + ", ".join(failed))
        return 1
    say(f"all {len(results)} faults healed in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentcp demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0,
                        help="server NextBeat in seconds (real servers use 5; default 1 keeps the demo short)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the slow faults (silent server, sign-in down): a smoke test in a few seconds")
    args = parser.parse_args(argv)
    return run_demo(interval=args.interval, quick=args.quick)
