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

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

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
    check = run([str(py), "-c", "import importlib.metadata as m; print(m.version('agentcp'))"])
    if check.returncode != 0 or check.stdout.strip() != "0.1.99":
        installed = run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PUBLISHED])
        if installed.returncode != 0:
            unavailable(f"cannot install {PUBLISHED} into a side venv: {installed.stderr[-800:]}")
    return py


def side_python(tmp_path_factory) -> Path:
    """The python of a side venv with 0.1.99 (``AGENTCP_0199_VENV`` or a fresh one for this test session)."""
    if os.name != "posix":
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
