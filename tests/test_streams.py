"""Streams (messaging.md §4) over real sockets: AgentID.send_stream_message, StreamClient, the fake stream server."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.parse
from types import SimpleNamespace

import pytest

from agentcp.msg.stream_client import StreamClientConfig, signed_url
from agentcp.msg.websocket_file_receiver import download_file_via_websocket

from conftest import FAST, until as _until


def stream_config(**changes):
    base = dict(ping_interval=0.5, pong_timeout=1.0, reconnect_backoff=FAST, give_up_after=5.0, close_timeout=5.0,
                send_timeout=5.0)
    base.update(changes)
    return StreamClientConfig(**base)


@pytest.fixture
def agents(agents):
    def make(name: str):
        aid = agents(name)
        aid.stream_config = stream_config()
        return aid

    return make


def _stream_threads():
    return [t for t in threading.enumerate() if t.name.startswith("agentcp-stream")]


@pytest.fixture
def pair(agents, network):
    a, b = agents("alice"), agents("bob")
    a.online()
    b.online()
    sid = a.create_session("chat", "")
    assert sid
    assert a.invite_member(sid, b.id)
    _until(lambda: b.session_manager.get(sid) is not None, what="b joined")
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    return a, b, sid


def _chunk(text: str) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def test_text_stream_reaches_the_receivers_handler_in_order(pair, network):
    a, b, sid = pair
    pieces = [f"tok{i} " for i in range(200)] + ["你好 + world&=?"]
    got, announces = [], []

    @b.message_handler()
    async def on_stream(msg):  # async handler that blocks while pulling, as 0.1.99 samples do
        announces.append(msg)
        got.append(b.fetch_stream_message(msg))

    result = asyncio.run(a.send_stream_message(sid, [b.id], [_chunk(p) for p in pieces]))
    assert result is True
    _until(lambda: got, what="pulled text")
    assert got[0] == "".join(pieces)
    block = json.loads(announces[0]["message"])[0]
    assert block["type"] == "text/event-stream" and block["status"] == "loading"
    assert block["content"].startswith(network.messages.url + "/stream/pull?")
    # Wire: one push_text_stream_req per chunk, the chunk's JSON form-encoded (space -> '+'), in order.
    stream = network.messages.streams.streams()[0]
    assert stream.closed and stream.sender == a.id and stream.receivers == (b.id,)
    assert stream.text_chunks() == [urllib.parse.quote_plus(json.dumps(_chunk(p), ensure_ascii=False))
                                    for p in pieces]
    assert network.messages.streams.counters["push_rejected"] == 0  # the push URL carried a valid signature
    create = network.messages.commands("session_create_stream_req", a.id)[0]
    assert create["receiver"] == b.id and create["content_type"] == "text/event-stream"
    assert not a.check_stream_url_exists(network.messages.streams.push_url(sid, stream.message_id))
    _until(lambda: not _stream_threads(), what="stream threads joined")


def test_async_generator_and_blocking_iterator_responses(pair):
    a, b, sid = pair
    texts = []
    b.add_message_handler(lambda msg: texts.append(b.fetch_stream_message(msg)))

    def obj(text):  # shaped like openai's ChatCompletionChunk: .choices[0].delta.content
        return SimpleNamespace(id="x", choices=[SimpleNamespace(index=0, delta=SimpleNamespace(content=text))])

    async def agen():
        for word in ("Hello", ", ", "stream", "!"):
            await asyncio.sleep(0)
            yield obj(word)

    def blocking():
        for word in ("slow ", "iterator"):
            time.sleep(0.02)
            yield obj(word)

    async def both():
        return (await a.send_stream_message(sid, [b.id], agen()),
                await a.send_stream_message(sid, [b.id], blocking()),
                await a.send_stream_message(sid, [b.id], ["plain text, not JSON"]))

    assert asyncio.run(both()) == (True, True, True)
    _until(lambda: len(texts) == 3, what="three pulls")
    assert sorted(texts) == sorted(["Hello, stream!", "slow iterator", "plain text, not JSON"])


def test_drop_between_chunks_loses_nothing(pair, network):
    a, b, sid = pair
    streams = network.messages.streams
    push, pull = asyncio.run(a.create_stream(sid, [b.id]))
    assert push and pull
    assert a.check_stream_url_exists(push)
    client = a._stream_client(sid, push)
    for i in range(50):
        assert a.send_chunk_to_stream(sid, push, f"c{i}").status == "queued"
    assert client.flush(5.0)  # confirmed by the server (pong after the chunks)
    assert streams.drop_all() == 1
    for i in range(50, 100):
        assert a.send_chunk_to_stream(sid, push, f"c{i}")
    assert a.close_stream(sid, push) is True
    stream = streams.get(sid, urllib.parse.parse_qs(urllib.parse.urlsplit(push).query)["message_id"][0])
    assert stream.text_chunks() == [f"c{i}" for i in range(100)]
    assert stream.push_connections == 2 and client.stats()["losses"] == 1
    assert not _stream_threads()


def test_drops_while_pushing_lose_nothing_and_keep_order(pair, network):
    a, b, sid = pair
    streams = network.messages.streams
    push, _pull = asyncio.run(a.create_stream(sid, [b.id]))
    client = a._stream_client(sid, push)
    stop = threading.Event()

    def dropper():
        for _ in range(3):
            if stop.wait(0.08):
                return
            streams.drop_all()

    thread = threading.Thread(target=dropper)
    thread.start()
    n = 3000
    for i in range(n):
        assert a.send_chunk_to_stream(sid, push, f"c{i}")
        if i % 300 == 0:
            time.sleep(0.02)  # spread the chunks over the drops
    thread.join()
    stop.set()
    assert a.close_stream(sid, push) is True
    stats = client.stats()
    got = streams.streams()[-1].text_chunks()
    firsts = list(dict.fromkeys(got))
    assert firsts == [f"c{i}" for i in range(n)]  # none lost, first arrivals in order
    # At least once: a chunk is repeated only if it was written but unconfirmed when its connection died.
    assert len(got) - n <= stats["resent"]
    assert stats["losses"] >= 1 and stats["failed"] == 0


def test_half_open_push_socket_is_detected_and_its_chunks_resent(pair, network):
    a, b, sid = pair
    a.stream_config = stream_config(ping_interval=0.2, pong_timeout=0.2)
    streams = network.messages.streams
    push, _pull = asyncio.run(a.create_stream(sid, [b.id]))
    client = a._stream_client(sid, push)
    streams.stop_pongs(True)
    started = time.monotonic()
    for i in range(20):
        assert a.send_chunk_to_stream(sid, push, f"c{i}")
    _until(lambda: client.stats()["dead"] >= 1, what="dead connection detected")
    assert time.monotonic() - started < 1.0  # a ping right after the writes, unanswered for pong_timeout
    assert client.stats()["resent"] >= 20  # nothing was confirmed, so all of it goes out again
    streams.stop_pongs(False)
    assert a.close_stream(sid, push) is True
    got = streams.streams()[-1].text_chunks()
    assert list(dict.fromkeys(got)) == [f"c{i}" for i in range(20)]


def test_unreachable_stream_server_fails_truthfully(pair, network):
    a, b, sid = pair
    a.stream_config = stream_config(give_up_after=1.0, close_timeout=5.0)
    streams = network.messages.streams
    push, _pull = asyncio.run(a.create_stream(sid, [b.id]))
    client = a._stream_client(sid, push)
    streams.refuse(True)
    streams.drop_all()
    _until(lambda: not client.connected, what="disconnected")
    results = [a.send_chunk_to_stream(sid, push, f"c{i}") for i in range(5)]
    assert all(r.status == "queued" for r in results)
    _until(lambda: client.failed, timeout=5.0, what="give up")
    assert "5 chunk(s) not confirmed" in client.failed
    later = a.send_chunk_to_stream(sid, push, "late")
    assert not later and later.status == "failed"
    assert a.close_stream(sid, push) is False
    assert not _stream_threads()


def test_file_stream_round_trip_beyond_the_old_208_kib_limit(pair, network, tmp_path):
    a, b, sid = pair
    data = os.urandom(600 * 1024 + 123)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    announces = []
    b.add_message_handler(lambda msg: announces.append(msg))
    assert asyncio.run(a.send_stream_message(sid, [b.id], None, type="file/binary", file_path=str(src))) is True
    _until(lambda: announces, what="file announce")
    block = json.loads(announces[0]["message"])[0]
    assert block["type"] == "file/binary" and block["status"] == "loading"
    assert block["extra"]["file_name"] == "blob.bin" and block["extra"]["file_size"] == len(data)
    auth = b.session_manager.message_client.auth_client
    dest = tmp_path / "received.bin"
    assert download_file_via_websocket(signed_url(block["content"], b.id, auth.signature), str(dest), timeout=10)
    assert dest.read_bytes() == data
    missing = asyncio.run(a.send_stream_message(sid, [b.id], None, type="file/binary", file_path=str(tmp_path / "no")))
    assert missing == (False, "文件不存在")


def test_stream_creation_failure_tells_the_receivers(pair, network):
    a, b, sid = pair
    errors = []
    b.add_message_handler(lambda msg: errors.append(msg))

    def refuse(conn, data):
        conn.send_json("session_create_stream_ack", {"request_id": data["request_id"], "session_id": sid,
                                                     "error": "no streams today"})

    network.messages._create_stream = refuse
    assert asyncio.run(a.send_stream_message(sid, [b.id], ["x"])) is None
    _until(lambda: errors, what="error block")
    block = json.loads(errors[0]["message"])[0]
    assert block["type"] == "error" and block["content"] == "no streams today"  # the reason, not a traceback
    assert not _stream_threads()


def test_offline_stops_open_streams_and_joins_their_threads(pair, network):
    a, b, sid = pair
    push, _pull = asyncio.run(a.create_stream(sid, [b.id]))
    assert a.send_chunk_to_stream(sid, push, "x")
    assert _stream_threads()
    a.offline()
    assert not [t for t in _stream_threads() if t.name.endswith(a.id)]
    assert not a.check_stream_url_exists(push)


def test_pull_parser_rules():
    from agentcp.agent_streams import _sse_line

    parts = []
    lines = [": keep-alive", "", "data: " + urllib.parse.quote_plus(json.dumps(_chunk("a b"))),
             urllib.parse.quote_plus(json.dumps(_chunk("c"))), "data: " + urllib.parse.quote_plus(
                 json.dumps({"choices": []})), "data: raw+text", 'data: "quoted"']
    assert not any(_sse_line(line, parts) for line in lines)
    assert parts == ["a b", "c", "raw text", '"quoted"']
    assert _sse_line("event: done", parts)


def test_signed_push_url():
    assert signed_url("ws://h/p?x=1", "a.b.c", "s/g=") == "ws://h/p?x=1&agent_id=a.b.c&signature=s%2Fg%3D"
    assert signed_url("ws://h/p", "a.b.c", None) == "ws://h/p?agent_id=a.b.c"


def test_offline_aborts_a_pull_in_progress_and_joins_the_handler(pair, network):
    a, b, sid = pair
    results = []
    b.add_message_handler(lambda msg: results.append(b.fetch_stream_message(msg)))
    push, pull = asyncio.run(a.create_stream(sid, [b.id]))
    assert a.send_message(sid, [b.id], [{"type": "text/event-stream", "status": "loading", "timestamp": 1,
                                         "content": pull}])
    assert a.send_chunk_to_stream(sid, push, "partial")
    network.messages.streams.wait_for(lambda: network.messages.streams.counters["pulls"] == 1)
    started = time.monotonic()
    b.offline()  # the stream never ends: offline must not wait for it
    assert time.monotonic() - started < 3.0
    assert results == [""]  # an unfinished stream is not passed off as complete
    assert not [t for t in _stream_threads() if t.name.endswith(b.id)]


def test_fetch_of_a_non_stream_or_unknown_stream_is_empty(pair, network):
    a, b, sid = pair
    assert b.fetch_stream_message({"message": json.dumps([{"type": "content", "content": "hi"}])}) == ""
    unknown = network.messages.streams.pull_url(sid, "no-such-stream")
    assert b.fetch_stream_message({"message": json.dumps([{"type": "text/event-stream", "content": unknown}])}) == ""
