"""The data folder ``./agentcp/`` (``AgentCP("./")``) must never shadow the package (issue 11, item 4).

With the README's development install (``pip install -e ".[test]"``), setuptools' default editable hook for a
flat layout is a finder that runs *after* the normal path search. A script run from a folder that holds the data
folder ``agentcp/`` (no ``__init__.py``) then imported that folder as a namespace package and failed with
``ImportError: cannot import name 'AgentCP' from 'agentcp' (unknown location)`` on its second start.
``package-dir = {"" = "."}`` in pyproject.toml makes setuptools install a plain ``.pth`` entry instead, and a
regular package found anywhere on sys.path wins over a namespace folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest
from _subproc import run_until_ready

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _is_editable_install() -> bool:
    # Every copy of the metadata on sys.path: the source tree's agentcp.egg-info has no direct_url.json.
    for dist in metadata.distributions(name="agentcp"):
        direct_url = dist.read_text("direct_url.json")
        if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
            return True
    return False


pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals"),
    pytest.mark.skipif(not _is_editable_install(),
                       reason="guards the editable install (pip install -e); agentcp is installed otherwise here"),
    pytest.mark.timeout(60),
]


def _start_until_ready(script: Path, cwd: Path, env: dict) -> str:
    """Run ``script`` until it prints its ready line, then SIGTERM it; returns everything it printed."""
    _, out, err = run_until_ready([sys.executable, script.name, "--data", "./"], str(cwd), env,
                                  ready=lambda line: line.startswith("ready "), within=20.0)
    return out + err


@pytest.fixture
def devserver():
    """The local network as ``python -m agentcp devserver`` runs it (agents in other processes can join)."""
    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    try:
        yield access_point
    finally:
        server.stop()


def test_example_runs_from_a_folder_holding_an_agentcp_data_folder(tmp_path, devserver):
    home = tmp_path / "agent_home"
    home.mkdir()
    shutil.copy(EXAMPLES / "echo_agent.py", home / "echo_agent.py")  # the script sits next to its data folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCP_", "PYTHONPATH"))}
    env.update(AGENTCP_AP_URL=devserver.url, PYTHONUNBUFFERED="1")

    first = _start_until_ready(home / "echo_agent.py", home, env)
    assert "ready echo.agentunion.cn online=True" in first, first
    assert (home / "agentcp").is_dir() and not (home / "agentcp" / "__init__.py").exists()

    # The second start, with ./agentcp/ (the data folder) next to the script: failed with ImportError before.
    second = _start_until_ready(home / "echo_agent.py", home, env)
    assert "ImportError" not in second, second
    assert "ready echo.agentunion.cn online=True" in second, second
