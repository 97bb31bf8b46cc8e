"""Upgrade in place: identities made by the published agentcp 0.1.99, then ``pip install -U`` this package over it.

Runs only with ``-m upgrade`` (``nox -s upgrade``; CI runs it). It needs PyPI: 0.1.99 and its dependencies are
installed into a side virtual environment; when that fails the test is skipped (with ``AGENTCP_UPGRADE_REQUIRED=1``,
as CI sets it, it fails instead).

0.1.99 builds its access-point URL as ``https://acp3.<domain>`` (protocol notes, liveness.md section 1.2) and has
no setting to change it. The harness redirects it without touching 0.1.99 (``tests/peer0199.py``, shared with
the interop tests): the phase-1 process gets a ``sitecustomize`` module that rewrites ``https://acp3.<domain>`` in
``requests`` calls to the local devserver; the rest 0.1.99 takes from the access point's config. After the
upgrade, our package is pointed at the devserver the supported way, ``AGENTCP_AP_URL``; the wrapper is gone.

What 0.1.99 writes to the agent database: its tables (history writes are stubs in 0.1.99, protocol notes api.md
section 3.8) and the friend list (``add_friend_agent``). Both must read back after the upgrade.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest
from peer0199 import make_side_venv, peer_env, run

ROOT = Path(__file__).resolve().parent.parent
AIDS = ["alice.agentunion.cn", "bob.agentunion.cn"]
SEED = "upgrade seed"

pytestmark = [
    pytest.mark.upgrade,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.name != "posix", reason="side virtual environment layout is POSIX"),
]


# Phase 1, run by agentcp 0.1.99: create both identities in the data folder "./" (as 0.1.99 users do), bring
# them online, write the friend list, go offline.
PHASE_OLD = '''\
import json, sys, time
import agentcp
from agentcp import AgentCP

AIDS = {aids!r}
acp = AgentCP("./", seed_password={seed!r})
report = {{"version": getattr(agentcp, "__version__", "?"), "online": {{}}, "friends": None}}
made = []
for aid_str in AIDS:
    name, domain = aid_str.split(".", 1)
    aid = acp.create_aid(domain, name)
    assert aid is not None and aid.id == aid_str, aid
    aid.online()
    report["online"][aid_str] = bool(aid.is_online_success)
    made.append(aid)
made[0].add_friend_agent(AIDS[1], "Bob", "written by 0.1.99", "")
report["friends"] = made[0].get_friend_agent_list()
for aid in made:
    aid.offline()
print("REPORT " + json.dumps(report), flush=True)
sys.stdout.flush()
import os
os._exit(0)  # 0.1.99 leaves non-daemon threads behind; its exit is not what is tested here
'''

# Phase 2, run by this package after `pip install -U`: the same data folder, no redirect, AGENTCP_AP_URL only.
PHASE_NEW = '''\
import json, threading
import agentcp
from agentcp import AgentCP

AIDS = {aids!r}
acp = AgentCP("./", seed_password={seed!r})
report = {{"version": agentcp.__version__, "file": agentcp.__file__, "loaded": {{}}, "online": {{}}}}
loaded = {{}}
for aid_str in AIDS:
    aid = acp.load_aid(aid_str)
    report["loaded"][aid_str] = None if aid is None else aid.id
    loaded[aid_str] = aid
alice, bob = loaded[AIDS[0]], loaded[AIDS[1]]
report["friends"] = alice.get_friend_agent_list()

got = threading.Event()
replies = []

@bob.message_handler()
async def on_bob(msg):
    bob.reply_message(msg, "echo: " + str(bob.get_content_from_message(msg)))

@alice.message_handler()
async def on_alice(msg):
    replies.append(alice.get_content_from_message(msg))
    got.set()

for aid in (alice, bob):
    aid.online()
    report["online"][aid.id] = bool(aid.is_online_success)
session_id = alice.create_session("upgrade", "after the upgrade")
alice.invite_member(session_id, bob.id)
result = alice.send_message_content(session_id, [bob.id], "hello after the upgrade")
report["sent"] = bool(result)
report["reply"] = replies[0] if got.wait(15) else None
report["history"] = [m.get("content") if isinstance(m, dict) else m
                     for m in (alice.get_message_list(session_id) or [])]
for aid in (alice, bob):
    aid.offline()
print("REPORT " + json.dumps(report, default=str), flush=True)
'''


def _report(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[len("REPORT "):])
    raise AssertionError(f"no report (exit {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n"
                         f"{proc.stderr[-4000:]}")


def _tree(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _identity_files(tree: Dict[str, str]) -> Dict[str, str]:
    """Keys and certificates (not the database, which the agents write to)."""
    return {k: v for k, v in tree.items() if not k.endswith((".db", ".db-journal", ".db-wal", ".db-shm"))}


@pytest.fixture(scope="module")
def side_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the published 0.1.99 (not the shared interop one: it gets upgraded)."""
    venv = tmp_path_factory.mktemp("upgrade") / "venv"
    make_side_venv(venv)  # skips (or fails, with AGENTCP_UPGRADE_REQUIRED=1) when 0.1.99 cannot be installed
    return venv


