"""Messaging benchmark: latency, throughput, healing after drops, dead-connection detection, loss and duplicates.

Everything runs in this process over loopback: the dev network (FakeACPServer + AccessPoint + message server, the
same as ``python -m agentcp devserver``) and two agents built with the public 0.1.99 API (``AgentCP``,
``create_aid``, ``online``, ``@message_handler``, ``send_message_content``, ``reply_message``). Bounded in count and
time (about 20-40 s). Prints one table, each figure beside its target; exit status 1 if a target is missed.

    python benchmarks/messaging.py                 # defaults below
    python benchmarks/messaging.py --rtt 2000 --messages 1000 --drops 5
    python benchmarks/messaging.py --vs-0199       # ours beside the published 0.1.99 (see bench_vs_0199)
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from agentcp import AgentCP, AgentID

DOMAIN = "bench.local"
SEED = "bench"


# --- results table ---------------------------------------------------------------------------------------------
class Table:
    """Collects ``(figure, measured, target, ok)`` rows and prints them as they come and at the end."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, str, str, Optional[bool]]] = []

    def add(self, figure: str, measured: str, target: str = "", ok: Optional[bool] = None) -> None:
        self.rows.append((figure, measured, target, ok))
        mark = {True: "ok  ", False: "MISS", None: "    "}[ok]
        print(f"  {mark} {figure:<52} {measured:>22}   {('target ' + target) if target else ''}", flush=True)

    def render(self) -> str:
        lines = ["| figure | measured | target | |", "|---|---:|---|---|"]
        for figure, measured, target, ok in self.rows:
            lines.append(f"| {figure} | {measured} | {target} | {'' if ok is None else ('ok' if ok else 'MISS')} |")
        return "\n".join(lines)

    @property
    def missed(self) -> List[str]:
        return [r[0] for r in self.rows if r[3] is False]


