"""The retry policy is a value: drive it with chosen random numbers and a fake sleep."""
from __future__ import annotations

import threading

import pytest
from freezegun import freeze_time

from agentcp.base.backoff import AUTH_BACKOFF, RECONNECT_BACKOFF, Backoff, Retrier


def test_full_jitter_spans_zero_to_the_exponential_ceiling():
    b = Backoff(base=0.5, cap=30.0)
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.delay(3, rand=lambda: 0.0) == 0.0
    assert b.delay(3, rand=lambda: 1.0) == 4.0
    assert b.delay(3, rand=lambda: 0.25) == 1.0


def test_cap_holds_for_huge_attempt_counts():
    assert AUTH_BACKOFF.delay(10_000, rand=lambda: 1.0) == 30.0


def test_retry_after_raises_the_wait_but_not_above_the_cap():
    assert AUTH_BACKOFF.delay(0, rand=lambda: 0.0, retry_after=12.0) == 12.0
    assert AUTH_BACKOFF.delay(0, rand=lambda: 0.0, retry_after=120.0) == 30.0


def test_reconnect_policy_bounds_the_attempt_rate_and_the_return_time():
    waits = [RECONNECT_BACKOFF.delay(n, rand=r) for n in range(20) for r in (lambda: 0.0, lambda: 1.0)]
    assert min(waits) == 2.5 and max(waits) == 9.0


def test_policy_is_an_immutable_value():
    b = Backoff()
    with pytest.raises(Exception):
        b.cap = 1  # type: ignore[misc]
    assert b.with_(cap=5.0).cap == 5.0 and b.cap == 30.0
    with pytest.raises(ValueError):
        Backoff(base=1, cap=1, floor=2)


class Flaky:
    def __init__(self, failures, exc):
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def test_retrier_retries_transient_errors_with_growing_waits():
    sleeps = []
    r = Retrier(Backoff(base=1, cap=8), max_attempts=10, sleep=sleeps.append, rand=lambda: 1.0)
    assert r.call(Flaky(4, ConnectionError("down")), is_transient=lambda e: True) == "ok"
    assert sleeps == [1, 2, 4, 8]


def test_retrier_stops_at_once_on_permanent_errors():
    sleeps = []
    fn = Flaky(5, PermissionError("403"))
    with pytest.raises(PermissionError):
        Retrier(max_attempts=10, sleep=sleeps.append).call(fn, is_transient=lambda e: False)
    assert fn.calls == 1 and sleeps == []


def test_retrier_gives_up_after_max_attempts():
    fn = Flaky(100, ConnectionError("down"))
    with pytest.raises(ConnectionError):
        Retrier(max_attempts=3, sleep=lambda s: None).call(fn, is_transient=lambda e: True)
    assert fn.calls == 3


def test_retrier_wait_is_cancellable():
    cancel = threading.Event()
    cancel.set()
    fn = Flaky(100, ConnectionError("down"))
    with pytest.raises((ConnectionError, InterruptedError)):
        Retrier(max_attempts=50, cancel=cancel).call(fn, is_transient=lambda e: True)
    assert fn.calls <= 1


def test_wall_clock_jumps_do_not_change_retry_waits():
    """The policy reads no clock: a wall-clock jump (freezegun) leaves every wait unchanged."""
    before = [AUTH_BACKOFF.delay(n, rand=lambda: 0.7) for n in range(6)]
    with freeze_time("2001-01-01"):
        during = [AUTH_BACKOFF.delay(n, rand=lambda: 0.7) for n in range(6)]
    assert before == during
