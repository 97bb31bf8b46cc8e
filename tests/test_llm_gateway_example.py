"""examples/llm_gateway.py runs unmodified against the devserver and the echo agent, each in its own process."""
from __future__ import annotations

import os
import signal
import sys
from typing import List

import pytest

from test_examples import EXAMPLES, Proc

pytestmark = [pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals"), pytest.mark.timeout(60)]


def test_the_gateway_example_gets_a_plain_and_a_streamed_answer_from_the_echo_agent(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCP_")}
    env["PYTHONUNBUFFERED"] = "1"
    procs: List[Proc] = []
    try:
        server = Proc([sys.executable, "-m", "agentcp", "devserver", "--port", "0"], env, tmp_path)
        procs.append(server)
        env["AGENTCP_AP_URL"] = server.wait_for(r"^export AGENTCP_AP_URL=(\S+)", 10).group(1)
        echo = Proc([sys.executable, str(EXAMPLES / "echo_agent.py"), "--data", str(tmp_path / "echo")], env,
                    tmp_path)
        procs.append(echo)
        echo.wait_for(r"^ready echo\.agentunion\.cn online=True", 15)
        client = Proc([sys.executable, str(EXAMPLES / "llm_gateway.py"), "--data", str(tmp_path / "gw"), "--http",
                       "--text", "hello gateway", "--timeout", "15"], env, tmp_path)
        procs.append(client)
        client.wait_for(r"^base_url http://127\.0\.0\.1:\d+/echo\.agentunion\.cn$", 15)
        client.wait_for(r"^answer: echo: hello gateway$", 15)
        client.wait_for(r"^streamed: echo: hello gateway$", 15)
        assert client.proc.wait(10) == 0, client.transcript()
        assert "Traceback" not in "".join(client.err), client.transcript()
        assert echo.stop(signal.SIGTERM) == 0, echo.transcript()
        assert server.stop(signal.SIGTERM) == 0, server.transcript()
    finally:
        for proc in reversed(procs):
            proc.kill()
