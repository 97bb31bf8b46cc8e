"""The heartbeat machine on lossy paths and in herds: seeded loss patterns and fleets, pure (no sockets, no sleeps).

Each test reproduces a figure of the issue "liveness under packet loss and herds" that the old machine got wrong
(fixed 3-miss verdict and immediate HTTP sign-in, beats exactly one interval apart, immediate re-sign-in after a
401, retries 2.5-9 s apart).
"""
from __future__ import annotations

import heapq
import random
from collections import Counter
from typing import Callable, List, Optional, Tuple

import pytest

from agentcp.heartbeat.liveness import Action, Liveness, LivenessConfig, SignInHealth, State, probe_budget


class Sim:
    """One machine against a simulated server over a path that loses each datagram with a seeded probability.

    ``server(t, sim)`` says what the server answers a beat arriving at ``t``: a NextBeat in ms, 401, or None (silent).
    ``sign_in(t)`` says whether an HTTP sign-in started at ``t`` succeeds (True), fails with an HTTP answer
    ("http") or gets no answer at all ("network"); it takes ``sign_in_time`` seconds.
    """

    def __init__(self, seed: int, loss: float = 0.0, rtt: float = 0.06,
                 server: Callable[[float, "Sim"], Optional[int]] = lambda t, sim: 5000,
                 sign_in: Callable[[float], object] = lambda t: True, sign_in_time: float = 0.05,
                 config: Optional[LivenessConfig] = None, start: float = 0.0,
                 sent: Optional[Counter] = None) -> None:
        self.rng = random.Random(seed)
        # ``sent``: beats sent per instant, shared by a fleet of machines run one after another; each machine then
        # sees how crowded a grid slot is (the shell's reactor counts its timers due at that instant).
        self.sent = sent
        self.m = Liveness(config or LivenessConfig(), rand=random.Random(seed + 1000).random,
                          slot_load=None if sent is None else lambda at: sent[at])
        self.loss, self.rtt, self.server, self.sign_in, self.sign_in_time = loss, rtt, server, sign_in, sign_in_time
        self.events: List[Tuple[float, int, str, object]] = []
        self.n = 0
        self.beats: List[float] = []  # beats that reached the server
        self.sign_ins: List[float] = []
        self.session_since = start  # when the current session was created (sign-in completed)
        self.rebuilds: List[float] = []
        self.t = start
        self.health: Optional[SignInHealth] = None
        self.started = False
        self.m.start(start, have_session=True)
        self.wake: Optional[float] = start

    def _push(self, t: float, kind: str, data: object = None) -> None:
        self.n += 1
        heapq.heappush(self.events, (t, self.n, kind, data))

    def _lost(self) -> bool:
        return self.rng.random() < self.loss

    def _act(self) -> None:
        for _ in range(50):
            failing = self.health is not None and self.m.signing_in and self.health.failing(self.t)
            d = self.m.poll(self.t, 0.0, failing)
            if d.action is Action.SEND_BEAT:
                self.m.beat_sent(self.t)
                if self.sent is not None:
                    self.sent[self.t] += 1
                if not self._lost():
                    arrive = self.t + self.rtt / 2
                    answer = self.server(arrive, self)
                    self.beats.append(arrive)
                    if answer is not None and not self._lost():
                        self._push(self.t + self.rtt, "reply", answer)
            elif d.action is Action.REBUILD_SOCKET:
                self.m.repair_started(self.t)
                self.rebuilds.append(self.t)
                self.m.socket_rebuilt(self.t)
            elif d.action is Action.SIGN_IN:
                self.m.repair_started(self.t)
                self.sign_ins.append(self.t)
                self._push(self.t + self.sign_in_time, "signed", self.sign_in(self.t))
            else:
                self.wake = d.wake_at
                return
        raise AssertionError("machine did not settle")

    def next_time(self) -> Optional[float]:
        nxt = self.events[0][0] if self.events else None
        if self.wake is not None and (nxt is None or self.wake <= nxt):
            return self.wake
        return nxt

    def step(self) -> None:
        """Advance to the next wake-up or event, and act on it."""
        nxt = self.events[0][0] if self.events else None
        if self.wake is not None and (nxt is None or self.wake <= nxt):
            self.t, self.wake = self.wake, None
        else:
            self.t, _, kind, data = heapq.heappop(self.events)
            if kind == "reply":
                self.m.reply(self.t, data)  # type: ignore[arg-type]
            elif data is True:
                self.session_since = self.t
                self.m.signed_in(self.t)
                if self.health is not None:
                    self.health.record(self.t, True)
            else:
                self.m.sign_in_failed(self.t, str(data), network=data == "network")
                if self.health is not None:
                    self.health.record(self.t, False)
        self._act()

    def run(self, until: float) -> "Sim":
        if not self.started:
            self.started = True
            self._act()
        while True:
            t = self.next_time()
            if t is None or t > until:
                break
            self.step()
        self.t = until
        return self


