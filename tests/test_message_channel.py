"""The message channel state machine, driven with plain numbers (no sockets, no clock)."""
from __future__ import annotations

import pytest

from agentcp.base.backoff import Backoff
from agentcp.msg.channel import Action, Channel, ChannelConfig, ConnectionState, OutItem

BACKOFF = Backoff(base=1.0, cap=8.0)


def make(**kw) -> Channel:
    cfg = ChannelConfig(ping_interval=5.0, reconnect_backoff=BACKOFF, permanent_backoff=Backoff(60, 60, floor=60),
                        immediate_reconnect_gap=1.0, **kw)
    return Channel(cfg, rand=lambda: 1.0)  # rand 1.0: every backoff wait is its ceiling


def connect(ch: Channel, t: float, have_token: bool = True) -> None:
    if ch.state is ConnectionState.DISCONNECTED:
        ch.start(t, have_token=have_token)
    d = ch.poll(t)
    if d.action is Action.SIGN_IN:
        ch.repair_started(t)
        ch.signed_in(t)
        d = ch.poll(t)
    assert d.action is Action.CONNECT
    ch.repair_started(t)
    ch.connected(t)
    ch.opened(t)


def test_start_signs_in_then_connects_and_schedules_pings():
    ch = make()
    ch.start(0.0, have_token=False)
    assert ch.state is ConnectionState.CONNECTING
    assert ch.poll(0.0).action is Action.SIGN_IN
    ch.repair_started(0.0)
    assert ch.poll(0.1).action is Action.NONE  # busy: never asks twice
    ch.signed_in(0.2)
    assert ch.poll(0.2).action is Action.CONNECT
    ch.repair_started(0.2)
    ch.connected(0.3)
    assert ch.state is ConnectionState.CONNECTED
    d = ch.poll(0.3)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(5.3)
    assert ch.poll(5.3).action is Action.PING


def test_dead_connection_detected_within_two_ping_intervals():
    ch = make()  # pong_timeout defaults to half the ping interval
    connect(ch, 0.0)
    ch.ping_sent(5.0)
    ch.frame_received(5.01)  # the pong: the connection is alive
    # The peer vanishes right after that pong; nothing arrives any more.
    assert ch.poll(9.9).action is Action.NONE
    assert ch.poll(10.0).action is Action.PING
    ch.ping_sent(10.0)
    d = ch.poll(10.0)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(12.5)
    assert ch.poll(12.49).action is Action.NONE
    assert ch.poll(12.5).action is Action.DROP
    detected_after = 12.5 - 5.01
    assert detected_after <= 2 * ch.config.ping_interval
    assert ch.counters.dead_connections == 1


def test_any_frame_proves_the_connection_alive():
    ch = make()
    connect(ch, 0.0)
    ch.ping_sent(5.0)
    ch.frame_received(6.0)  # a relayed message instead of the pong
    assert ch.poll(7.6).action is Action.NONE


def test_pong_timeout_is_capped_by_the_ping_interval():
    assert ChannelConfig(ping_interval=2.0, pong_timeout=10.0).effective_pong_timeout() == 2.0
    assert ChannelConfig(ping_interval=2.0, pong_timeout=0.5).effective_pong_timeout() == 0.5


def test_first_reconnect_after_a_healthy_connection_is_immediate_then_backoff_grows():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.5)  # healthy
    ch.connection_lost(10.0, "closed by peer")
    assert ch.state is ConnectionState.RECONNECTING
    assert ch.poll(10.0).action is Action.CONNECT  # immediate
    ch.repair_started(10.0)
    ch.connect_failed(10.1, "refused")
    d = ch.poll(10.1)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(10.1 + 1.0)  # delay(0) ceiling = base
    assert ch.poll(11.1).action is Action.CONNECT
    ch.repair_started(11.1)
    ch.connect_failed(11.1, "refused")
    assert ch.poll(11.1).wake_at == pytest.approx(11.1 + 2.0)
    ch.repair_started(13.1)
    ch.connect_failed(13.1, "refused")  # third failure in a row: sign in before the next attempt
    assert ch.poll(13.1 + 4.0).action is Action.SIGN_IN