def test_upgrade_in_place_from_0_1_99(side_venv, tmp_path):
    from agentcp.testing.devserver import start_dev_network

    py = str(side_venv / "bin" / "python")
    home = tmp_path / "agent_home"  # the agent's working directory; AgentCP("./") puts ./agentcp/ here
    home.mkdir()
    harness = tmp_path / "harness"
    harness.mkdir()
    (home / "old_agent.py").write_text(PHASE_OLD.format(aids=AIDS, seed=SEED), encoding="utf-8")
    (home / "new_agent.py").write_text(PHASE_NEW.format(aids=AIDS, seed=SEED), encoding="utf-8")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCP_", "PYTHON", "PEER0199_"))}

    server, access_point = start_dev_network(port=0)
    try:
        # Phase 1: agentcp 0.1.99 makes the identities, against the devserver through the harness redirect.
        old = run([py, "old_agent.py"], cwd=str(home), env=peer_env(harness, access_point.url), timeout=180)
        before = _report(old)
        assert before["version"] != "0.2.0", before
        assert before["online"] == {a: True for a in AIDS}, (before, old.stderr[-3000:])
        assert [f["aid"] for f in before["friends"]] == [AIDS[1]], before
        data = home / "agentcp"
        assert (data / "AIDs" / AIDS[0]).is_dir(), sorted(_tree(home))
        identities_before = _identity_files(_tree(data))
        assert identities_before, "0.1.99 wrote no identity files"

        # Upgrade in place: this package over 0.1.99, in the same environment. Built from a copy of the source,
        # so the build leaves no build/ folder in the working tree.
        source = tmp_path / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv*", ".nox", "build", "dist", "*.egg-info", "__pycache__", "*_cache"))
        upgraded = run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-U", str(source)])
        assert upgraded.returncode == 0, upgraded.stderr[-3000:]

        # Phase 2: the upgraded package on the same data folder; AGENTCP_AP_URL is the only setting.
        new_env = dict(base_env, AGENTCP_AP_URL=access_point.url)
        new = run([py, "new_agent.py"], cwd=str(home), env=new_env, timeout=180)
        after = _report(new)
        assert after["version"] == "0.2.0" and str(side_venv) in after["file"], after
        assert after["loaded"] == {a: a for a in AIDS}, after
        assert after["online"] == {a: True for a in AIDS}, (after, new.stderr[-3000:])
        assert after["friends"] == before["friends"], (before["friends"], after["friends"])
        assert after["sent"] and after["reply"] == "echo: hello after the upgrade", (after, new.stderr[-3000:])
        assert after["history"], after  # the upgraded package records history in 0.1.99's database
        tree_after = _tree(data)
        assert _identity_files(tree_after) == identities_before, "identity files changed by the upgrade"

        # pip uninstall removes the package and leaves the data folder alone.
        removed = run([py, "-m", "pip", "uninstall", "--yes", "agentcp"])
        assert removed.returncode == 0, removed.stderr[-2000:]
        assert _tree(data) == tree_after, "pip uninstall touched the data folder"
        gone = run([py, "-c", "import agentcp, sys; sys.exit(0 if getattr(agentcp, '__file__', None) else 3)"],
                    cwd=str(tmp_path))
        assert gone.returncode != 0, "agentcp is still importable after pip uninstall"
    finally:
        server.stop()
