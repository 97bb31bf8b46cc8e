"""Issue 7, items 5-9: hostile peers and servers over real sockets (trust.md rules 4 and 7).

Each test plays the attacker and asserts what the attacker did NOT get: a silenced agent, memory, a 4 GiB file,
a call that never returns, unbounded threads, lost messages.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import tracemalloc

import pytest

from agentcp.base.limits import MiB
from agentcp.testing.hostile import FAR_OFFSET, HostileServer
from agentcp.testing.message_server import OP_CONT, OP_TEXT, encode_frame
from test_messaging_api import _pair, _until

#: What one hostile source may cost the client (the issue's bar).
MEMORY_BAR = 64 * MiB


def _limits(aid, **bounds):
    aid.limits = dataclasses.replace(aid.limits, **bounds)


class _Peak:
    """Peak traced Python memory above the level at entry (client and in-process fake server together)."""

    def __enter__(self):
        tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        self.grew = tracemalloc.get_traced_memory()[1] - self.base
        tracemalloc.stop()


def _block(text):
    return json.dumps([{"type": "content", "status": "success", "timestamp": 1, "content": text}])


def _crossed(aid, bound):
    return aid.status()["trust"]["limits_crossed"].get(bound, 0)


def _reconnected(network, aid, old_conn):
    conn = network.messages.connection(aid.id)
    return conn is not None and conn is not old_conn and aid.status()["messaging"]["state"] == "connected"


# --- item 5: a peer's text the SDK cannot encode ------------------------------------------------------------------
def test_a_peers_lone_surrogate_id_fails_only_that_reply_and_messages_keep_flowing(agents, network):
    a, b, sid = _pair(agents, network)
    replies, at_a = [], []

    def answer(msg):
        replies.append(b.reply_message(msg, "re: " + str(b.get_content_from_message(msg))))

    b.add_message_handler(answer)
    a.add_message_handler(lambda msg: at_a.append(a.get_content_from_message(msg)))
    # The attacker: a message whose id is a lone surrogate (legal JSON "\ud800"); b's reply echoes it in ref_msg_id.
    network.messages.push(b.id, "session_message", {
        "session_id": sid, "message_id": "\ud800", "sender": a.id, "receiver": b.id, "ref_msg_id": "",
        "message": _block("poison"), "timestamp": "1"})
    _until(lambda: replies, what="the reply to the poisoned message")
    assert replies[0].failed and "UTF-8" in replies[0].error and "not sent" in replies[0].error
    stats = b.session_manager.message_client.stats()
    assert stats["inflight"] == 0 and stats["queued"] == 0 and stats["unencodable"] == 1
    # A reconnect: nothing poisoned is resent, nothing behind it is blocked.
    old = network.messages.connection(b.id)
    network.messages.drop_all()
    _until(lambda: _reconnected(network, b, old), what="b reconnected")
    for i in range(3):
        assert a.send_message_content(sid, [b.id], f"after {i}")
    _until(lambda: len(at_a) == 3, what="replies after the poison")
    assert at_a == ["re: after 0", "re: after 1", "re: after 2"]
    assert replies[-1] and not replies[-1].failed


def test_unencodable_text_is_refused_at_every_send_call(agents, network):
    a, b, sid = _pair(agents, network)
    # Content travels JSON-encoded inside "message" (escaped, so encodable, as 0.1.99 sent it); ids travel raw.
    assert not a.send_message(sid, [b.id], "odd \udfff text").failed
    for result in (a.send_message_content(sid, [b.id], "ok", ref_msg_id="\ud800"),
                   a.send_message(sid, [b.id], "ok", message_id="\ud800")):
        assert result.failed and "UTF-8" in result.error
    push, _pull = __import__("asyncio").run(a.create_stream(sid, [b.id]))
    chunk = a.send_chunk_to_stream(sid, push, "bad \ud800 chunk")
    assert chunk.failed and "UTF-8" in chunk.error
    assert a.send_chunk_to_stream(sid, push, "fine")
    assert a.close_stream(sid, push)  # the refused chunk never entered the stream: it closes cleanly
    assert a.send_message_content(sid, [b.id], "still fine")


# --- item 6: size bounds on incoming WebSocket messages -----------------------------------------------------------
def _attack_until_closed(network, aid, first: bytes, more: bytes, budget: int) -> int:
    """Write ``first`` then ``more`` repeatedly to ``aid``'s current connection until it goes (or ``budget``)."""
    conn = network.messages.connection(aid.id)
    sent = 0
    piece = first
    while sent < budget and network.messages.send_raw(aid.id, piece, wait=2.0, connection=conn):
        sent += len(piece)
        piece = more
    return sent