def test_reconnect_never_gives_up_and_stays_capped():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.1)
    ch.connection_lost(1.0)
    t = 1.0
    for _ in range(50):
        d = ch.poll(t)
        if d.action is Action.NONE:
            assert d.wake_at - t <= BACKOFF.cap + 1e-9
            t = d.wake_at
            d = ch.poll(t)
        assert d.action in (Action.CONNECT, Action.SIGN_IN)
        ch.repair_started(t)
        if d.action is Action.SIGN_IN:
            ch.signed_in(t)
            continue
        ch.connect_failed(t, "refused")
    assert ch.counters.connect_failures >= 30  # still trying after 50 rounds


def test_a_connection_that_dies_before_any_frame_counts_as_a_failure():
    ch = make()
    connect(ch, 0.0)
    ch.connection_lost(0.1, "closed by peer")  # accepted, then dropped before anything arrived
    d = ch.poll(0.1)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(1.1)


def test_immediate_reconnects_are_rate_limited():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.0)
    ch.connection_lost(0.2)
    assert ch.poll(0.2).action is Action.CONNECT
    ch.repair_started(0.2)
    ch.connected(0.2)
    ch.opened(0.2)
    ch.frame_received(0.3)
    ch.connection_lost(0.5)  # healthy again, but the last immediate reconnect was 0.3 s ago
    assert ch.poll(0.5).wake_at == pytest.approx(1.5)


def test_rejected_handshake_signs_in_again_at_once_then_backs_off():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.0)
    ch.connection_lost(3.0)
    assert ch.poll(3.0).action is Action.CONNECT
    ch.repair_started(3.0)
    ch.connect_failed(3.0, "handshake rejected: HTTP 401", auth_rejected=True)
    assert ch.poll(3.0).action is Action.SIGN_IN  # the stale token is replaced right away
    ch.repair_started(3.0)
    ch.signed_in(3.1)
    assert ch.poll(3.1).action is Action.CONNECT
    ch.repair_started(3.1)
    ch.connect_failed(3.2, "handshake rejected: HTTP 401", auth_rejected=True)
    d = ch.poll(3.2)
    assert d.action is Action.NONE and d.wake_at > 3.2  # a fresh token rejected again: back off
    assert ch.counters.auth_rejections == 2


def test_sign_in_failures_back_off_permanent_ones_rarely():
    ch = make()
    ch.start(0.0, have_token=False)
    ch.repair_started(0.0)
    ch.sign_in_failed(0.0, "503")
    assert ch.poll(0.0).wake_at == pytest.approx(1.0)
    ch.repair_started(1.0)
    ch.sign_in_failed(1.0, "bad key", permanent=True)
    assert ch.poll(1.0).wake_at == pytest.approx(61.0)


def test_outbox_keeps_order_and_refuses_when_full():
    ch = make(max_queue_size=3)
    ch.start(0.0, have_token=True)
    items = [OutItem(f"m{i}") for i in range(3)]
    assert all(ch.submit(it) for it in items)
    assert not ch.submit(OutItem("m3"))  # full: refused, never dropped silently
    assert ch.counters.refused_full == 1
    assert ch.next_item() is None  # not connected: nothing goes out
    ch.poll(0.0)
    ch.repair_started(0.0)
    ch.connected(0.0)
    assert not ch.can_send_direct() and ch.next_item() is None  # re-joins first
    ch.opened(0.0)
    assert [ch.next_item().text for _ in range(3)] == ["m0", "m1", "m2"]
    assert ch.can_send_direct()


def test_unacked_items_are_resent_first_after_a_loss_and_acks_clear_them():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.0)
    a, b, c = OutItem("a", ack_key="1"), OutItem("b", ack_key="2"), OutItem("c")
    for it in (a, b, c):
        ch.written(it)
    assert ch.inflight == 2
    assert ch.acked("1") is a
    ch.submit(OutItem("d", ack_key="4"))
    ch.connection_lost(1.0)
    assert ch.queued == 2 and ch.inflight == 0
    ch.poll(1.0)
    ch.repair_started(1.0)
    ch.connected(1.0)
    ch.opened(1.0)
    assert [ch.next_item().text for _ in range(2)] == ["b", "d"]  # "b" was unconfirmed: it goes out again first
    ch.written(b)
    assert b.attempts == 2 and ch.counters.resent == 1


