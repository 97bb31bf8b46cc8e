"""The heartbeat state machine, driven with plain numbers: no sockets, no sleeping."""
from __future__ import annotations

import pytest

from agentcp.heartbeat.liveness import Action, Liveness, LivenessConfig, State


def machine(**kw) -> Liveness:
    """A machine without phase jitter or re-sign-in spread (those have tests of their own below)."""
    kw.setdefault("jitter", 0.0)
    kw.setdefault("first_beat_min", 1.0)
    kw.setdefault("reauth_spread", 0.0)
    return Liveness(LivenessConfig(**kw), rand=lambda: 0.5)


def online_machine(t: float = 0.0) -> Liveness:
    m = machine()
    m.start(t, have_session=True)
    assert m.poll(t).action is Action.SEND_BEAT
    m.beat_sent(t)
    m.reply(t + 0.01, 5000)
    assert m.state is State.ONLINE
    return m


def test_first_beat_is_immediate_with_a_session():
    m = machine()
    m.start(100.0, have_session=True)
    assert m.poll(100.0).action is Action.SEND_BEAT


def test_without_a_session_it_signs_in_first():
    m = machine()
    m.start(0.0, have_session=False)
    assert m.poll(0.0).action is Action.SIGN_IN
    m.repair_started(0.0)
    assert m.poll(0.5).action is Action.NONE  # single flight while the sign-in runs
    m.signed_in(0.5)
    assert m.poll(0.5).action is Action.SEND_BEAT


def test_next_beat_follows_the_server_interval_from_the_send_time():
    m = online_machine()
    d = m.poll(1.0)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(5.0)
    m.reply(0.02, 12000)
    assert m.poll(1.0).wake_at == pytest.approx(12.0)


@pytest.mark.parametrize("next_beat, expected", [(0, 5.0), (1000, 5.0), (5000, 5.0), (30000, 30.0),
                                                 (10**9, 60.0), (2**64 - 1, 60.0)])
def test_next_beat_is_clamped(next_beat, expected):
    m = online_machine()
    m.reply(0.02, next_beat)
    assert m.interval == expected


def test_401_is_never_an_interval_and_triggers_one_sign_in():
    """Upstream U1 kept 401 ms as the interval; 0.1.99 re-signed-in on the receive thread."""
    m = online_machine()
    m.poll(5.0)
    m.beat_sent(5.0)
    m.reply(5.001, 401)
    assert m.interval == 5.0
    assert m.state is State.RECONNECTING
    assert m.poll(5.001).action is Action.SIGN_IN
    m.repair_started(5.001)
    m.reply(5.002, 401)  # more 401s while signing in: still one sign-in
    m.reply(5.003, 401)
    assert m.poll(5.004).action is Action.NONE
    assert m.counters.reconnects == {"401": 1}
    m.signed_in(5.05)
    assert m.poll(5.05).action is Action.SEND_BEAT  # first beat right after the new sign-in
    m.beat_sent(5.05)
    m.reply(5.051, 5000)
    assert m.state is State.ONLINE
    assert any(e.kind == "recovered" for e in m.history)


def drive(m: Liveness, t: float, until: float, on_beat=None):
    """Run the machine alone (no replies unless ``on_beat`` answers); returns the actions with their times."""
    actions = []
    while t < until:
        d = m.poll(t)
        if d.action is Action.SEND_BEAT:
            m.beat_sent(t)
            actions.append(("beat", t))
            if on_beat is not None:
                on_beat(m, t)
            continue
        if d.action is Action.REBUILD_SOCKET:
            actions.append(("rebuild", t))
            m.repair_started(t)
            m.socket_rebuilt(t)
            continue
        if d.action is Action.SIGN_IN:
            actions.append(("sign_in", t))
            break
        t = d.wake_at
    return actions


def test_silent_server_detected_within_interval_plus_three_timeouts():
    m = online_machine()  # last reply at 0.01
    actions = drive(m, 0.0, 20.0)
    # beat at 5, probes at 6 and 7, silent at 8: the cheap step first (rebuild + probe), sign-in only when the
    # rebuilt socket's probes go unanswered too.
    assert actions[:4] == [("beat", 5.0), ("beat", 6.0), ("beat", 7.0), ("rebuild", 8.0)]
    assert actions[4:] == [("beat", 8.0), ("beat", 9.0), ("beat", 10.0), ("sign_in", pytest.approx(11.0))]
    assert m.counters.reconnects == {"silent": 1}


