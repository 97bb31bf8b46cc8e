"""One client process of ``benchmarks/messaging.py --vs-0199``, driven line by line over stdin.

It uses only the 0.1.99 public API (``AgentCP``, ``create_aid``, ``online``, ``message_handler``,
``create_session``, ``invite_member``, ``send_message_content``, ``reply_message``), so the same file runs on our
agentcp and on the published 0.1.99 in its own virtual environment. Every answer is one ``BENCH {json}`` line on
stdout (other output, e.g. a library's logging, is ignored by the parent).

    python msg_worker.py recv  <data dir> <domain> <name> [ap_url]          # records, echoes "rtt"/"probe"
    python msg_worker.py send  <data dir> <domain> <name> <target> [ap_url]  # rtt N, flood N, probe
    python msg_worker.py idle  <data dir> <domain> [ap_url]                  # online K: K idle agents

``ap_url`` is given for our agentcp; 0.1.99 has no such parameter and reaches the devserver through the redirect
``sitecustomize`` of ``tests/peer0199.py``.
"""
import faulthandler
import json
import os
import queue
import signal
import sys
import threading
import time

from agentcp import AgentCP

faulthandler.register(signal.SIGUSR1)  # the benchmark asks a process that hangs where its threads are

SEED = "bench seed"


def say(**kw):
    sys.stdout.write("BENCH " + json.dumps(kw) + "\n")
    sys.stdout.flush()


def os_threads():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def make_acp(data, ap_url):
    kwargs = {"seed_password": SEED, "run_proxy": False}
    if ap_url:
        kwargs["ap_url"] = ap_url
    return AgentCP(data, **kwargs)


def online(aid):
    aid.online()
    if not aid.is_online_success:
        say(event="error", error=f"{aid.id} did not come online")
        os._exit(2)


def recv(data, domain, name, ap_url=""):
    acp = make_acp(data, ap_url)
    aid = acp.create_aid(domain, name)
    got = []  # (monotonic time, text)

    @aid.message_handler()
    async def on_message(msg):
        if msg.get("sender") == aid.id:
            return
        text = aid.get_content_from_message(msg)
        if not isinstance(text, str):
            return
        got.append((time.monotonic(), text))
        if text == "probe" or text.startswith("rtt "):
            aid.reply_message(msg, text)

    online(aid)
    say(event="ready", aid=aid.id)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "count":
            mine = [(t, x) for t, x in list(got) if x.startswith(arg)]
            say(event="count", n=len(mine), first=mine[0][0] if mine else None, last=mine[-1][0] if mine else None,
                distinct=len({x for _, x in mine}))
        elif cmd == "reset":
            del got[:]
            say(event="reset")
        elif cmd == "quit":
            break
    say(event="bye")
    os._exit(0)  # 0.1.99 leaves non-daemon threads behind; its shutdown is not what is measured


def send(data, domain, name, target, ap_url=""):
    acp = make_acp(data, ap_url)
    aid = acp.create_aid(domain, name)
    replies = queue.Queue()

    @aid.message_handler()
    async def on_message(msg):
        if msg.get("sender") == aid.id:
            return
        text = aid.get_content_from_message(msg)
        if isinstance(text, str):
            replies.put(text)

    online(aid)
    sid = aid.create_session("benchmark", "")
    aid.invite_member(sid, target)
    say(event="ready", aid=aid.id, session=sid)

    def send_text(text):
        return aid.send_message_content(sid, [target], text)

    def drain():
        while True:
            try:
                replies.get_nowait()
            except queue.Empty:
                return

    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "probe":  # until the receiver has joined and answers
            deadline = time.monotonic() + 30
            ok = False
            while not ok and time.monotonic() < deadline:
                send_text("probe")
                try:
                    ok = replies.get(timeout=0.5) == "probe"
                except queue.Empty:
                    pass
            time.sleep(0.3)
            drain()
            say(event="probe", ok=ok)
        elif cmd == "rtt":
            samples = []
            for i in range(int(arg) + 20):  # 20 warm-up round trips are not counted
                text = f"rtt {i}"
                t0 = time.perf_counter()
                send_text(text)
                try:
                    while replies.get(timeout=5) != text:
                        pass
                except queue.Empty:
                    say(event="rtt", error=f"no echo of {text!r} within 5 s")
                    break
                if i >= 20:
                    samples.append((time.perf_counter() - t0) * 1000)
            else:
                say(event="rtt", samples=samples)
        elif cmd == "flood":
            n = int(arg)
            t0 = time.monotonic()
            ok = sum(1 for i in range(n) if send_text(f"tp {i}"))
            t1 = time.monotonic()
            say(event="flood", t0=t0, t1=t1, ok=ok)
        elif cmd == "quit":
            break
    say(event="bye")
    os._exit(0)


def idle(data, domain, ap_url=""):
    acp = make_acp(data, ap_url)
    agents = []
    say(event="ready", threads=os_threads())
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "online":
            while len(agents) < int(arg):
                aid = acp.create_aid(domain, f"idle{len(agents)}")
                online(aid)
                agents.append(aid)
            say(event="online", agents=len(agents), threads=os_threads(), py_threads=threading.active_count())
        elif cmd == "threads":
            say(event="threads", threads=os_threads(), py_threads=threading.active_count())
        elif cmd == "quit":
            break
    say(event="bye")
    os._exit(0)


if __name__ == "__main__":
    role, rest = sys.argv[1], sys.argv[2:]
    {"recv": recv, "send": send, "idle": idle}[role](*rest)