def test_ack_for_a_copy_that_waits_in_the_outbox_removes_it():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.0)
    item = OutItem("x", ack_key="9")
    ch.written(item)
    ch.connection_lost(1.0)
    assert ch.queued == 1
    assert ch.acked("9") is item  # the ack of the first copy arrived late
    assert ch.queued == 0


def test_inflight_is_bounded_for_servers_that_never_ack():
    ch = make(max_queue_size=5)
    connect(ch, 0.0)
    for i in range(8):
        ch.written(OutItem(str(i), ack_key=str(i)))
    assert ch.inflight == 5 and ch.counters.unconfirmed == 3


def test_dedup_window():
    ch = make(dedup_window=3)
    assert ch.seen(("s", "1")) is False
    assert ch.seen(("s", "1")) is True
    for key in ("2", "3", "4"):
        ch.seen(("s", key))
    assert ch.seen(("s", "1")) is False  # fell out of the window
    assert ch.counters.duplicates == 1


def test_stop_returns_unconfirmed_items_and_ends_everything():
    ch = make()
    connect(ch, 0.0)
    ch.written(OutItem("a", ack_key="1"))
    ch.submit(OutItem("b"))
    left = ch.stop(1.0)
    assert [it.text for it in left] == ["a", "b"]
    assert ch.state is ConnectionState.DISCONNECTED
    assert ch.poll(2.0).action is Action.NONE and ch.poll(2.0).wake_at is None
    assert not ch.submit(OutItem("c"))
    ch.connection_lost(3.0)  # a late report changes nothing
    assert ch.state is ConnectionState.DISCONNECTED


def test_state_changes_are_reported_once():
    ch = make()
    connect(ch, 0.0)
    ch.frame_received(0.0)
    ch.connection_lost(1.0)
    changes = [(a.value, b.value) for a, b in ch.take_state_changes()]
    assert changes == [("disconnected", "connecting"), ("connecting", "connected"), ("connected", "reconnecting")]
    assert ch.take_state_changes() == []
    snap = ch.snapshot(1.0)
    assert snap["state"] == "reconnecting" and snap["losses"] == 1


def test_the_outbox_is_bounded_in_bytes_too_and_one_item_always_fits():
    ch = make(max_queue_size=100, max_queue_bytes=10)
    ch.start(0.0, have_token=True)
    assert ch.submit(OutItem("x" * 25))  # larger than the bound alone: it fits (nothing else waits)
    assert not ch.has_room() and not ch.submit(OutItem("y"))
    assert ch.counters.refused_full == 1


def test_held_bytes_follow_every_way_an_item_comes_and_goes():
    """The byte count equals the text of what is queued or in flight, whatever happens to the items."""
    import random

    rng = random.Random(7)
    ch = make(max_queue_size=50, max_queue_bytes=10_000)
    connect(ch, 0.0)
    ch.frame_received(0.0)
    keys = []
    for step in range(2000):
        op = rng.random()
        if op < 0.35:
            key = str(step) if rng.random() < 0.7 else None
            item = OutItem("m" * rng.randint(1, 40), ack_key=key)
            if ch.submit(item) and key:
                keys.append(key)
        elif op < 0.6:
            item = ch.next_item()
            if item is not None:
                ch.written(item)
        elif op < 0.75 and keys:
            ch.acked(keys.pop(rng.randrange(len(keys))))
        elif op < 0.8:
            item = ch.next_item()
            if item is not None:
                ch.requeue_front(item)
        elif op < 0.85:
            ch.evict_oldest_inflight()
        elif op < 0.9:
            ch.connection_lost(float(step))
            connect(ch, float(step))
            ch.frame_received(float(step))
        elif op < 0.95 and ch._outbox:
            ch.discard(ch._outbox[rng.randrange(len(ch._outbox))])
        else:
            ch.written(OutItem("d" * rng.randint(1, 40), ack_key=f"d{step}"))  # a direct write
            keys.append(f"d{step}")
        held = sum(len(i.text) for i in ch._outbox) + sum(len(i.text) for i in ch._inflight.values())
        assert ch.snapshot(0.0)["held_bytes"] == held, step
    ch.stop(0.0)
    assert ch.snapshot(0.0)["held_bytes"] == 0
