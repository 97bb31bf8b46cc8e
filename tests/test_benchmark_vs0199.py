"""benchmarks/messaging.py --vs-0199: the comparison table (the measuring itself is the benchmark's job)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import messaging  # noqa: E402

ARGS = argparse.Namespace(throughput=2000, idle_agents=50, idle_window=20.0)
OURS = {"send_calls": 9000.0, "delivered": 3300.0, "rtt_p50": 1.5, "rtt_p99": 5.0, "threads": 40,
        "rss_per_agent": 150.0, "cpu_idle": 0.3}
THEIRS = {"send_calls": 8000.0, "delivered": 2000.0, "rtt_p50": 1.8, "rtt_p99": 6.0, "threads": 101,
          "rss_per_agent": 183.0, "cpu_idle": 0.6}


def _rows(table: str) -> dict:
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[2:]}


def test_each_figure_has_ours_theirs_ratio_goal_and_verdict():
    rows = _rows(messaging.render_vs(OURS, THEIRS, ARGS))
    assert len(rows) == 7
    calls = rows["`send_message` calls per second"]
    assert calls[1:5] == ["9,000", "8,000", "1.12", ">= 1.0"] and calls[5].startswith("ok")
    assert rows["delivered messages per second, 2,000 one-way"][5].startswith("ok")  # 1.65 >= 1.5
    assert rows["OS threads, 50 idle agents in one process"][3] == "0.40"


def test_a_miss_a_hung_side_and_a_missing_venv_are_said_so():
    slow = dict(OURS, delivered=2500.0)  # 1.25 < 1.5
    rows = _rows(messaging.render_vs(slow, dict(THEIRS, rtt_p50=None), ARGS))
    assert rows["delivered messages per second, 2,000 one-way"][5].startswith("MISS")
    assert rows["round trip p50"][2:4] == ["hung", "n/a"]
    alone = _rows(messaging.render_vs(OURS, None, ARGS))
    assert all(r[2] == "(not installed)" for r in alone.values())
