"""The default idle ping of the message connection: keeps 60 s idle timeouts open, detects a dead peer in 30 s."""
from __future__ import annotations

import pytest

from agentcp.base.backoff import Backoff
from agentcp.msg.channel import Action, Channel
from agentcp.msg.message_client import MessageClientConfig

#: The shortest idle timeout common on the path (nginx proxy_read_timeout, cloud load balancers).
PROXY_IDLE_TIMEOUT = 60.0


def _connected_default_channel() -> Channel:
    cfg = MessageClientConfig().channel_config()
    ch = Channel(cfg, rand=lambda: 1.0)
    ch.start(0.0, have_token=True)
    assert ch.poll(0.0).action is Action.CONNECT
    ch.repair_started(0.0)
    ch.connected(0.0)
    ch.opened(0.0)
    return ch


def test_default_is_not_the_old_five_seconds_and_keeps_idle_bindings_open():
    cfg = MessageClientConfig()
    assert cfg.ping_interval == 20.0
    # a frame in every idle window even when one ping is lost
    assert 2 * cfg.ping_interval < PROXY_IDLE_TIMEOUT


def test_idle_connection_pings_every_interval_and_a_silent_peer_is_dead_within_30_s():
    ch = _connected_default_channel()
    for k in range(1, 4):  # idle and healthy: one ping per 20 s, nothing in between
        t = 20.0 * k
        assert ch.poll(t - 0.01).action is Action.NONE
        assert ch.poll(t).action is Action.PING
        ch.ping_sent(t)
        ch.frame_received(t + 0.01)  # the pong
    # the peer goes silent right after the last pong: the next ping is never answered
    assert ch.poll(80.0).action is Action.PING
    ch.ping_sent(80.0)
    assert ch.poll(89.99).action is Action.NONE
    assert ch.poll(90.0).action is Action.DROP
    detected_after = 90.0 - 60.01
    assert detected_after <= 30.0  # ping interval + pong timeout (half of it)
    assert detected_after <= 2 * MessageClientConfig().ping_interval  # the README's bound


@pytest.mark.parametrize("interval", [0.3, 0.5, 1.0])
def test_short_intervals_set_by_callers_are_kept(interval):
    cfg = MessageClientConfig(ping_interval=interval, reconnect_backoff=Backoff(0.05, 0.2)).channel_config()
    assert cfg.ping_interval == interval
    assert cfg.effective_pong_timeout() == pytest.approx(interval / 2)