def run_fleet(fleet: List[Sim], until: float) -> None:
    """Step every machine in global time order (so a shared SignInHealth sees outcomes when they happen)."""
    for sim in fleet:
        sim.started = True
        sim._act()
    queue = [(s.next_time(), i) for i, s in enumerate(fleet) if s.next_time() is not None]
    heapq.heapify(queue)
    while queue:
        t, i = heapq.heappop(queue)
        if t > until:
            break
        sim = fleet[i]
        if sim.next_time() != t:
            continue
        sim.step()
        nt = sim.next_time()
        if nt is not None:
            heapq.heappush(queue, (nt, i))


def test_probe_budget_grows_with_loss_and_is_bounded():
    assert probe_budget(0.0, 1e-5, 3, 10) == 3  # a clean path: today's 3 misses
    assert 4 <= probe_budget(0.0975, 1e-5, 3, 10) <= 6  # 5 % each way
    assert probe_budget(0.36, 1e-5, 3, 10) == 10  # 20 % each way: capped
    assert probe_budget(0.99, 1e-5, 3, 10) == 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_20_percent_loss_each_way_causes_no_sign_in(seed):
    """Old machine: 3 misses in a row (36 % round-trip loss) meant "silent" and an HTTP sign-in, every few minutes."""
    rt_loss = 1 - 0.8 * 0.8
    sim = Sim(seed, loss=0.2).run(4 * 3600.0)  # four agent-hours
    assert sim.sign_ins == []
    assert sim.m.state is State.ONLINE
    assert 0.2 < sim.m.loss < 0.6 and abs(sim.m.loss - rt_loss) < 0.2
    # The server heard from the agent at least every 1.5 intervals (7.5 s) nearly all the time.
    gaps = [b - a for a, b in zip(sim.beats, sim.beats[1:])]
    assert sum(g - 7.5 for g in gaps if g > 7.5) / (4 * 3600.0) < 0.001


def test_5_percent_loss_causes_no_verdict_at_all():
    sim = Sim(5, loss=0.05).run(4 * 3600.0)
    assert sim.rebuilds == [] and sim.sign_ins == []


def test_a_silent_server_is_still_noticed_on_a_lossy_path():
    """The budget grows with loss but stays bounded: interval + max_probe_budget timeouts after the last reply."""
    silent_from = 1800.0
    sim = Sim(7, loss=0.2, server=lambda t, s: None if t >= silent_from else 5000).run(silent_from + 40)
    assert sim.rebuilds and sim.rebuilds[0] - silent_from <= 5.0 + 10 * 1.0 + 0.5
    assert sim.sign_ins  # the rebuilt socket's probes went unanswered too: sign in over HTTP


def test_silence_heals_with_a_rebuild_and_probe_before_any_sign_in():
    """Old machine: 3 misses -> HTTP sign-in. Now a short silence (e.g. a NAT rebinding) is healed by the cheap
    step: a new socket and a probe."""
    sim = Sim(3, server=lambda t, s: None if 100.0 <= t < 108.5 else 5000).run(200.0)
    assert len(sim.rebuilds) == 1 and sim.sign_ins == []
    assert sim.m.counters.silence_healed_by_probe == 1 and sim.m.state is State.ONLINE


def test_blackout_probes_udp_and_signs_in_over_http_at_most_once():
    """30 s of total loss: the old machine signed in over HTTP every 2.5-9 s; now one attempt (no answer), then UDP
    probes every 1.5-2.5 s, and the first probe after the blackout brings the agent back."""
    cfg = LivenessConfig(blackout_probe=(1.5, 2.5))
    start, end = 100.0, 130.0
    sim = Sim(11, server=lambda t, s: 5000, sign_in=lambda t: "network" if start <= t < end else True,
              sign_in_time=10.0, config=cfg)
    sim.run(start)
    sim.loss = 1.0
    sim.run(end)
    assert len(sim.sign_ins) <= 1
    sim.loss = 0.0
    sim.run(end + 10)
    back = min(b for b in sim.beats if b >= end)
    assert back - end <= 2.6 and sim.m.state is State.ONLINE
    assert len(sim.sign_ins) <= 1