def _flows(a, b, sid, text):
    got = []
    b.add_message_handler(lambda msg: got.append(b.get_content_from_message(msg)), sid)
    assert a.send_message_content(sid, [b.id], text)
    _until(lambda: got == [text], what=f"{text!r} delivered")


def test_endless_fragmented_message_is_cut_at_the_bound_with_1009_and_the_channel_recovers(agents, network):
    a, b, sid = _pair(agents, network, setup=lambda a, b: _limits(b, ws_message_max=2 * MiB))
    old = network.messages.connection(b.id)
    piece = b"x" * MiB
    with _Peak() as peak:
        sent = _attack_until_closed(network, b, encode_frame(OP_TEXT, piece, fin=False),
                                    encode_frame(OP_CONT, piece, fin=False), budget=96 * MiB)
    assert (b.id, 1009) in network.messages.close_codes
    assert sent < 16 * MiB  # cut at the bound, not when the attacker gave up
    assert peak.grew < MEMORY_BAR
    assert _crossed(b, "ws_message_max") == 1
    _until(lambda: _reconnected(network, b, old), what="b reconnected after the 1009")
    _flows(a, b, sid, "after the endless message")


@pytest.mark.parametrize("bound", [2 * MiB, None], ids=["lowered", "default"])
def test_frame_announcing_2_40_bytes_is_refused_from_its_header(agents, network, bound):
    a, b, sid = _pair(agents, network, setup=lambda a, b: bound and _limits(b, ws_message_max=bound))
    old = network.messages.connection(b.id)
    header = bytes([0x81, 127]) + (1 << 40).to_bytes(8, "big")
    with _Peak() as peak:
        sent = _attack_until_closed(network, b, header, b"\0" * MiB, budget=80 * MiB)
    assert (b.id, 1009) in network.messages.close_codes
    assert sent < 16 * MiB
    assert peak.grew < MEMORY_BAR
    assert _crossed(b, "ws_message_max") == 1
    _until(lambda: _reconnected(network, b, old), what="b reconnected after the 1009")
    _flows(a, b, sid, "after the huge frame")


def test_message_at_the_bound_still_arrives(agents, network):
    a, b, sid = _pair(agents, network, setup=lambda a, b: _limits(b, ws_message_max=256 * 1024))
    _flows(a, b, sid, "y" * (200 * 1024))
    assert _crossed(b, "ws_message_max") == 0


def test_stream_push_socket_refuses_a_huge_frame_and_fails_the_stream_truthfully():
    from agentcp.base.limits import DEFAULT_LIMITS
    from agentcp.msg.stream_client import StreamClient

    crossed = []
    with HostileServer("huge_frame") as srv, _Peak() as peak:
        client = StreamClient("a.example.com", "s", srv.url, "token",
                              limits=dataclasses.replace(DEFAULT_LIMITS, stream_chunk_max=MiB),
                              on_limit=crossed.append)
        client.start_websocket_client()
        _until(lambda: client.failed, what="the stream failed")
        late = client.send_chunk_to_stream("hello")
        assert late.failed and "stream_chunk_max" in late.error
        assert not client.close_stream()
    assert "stream_chunk_max" in client.failed
    assert [e.bound for e in crossed] == ["stream_chunk_max"]
    assert peak.grew < MEMORY_BAR
    assert client.join(1.0) is not False


