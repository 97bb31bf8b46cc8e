"""The demo is the product's first impression: it must heal every fault it injects."""
from __future__ import annotations

import io

import pytest

from agentcp.demo import run_demo
from agentcp.heartbeat.heartbeat_client import HeartbeatClient


@pytest.mark.timeout(90)
def test_demo_heals_every_fault_through_agentcp_and_agentid():
    out = io.StringIO()
    assert run_demo(interval=0.5, out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "created identity demo.agentcp.local" in text
    assert text.count("healed") >= 7 and "NOT HEALED" not in text
    assert HeartbeatClient.MIN_INTERVAL == 5.0  # the demo's lower floor was restored


def test_cli_usage():
    from agentcp.__main__ import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
