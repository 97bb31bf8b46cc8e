"""Release promises that are cheap to check in the suite: the typing marker ships, the quick demo heals."""
from __future__ import annotations

import io
from pathlib import Path

import agentcp
from agentcp.demo import run_demo


def test_package_ships_py_typed():
    assert (Path(agentcp.__file__).parent / "py.typed").is_file()


def test_quick_demo_skips_the_slow_faults_and_heals_the_rest():
    out = io.StringIO()
    assert run_demo(interval=0.5, out=out, quick=True) == 0, out.getvalue()
    text = out.getvalue()
    assert "all 5 faults healed" in text and "NOT HEALED" not in text
    assert "server silent" not in text and "sign-in down" not in text