@pytest.mark.parametrize("file_size", [16, None], ids=["announced", "unannounced"])
def test_file_chunk_at_a_far_offset_fails_the_download_and_leaves_no_file(tmp_path, file_size):
    from agentcp.base.limits import DEFAULT_LIMITS
    from agentcp.msg.websocket_file_receiver import download_file_via_websocket

    dest = tmp_path / "got.bin"
    crossed = []
    with HostileServer("far_offset") as srv:
        ok = download_file_via_websocket(srv.url, str(dest), timeout=5, file_size=file_size,
                                         limits=DEFAULT_LIMITS, on_limit=crossed.append)
    assert ok is False
    assert os.listdir(tmp_path) == []  # no sparse 4 GiB file, no partial file
    # Beyond the announced size: refused as a protocol error; beyond the file cap: a crossed bound.
    assert [e.bound for e in crossed] == ([] if file_size else ["file_stream_max"])
    assert FAR_OFFSET > DEFAULT_LIMITS.file_stream_max


def test_file_pull_refuses_a_frame_over_the_chunk_bound(tmp_path):
    from agentcp.base.limits import DEFAULT_LIMITS
    from agentcp.msg.websocket_file_receiver import download_file_via_websocket

    crossed = []
    with HostileServer("huge_frame") as srv, _Peak() as peak:
        ok = download_file_via_websocket(srv.url, str(tmp_path / "f"), timeout=5, file_size=10,
                                         limits=dataclasses.replace(DEFAULT_LIMITS, stream_chunk_max=MiB),
                                         on_limit=crossed.append)
    assert ok is False and os.listdir(tmp_path) == []
    assert [e.bound for e in crossed] == ["stream_chunk_max"]
    assert peak.grew < MEMORY_BAR


# --- item 7: fetch_stream_message's deadline is on the whole call -------------------------------------------------
def _announce(url):
    return {"message_id": "m", "sender": "peer", "message": json.dumps([{"type": "text/event-stream",
                                                                         "content": url}])}


def test_trickling_pull_returns_what_arrived_within_the_deadline(agents):
    b = agents("bob")
    b.STREAM_PULL_TIMEOUTS = (2.0, 5.0, 1.0)
    with HostileServer("trickle", interval=0.1) as srv:
        started = time.monotonic()
        text = b.fetch_stream_message(_announce(srv.url))
        took = time.monotonic() - started
    assert took < 1.0 + 1.0
    assert isinstance(text, str) and text == "" and not text.complete  # the line never ended: nothing whole
    assert "no end within 1 s" in text.error
    assert b.status()["messaging"] is None or True  # offline agent: no messaging snapshot
    assert b._msg_counters["stream_pulls_incomplete"] == 1


def test_endless_line_is_cut_at_the_line_bound_with_bounded_memory(agents):
    b = agents("bob")
    b.STREAM_PULL_TIMEOUTS = (2.0, 5.0, 5.0)
    _limits(b, stream_chunk_max=MiB)
    with HostileServer("endless_line") as srv, _Peak() as peak:
        started = time.monotonic()
        text = b.fetch_stream_message(_announce(srv.url))
        took = time.monotonic() - started
    assert took < 5.0
    assert not text.complete and "stream_chunk_max" in text.error
    assert peak.grew < MEMORY_BAR
    assert srv.sent < 64 * MiB  # the client stopped reading at the bound
    assert _crossed(b, "stream_chunk_max") == 1


def test_pull_parser_bounds_lines_and_total_text():
    from agentcp.agent_streams import _SsePull

    pull = _SsePull(line_max=12, total_max=1000)
    assert not pull.feed(b"data: abc\n: keep-alive\ndata: de")
    assert pull.feed(b"f\nevent: done\nignored")
    assert pull.text() == "abcdef" and pull.crossed is None
    long_line = _SsePull(line_max=10, total_max=1000)
    assert not long_line.feed(b"data: 0123") and not long_line.feed(b"456789")
    assert long_line.crossed.bound == "stream_chunk_max"
    total = _SsePull(line_max=100, total_max=5)
    total.feed(b"data: abc\ndata: def\ndata: never\n")
    assert total.crossed.bound == "stream_pull_max" and total.text() == "abcdef"