def test_beat_phases_stay_apart_in_a_fleet():
    """Old machine: beats exactly one interval apart, so 200 agents started together beat together forever."""
    cfg = LivenessConfig()
    fleet = [Sim(i, config=cfg).run(120.0) for i in range(200)]
    slots = Counter(int((b % 5.0) / 0.1) for s in fleet for b in s.beats if b > 100.0)
    assert max(slots.values()) < 0.1 * sum(slots.values())  # no 100 ms slot holds even a tenth of the beats
    gaps = [b - a for a, b in zip(fleet[0].beats[2:], fleet[0].beats[3:])]
    assert all(4.5 - 1e-9 <= g <= 5.0 + 1e-9 for g in gaps) and len(set(round(g, 6) for g in gaps)) > 1


GRID = 0.05


def _on_grid(t: float, step: float = GRID) -> bool:
    return abs(t / step - round(t / step)) < 1e-6


def test_with_a_beat_grid_every_drawn_beat_time_is_a_grid_point():
    """The jittered gaps and the first-beat offset are drawn on the grid: beats of different agents that share a
    slot are due at the same instant (one wake-up), and no beat is later than the server asked."""
    cfg = LivenessConfig(beat_grid=GRID)
    for seed in range(20):
        sim = Sim(seed, config=cfg, start=1000.0137 + 0.0137 * seed).run(1100.0)
        sent = [b - sim.rtt / 2 for b in sim.beats]
        assert not _on_grid(sent[0])  # the first beat of a session goes out at once, wherever that is
        assert all(_on_grid(t) for t in sent[1:])
        gaps = [b - a for a, b in zip(sent[1:], sent[2:])]
        assert all(4.5 - GRID - 1e-9 <= g <= 5.0 + 1e-9 for g in gaps)  # shortened by < 1 step, never longer
        assert len(set(round(g, 6) for g in gaps)) > 3  # still jittered on every interval


@pytest.mark.parametrize("grid, per_instant, most", [(0.05, 3.0, 10), (0.1, 5.0, 14)])
def test_a_beat_grid_keeps_a_fleet_spread_and_reshuffles_who_shares_a_slot(grid, per_instant, most):
    """200 agents started at once on a 50 or 100 ms grid: phases spread over the interval (about 2 or 4 agents
    per slot), and agents that share a slot once do not stay together (the per-interval jitter draws again)."""
    cfg = LivenessConfig(beat_grid=grid)
    fleet = [Sim(i, config=cfg).run(125.0) for i in range(200)]
    sent = [[round(b - s.rtt / 2, 6) for b in s.beats if 20.0 < b <= 125.0] for s in fleet]
    windows = Counter(int(t / 0.1) for beats in sent for t in beats)  # 100 ms windows of absolute time
    per_interval = sum(windows.values()) / (105.0 / 0.1)
    assert 3.0 < per_interval < 5.0  # ~200 beats per ~4.75 s, i.e. ~4 per 100 ms
    assert max(windows.values()) <= 20  # no herd: before the jitter, all 200 shared one window
    slots = Counter(t for beats in sent for t in beats)
    assert max(slots.values()) <= most and sum(slots.values()) / len(slots) < per_instant  # agents per instant
    # Pairs of agents that share a slot on half of their beats or more: none (chance alone: ~1 in 10 each).
    sets = [set(beats) for beats in sent]
    sticky = sum(1 for i in range(200) for j in range(i + 1, 200)
                 if len(sets[i] & sets[j]) >= len(sets[i]) / 2)
    assert sticky == 0


