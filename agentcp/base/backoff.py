"""Retry timing as a value: capped exponential backoff with full jitter.

A :class:`Backoff` is immutable and does no I/O; it answers "how long to wait before attempt n" given a random
number, so tests drive it without sleeping. :class:`Retrier` runs a call under a policy with injectable
``sleep``/``rand``/``clock`` and is what :class:`~agentcp.base.auth_client.AuthClient` uses.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

__all__ = ["Backoff", "Retrier", "AUTH_BACKOFF", "RECONNECT_BACKOFF", "PERMANENT_ERROR_BACKOFF",
           "HEARTBEAT_RECONNECT_BACKOFF", "BLACKOUT_BACKOFF"]


@dataclass(frozen=True)
class Backoff:
    """Wait ``floor + U(0, min(cap - floor, base * multiplier**failures))`` seconds before the next attempt.

    ``failures`` is the number of consecutive failures so far, minus one (0 after the first failure). With
    ``floor == 0`` this is the classic "full jitter" scheme: every wait is drawn from zero up to an exponentially
    growing ceiling, so a crowd of clients that failed together spreads out instead of retrying in lock-step.
    A positive ``floor`` bounds the attempt rate (at most one attempt per ``floor`` seconds) while keeping the
    jitter above it; ``cap`` bounds every wait, and so bounds how long a client stays away from a server that has
    come back.
    """

    base: float = 0.5
    cap: float = 30.0
    multiplier: float = 2.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.floor < 0 or self.multiplier < 1:
            raise ValueError(f"invalid backoff parameters: {self!r}")
        if self.floor > self.cap:
            raise ValueError(f"backoff floor {self.floor} exceeds cap {self.cap}")

    def ceiling(self, failures: int) -> float:
        """The largest wait after ``failures + 1`` consecutive failures."""
        failures = max(0, int(failures))
        span = self.cap - self.floor
        # Compare exponents rather than computing base * multiplier**failures, which overflows for large counts.
        try:
            grown = self.base * (self.multiplier ** min(failures, 1024))
        except OverflowError:
            grown = float("inf")
        return self.floor + min(span, grown)

    def delay(self, failures: int, rand: Callable[[], float] = random.random, retry_after: float = 0.0) -> float:
        """The wait before the next attempt; a server's ``Retry-After`` raises it, but never above ``cap``."""
        top = self.ceiling(failures)
        wait = self.floor + (top - self.floor) * min(max(rand(), 0.0), 1.0)
        if retry_after > wait:
            wait = retry_after
        return min(wait, self.cap)

    def with_(self, **changes) -> "Backoff":
        """A copy with some parameters changed (the policy is a value; it is never mutated)."""
        return replace(self, **changes)


#: Sign-in retries inside ``AuthClient.sign_in``.
AUTH_BACKOFF = Backoff(base=0.5, cap=30.0)
#: The heartbeat's reconnect loop: at most one sign-in attempt every 2.5 s while the server is down, and back
#: within 9 s of its return (liveness targets: <= 8 attempts in a 20 s outage, <= 10 s to recover).
RECONNECT_BACKOFF = Backoff(base=0.5, cap=9.0, floor=2.5)
#: The heartbeat's sign-in retries during an outage: every wait in [7, 9.5] s. A fleet that failed together
#: spreads over 2.5 s instead of retrying in lock-step, makes about 4 attempts per agent in 30 s, and is back
#: within 10 s of the server's return (issue "liveness under packet loss and herds").
HEARTBEAT_RECONNECT_BACKOFF = Backoff(base=2.5, cap=9.5, floor=7.0)
#: Sign-in retries while nothing answers at all, neither HTTP nor the UDP probes: rare, since the probes notice
#: the network's return long before the next HTTP attempt is due.
BLACKOUT_BACKOFF = Backoff(base=20.0, cap=60.0, floor=20.0)
#: Retrying a permanent failure (wrong seed password, 4xx) is pointless until something changes; keep it rare.
PERMANENT_ERROR_BACKOFF = Backoff(base=60.0, cap=60.0, floor=60.0)


class Retrier:
    """Run a call until it succeeds, fails permanently, runs out of attempts, or is cancelled.

    ``is_transient(exc)`` says whether an exception may be retried; ``retry_after(exc)`` may return a
    server-requested wait in seconds. ``cancel`` (a :class:`threading.Event`) interrupts a wait at once.
    """

    def __init__(
        self,
        policy: Backoff = AUTH_BACKOFF,
        max_attempts: int = 11,
        *,
        sleep: Optional[Callable[[float], None]] = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        cancel: Optional[threading.Event] = None,
    ) -> None:
        self.policy = policy
        self.max_attempts = max(1, int(max_attempts))
        self.rand = rand
        self.clock = clock
        self.cancel = cancel
        self._sleep = sleep
        self.attempts = 0
        self.waited = 0.0

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds``; False if cancelled meanwhile."""
        self.waited += seconds
        if self._sleep is not None:
            self._sleep(seconds)
            return not (self.cancel is not None and self.cancel.is_set())
        if self.cancel is not None:
            return not self.cancel.wait(seconds)
        time.sleep(seconds)
        return True

    def call(
        self,
        fn: Callable[[], T],
        is_transient: Callable[[BaseException], bool],
        retry_after: Callable[[BaseException], float] = lambda exc: 0.0,
        on_retry: Optional[Callable[[int, BaseException, float], None]] = None,
    ) -> T:
        failures = 0
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise InterruptedError("retry cancelled")
            self.attempts += 1
            try:
                return fn()
            except Exception as exc:  # classified just below; permanent errors propagate unchanged
                if not is_transient(exc) or self.attempts >= self.max_attempts:
                    raise
                wait = self.policy.delay(failures, self.rand, retry_after(exc))
                failures += 1
                if on_retry is not None:
                    on_retry(self.attempts, exc, wait)
                if not self._wait(wait):
                    raise
