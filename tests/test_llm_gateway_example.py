"""examples/llm_gateway.py runs unmodified against the devserver and the echo agent, each in its own process."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from test_examples import EXAMPLES, Proc, echo_network

pytestmark = [pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals"), pytest.mark.timeout(60)]


def test_the_gateway_example_gets_a_plain_and_a_streamed_answer_from_the_echo_agent(tmp_path):
    with echo_network(tmp_path) as (env, procs, server, echo):
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