# --- item 8: a bounded pool for stream-announce handlers ----------------------------------------------------------
def test_three_hundred_announces_use_a_bounded_pool_and_the_rest_are_dropped_and_counted(agents, network):
    a, b, sid = _pair(agents, network, setup=lambda a, b: _limits(b, announce_workers=4, announce_queue_max=16))
    release = threading.Event()
    lock = threading.Lock()
    seen = {"calls": 0, "max_threads": 0}

    def slow_stream_handler(msg):
        with lock:
            seen["calls"] += 1
            running = sum(1 for t in threading.enumerate() if t.name.startswith("agentcp-stream-handler"))
            seen["max_threads"] = max(seen["max_threads"], running)
        release.wait(10)

    b.add_message_handler(slow_stream_handler)
    block = [{"type": "text/event-stream", "status": "loading", "timestamp": 1, "content": "http://127.0.0.1:9/x"}]
    for _ in range(300):
        assert a.send_message(sid, [b.id], block)
    _until(lambda: b._msg_counters.get("announces_dropped", 0) == 300 - 4 - 16, timeout=10,
           what="the announces beyond the pool and its queue dropped")
    assert seen["max_threads"] <= 4
    assert _crossed(b, "announce_queue_max") == 280
    release.set()
    _until(lambda: seen["calls"] == 20, what="the pooled and queued announces handled")
    _until(lambda: not [t for t in threading.enumerate() if t.name.startswith("agentcp-stream-handler")],
           what="the pool threads ended")


# --- item 9: dispatcher back-pressure -----------------------------------------------------------------------------
def test_flood_with_a_slow_handler_is_held_back_by_back_pressure_and_nothing_is_lost(agents, network):
    a, b, sid = _pair(agents, network, setup=lambda a, b: _limits(b, handler_backlog_messages=50,
                                                                   handler_backlog_bytes=4 * MiB))
    gate = threading.Event()
    got = []

    def slow(msg):
        gate.wait(20)
        got.append(b.get_content_from_message(msg))

    b.add_message_handler(slow)
    n = 600
    for i in range(n):
        assert a.send_message_content(sid, [b.id], f"m{i:04d} " + "p" * 1000)
    network.messages.wait_for(lambda: network.messages.counters["messages"] >= n + 0)
    client = b.session_manager.message_client
    _until(lambda: client.reading_paused, what="b stopped reading")
    # Taken off the socket but not handled: at most the backlog (the reader holds one more in hand).
    taken = b._msg_counters["received"]
    assert taken <= 51, taken
    assert b._dispatcher.backlog()["messages"] <= 50
    time.sleep(3 * 0.5)  # several ping intervals while paused: the connection is not dropped as dead
    assert client.stats()["dead_connections"] == 0
    gate.set()
    _until(lambda: len(got) == n, timeout=20, what="every message delivered after the handler sped up")
    assert [t.split()[0] for t in got] == [f"m{i:04d}" for i in range(n)]  # all, once, in order
    assert client.stats()["backpressure_waits"] >= 1
    assert b._dispatcher.counters["backlog_peak"] <= 50


def test_offline_while_the_reader_is_held_back_is_prompt_and_joins_everything(agents, network):
    a, b, sid = _pair(agents, network, setup=lambda a, b: _limits(b, handler_backlog_messages=5))
    b.add_message_handler(lambda msg: time.sleep(0.05))
    for i in range(100):
        assert a.send_message_content(sid, [b.id], f"m{i}")
    client = b.session_manager.message_client
    _until(lambda: client.reading_paused, what="b stopped reading")
    started = time.monotonic()
    b.offline()
    assert time.monotonic() - started < 1.0  # the running handler finishes; the held message is left for later
    assert not client.reading_paused
    assert not [t for t in threading.enumerate() if t.name.startswith("agentcp-") and t.name.endswith(b.id)]
