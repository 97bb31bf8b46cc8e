"""Interop with the published agentcp 0.1.99: a 0.1.99 agent process and our agent on one devserver.

Marked ``interop`` (``python -m pytest -m interop``; CI runs it). Skipped when 0.1.99 cannot be installed into a
side virtual environment (see ``tests/peer0199.py``). Covers what went wrong between 0.2.0 and 0.1.99 peers:
bursts whose ids share one millisecond stamp (10/10 must arrive), a 2,000-message one-way run (all must arrive),
a stream from 0.1.99 read by our ``fetch_stream_message``, and replies both ways.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from conftest import fast_messaging, until
from peer0199 import LineProcess, peer_env, side_python

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

# The 0.1.99 side: one agent, driven line by line over stdin; every answer is one JSON line on stdout.
PEER = r'''
import asyncio, json, sys, threading, time
from agentcp import AgentCP

def say(**kw):
    sys.stdout.write("PEER " + json.dumps(kw) + "\n")
    sys.stdout.flush()

target = sys.argv[1]
acp = AgentCP("./", seed_password="peer seed")
aid = acp.create_aid("agentunion.cn", "peer")
got = []

@aid.message_handler()
async def on_message(msg):
    text = aid.get_content_from_message(msg)
    got.append(text)
    if isinstance(text, str) and text.startswith("to-peer"):
        aid.reply_message(msg, "peer echo: " + text)

aid.online()
sid = aid.create_session("interop", "0.1.99 and 0.2")
aid.invite_member(sid, target)
say(event="ready", aid=aid.id, session=sid, online=bool(aid.is_online_success))
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "burst":
        t0 = time.time()
        ok = [bool(aid.send_message_content(sid, [target], "burst %d" % i)) for i in range(int(arg))]
        say(event="sent", ok=sum(ok), ms=int((time.time() - t0) * 1000))
    elif cmd == "flood":
        t0 = time.time()
        ok = [bool(aid.send_message_content(sid, [target], "flood %d" % i)) for i in range(int(arg))]
        say(event="sent", ok=sum(ok), seconds=time.time() - t0)
    elif cmd == "ask":
        aid.send_message_content(sid, [target], "question from 0.1.99")
        say(event="asked")
    elif cmd == "stream":
        chunks = [{"choices": [{"delta": {"content": part}}]} for part in ("streamed ", "by ", "0.1.99")]
        result = asyncio.run(aid.send_stream_message(sid, [target], chunks))
        say(event="streamed", result=repr(result))
    elif cmd == "got":
        say(event="got", got=got)
    elif cmd == "quit":
        break
say(event="bye")
import os
os._exit(0)  # 0.1.99 leaves non-daemon threads behind; its exit is not what is tested here
'''


class Peer(LineProcess):
    """The 0.1.99 process: ``ask(cmd)`` writes a command line and returns the next answer."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(proc, "PEER ")

    def next(self, timeout: float = 60.0) -> dict:
        try:
            return super().next(timeout)
        except RuntimeError as exc:
            raise AssertionError(f"the 0.1.99 peer said nothing; {exc}") from None


@pytest.fixture(scope="module")
def py0199(tmp_path_factory):
    return side_python(tmp_path_factory)


@pytest.fixture
def devnet():
    """The same network as ``python -m agentcp devserver`` (on a free port): ``(server, access_point)``."""
    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    try:
        yield server, access_point
    finally:
        server.stop()


@pytest.fixture
def pair(py0199, tmp_path, devnet):
    """``(ours, peer, session_id)``: our agent online, a 0.1.99 agent that invited it into a session."""
    from agentcp import AgentCP

    server, access_point = devnet
    acp = AgentCP(str(tmp_path / "ours"), seed_password="s", run_proxy=False, ap_url=access_point.url)
    ours = fast_messaging(acp.create_aid("example.com", "ours"))
    ours.online()
    home = tmp_path / "peer_home"
    home.mkdir()
    (home / "peer.py").write_text(PEER, encoding="utf-8")
    harness = tmp_path / "harness"
    harness.mkdir()
    proc = subprocess.Popen([str(py0199), "peer.py", ours.id], cwd=str(home),
                            env=peer_env(harness, access_point.url),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peer = Peer(proc)
    try:
        ready = peer.next(120)
        assert ready["event"] == "ready" and ready["online"] and ready["session"], ready
        sid = ready["session"]
        until(lambda: ours.session_manager.get(sid) is not None, timeout=15, what="our agent joined 0.1.99's session")
        messages = access_point.messages
        messages.wait_for(lambda: ours.id in messages.members(sid), timeout=10)
        yield ours, peer, sid
        peer.ask("quit", timeout=20)
    finally:
        ours.offline()
        proc.kill()
        proc.wait(10)


def _texts(aid):
    got = []
    aid.add_message_handler(lambda msg: got.append(aid.get_content_from_message(msg)))
    return got


def test_a_burst_from_0199_arrives_whole(pair):
    ours, peer, sid = pair
    got = _texts(ours)
    sent = peer.ask("burst 10")
    assert sent["ok"] == 10
    until(lambda: len(got) >= 10, timeout=15, what="the burst of 10")
    time.sleep(0.2)
    assert sorted(got) == sorted(f"burst {i}" for i in range(10)), got


def test_two_thousand_one_way_from_0199_all_arrive(pair):
    ours, peer, sid = pair
    got = _texts(ours)
    sent = peer.ask("flood 2000", timeout=120)
    assert sent["ok"] == 2000
    until(lambda: len(got) >= 2000, timeout=60, what="2,000 one-way messages")
    time.sleep(0.2)
    assert sorted(got) == sorted(f"flood {i}" for i in range(2000))


def test_replies_both_ways(pair):
    ours, peer, sid = pair
    replies = []

    @ours.message_handler()
    async def answer(msg):
        text = ours.get_content_from_message(msg)
        if text == "question from 0.1.99":
            ours.reply_message(msg, "answer from 0.2")
        elif isinstance(text, str) and text.startswith("peer echo:"):
            replies.append(text)

    assert peer.ask("ask")["event"] == "asked"
    assert ours.send_message_content(sid, [peer_aid(peer, sid, ours)], "to-peer hello").wait(5)
    until(lambda: replies, timeout=15, what="0.1.99's reply to us")
    assert replies == ["peer echo: to-peer hello"]
    until(lambda: "answer from 0.2" in peer.ask("got")["got"], timeout=15, what="our reply at 0.1.99")


def peer_aid(peer, sid, ours) -> str:
    members = ours.get_session_member_list(sid) or []
    others = [m.get("agent_id") if isinstance(m, dict) else m for m in members]
    others = [a for a in others if a and a != ours.id]
    assert others, members
    return others[0]


def test_a_stream_from_0199_reaches_fetch_stream_message(pair):
    ours, peer, sid = pair
    texts = []

    @ours.message_handler()
    async def on_stream(msg):
        blocks = ours.get_content_array_from_message(msg)
        if blocks and isinstance(blocks[0], dict) and blocks[0].get("type") == "text/event-stream":
            texts.append(await_in_thread(lambda: ours.fetch_stream_message(msg)))

    streamed = peer.ask("stream", timeout=60)
    assert streamed["result"] == "True", streamed
    until(lambda: texts, timeout=20, what="the stream read by fetch_stream_message")
    assert texts == ["streamed by 0.1.99"]


def await_in_thread(fn):
    return fn()
