"""The process-wide timer: agents' periodic chores on one thread that ends with the last of them."""
from __future__ import annotations

import threading
import time

import pytest

from agentcp.base.shared_timer import TIMER, SharedTimer
from conftest import until


def test_calls_run_in_time_order_on_one_thread_which_ends_when_idle():
    timer = SharedTimer(name="agentcp-test-timer")
    ran, threads = [], set()
    done = threading.Event()
    now = time.monotonic()
    for k in (3, 1, 2):
        timer.call_at(now + 0.02 * k, lambda k=k: (ran.append(k), threads.add(threading.current_thread())))
    timer.call_at(now + 0.1, done.set)
    assert done.wait(5)
    assert ran == [1, 2, 3] and len(threads) == 1
    assert timer.join_if_idle()
    assert not timer.stats()["running"]
    assert not [t for t in threading.enumerate() if t.name == "agentcp-test-timer"]


def test_cancelled_calls_do_not_run_and_a_failing_call_does_not_stop_the_others():
    timer = SharedTimer(name="agentcp-test-timer")
    ran = []
    handle = timer.call_later(0.01, lambda: ran.append("cancelled"))
    timer.cancel(handle)
    timer.call_later(0.01, lambda: 1 / 0)
    done = threading.Event()
    timer.call_later(0.03, lambda: (ran.append("ok"), done.set()))
    assert done.wait(5)
    assert ran == ["ok"] and timer.stats()["errors"] == 1
    assert timer.join_if_idle()


def test_join_if_idle_leaves_a_busy_timer_alone():
    timer = SharedTimer(name="agentcp-test-timer")
    handle = timer.call_later(3600, lambda: None)
    assert timer.join_if_idle() is False and timer.stats()["running"]
    timer.cancel(handle)
    assert timer.join_if_idle() is True


def test_online_agent_keeps_no_thread_of_its_own_for_renewal_checks(agents, monkeypatch):
    a, b = agents("alice"), agents("bob")
    checks = {a.id: 0, b.id: 0}
    for x in (a, b):
        x.RENEWAL_CHECK_INTERVAL = 0.02
        monkeypatch.setattr(x, "_maybe_renew", lambda x=x: checks.__setitem__(x.id, checks[x.id] + 1))
        x.online()
        assert x.is_online_success
    until(lambda: min(checks.values()) >= 3, timeout=5, what="renewal checks on the shared timer")
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("agentcp-online-")]  # the connect thread ended once online
    assert names.count("agentcp-timer") == 1  # one for both agents
    a.offline()
    seen, seen_b = checks[a.id], checks[b.id]
    until(lambda: checks[b.id] >= seen_b + 3, timeout=5, what="b's checks go on")
    assert checks[a.id] == seen  # none for a after offline()
    b.offline()
    assert TIMER.join_if_idle()
    assert "agentcp-timer" not in [t.name for t in threading.enumerate()]


def test_a_call_at_infinity_waits_without_breaking_the_thread():
    timer = SharedTimer(name="agentcp-test-timer")
    far = timer.call_at(float("inf"), lambda: None)
    done = threading.Event()
    timer.call_later(0.01, done.set)
    assert done.wait(5)
    timer.cancel(far)
    assert timer.join_if_idle() and timer.stats()["errors"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end is the point
def test_a_call_that_ends_its_thread_does_not_stop_later_calls():
    timer = SharedTimer(name="agentcp-test-timer")
    timer.call_later(0.0, lambda: (_ for _ in ()).throw(SystemExit()))  # ends the thread (not an Exception)
    until(lambda: not timer.stats()["running"], timeout=5, what="the thread ended")
    done = threading.Event()
    timer.call_later(0.0, done.set)
    assert done.wait(5)
    assert timer.join_if_idle()
