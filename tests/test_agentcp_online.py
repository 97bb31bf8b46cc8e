"""AgentID.online()/offline()/status() against FakeACPServer + AccessPoint over real sockets."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from agentcp import AgentCP, AgentID
from agentcp.base.backoff import Backoff
from agentcp.context import ErrorContext

from conftest import FAST


def _agent_threads():
    return {t for t in threading.enumerate() if t.name.startswith("agentcp-") and t.name != "agentcp-error-context"}


def _fast(aid: AgentID) -> AgentID:
    aid.RECONNECT_BACKOFF = FAST
    aid.PERMANENT_BACKOFF = FAST
    return aid


def test_independent_identity_goes_online_and_offline_joins_threads(tmp_path, acp_server, network):
    before = _agent_threads()
    acp = AgentCP(str(tmp_path), seed_password="seed", run_proxy=False, ap_url=network.url)
    # written by the fake server's own issuer (not by agentcp.ca), in the 0.1.99 layout
    acp_server.issue_identity("zoe.example.com", os.path.join(acp.aid_path, "zoe.example.com", "private", "certs"),
                              "seed")
    aid = acp.load_aid("zoe.example.com")
    assert aid is not None
    aid.online()
    assert aid.is_online_success is True
    assert aid.wait_online(5)
    acp_server.wait_for_beats(1, agent_id="zoe.example.com", timeout=5)
    st = aid.status()
    assert st["state"] == "online" and st["online"] is True
    assert st["access_point"]["connected"] is True
    assert st["heartbeat_server"] == acp_server.heartbeat_url
    assert isinstance(st["heartbeat"], dict)
    assert aid.get_online_status(["zoe.example.com"]) == [{"agent_id": "zoe.example.com", "online": True}]
    aid.online()  # a second call while online is a no-op
    aid.offline()
    assert _agent_threads() <= before
    assert aid.status()["state"] == "offline" and aid.is_online_success is False
    assert aid.get_online_status(["zoe.example.com"]) == []
    aid.offline()  # idempotent


def test_online_while_network_down_then_up(tmp_path, acp_server, network):
    before = _agent_threads()
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = _fast(acp.create_aid("example.com", "yuri"))
    acp_server.set_sign_in("refuse")  # every HTTP connection refused: access point and heartbeat server down
    try:
        t0 = time.monotonic()
        aid.online()  # never raises, returns after the first failed attempt
        assert time.monotonic() - t0 < 5
        assert aid.is_online_success is False
        st = aid.status()
        assert st["state"] == "connecting" and st["access_point"]["last_error"]
        time.sleep(0.5)
        assert aid.status()["access_point"]["attempts"] >= 2
    finally:
        acp_server.set_sign_in("ok")
    assert aid.wait_online(10)
    assert aid.is_online_success is True and aid.status()["state"] == "online"
    aid.offline()
    assert _agent_threads() <= before


def test_access_point_503_then_back(tmp_path, acp_server, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = _fast(acp.create_aid("example.com", "xena"))
    network.set_available(False)
    aid.online()
    assert aid.is_online_success is False
    network.set_available(True)
    assert aid.wait_online(10)
    aid.offline()


def test_offline_while_retrying_stops_promptly(tmp_path, acp_server, network):
    before = _agent_threads()
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "walt")
    aid.RECONNECT_BACKOFF = Backoff(base=30, cap=30, floor=30)  # a long wait that offline() must cut short
    network.set_available(False)
    aid.online()
    t0 = time.monotonic()
    aid.offline()
    assert time.monotonic() - t0 < 2
    assert _agent_threads() <= before


def test_reauth_on_401_with_fresh_token(tmp_path, acp_server, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "vera")
    aid.online()
    assert aid.wait_online(5)
    signins = network.counters["sign_ins"]
    network.expire_tokens()
    assert aid.get_all_public_data() == []
    assert network.counters["unauthorised"] == 1 and network.counters["sign_ins"] == signins + 1
    aid.offline()


def test_init_ap_client_profile_and_sync(tmp_path, acp_server, network):
    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
    aid = acp.create_aid("example.com", "uma")
    aid.init_ap_client()
    assert aid.ap_client.get_heartbeat_server() == acp_server.heartbeat_url
    info = aid.get_publisher_info()
    assert info == {"publisherAid": "uma.example.com", "organization": "example.com",
                    "certificationSignature": "example.com"}
    profile = {
        "publisherInfo": info, "version": "1.0.0", "lastUpdated": "2026-01-01", "name": "Uma",
        "description": "test agent", "capabilities": {"core": [], "extended": []}, "llm": {},
        "references": {"knowledgeBases": [], "tools": [], "companyInfo": [], "productInfo": []},
        "authorization": {"modes": [], "fee": {}, "description": "", "sla": {}},
        "input": {"types": [], "formats": [], "examples": [], "semantics": [], "compatibleAids": []},
        "output": {"types": [], "formats": [], "examples": [], "semantics": [], "compatibleAids": []},
        "avaUrl": "", "supportStream": True, "supportAsync": False, "permission": [],
    }
    aid.create_agent_profile(profile)
    assert profile["avaUrl"].startswith("https://")
    public = aid.get_agent_public_path()
    assert sorted(os.listdir(public)) == ["agentprofile.json", "config.json", "index.html"]
    assert aid.get_my_profile_data()["name"] == "Uma"
    with pytest.raises(Exception, match="version"):
        aid.create_agent_profile({k: v for k, v in profile.items() if k != "version"})
    assert aid.sync_public_files() is True
    data = aid.get_all_public_data()
    assert data and data[0]["agent_id"] == "uma.example.com"
    aid.offline()


def test_agentcp_add_message_handler_and_context_manager(tmp_path, acp_server, network):
    before = _agent_threads()
    with AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url) as acp:

        @acp.message_handler("tess.example.com")
        async def handler(msg):
            return None

        aid = acp.get_aid("tess.example.com")
        assert aid is not None and aid.is_online_success and handler in aid.message_handlers
        with pytest.raises(ValueError):
            acp.add_message_handler(handler, "example.com")
    assert acp.shutdown_flag.is_set()
    assert aid.status()["state"] == "offline"
    assert _agent_threads() <= before


def test_serve_forever_returns_on_signal_handle(tmp_path):
    acp = AgentCP(str(tmp_path), run_proxy=False)
    calls = []
    acp.exit_hook_func = lambda signum, frame: calls.append(signum)
    threading.Timer(0.1, acp.signal_handle, args=(15, None)).start()
    t0 = time.monotonic()
    acp.serve_forever()
    assert time.monotonic() - t0 < 3 and calls == [15]
    acp.register_signal_handler()  # main thread: installs; must not raise
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_error_context_gets_online_failures(tmp_path, acp_server, network):
    got = []
    ErrorContext.subscribe("test", got.append)
    try:
        acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=network.url)
        aid = _fast(acp.create_aid("example.com", "sam"))
        network.set_available(False)
        aid.online()
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got and "503" in str(got[0])
        aid.offline()
    finally:
        ErrorContext.unsubscribe(got.append)


def test_unreachable_access_point_never_raises(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    from legacy_identity import make_test_ca, write_legacy_identity

    acp = AgentCP(str(tmp_path), seed_password="s", run_proxy=False, ap_url=f"http://127.0.0.1:{port}")
    write_legacy_identity(acp.aid_path, "rita.example.com", "s", make_test_ca())
    aid = _fast(acp.load_aid("rita.example.com"))
    aid.online()
    assert aid.is_online_success is False and aid.status()["state"] == "connecting"
    aid.offline()
    assert aid.status()["state"] == "offline"


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("register", [True, False])
def test_serve_forever_and_signals_in_a_real_process(tmp_path, register):
    import signal
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from agentcp import AgentCP\n"
        f"acp = AgentCP({str(tmp_path)!r}, run_proxy=False)\n"
        + ("acp.register_signal_handler(lambda s, f: print('hook', s, flush=True))\n" if register else "")
        + "print('ready', flush=True)\n"
        "try:\n"
        "    acp.serve_forever()\n"
        "    print('returned', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    if register:
        assert "hook 2" in out and "returned" in out
    else:
        assert "interrupted" in out
