"""Dispatcher: coroutine items run on the loop (no worker), in order per key with sync items, and stop() waits
for a running one (as it waits for a running sync handler)."""
from __future__ import annotations

import asyncio
import threading
import time

from agentcp.msg.dispatcher import Dispatcher


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_coroutine_and_sync_items_of_one_key_run_in_order_and_others_run_concurrently():
    d = Dispatcher("agentcp-test-dispatch", workers=2)
    order, where = [], []
    try:
        async def slow(tag):
            where.append(threading.current_thread().name)
            await asyncio.sleep(0.05)
            order.append(tag)

        d.submit("s1", lambda: slow("a1"), coroutine=True)
        d.submit("s1", lambda: order.append("s1"))
        d.submit("s1", lambda: slow("a2"), coroutine=True)
        d.submit("s2", lambda: slow("other"), coroutine=True)  # another key: not behind s1
        _wait(lambda: len(order) == 4)
        assert order.index("other") < order.index("s1")
        assert [t for t in order if t != "other"] == ["a1", "s1", "a2"]
        assert set(where) == {"agentcp-test-dispatch-asyncio"}
        assert d.backlog() == {"messages": 0, "bytes": 0}
    finally:
        d.stop(5)


def test_stop_waits_for_a_running_coroutine_item():
    d = Dispatcher("agentcp-test-dispatch", workers=1)
    done = threading.Event()
    started = threading.Event()

    async def work():
        started.set()
        await asyncio.sleep(0.2)
        done.set()

    d.submit("k", work, coroutine=True)
    assert started.wait(2)
    d.stop(5)
    assert done.is_set()  # finished, not cancelled
    assert not [t for t in threading.enumerate() if t.name.startswith("agentcp-test-dispatch")]


def test_a_coroutine_item_that_overruns_is_cancelled_and_the_key_goes_on():
    d = Dispatcher("agentcp-test-dispatch", workers=1, handler_timeout=0.05)
    after = threading.Event()
    try:
        async def stuck():
            await asyncio.sleep(30)

        d.submit("k", stuck, coroutine=True)
        d.submit("k", after.set)
        assert after.wait(3)
        assert d.counters["timeouts"] == 1
    finally:
        d.stop(5)