def pct(values: List[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --- the two agents --------------------------------------------------------------------------------------------
class Pair:
    """Agent ``alice`` talks to agent ``bob`` in one session; bob echoes or records, alice collects replies."""

    def __init__(self, data: str, ap_url: str) -> None:
        self.acp = AgentCP(data, seed_password=SEED, ap_url=ap_url)
        self.alice: AgentID = self.acp.create_aid(DOMAIN, "alice")
        self.bob: AgentID = self.acp.create_aid(DOMAIN, "bob")
        self.echo = True
        self.lock = threading.Lock()
        self.received: List[Tuple[float, str]] = []  # at bob: (monotonic time, text)
        self.replies: "queue.Queue[Tuple[float, str]]" = queue.Queue()  # at alice
        self.session_id = ""

        @self.bob.message_handler()
        def bob_handler(msg: Dict[str, Any]) -> None:
            if msg.get("sender") == self.bob.id:
                return
            text = self.bob.get_content_from_message(msg)
            if text is None:
                return
            with self.lock:
                self.received.append((time.monotonic(), text))
            if self.echo:
                self.bob.reply_message(msg, text)

        @self.alice.message_handler()
        def alice_handler(msg: Dict[str, Any]) -> None:
            if msg.get("sender") == self.alice.id:
                return
            text = self.alice.get_content_from_message(msg)
            if text is not None:
                self.replies.put((time.monotonic(), text))

    def start(self) -> None:
        for agent in (self.alice, self.bob):
            agent.online()
            if not agent.is_online_success:
                raise SystemExit(f"{agent.id} did not come online: {agent.status()}")
        self.session_id = self.alice.create_session("benchmark", "")
        if not self.session_id:
            raise SystemExit("alice could not create a session")
        self.alice.invite_member(self.session_id, self.bob.id)
        # bob joins on the invite; resend a probe until it has joined and answers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.send("probe")
            try:
                self.replies.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        else:
            raise SystemExit("bob never answered the probe")
        time.sleep(0.2)
        self.drain()

    def drain(self) -> None:
        with self.lock:
            self.received.clear()
        while True:
            try:
                self.replies.get_nowait()
            except queue.Empty:
                return

    def send(self, text: str) -> Any:
        return self.alice.send_message_content(self.session_id, [self.bob.id], text)

    def stop(self) -> None:
        for agent in (self.alice, self.bob):
            agent.offline()


# --- the local network ---------------------------------------------------------------------------------------
def start_network() -> Tuple[Any, Any, Any]:
    """FakeACPServer (heartbeat) + MessageServer + AccessPoint announcing it, on loopback ports chosen by the OS.

    The same pieces as ``python -m agentcp devserver``, built here so the benchmark holds the message server's
    fault controls (``drop_all``, ``stop_pongs``).
    """
    from agentcp.testing import FakeACPServer
    from agentcp.testing.access_point import AccessPoint, accept_any_issuer
    from agentcp.testing.message_server import MessageServer

    server = FakeACPServer(host="127.0.0.1", server_auth="none", http_port=0)
    accept_any_issuer(server)
    server.start()
    ms = MessageServer(server, accept_any_issuer=True).install()
    access_point = AccessPoint(server, message_server=ms.url, accept_any_issuer=True).install()
    return server, ms, access_point


# --- measurements ----------------------------------------------------------------------------------------------
def bench_round_trip(pair: Pair, table: Table, count: int) -> None:
    """Sequential request/echo round trips, alice → server → bob → server → alice, handler to handler."""
    pair.echo = True
    samples: List[float] = []
    for i in range(count + 20):
        text = f"rtt {i}"
        t0 = time.perf_counter()
        pair.send(text)
        while True:
            try:
                _, got = pair.replies.get(timeout=5)
            except queue.Empty:
                raise SystemExit(f"no echo for {text!r} within 5 s") from None
            if got == text:
                break
        if i >= 20:  # warm-up excluded
            samples.append((time.perf_counter() - t0) * 1000)
    p50, p99 = pct(samples, 50), pct(samples, 99)
    table.add(f"round trip p50 ({count} sequential echoes)", f"{p50:.2f} ms", "<= 5 ms", p50 <= 5)
    table.add("round trip p99", f"{p99:.2f} ms", "<= 20 ms", p99 <= 20)
    table.add("round trip max", f"{max(samples):.2f} ms")


def bench_throughput(pair: Pair, table: Table, count: int) -> None:
    """One-way messages alice → bob as fast as ``send_message_content`` returns; delivered per second."""
    pair.echo = False
    pair.drain()
    t0 = time.monotonic()
    for i in range(count):
        pair.send(f"tp {i}")
    sent = time.monotonic() - t0
    ok = wait_until(lambda: len(pair.received) >= count, 30, 0.005)
    with pair.lock:
        got = len(pair.received)
        last = pair.received[-1][0] if pair.received else t0
    elapsed = last - t0
    rate = got / elapsed if elapsed > 0 else float("inf")
    table.add(f"messages per second ({count} one-way, delivered)", f"{rate:,.0f} msg/s")
    table.add("send_message_content calls per second", f"{count / sent:,.0f} /s")
    if not ok:
        table.add("throughput run delivered", f"{got}/{count}", f"{count}/{count}", False)
        return
    # each send waits for the server's ack while connected, so one sender is bound by the round trip to the
    # server; several threads sending at once show what the channel itself carries
    senders = 4
    pair.drain()
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda k=k: [pair.send(f"tp{k} {i}") for i in range(count // senders)])
               for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = senders * (count // senders)
    wait_until(lambda: len(pair.received) >= total, 30, 0.005)
    with pair.lock:
        got = len(pair.received)
        last = pair.received[-1][0] if pair.received else t0
    rate = got / (last - t0) if last > t0 else float("inf")
    table.add(f"messages per second ({senders} sending threads, delivered)", f"{rate:,.0f} msg/s")


def _drop_and_time(pair: Pair, ms: Any, tag: str) -> float:
    """Drop every connection and keep sending (every 10 ms); seconds until a message sent after the drop
    reaches bob (inf after 10 s)."""
    seq = 0
    t_drop = time.monotonic()
    ms.drop_all()
    while time.monotonic() < t_drop + 10:
        pair.send(f"{tag} {seq}")
        seq += 1
        with pair.lock:
            hits = [t for t, text in pair.received if text.startswith(tag + " ")]
        if hits:
            return min(hits) - t_drop
        time.sleep(0.01)
    return float("inf")


def bench_resume(pair: Pair, ms: Any, table: Table, rounds: int) -> None:
    """Drop every connection of a settled channel; time from the drop to the first message sent after it
    reaching bob. Then the same for a drop that follows a reconnect within a second (flapping)."""
    pair.echo = False
    times: List[float] = []
    for r in range(rounds):
        pair.drain()
        # The client reconnects at once after a healthy connection but "not twice within 1 s"
        # (immediate_reconnect_gap): let the previous reconnect age past that, as a real drop would find it.
        time.sleep(1.2)
        times.append(_drop_and_time(pair, ms, f"resume {r}"))
    print("    per round: " + ", ".join(f"{t * 1000:.0f} ms" for t in times), flush=True)
    worst = max(times)
    table.add(f"drop → first message delivered (worst of {rounds})", f"{worst * 1000:.0f} ms", "<= 2 s", worst <= 2)
    table.add("drop → first message delivered (median)", f"{statistics.median(times) * 1000:.0f} ms")
    time.sleep(1.2)
    _drop_and_time(pair, ms, "flap a")
    time.sleep(0.3)
    flap = _drop_and_time(pair, ms, "flap b")
    table.add("second drop 0.3 s after a reconnect (backoff by design)", f"{flap * 1000:.0f} ms")


def bench_loss(pair: Pair, ms: Any, table: Table, count: int, drops: int) -> None:
    """``count`` messages alice → bob while the server drops all connections ``drops`` times; lost/duplicated."""
    pair.echo = False
    pair.drain()
    drop_at = {int(count * (k + 1) / (drops + 1)) for k in range(drops)}
    t0 = time.monotonic()
    for i in range(count):
        if i in drop_at:
            ms.drop_all()
        pair.send(f"seq {i}")
        if i % 50 == 0:
            time.sleep(0.005)  # let drops land mid-stream rather than all before the sends
    def all_seq_arrived() -> bool:  # count only this test's messages (late ones of earlier rounds may still come)
        with pair.lock:
            return len({t for _, t in pair.received if t.startswith("seq ")}) >= count

    wait_until(all_seq_arrived, 20, 0.01)
    time.sleep(0.5)  # late duplicates would show up now
    with pair.lock:
        texts = [t for _, t in pair.received if t.startswith("seq ")]
    counts: Dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    lost = sum(1 for i in range(count) if f"seq {i}" not in counts)
    dup = sum(n - 1 for n in counts.values() if n > 1)
    table.add(f"lost across {drops} forced drops in {count}", str(lost), "0", lost == 0)
    table.add(f"duplicated across {drops} forced drops in {count}", str(dup), "0", dup == 0)
    table.add("…delivered in", f"{time.monotonic() - t0:.2f} s")


def bench_detection(server: Any, ms: Any, data: str, table: Table, ping_interval: float, rounds: int) -> None:
    """A message client whose server stops answering pings: time until it declares the connection dead."""
    from agentcp.base.credentials import hash_seed
    from agentcp.msg.message_client import MessageClient, MessageClientConfig

    aid = f"detect.{DOMAIN}"
    certs = os.path.join(data, "detect", "certs")
    server.issue_identity(aid, certs, SEED)
    client = MessageClient(aid, ms.url, certs, hash_seed(SEED),
                           config=MessageClientConfig(ping_interval=ping_interval))
    lost = threading.Event()
    lost_at: List[float] = []

    def on_state(old: str, new: str) -> None:
        if old == "connected" and new != "connected" and not lost.is_set():
            lost_at.append(time.monotonic())
            lost.set()

    client.on_state_change = on_state
    client.start()
    try:
        results = []
        for k in range(rounds):
            if not client.wait_connected(10):
                raise SystemExit(f"detection client did not connect: {client.stats()}")
            # Pings follow the connect by whole intervals: start the silence at a different phase of the ping
            # cycle each round (just after a ping is the worst case: a full interval plus the pong timeout).
            time.sleep(ping_interval * (k + 0.5) / rounds)
            lost.clear()
            lost_at.clear()
            t0 = time.monotonic()
            ms.stop_pongs(True)
            results.append(lost_at[0] - t0 if lost.wait(ping_interval * 4) and lost_at else float("inf"))
            ms.stop_pongs(False)
        print("    per round: " + ", ".join(f"{t:.3f} s" for t in results), flush=True)
        worst = max(results)
        table.add(f"dead connection detected (ping {ping_interval:g} s, worst of {rounds})",
                  f"{worst:.3f} s = {worst / ping_interval:.2f} intervals", "<= 2 ping intervals",
                  worst <= 2 * ping_interval)
    finally:
        client.stop_websocket_client()


# --- ours beside the published 0.1.99 ------------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # peer0199: the interop tests' harness (redirect, line protocol)


class Worker:
    """A client process running ``msg_worker.py`` (``ask(cmd)``: a command line in, the next answer out)."""

    def __init__(self, python: str, args: List[str], env: Dict[str, str], cwd: str) -> None:
        from peer0199 import LineProcess  # the interop tests' line protocol, one copy

        proc = subprocess.Popen([python, str(HERE / "msg_worker.py"), *args], cwd=cwd, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = LineProcess(proc, "BENCH ")
        self.pid = proc.pid

    def next(self, timeout: float = 60.0) -> dict:
        try:
            answer = self.lines.next(timeout)
        except RuntimeError:
            self.dump_stacks()
            raise
        if answer.get("event") == "error" or answer.get("error"):
            raise RuntimeError(f"worker {self.pid}: {answer}; stderr:\n" + "".join(self.lines.stderr))
        return answer

    def ask(self, cmd: str, timeout: float = 60.0) -> dict:
        self.lines.proc.stdin.write(cmd + "\n")
        self.lines.proc.stdin.flush()
        return self.next(timeout)

    def stop(self) -> None:
        self.lines.stop()

    def dump_stacks(self) -> None:
        """Print where the threads of a worker that stopped answering are (faulthandler, SIGUSR1)."""
        if self.lines.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGUSR1)
        time.sleep(1.0)
        if os.environ.get("BENCH_VERBOSE_HANG"):
            print("".join(self.lines.stderr), file=sys.stderr, flush=True)


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (``VmRSS`` in KiB, ``Threads``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class Side:
    """How to start client processes of one implementation against the devserver."""

    def __init__(self, label: str, python: str, env: Dict[str, str], domain: str, ap_url: str) -> None:
        self.label, self.python, self.env, self.domain, self.ap_url = label, python, env, domain, ap_url

    def spawn(self, root: str, role: str, *args: str) -> Worker:
        data = tempfile.mkdtemp(prefix=f"{role}-", dir=root)
        extra = [self.ap_url] if self.ap_url else []
        return Worker(self.python, [role, data, self.domain, *args, *extra], self.env, data)


def pair_figures(side: Side, root: str, args: argparse.Namespace) -> Dict[str, float]:
    """Round trips and one-way throughput between a sender and a receiver process of one implementation."""
    out: Dict[str, float] = {}
    r = side.spawn(root, "recv", "benchr")
    s = None
    try:
        target = r.next(120)["aid"]
        s = side.spawn(root, "send", "benchs", target)
        s.next(120)
        if not s.ask("probe", 60)["ok"]:
            raise RuntimeError(f"{side.label}: the receiver never answered the probe")
        samples = s.ask(f"rtt {args.rtt}", 60 + args.rtt * 0.1)["samples"]
        out["rtt_p50"], out["rtt_p99"] = pct(samples, 50), pct(samples, 99)
        r.ask("reset")
        n = args.throughput
        flood = s.ask(f"flood {n}", 120)
        out["send_calls"] = n / max(flood["t1"] - flood["t0"], 1e-9)
        deadline = time.monotonic() + 60
        count = r.ask("count tp ")
        while count["n"] < n and time.monotonic() < deadline:
            time.sleep(0.2)
            count = r.ask("count tp ")
        out["delivered_n"] = count["n"]
        out["delivered"] = count["n"] / max(count["last"] - flood["t0"], 1e-9) if count["n"] else 0.0
    finally:
        for w in (s, r):
            if w is not None:
                w.stop()
    return out


def measure_side(side: Side, root: str, args: argparse.Namespace) -> Dict[str, Optional[float]]:
    """The figures of one implementation: sender and receiver in two processes, idle agents in a third."""
    print(f"  {side.label}: round trips and throughput", flush=True)
    runs: List[Dict[str, float]] = []
    failures = 0
    while len(runs) < args.repeat and failures < 3:
        try:
            runs.append(pair_figures(side, root, args))
        except RuntimeError as exc:  # a client process that hangs: again, with fresh processes
            failures += 1
            print(f"  {side.label}: attempt failed: {str(exc).splitlines()[0]}", flush=True)
    out: Dict[str, Optional[float]]
    if runs:  # each figure's median over the runs (--repeat)
        out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        out["delivered_n"] = min(run["delivered_n"] for run in runs)
    else:
        print(f"  {side.label}: no round-trip or throughput figures (every attempt hung)", flush=True)
        out = {"rtt_p50": None, "rtt_p99": None, "send_calls": None, "delivered": None, "delivered_n": None}
    print(f"  {side.label}: {args.idle_agents} idle agents", flush=True)
    w = side.spawn(root, "idle")
    try:
        w.next(120)
        w.ask("online 1", 120)
        time.sleep(args.settle)
        rss1 = proc_status(w.pid, "VmRSS")
        w.ask(f"online {args.idle_agents}", 30 + 10 * args.idle_agents)
        time.sleep(args.settle)
        rss_n = proc_status(w.pid, "VmRSS")
        out["rss_per_agent"] = (rss_n - rss1) / max(args.idle_agents - 1, 1)
        cpu0, t0 = cpu_seconds(w.pid), time.monotonic()
        time.sleep(args.idle_window)
        out["cpu_idle"] = (cpu_seconds(w.pid) - cpu0) / (time.monotonic() - t0) * 100
        out["threads"] = proc_status(w.pid, "Threads")
    finally:
        w.stop()
    return out


#: (key, figure, unit format, goal text, goal test on the ratio ours / 0.1.99)
VS_FIGURES: List[Tuple[str, str, str, str, Callable[[float], bool]]] = [
    ("send_calls", "`send_message` calls per second", "{:,.0f}", ">= 1.0", lambda r: r >= 1.0),
    ("delivered", "delivered messages per second, {n:,} one-way", "{:,.0f}", ">= 1.5", lambda r: r >= 1.5),
    ("rtt_p50", "round trip p50", "{:.2f} ms", "<= 1.0", lambda r: r <= 1.0),
    ("rtt_p99", "round trip p99", "{:.2f} ms", "<= 1.0", lambda r: r <= 1.0),
    ("threads", "OS threads, {k} idle agents in one process", "{:.0f}", "<= 0.5", lambda r: r <= 0.5),
    ("rss_per_agent", "RSS per additional idle agent", "{:.0f} KiB", "<= 1.0", lambda r: r <= 1.0),
    ("cpu_idle", "CPU, {k} idle agents ({w:g} s window)", "{:.2f} % of a core", "<= 1.0", lambda r: r <= 1.0),
]


def render_vs(ours: Dict[str, Optional[float]], theirs: Optional[Dict[str, Optional[float]]],
              args: argparse.Namespace) -> str:
    lines = ["| figure | ours | 0.1.99 | ratio | goal | |", "|---|---:|---:|---:|---|---|"]
    for key, figure, fmt, goal, test in VS_FIGURES:
        name = figure.format(n=args.throughput, k=args.idle_agents, w=args.idle_window)
        mine = "hung" if ours[key] is None else fmt.format(ours[key])
        if theirs is None:
            lines.append(f"| {name} | {mine} | (not installed) | | {goal} | |")
            continue
        if theirs[key] is None or ours[key] is None:
            lines.append(f"| {name} | {mine} | {'hung' if theirs[key] is None else fmt.format(theirs[key])} | n/a "
                         f"| {goal} | |")
            continue
        if not theirs[key]:  # e.g. no CPU tick in the window: no ratio
            verdict = "ok" if not ours[key] else "MISS"
            lines.append(f"| {name} | {mine} | {fmt.format(theirs[key])} | n/a | {goal} | {verdict} |")
            continue
        ratio = ours[key] / theirs[key]
        lines.append(f"| {name} | {mine} | {fmt.format(theirs[key])} | {ratio:.2f} | {goal} | "
                     f"{'ok' if test(ratio) else 'MISS'} |")
    return "\n".join(lines)


def bench_vs_0199(args: argparse.Namespace) -> Tuple[str, List[str]]:
    """Ours and the published 0.1.99 against one devserver, each client in its own process; the table and the
    figures that missed their goal.

    0.1.99 runs from the virtual environment ``--venv-0199`` (``AGENTCP_0199_VENV``) if agentcp 0.1.99 is installed
    there (``tests/peer0199.py`` makes one: ``python -m pytest -m interop``); otherwise its column says so.
    """
    from peer0199 import installed_version, peer_env  # the interop tests' harness: one copy of the redirect

    from agentcp.testing.devserver import start_dev_network

    venv = Path(args.venv_0199)
    py0199 = venv / "bin" / "python"
    version = installed_version(py0199)
    if version != "0.1.99":
        print(f"agentcp 0.1.99 is not installed in {venv} (found {version or 'nothing'}): its column is skipped; "
              "create it with: python -m venv DIR && DIR/bin/pip install agentcp==0.1.99", flush=True)
    server, access_point = start_dev_network(port=0)
    try:
        with tempfile.TemporaryDirectory(prefix="agentcp-vs0199-") as root:
            ours_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
            ours = measure_side(Side("ours", sys.executable, ours_env, "example.com", access_point.url), root, args)
            theirs = None
            if version == "0.1.99":
                harness = Path(root) / "harness"
                harness.mkdir()
                side = Side("0.1.99", str(py0199), peer_env(harness, access_point.url), "agentunion.cn", "")
                theirs = measure_side(side, root, args)
    finally:
        server.stop()
    for label, figures in (("ours", ours), ("0.1.99", theirs)):
        if figures is not None and figures["delivered_n"] is not None and figures["delivered_n"] < args.throughput:
            print(f"  {label}: only {figures['delivered_n']:.0f} of {args.throughput} one-way messages arrived")
    table = render_vs(ours, theirs, args)
    missed = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.endswith("| MISS |")]
    return table, missed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=int, default=1000, help="round trips to time (default 1000)")
    parser.add_argument("--throughput", type=int, default=2000, help="one-way messages for msg/s (default 2000)")
    parser.add_argument("--resume-rounds", type=int, default=5, help="drop/resume rounds (default 5)")
    parser.add_argument("--messages", type=int, default=1000, help="messages in the loss test (default 1000)")
    parser.add_argument("--drops", type=int, default=5, help="forced drops in the loss test (default 5)")
    parser.add_argument("--ping-interval", type=float, default=1.0, help="ping interval for detection (s)")
    parser.add_argument("--detect-rounds", type=int, default=4, help="silences at spread ping phases")
    parser.add_argument("--only", choices=["rtt", "throughput", "resume", "loss", "detection"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the SDK at INFO")
    parser.add_argument("--vs-0199", action="store_true",
                        help="only the comparison with the published 0.1.99 (client processes on one devserver)")
    parser.add_argument("--venv-0199", default=os.environ.get("AGENTCP_0199_VENV", str(REPO / ".venv0199")),
                        help="virtual environment with agentcp==0.1.99 (default $AGENTCP_0199_VENV or .venv0199)")
    parser.add_argument("--idle-agents", type=int, default=50, help="idle agents in one process (default 50)")
    parser.add_argument("--idle-window", type=float, default=20.0, help="seconds of idle CPU measured (default 20)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to settle before RSS readings")
    parser.add_argument("--repeat", type=int, default=1,
                        help="--vs-0199: client pairs measured per side; each figure is their median (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.vs_0199:
        started = time.monotonic()
        table, missed = bench_vs_0199(args)
        print(f"\n{table}\n\n(ratio = ours / 0.1.99; medians of {args.repeat} client pair(s) per side; "
              f"total {time.monotonic() - started:.1f} s, "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
        if missed:
            print("missed: " + ", ".join(missed))
            return 1
        return 0

    table = Table()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentcp-bench-") as data:
        server, ms, access_point = start_network()
        pair = None
        try:
            print(f"local network {access_point.url}; message server {ms.url}", flush=True)
            parts = set(args.only or ["rtt", "throughput", "resume", "loss", "detection"])
            if parts - {"detection"}:
                pair = Pair(data, access_point.url)
                pair.start()
            if "rtt" in parts:
                bench_round_trip(pair, table, args.rtt)
            if "throughput" in parts:
                bench_throughput(pair, table, args.throughput)
            if "resume" in parts:
                bench_resume(pair, ms, table, args.resume_rounds)
            if "loss" in parts:
                bench_loss(pair, ms, table, args.messages, args.drops)
            if "detection" in parts:
                bench_detection(server, ms, data, table, args.ping_interval, args.detect_rounds)
        finally:
            if pair is not None:
                pair.stop()
            server.stop()
    print(f"\n{table.render()}\n\n(total {time.monotonic() - started:.1f} s, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    if table.missed:
        print("missed: " + ", ".join(table.missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