def test_a_fleet_on_a_200_ms_grid_takes_the_emptier_of_two_slots():
    """A big fleet shares wake-ups on a 200 ms grid (about 8 of 200 agents per slot at 5 s). With one random draw
    per beat some slots fill up by chance (17-19 beats in one instant were seen); drawing twice and taking the
    emptier slot keeps every slot near the mean, while each agent's phase stays random and jittered."""
    cfg = LivenessConfig(beat_grid=0.2)
    most = {}
    for balanced in (False, True):
        sent: Counter = Counter()
        fleet = [Sim(i, config=cfg, sent=sent if balanced else None).run(125.0) for i in range(200)]
        beats = [[round(b - s.rtt / 2, 6) for b in s.beats if 20.0 < b <= 125.0] for s in fleet]
        slots = Counter(t for agent in beats for t in agent)
        per_slot = sum(slots.values()) / (105.0 / 0.2)
        assert 7.5 < per_slot < 9.5  # every slot in use, ~8.5 beats each
        most[balanced] = max(slots.values())
        for agent in beats:
            gaps = [b - a for a, b in zip(agent, agent[1:])]
            assert all(4.5 - 0.2 - 1e-9 <= g <= 5.0 + 1e-9 for g in gaps)  # never later than the server asked
        # No pair in lock-step (that would be every slot shared): the wider slots make chance sharing more common
        # than on a 100 ms grid (a few pairs share half their slots), but none shares two thirds.
        sets = [set(agent) for agent in beats]
        assert all(len(sets[i] & sets[j]) < 2 / 3 * len(sets[i]) for i in range(200) for j in range(i + 1, 200))
    assert most[False] >= 15  # chance alone crowds some slot
    assert most[True] <= 12, most


def test_the_grid_step_shrinks_with_short_intervals_and_never_delays_a_beat():
    m = Liveness(LivenessConfig(min_interval=0.3, beat_grid=GRID, jitter=0.0, first_beat_min=1.0),
                 rand=lambda: 0.5)
    m.start(10.0, have_session=True)
    m.beat_sent(10.0)
    m.reply(10.001, 300)  # interval 0.3 s: the step is 4 % of it (12 ms), not 50 ms
    d = m.poll(10.001)
    assert d.wake_at == pytest.approx(10.296) and d.wake_at <= 10.3
    m = Liveness(LivenessConfig(beat_grid=GRID, jitter=0.0, first_beat_min=1.0), rand=lambda: 0.5)
    m.start(7.03, have_session=True)
    m.beat_sent(7.03)
    m.reply(7.04, 5000)
    assert m.poll(7.04).wake_at == pytest.approx(12.0)  # 12.03 rounded down to the 50 ms grid


def test_first_sign_in_after_401_is_spread_over_0_4_s():
    times = []
    for seed in range(100):
        m = Liveness(LivenessConfig(), rand=random.Random(seed).random)
        m.start(0.0, have_session=True)
        m.poll(0.0)
        m.beat_sent(0.0)
        m.reply(0.01, 5000)
        m.reply(3.0, 401)
        d = m.poll(3.0)
        times.append(0.0 if d.action is Action.SIGN_IN else d.wake_at - 3.0)
    assert max(times) <= 0.4 and min(times) >= 0.0 and max(times) - min(times) > 0.25


@pytest.mark.parametrize("shared", [False, True])
def test_outage_retries_are_few_and_recovery_is_prompt(shared):
    """200 agents learn of a restart at their next beat while sign-in answers 503 for 30 s: about 4 attempts each
    (old: about 7), all back within 10 s of the server's return. Agents of one process that share what they learn
    (``SignInHealth``) defer their first attempt while the others fail: fewer attempts, no burst above 50/s."""
    restart, end = 60.0, 90.0
    health = SignInHealth(memory=10.0) if shared else None
    fleet = []
    for i in range(200):
        sim = Sim(100 + i, server=lambda t, s: 401 if s.session_since < restart <= t else 5000,
                  sign_in=lambda t: "http" if restart <= t < end else True, start=i * 0.0123)
        sim.health = health
        fleet.append(sim)
    run_fleet(fleet, end + 15.0)
    attempts = [sum(1 for t in s.sign_ins if restart <= t < end) for s in fleet]
    assert all(s.m.state is State.ONLINE for s in fleet)
    back = max(min(b for b in s.beats if b >= s.session_since >= end) for s in fleet)
    assert back - end <= 9.7
    per_second = Counter(int(t - restart) for s in fleet for t in s.sign_ins if restart <= t < end)
    if shared:
        assert sum(attempts) / len(attempts) <= 3.5 and max(per_second.values()) <= 50
    else:
        assert sum(attempts) / len(attempts) <= 4.0 and max(attempts) <= 5


