"""examples/ run unmodified against ``python -m agentcp devserver``, each in its own process."""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _messaging_available() -> bool:
    """True once the messaging core is in: the dev network has a message server and AgentID really sends."""
    if importlib.util.find_spec("agentcp.testing.message_server") is None:
        return False
    from agentcp import AgentID

    return "self._messaging(" not in inspect.getsource(AgentID.send_message_content)


pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals"),
    pytest.mark.timeout(60),
]


class Proc:
    """A child process whose stdout lines are collected by a thread, so waiting for a line is bounded."""

    def __init__(self, args: List[str], env: dict, cwd: Path) -> None:
        self.proc = subprocess.Popen(args, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.out: List[str] = []
        self.err: List[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, None), daemon=True).start()

    def _pump(self, stream, sink) -> None:
        for line in stream:
            (self.out if sink is not None else self.err).append(line)
            if sink is not None:
                sink.put(line)
        if sink is not None:
            sink.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, remaining))
            except queue.Empty:
                line = ""
            if line is None or remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s\n{self.transcript()}")
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def transcript(self) -> str:
        time.sleep(0.1)  # let the pump threads catch up
        return f"--- stdout\n{''.join(self.out)}--- stderr\n{''.join(self.err[-60:])}"


@contextlib.contextmanager
def echo_network(tmp_path: Path) -> Iterator[Tuple[dict, List[Proc], Proc, Proc]]:
    """The devserver and ``echo_agent.py`` (online), each in its own process: ``(env, procs, server, echo)``.
    ``env`` has the ``AGENTCP_AP_URL`` for more scripts; append them to ``procs``; all are killed at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCP_")}
    env["PYTHONUNBUFFERED"] = "1"
    procs: List[Proc] = []
    try:
        server = Proc([sys.executable, "-m", "agentcp", "devserver", "--port", "0"], env, tmp_path)
        procs.append(server)
        env["AGENTCP_AP_URL"] = server.wait_for(r"^export AGENTCP_AP_URL=(\S+)", 10).group(1)  # the only setting
        echo = Proc([sys.executable, str(EXAMPLES / "echo_agent.py"), "--data", str(tmp_path / "echo")], env,
                    tmp_path)
        procs.append(echo)
        echo.wait_for(r"^ready echo\.agentunion\.cn online=True", 15)
        yield env, procs, server, echo
    finally:
        for proc in reversed(procs):
            proc.kill()


def test_examples_do_not_import_the_testing_package():
    for script in ("echo_agent.py", "conversation.py", "llm_gateway.py"):
        source = (EXAMPLES / script).read_text(encoding="utf-8")
        assert "agentcp.testing" not in source and "from agentcp import AgentCP" in source


@pytest.mark.skipif(not _messaging_available(), reason="messaging core (message server, AgentID sending) not in yet")
def test_echo_conversation_over_the_devserver(tmp_path):
    with echo_network(tmp_path) as (env, procs, server, echo):
        talk = Proc([sys.executable, str(EXAMPLES / "conversation.py"), "--data", str(tmp_path / "alice"),
                     "--peer", "echo.agentunion.cn", "--count", "5", "--timeout", "8"], env, tmp_path)
        procs.append(talk)
        for i in range(1, 6):
            talk.wait_for(rf"^{i}/5: sent 'message {i}', got 'echo: message {i}'", 10)
        talk.wait_for(r"conversation complete: 5 exchanges", 5)
        assert talk.proc.wait(10) == 0, talk.transcript()
        assert "Traceback" not in "".join(talk.err), talk.transcript()

        # history was written by both sides (0.1.99 wrote none)
        db = tmp_path / "alice" / "agentcp" / "AIDs" / "alice.agentunion.cn" / "private" / "data" / "agentid_data.db"
        conn = sqlite3.connect(str(db))
        try:
            rows = conn.execute("SELECT role, message_aid, content FROM messages ORDER BY id").fetchall()
            owner = conn.execute("SELECT identifying_code FROM conversation").fetchall()
        finally:
            conn.close()
        sent = [r for r in rows if r[0] == "user" and r[1] == "alice.agentunion.cn"]
        echoed = {json.loads(r[2])[0]["content"] for r in rows if r[0] == "assistant"}
        assert len(sent) >= 5 and {f"echo: message {i}" for i in range(1, 6)} <= echoed, rows
        assert owner and owner[0][0], "the session's owner code was not kept"

        assert echo.stop(signal.SIGINT) == 0, echo.transcript()  # Ctrl-C
        assert "echo agent stopped" in "".join(echo.out)
        assert "Traceback" not in "".join(echo.err), echo.transcript()
        assert server.stop(signal.SIGTERM) == 0, server.transcript()


def test_echo_agent_goes_online_and_stops_cleanly_on_sigterm(tmp_path):
    with echo_network(tmp_path) as (_env, _procs, server, echo):
        started = time.monotonic()
        assert echo.stop(signal.SIGTERM) == 0, echo.transcript()
        assert time.monotonic() - started < 8
        assert "echo agent stopped" in "".join(echo.out) and "Traceback" not in "".join(echo.err)
        assert server.stop(signal.SIGTERM) == 0
