"""Run the published agentcp 0.1.99 as a peer process against our devserver (interop and upgrade tests).

0.1.99 is installed from PyPI into a side virtual environment (cached per test session; set ``AGENTCP_0199_VENV``
to reuse one across runs). When that is impossible the tests that need it are skipped, or fail where
``AGENTCP_0199_REQUIRED=1`` (CI) says they must run.

0.1.99 builds its access-point URL as ``https://acp3.<domain>`` and has no setting to change it. The harness
redirects it without touching 0.1.99's code: the peer process gets a ``sitecustomize`` module (on PYTHONPATH) that
wraps ``requests.Session.request`` (the HTTP library 0.1.99 uses for every call) and rewrites
``https://acp3.<domain>`` to the devserver. Everything else (heartbeat, message and stream servers) 0.1.99 takes
from the access point's config, which the devserver fills with local addresses.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

PUBLISHED = "agentcp==0.1.99"
REQUIRED_ENV = "AGENTCP_0199_REQUIRED"
VENV_ENV = "AGENTCP_0199_VENV"

REDIRECT = '''\
"""Test harness only: send agentcp 0.1.99's access-point calls (https://acp3.<domain>) to the local devserver."""
import os
import re

_target = os.environ.get("PEER0199_AP_URL", "").rstrip("/")
if _target:
    import requests.sessions

    _pattern = re.compile(r"^https://acp3\\.[A-Za-z0-9.-]+")
    _request = requests.sessions.Session.request

    def _redirected(self, method, url, *args, **kwargs):
        if isinstance(url, str):
            url = _pattern.sub(_target, url, count=1)
        return _request(self, method, url, *args, **kwargs)

    requests.sessions.Session.request = _redirected
'''


def run(args: List[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output and a timeout (600 s unless given)."""
    kwargs.setdefault("timeout", 600)
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def unavailable(reason: str) -> None:
    """Skip the test (or fail it where 0.1.99 is required, as in CI)."""
    import pytest  # here, not at the top: benchmarks/messaging.py imports this module without pytest

    if os.environ.get(REQUIRED_ENV) == "1" or os.environ.get("AGENTCP_UPGRADE_REQUIRED") == "1":
        pytest.fail(f"agentcp 0.1.99 is required but {reason}")
    pytest.skip(reason)


def make_side_venv(venv: Path) -> Path:
    """A virtual environment at ``venv`` with the published 0.1.99 installed; its python. Skips on failure."""
    py = venv / "bin" / "python"
    if not py.exists():
        made = run([sys.executable, "-m", "venv", str(venv)])
        if made.returncode != 0:
            unavailable(f"cannot create a virtual environment: {made.stderr[-500:]}")
    if installed_version(py) != "0.1.99":
        installed = run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PUBLISHED])
        if installed.returncode != 0:
            unavailable(f"cannot install {PUBLISHED} into a side venv: {installed.stderr[-800:]}")
    return py


def installed_version(py: Path) -> Optional[str]:
    """The version of agentcp installed for the interpreter ``py``; None if there is none (or no ``py``)."""
    if not Path(py).exists():
        return None
    # -I: not the current directory (a source checkout of ours there would answer for the venv)
    check = run([str(py), "-I", "-c", "import importlib.metadata as m; print(m.version('agentcp'))"], timeout=60)
    return check.stdout.strip() if check.returncode == 0 else None


def side_python(tmp_path_factory) -> Path:
    """The python of a side venv with 0.1.99 (``AGENTCP_0199_VENV`` or a fresh one for this test session)."""
    if os.name != "posix":
        import pytest

        pytest.skip("side virtual environment layout is POSIX")
    where = os.environ.get(VENV_ENV)
    venv = Path(where) if where else tmp_path_factory.mktemp("side0199") / "venv"
    return make_side_venv(venv)


def peer_env(harness: Path, ap_url: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a 0.1.99 peer: our own settings removed, the redirect on PYTHONPATH."""
    (harness / "sitecustomize.py").write_text(REDIRECT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCP_", "PYTHON", "PEER0199_"))}
    env.update(PYTHONPATH=str(harness), PEER0199_AP_URL=ap_url, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


class LineProcess:
    """A child process driven line by line: ``ask(cmd)`` writes a command line and returns the next answer, one
    ``<prefix>{json}`` on its stdout (other output, e.g. a library's logging, is skipped; stderr is kept)."""

    def __init__(self, proc: subprocess.Popen, prefix: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.prefix = prefix
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.stderr: "collections.deque[str]" = collections.deque(maxlen=40)
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._drain_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            # anywhere in the line: the child's own output (0.1.99 prints without a newline now and then) may
            # precede the answer on the same line
            at = line.find(self.prefix + "{")
            if at >= 0:
                self.lines.put(json.loads(line[at + len(self.prefix):]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def next(self, timeout: float = 60.0) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"process {self.pid} said nothing within {timeout:g} s; stderr:\n"
                               + "".join(self.stderr)) from None

    def ask(self, cmd: str, timeout: float = 60.0) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.next(timeout)

    def stop(self, cmd: str = "quit") -> None:
        """Ask it to end (``cmd``), kill it if it does not within 10 s, join the pipe readers."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(cmd + "\n")
                self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(5)
