"""``python -m agentcp.testing.devserver``: a standalone local network an unmodified script can use."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    from agentcp import AgentCP
    acp = AgentCP(sys.argv[1], seed_password="dev")
    aid = acp.create_aid("example.com", "devagent")
    aid.online()
    ok = aid.wait_online(5)
    print("ONLINE" if ok and aid.is_online_success else "NOT ONLINE", aid.status()["state"])
    aid.offline()
    again = acp.load_aid("devagent.example.com")
    print("LOADED" if again is not None else "NOT LOADED")
    """
)

LEGACY_SCRIPT = textwrap.dedent(
    """
    import sys
    from agentcp import AgentCP
    acp = AgentCP(sys.argv[1], seed_password="legacy")
    aid = acp.load_aid("old.example.com")
    aid.online()
    ok = aid.wait_online(5)
    print("LEGACY ONLINE" if ok else "LEGACY NOT ONLINE", aid.status()["state"])
    aid.offline()
    """
)


@pytest.mark.skipif(os.name != "posix", reason="uses SIGTERM")
def test_devserver_runs_an_unmodified_script(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "agentcp.testing.devserver", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("export AGENTCP_AP_URL=http://127.0.0.1:"), line
        url = line.split("=", 1)[1]
        env = dict(os.environ, AGENTCP_AP_URL=url)
        script = tmp_path / "agent.py"
        script.write_text(SCRIPT, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], env=env, capture_output=True,
                             text=True, timeout=30)
        assert "ONLINE online" in out.stdout, out.stdout + out.stderr
        assert "LOADED" in out.stdout
        # an identity in 0.1.99's layout, issued by another CA, written without agentcp's code
        from legacy_identity import make_test_ca, write_legacy_identity

        write_legacy_identity(str(tmp_path / "legacy" / "agentcp" / "AIDs"), "old.example.com", "legacy",
                              make_test_ca())
        script = tmp_path / "legacy_agent.py"
        script.write_text(LEGACY_SCRIPT, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "legacy")], env=env, capture_output=True,
                             text=True, timeout=30)
        assert "LEGACY ONLINE online" in out.stdout, out.stdout + out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def test_devserver_main_rejects_busy_port():
    import socket

    from agentcp.testing.devserver import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["--port", str(s.getsockname()[1])]) == 1
    finally:
        s.close()