def test_a_valid_reply_cancels_a_pending_blackout_sign_in():
    m = Liveness(LivenessConfig(blackout_probe=(2.0, 2.0), reauth_spread=0.0), rand=lambda: 0.5)
    m.start(0.0, True)
    t = 0.0
    m.poll(t)
    m.beat_sent(t)
    m.reply(0.05, 5000)
    # silence: drive to the escalation
    while True:
        d = m.poll(t)
        if d.action is Action.SEND_BEAT:
            m.beat_sent(t)
        elif d.action is Action.REBUILD_SOCKET:
            m.repair_started(t)
            m.socket_rebuilt(t)
        elif d.action is Action.SIGN_IN:
            break
        else:
            t = d.wake_at
    m.repair_started(t)
    m.sign_in_failed(t + 10, "timeout", network=True)
    d = m.poll(t + 10)
    assert d.action is Action.SEND_BEAT  # probing by UDP, the HTTP retry is far away
    m.beat_sent(t + 10)
    assert m.poll(t + 10).wake_at - (t + 10) <= 2.0 and m._repair_at - (t + 10) >= 20.0
    m.reply(t + 10.05, 5000)
    assert m.state is State.ONLINE and not m.signing_in
    assert m.counters.silence_healed_by_probe == 1


def test_a_young_loss_estimate_is_a_plain_mean():
    """The estimate starts as the mean of the first outcomes: an agent new on a bad path is not judged by a
    near-zero estimate (old: no estimate; an EWMA from zero would take ~60 beats to get there)."""
    m = Liveness(LivenessConfig(), rand=lambda: 0.5)
    m._fold_outcome(1)  # one miss, then a reply
    m._fold_outcome(0)
    assert m.loss == pytest.approx(1 / 3) and m.loss_samples == 3
    assert m.budget >= 6


def test_sign_in_health_remembers_a_recent_failure_until_a_success():
    h = SignInHealth(memory=10.0)
    assert not h.failing(0.0)
    h.record(1.0, ok=False)
    assert h.failing(5.0) and not h.failing(11.5)  # forgotten after `memory` seconds
    h.record(6.0, ok=True)
    assert not h.failing(7.0)
    h.record(8.0, ok=False)
    assert h.failing(9.0)


def test_a_first_sign_in_is_deferred_once_while_peers_fail():
    m = Liveness(LivenessConfig(reauth_spread=0.0, outage_defer=(1.0, 9.0)), rand=lambda: 0.5)
    m.start(0.0, have_session=True)
    m.poll(0.0)
    m.beat_sent(0.0)
    m.reply(0.01, 5000)
    m.reply(2.0, 401)
    d = m.poll(2.0, 0.0, peers_failing=True)
    assert d.action is Action.NONE and d.wake_at == pytest.approx(7.0)
    assert m.poll(7.0, 0.0, peers_failing=True).action is Action.SIGN_IN  # deferred once only: never starved


class _CheckedLiveness(Liveness):
    """Checks that every wake time reply() and beat_sent() hand back is exactly what poll() would answer."""

    checked = 0

    def _agrees(self, now: float, wake: Optional[float]) -> None:
        if wake is None:
            return
        assert not self.has_news()  # a shortcut is only taken when there is nothing to report
        d = self.poll(now, 0.0)
        if wake <= now:
            assert d.action is Action.SEND_BEAT
        else:
            assert d.action is Action.NONE and d.wake_at == wake
        _CheckedLiveness.checked += 1

    def reply(self, now: float, next_beat_ms: int) -> Optional[float]:
        self.take_events(), self.take_state_changes()
        wake = super().reply(now, next_beat_ms)
        self._agrees(now, wake)
        return wake

    def beat_sent(self, now: float) -> Optional[float]:
        self.take_events(), self.take_state_changes()
        wake = super().beat_sent(now)
        self._agrees(now, wake)
        return wake


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_the_shortcut_wake_times_equal_what_poll_answers(loss):
    """reply() and beat_sent() return the next wake time when nothing else changed, so the shell of a big fleet
    skips a poll() per beat and per reply; that answer must be poll()'s, through loss, 401s and silences."""
    def server(t: float, sim: Sim) -> Optional[int]:
        if 300.0 <= t < 320.0:
            return None  # silent for 20 s
        return 401 if 600.0 <= t < 601.0 else 5000

    _CheckedLiveness.checked = 0
    for seed in range(3):
        sim = Sim(seed, loss=loss, server=server, config=LivenessConfig(beat_grid=0.1))
        sim.m = _CheckedLiveness(sim.m.config, rand=random.Random(seed).random)
        sim.m.start(0.0, have_session=True)
        sim.run(900.0)
        assert sim.m.state is State.ONLINE
    assert _CheckedLiveness.checked > 500
