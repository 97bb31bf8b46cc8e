"""Package-level promises: cheap import, upstream import paths, logging helpers, ErrorContext."""
from __future__ import annotations

import subprocess
import sys
import threading
import time


from agentcp.context import ErrorContext, exceptions
from agentcp.context.context import AtomicErrorContext


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_agentcp_is_cheap():
    """0.1.99 imported openai and flask and silenced urllib3 warnings process-wide at import (D-A8)."""
    out = run_python(
        "import sys, threading, socket\n"
        "opened = []\n"
        "real = socket.socket.__init__\n"
        "def spy(self, *a, **k):\n"
        "    opened.append(a); real(self, *a, **k)\n"
        "socket.socket.__init__ = spy\n"
        "import agentcp\n"
        "heavy = [m for m in ('requests', 'cryptography', 'openai', 'flask', 'websocket') if m in sys.modules]\n"
        "print(threading.active_count(), len(opened), heavy, agentcp.__version__)\n"
    )
    assert out.split() == ["1", "0", "[]", "0.2.0"]


def test_upstream_import_paths():
    run_python(
        "from agentcp.heartbeat.heartbeat_client import HeartbeatClient\n"
        "from agentcp.heartbeat import HeartbeatClient as H2\n"
        "assert H2 is HeartbeatClient\n"
        "from agentcp.base.auth_client import AuthClient\n"
        "from agentcp.msg.message_serialize import (UdpMessageHeader, HeartbeatMessageReq, HeartbeatMessageResp,\n"
        "    InviteMessageReq, InviteMessageResp, uint64_to_varint, varint_to_uint64)\n"
        "from agentcp.context import ErrorContext, exceptions\n"
        "from agentcp.context.exceptions import SDKError, SendMsgError\n"
        "from agentcp.base.log import log_info, log_error, log_debug, log_warning, log_exception, set_log_enabled\n"
        "import agentcp.heartbeat.heartbeat_client as m\n"
        "assert m.HeartbeatMessageReq is HeartbeatMessageReq  # 0.1.99 re-exported the wire names there\n"
        "h = HeartbeatClient('a.b.c', 'http://127.0.0.1:9', '/nonexistent', 'x')\n"
        "for name in ('udp_socket', 'server_ip', 'port', 'sign_cookie', 'heartbeat_interval', 'is_running',\n"
        "             'local_ip', 'local_port', 'initialize', 'sign_in', 'sign_out', 'set_on_recv_invite',\n"
        "             'online', 'offline', 'get_online_status', 'state', 'stats', 'on_state_change'):\n"
        "    assert hasattr(h, name), name\n"
    )


def test_log_helpers_work_before_anything_is_configured():
    """0.1.99 raised AttributeError from every log_* helper until AgentCP() had been constructed."""
    run_python(
        "from agentcp.base.log import log_info, log_error, log_debug, log_warning, log_exception, log_verbose\n"
        "log_info('x'); log_error('x'); log_debug('x'); log_warning('x'); log_verbose('x')\n"
        "log_exception(ValueError('boom'))\n"
    )


def test_error_codes_and_dict():
    e = exceptions.SendMsgError("could not send", trace_id="t1")
    assert e.to_dict()["message"] == "could not send" and e.to_dict()["trace_id"] == "t1"
    assert e.code == 1000 and exceptions.SendMsgError.code == 1009  # as 0.1.99: instance code is the argument
    assert isinstance(exceptions.CredentialError("x"), exceptions.PermanentAuthError)


def test_error_context_delivers_without_blocking_and_survives_bad_subscribers():
    ctx = AtomicErrorContext(max_queue_size=4)
    ctx.publish(exceptions.SDKError("before anyone listens"))  # dropped, as in 0.1.99
    got = []
    done = threading.Event()

    def bad(err):
        raise RuntimeError("subscriber bug")

    def good(err):
        got.append(err)
        if len(got) == 2:
            done.set()

    ctx.subscribe("a.b.c", bad)
    ctx.subscribe("a.b.c", good)
    t0 = time.monotonic()
    ctx.publish(exceptions.SDKError("one"))
    ctx.publish(exceptions.SDKError("two"))
    assert time.monotonic() - t0 < 0.05
    assert done.wait(2)
    assert [str(e) for e in got] == ["one", "two"] and got[0].agent_id == "a.b.c"
    assert ctx.subscriber_failures == 2
    ctx.close()
    assert ctx.worker_thread is None


def test_error_context_bounded_queue_drops_oldest():
    ctx = AtomicErrorContext(max_queue_size=2)
    ctx._subscribers.append(("a.b.c", lambda e: None))  # a subscriber without a worker: nothing drains
    for i in range(5):
        ctx.publish(exceptions.SDKError(str(i)))
    assert [str(e) for e in ctx.queue] == ["3", "4"] and ctx.dropped == 3


def test_shared_error_context_is_a_singleton():
    from agentcp.context import ErrorContext as again

    assert again is ErrorContext