def test_a_late_reply_after_a_miss_restores_health():
    m = online_machine()
    m.poll(5.0)
    m.beat_sent(5.0)
    assert m.poll(6.0).action is Action.SEND_BEAT  # miss 1 -> probe
    m.beat_sent(6.0)
    m.reply(6.2, 5000)
    assert m.consecutive_misses == 0 and m.state is State.ONLINE


def test_repeated_reconnects_without_a_reply_back_off():
    m = online_machine()
    m.reply(0.02, 401)
    assert m.poll(0.02).action is Action.SIGN_IN  # first: immediate
    m.repair_started(0.02)
    m.signed_in(0.03)
    m.poll(0.03)
    m.beat_sent(0.03)
    m.reply(0.04, 401)  # the server rejects the fresh session too
    d = m.poll(0.04)
    assert d.action is Action.NONE and 7.0 <= d.wake_at - 0.04 <= 9.5


def test_sign_in_failures_back_off_with_a_floor_and_a_cap():
    m = machine()
    m.start(0.0, have_session=False)
    t = 0.0
    attempts = []
    while t < 200:
        d = m.poll(t)
        if d.action is Action.SIGN_IN:
            attempts.append(t)
            m.repair_started(t)
            m.sign_in_failed(t, "503")
            continue
        t = d.wake_at
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert min(gaps) >= 7.0 and max(gaps) <= 9.5


def test_permanent_sign_in_errors_are_retried_rarely():
    m = machine()
    m.start(0.0, have_session=False)
    m.poll(0.0)
    m.repair_started(0.0)
    m.sign_in_failed(0.0, "403 forbidden", permanent=True)
    assert m.poll(0.0).wake_at == pytest.approx(60.0)


def test_retry_after_is_honoured_up_to_the_cap():
    m = machine()
    m.start(0.0, have_session=False)
    m.repair_started(0.0)
    m.sign_in_failed(0.0, "429", retry_after=9.2)
    assert m.poll(0.0).wake_at == pytest.approx(9.2)
    m.sign_in_failed(0.0, "429", retry_after=500.0)
    assert m.poll(0.0).wake_at == pytest.approx(9.5)


def test_socket_error_rebuilds_at_once_and_probes():
    m = online_machine()
    m.socket_failed(1.0)
    assert m.poll(1.0).action is Action.REBUILD_SOCKET
    m.repair_started(1.0)
    m.socket_rebuilt(1.001)
    assert m.poll(1.001).action is Action.SEND_BEAT


def test_persistent_socket_errors_do_not_spin():
    m = online_machine()
    t = 1.0
    rebuilds = []
    while t < 30:
        d = m.poll(t)
        if d.action is Action.REBUILD_SOCKET:
            rebuilds.append(t)
            m.repair_started(t)
            m.socket_rebuilt(t)
        elif d.action is Action.SEND_BEAT:
            m.socket_failed(t)  # every send fails (network down)
        else:
            t = d.wake_at
    assert len(rebuilds) < 15


def test_unreachable_means_sign_in_again():
    m = online_machine()
    m.socket_failed(1.0, unreachable=True)
    assert m.poll(1.0).action is Action.SIGN_IN
    assert m.counters.reconnects == {"unreachable": 1}


def test_stop_is_final_and_quiet():
    m = online_machine()
    m.stop(1.0)
    assert m.state is State.STOPPED
    m.reply(1.1, 401)
    m.socket_failed(1.2)
    assert m.poll(1.3).action is Action.NONE and m.poll(1.3).wake_at is None


def test_state_changes_are_reported_once():
    m = online_machine()
    changes = m.take_state_changes()
    assert [(a.value, b.value) for a, b in changes] == [("offline", "connecting"), ("connecting", "online")]
    assert m.take_state_changes() == []


def test_snapshot_has_the_documented_fields():
    m = online_machine()
    snap = m.snapshot(3.0)
    for key in ("state", "beats_sent", "replies", "misses", "reconnects", "last_rtt", "last_reply_age"):
        assert key in snap
    assert snap["last_reply_age"] == pytest.approx(2.99)
    assert snap["last_rtt"] == pytest.approx(0.01)
