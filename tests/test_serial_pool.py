"""Shared callback threads: each lane in order, lanes independent, nothing runs after close, no idle threads."""
from __future__ import annotations

import threading
import time

import pytest

from agentcp.base.serial_pool import SerialPool
from conftest import until


def _pool_threads(name):
    return [t for t in threading.enumerate() if t.name.startswith(name + "-")]


def test_each_lane_runs_in_order_on_few_threads_that_end_when_idle():
    pool = SerialPool("agentcp-test-pool", max_workers=2, linger=0.05)
    lanes = [pool.lane() for _ in range(20)]  # 20 clients, not 20 threads
    got = {i: [] for i in range(20)}
    for k in range(10):
        for i, lane in enumerate(lanes):
            lane.submit(got[i].append, k)
    until(lambda: all(len(v) == 10 for v in got.values()), timeout=5, what="all callbacks")
    assert all(v == list(range(10)) for v in got.values())
    assert pool.workers <= 2
    until(lambda: not _pool_threads("agentcp-test-pool"), timeout=5, what="idle workers end")


def test_a_slow_callback_holds_one_worker_the_other_lanes_go_on():
    pool = SerialPool("agentcp-test-pool", max_workers=2, linger=0.05)
    slow, fast = pool.lane(), pool.lane()
    release = threading.Event()
    ran = []
    slow.submit(release.wait, 5)
    slow.submit(ran.append, "slow after")
    fast.submit(ran.append, "fast")
    until(lambda: ran == ["fast"], timeout=5, what="the other lane")
    release.set()
    until(lambda: ran == ["fast", "slow after"], timeout=5, what="the slow lane")
    assert pool.join_if_idle()


def test_close_drops_queued_callbacks_and_waits_for_the_running_one():
    pool = SerialPool("agentcp-test-pool", max_workers=1, linger=0.05)
    lane = pool.lane()
    started, ran = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.2)
        ran.append("slow")

    lane.submit(slow)
    lane.submit(ran.append, "queued")
    assert started.wait(5)
    lane.close()
    assert ran == ["slow"]  # close() returned after the running one, and the queued one never runs
    assert lane.submit(ran.append, "late") is False
    assert pool.join_if_idle() and not _pool_threads("agentcp-test-pool")


def test_close_from_inside_the_lane_callback_does_not_deadlock():
    pool = SerialPool("agentcp-test-pool", max_workers=1, linger=0.05)
    lane = pool.lane()
    done = threading.Event()

    def closes_itself():
        lane.close()
        pool.join_if_idle()  # from a worker: it leaves the caller alone
        done.set()

    lane.submit(closes_itself)
    assert done.wait(5)
    until(lambda: not _pool_threads("agentcp-test-pool"), timeout=5, what="the worker ends")


def test_join_if_idle_refuses_while_work_is_running():
    pool = SerialPool("agentcp-test-pool", max_workers=1, linger=5)
    lane = pool.lane()
    started, release = threading.Event(), threading.Event()
    lane.submit(lambda: (started.set(), release.wait(5)))
    assert started.wait(5)
    assert pool.join_if_idle() is False
    release.set()
    until(lambda: pool.join_if_idle(), timeout=5, what="idle")
    assert not _pool_threads("agentcp-test-pool")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end is the point
def test_a_callback_that_ends_its_thread_does_not_stop_the_lane():
    pool = SerialPool("agentcp-test-pool", max_workers=1, linger=0.05)
    lane = pool.lane()
    ran = []

    def ends_thread():
        raise SystemExit()

    lane.submit(ends_thread)
    lane.submit(ran.append, "after")
    until(lambda: ran == ["after"], timeout=5, what="the next callback on a new worker")
    lane.close()  # returns: nothing is marked running any more
    assert pool.join_if_idle()
