"""The local LLM gateway (api.md §12) over real sockets: an OpenAI-style client -> gateway -> ACP -> an agent on the
fake network, and its answer (a message or a stream) back in OpenAI's format."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from agentcp import llm_server
from agentcp.llm_gateway import GatewayConfig

FAST_GATEWAY = GatewayConfig(reply_timeout=5.0, request_deadline=20.0, pull_idle_timeout=5.0, socket_timeout=5.0,
                             join_timeout=5.0)


def _chunk(text: str) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


hostile_url = [""]  # the pull URL the "hostile-stream" mode announces


def _echo_agent(aid, gate: threading.Event = None):
    """Answers ``echo: <last user text>``: by stream when the request streams, else by message. The request's
    ``model`` forces a kind: ``stream``, ``message``, ``text-stream`` (plain text chunks), ``error``, ``silent``,
    ``slow`` (streams ``first``, waits for ``gate``, then streams ``second``)."""

    async def slow():
        yield _chunk("first")
        opened = await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        yield _chunk("second" if opened else "never opened")

    @aid.message_handler()
    async def on_message(msg):
        body = aid.get_content_from_message(msg, "llm")
        if not isinstance(body, dict):
            return
        text = aid.get_content_from_message(msg)
        mode = body.get("model")
        sid, sender = msg["session_id"], msg["sender"]
        if mode == "silent":
            return
        if mode in ("bad-stream", "hostile-stream"):  # announces a stream nobody serves / a hostile server's
            url = hostile_url[0] if mode == "hostile-stream" else f"http://127.0.0.1:{_closed_port()}/pull?s=1"
            aid.reply_message(msg, [{"type": "text/event-stream", "status": "loading", "timestamp": 0,
                                     "content": url}])
        elif mode == "slow":
            await aid.send_stream_message(sid, [sender], slow())
        elif mode == "error":
            aid.reply_message(msg, [{"type": "error", "status": "success", "timestamp": 0, "content": "boom"}])
        elif mode == "text-stream":
            await aid.send_stream_message(sid, [sender], ["echo: ", text])
        elif mode == "stream" or (mode != "message" and body.get("stream")):
            await aid.send_stream_message(sid, [sender], [_chunk("echo: "), _chunk(text)], ref_msg_id=msg["message_id"])
        else:
            aid.reply_message(msg, f"echo: {text}")

    return aid


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(autouse=True)
def _no_gateway_left():
    """Each test starts without a gateway (an AgentCP elsewhere may have left one running) and leaves none."""
    llm_server.shutdown_server()
    yield
    llm_server.shutdown_server()


@pytest.fixture
def gateway(monkeypatch):
    monkeypatch.setattr(llm_server, "gateway_config", FAST_GATEWAY)
    port = llm_server.run_server(False, 0)
    yield port
    llm_server.shutdown_server()


@pytest.fixture
def gate():
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def pair(agents, network, gateway, gate):
    """(caller, echo): both online; the caller's key opens the gateway."""
    caller, echo = agents("alice"), _echo_agent(agents("echo"), gate)
    caller.online()
    echo.online()
    assert caller.is_online_success and echo.is_online_success
    return caller, echo


def _post(url: str, key: str, body, **kw):
    return requests.post(url + "/chat/completions", json=body, timeout=15,
                         headers={"Authorization": f"Bearer {key}"} if key else {}, **kw)


def _events(resp) -> list:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def _wait_in_flight(timeout: float = 5.0) -> None:
    """Until the gateway has a request in flight (it waits for the agent)."""
    deadline = time.monotonic() + timeout
    while not llm_server.app.status()["in_flight"]:
        assert time.monotonic() < deadline, "no request in flight"
        time.sleep(0.01)


def _gateway_threads():
    return [t for t in threading.enumerate() if t.name.startswith("agentcp-llm") and t.is_alive()]


# --- plain HTTP (always runs) -----------------------------------------------------------------------------------
def test_plain_http_completion_and_stream(pair):
    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
    assert url == f"http://127.0.0.1:{llm_server.actual_port}/{echo.id}"
    assert len(key) == 64 and int(key, 16) >= 0

    resp = _post(url, key, {"model": "any", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "any"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi"}
    assert body["choices"][0]["finish_reason"] == "stop"

    resp = _post(url, key, {"model": "any", "stream": True, "messages": [{"role": "user", "content": "你好 + x"}]},
                 stream=True)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = _events(resp)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert _text(events) == "echo: 你好 + x"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_stream_answer_to_a_plain_request_and_the_other_way_round(pair):
    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
    resp = _post(url, key, {"model": "stream", "messages": [{"role": "user", "content": "one"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "echo: one"

    resp = _post(url, key, {"model": "text-stream", "messages": [{"role": "user", "content": "two"}]})
    assert resp.json()["choices"][0]["message"]["content"] == "echo: two"  # plain text chunks wrapped

    resp = _post(url, key, {"model": "message", "stream": True, "messages": [{"role": "user", "content": "3"}]},
                 stream=True)
    events = _events(resp)
    assert _text(events) == "echo: 3" and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_chunks_reach_the_client_while_the_agent_is_still_streaming(pair, gate):
    caller, echo = pair
    resp = _post(caller.get_llm_url(echo.id), caller.get_llm_api_key(),
                 {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines(decode_unicode=True)
    first = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
    assert first["choices"][0]["delta"]["content"] == "first" and not gate.is_set()
    gate.set()
    rest = _events(SimpleNamespace(iter_lines=lambda decode_unicode: lines))
    assert _text(rest) == "second" and rest[-1] == "[DONE]"


def test_the_agent_receives_the_openai_body_as_an_llm_block(pair, network):
    caller, echo = pair
    seen = []
    echo.message_handlers.insert(0, lambda msg: seen.append(echo.get_content_array_from_message(msg)))
    body = {"model": "m", "temperature": 0.5, "messages": [{"role": "system", "content": "s"},
                                                           {"role": "user", "content": "q"}]}
    assert _post(caller.get_llm_url(echo.id), caller.get_llm_api_key(), body).status_code == 200
    blocks = seen[0]
    assert blocks[0]["type"] == "llm" and blocks[0]["content"] == body and blocks[0]["trace_id"]
    assert blocks[1] == {"type": "content", "status": "success", "timestamp": blocks[1]["timestamp"],
                         "content": "q"}


def test_wrong_or_missing_key_is_401_and_the_agent_hears_nothing(pair, network):
    caller, echo = pair
    url = caller.get_llm_url(echo.id)
    before = network.messages.counters["messages"]
    for key in ("0" * 64, caller.get_llm_api_key()[:-1], ""):
        resp = _post(url, key, {"messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    resp = requests.post(url + "/chat/completions", json={"messages": []}, timeout=5,
                         headers={"Authorization": "Basic " + caller.get_llm_api_key()})
    assert resp.status_code == 401
    assert network.messages.counters["messages"] == before


def test_error_statuses(pair, monkeypatch):
    caller, echo = pair
    key = caller.get_llm_api_key()
    base = f"http://127.0.0.1:{llm_server.actual_port}"
    auth = {"Authorization": f"Bearer {key}"}
    assert requests.get(base + "/nothing", headers=auth, timeout=5).status_code == 404
    assert requests.get(f"{base}/{echo.id}/chat/completions", headers=auth, timeout=5).status_code == 405
    resp = requests.post(f"{base}/not-an-aid/chat/completions", json={"messages": []}, headers=auth, timeout=5)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert requests.post(f"{base}/{echo.id}/chat/completions", data=b"{nope", headers=auth,
                         timeout=5).status_code == 400
    resp = _post(f"{base}/{echo.id}", key, {"messages": "hi"})
    assert resp.status_code == 400 and "messages" in resp.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "x" * (FAST_GATEWAY.max_body + 1)}]}
    assert _post(f"{base}/{echo.id}", key, big).status_code == 413
    resp = _post(f"{base}/{echo.id}", key, {"model": "error", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400 and "boom" in resp.json()["error"]["message"]
    # an agent nobody runs: the server says it is not online
    resp = _post(f"{base}/ghost.example.com", key, {"messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404, resp.text
    models = requests.get(f"{base}/{echo.id}/models", headers=auth, timeout=5).json()
    assert models["data"][0]["id"] == echo.id


def test_an_agent_that_does_not_answer_is_504_within_the_reply_timeout(agents, network, monkeypatch):
    monkeypatch.setattr(llm_server, "gateway_config", GatewayConfig(reply_timeout=0.5, socket_timeout=5.0))
    llm_server.run_server(False, 0)
    try:
        caller, echo = agents("alice"), _echo_agent(agents("echo"))
        caller.online()
        echo.online()
        start = time.monotonic()
        resp = _post(caller.get_llm_url(echo.id), caller.get_llm_api_key(),
                     {"model": "silent", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 4.0
    finally:
        llm_server.shutdown_server()


def test_offline_of_the_caller_answers_its_waiting_request_503_at_once(pair):
    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
    out = {}

    def call():
        out["resp"] = _post(url, key, {"model": "silent", "messages": [{"role": "user", "content": "x"}]})

    thread = threading.Thread(target=call)
    thread.start()
    _wait_in_flight()
    start = time.monotonic()
    caller.offline()
    thread.join(5)
    assert out["resp"].status_code == 503
    assert time.monotonic() - start < FAST_GATEWAY.reply_timeout
    resp = _post(url, key, {"messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 503 and "not online" in resp.json()["error"]["message"]


def test_shutdown_answers_in_flight_requests_and_joins_every_thread(pair):
    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
    idle = socket.create_connection(("127.0.0.1", llm_server.actual_port))  # a keep-alive connection, idle
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("resp", _post(
        url, key, {"model": "silent", "messages": [{"role": "user", "content": "x"}]})))
    thread.start()
    _wait_in_flight()
    start = time.monotonic()
    assert llm_server.shutdown_server() is True
    assert time.monotonic() - start < 3.0
    thread.join(5)
    assert out["resp"].status_code == 503
    assert _gateway_threads() == []
    assert not llm_server.llm_server_is_running() and llm_server.actual_port is None
    idle.close()
    with pytest.raises(requests.ConnectionError):
        _post(url, key, {"messages": []})
    with pytest.raises(RuntimeError, match="not running"):
        caller.get_llm_url(echo.id)


def test_too_many_connections_get_503(agents, network, monkeypatch):
    monkeypatch.setattr(llm_server, "gateway_config", GatewayConfig(max_connections=1, socket_timeout=5.0))
    port = llm_server.run_server(False, 0)
    try:
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"GET /x")  # an unfinished request keeps the only slot busy
        deadline = time.monotonic() + 5
        while True:
            resp = requests.get(f"http://127.0.0.1:{port}/a.b.c/models", timeout=5)
            if resp.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "unavailable"
        held.close()
    finally:
        llm_server.shutdown_server()


def test_agentcp_runs_the_gateway_and_stops_it_on_exit(tmp_path, network):
    from agentcp import AgentCP

    with AgentCP(str(tmp_path), seed_password="s", port=0, run_proxy=True, ap_url=network.url) as acp:
        assert llm_server.llm_server_is_running()
        port = llm_server.actual_port
        assert acp.get_llm_url("echo.example.com") == f"http://127.0.0.1:{port}/echo.example.com"
        key = acp.get_llm_api_key("alice.example.com")
        assert acp.get_llm_api_key("alice.example.com") == key and len(key) == 64
        aid = acp.create_aid("example.com", "alice")
        assert aid.get_llm_api_key() == key
        assert aid.add_llm_api_key("bob.example.com", "k" * 32) is False
        assert aid.add_llm_api_key(aid.id, "my-own-key-1234567") is True
        assert llm_server.llm_app_key_aid_map["my-own-key-1234567"] == aid.id
        assert llm_server.llm_aid_app_key_map[aid.id] == "my-own-key-1234567"
        assert AgentCP(str(tmp_path), run_proxy=True).get_llm_url("x.y.z").endswith(f":{port}/x.y.z")  # one server
    assert not llm_server.llm_server_is_running()
    assert _gateway_threads() == []


def test_llm_request_without_http(pair):
    caller, echo = pair
    status, body = llm_server.llm_request(echo.id, body={"messages": [{"role": "user", "content": "q"}]},
                                          api_key=caller.get_llm_api_key())
    assert status == 200 and body["choices"][0]["message"]["content"] == "echo: q"
    assert llm_server.llm_request(echo.id, body={"messages": []}, api_key="wrong")[0] == 401
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("answer", llm_server.llm_request(
        echo.id, body={"model": "silent", "messages": [{"role": "user", "content": "x"}]},
        api_key=caller.get_llm_api_key())))
    thread.start()
    deadline = time.monotonic() + 5
    while not any(a.session_id for a in list(llm_server._local)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    caller.offline()  # cancels the in-process request too
    thread.join(3)
    assert out["answer"][0] == 503


def test_llm_agent_chat_create(pair):
    from agentcp.llm_agent_utils import AttrDict, LLMAgent

    caller, echo = pair
    result = asyncio.run(LLMAgent(echo.id, caller).chat_create({"messages": [{"role": "user", "content": "z"}]}))
    assert isinstance(result, AttrDict) and result.choices[0].message.content == "echo: z"
    events = asyncio.run(LLMAgent(echo.id, caller).chat_create(
        {"model": "stream", "messages": [{"role": "user", "content": "s"}]}))
    lines = list(events)
    assert [json.loads(line[len("data: "):])["choices"][0]["delta"]["content"] for line in lines] == ["echo: ", "s"]
    failed = asyncio.run(LLMAgent(echo.id, caller).chat_create({"model": "error", "messages": []}))
    assert failed.status == "error" and failed.code == 400


# --- the openai package (when it is installed) ------------------------------------------------------------------
def test_openai_client_talks_to_an_agent(pair):
    openai = pytest.importorskip("openai")
    caller, echo = pair
    client = openai.OpenAI(base_url=caller.get_llm_url(echo.id), api_key=caller.get_llm_api_key(), max_retries=0,
                           timeout=15)
    done = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hello"}])
    assert done.choices[0].message.content == "echo: hello"
    stream = client.chat.completions.create(model="any", stream=True,
                                            messages=[{"role": "user", "content": "streamed"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "echo: streamed"
    bad = openai.OpenAI(base_url=caller.get_llm_url(echo.id), api_key="wrong-key", max_retries=0, timeout=5)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}])


def test_a_port_in_use_is_logged_and_the_agents_work_on(tmp_path, caplog):
    from agentcp import AgentCP

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        port = blocker.getsockname()[1]
        acp = AgentCP(str(tmp_path), seed_password="s", port=port, run_proxy=True)
        assert not llm_server.llm_server_is_running()
        assert any("could not listen" in r.getMessage() for r in caplog.records)
        with pytest.raises(RuntimeError, match="not running"):
            acp.get_llm_url("echo.example.com")
        with pytest.raises(OSError):
            llm_server.run_server(False, port)
    finally:
        blocker.close()


def test_a_bug_in_the_gateway_is_a_500_and_the_server_goes_on(pair, monkeypatch):
    from agentcp import llm_gateway

    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(llm_gateway, "chat_completion", broken)
    resp = _post(url, key, {"messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
    monkeypatch.undo()
    assert _post(url, key, {"messages": [{"role": "user", "content": "x"}]}).status_code == 200
    assert llm_server.app.status()["errors"] == 1


def test_a_stream_that_cannot_be_pulled_is_502_before_any_byte(pair):
    caller, echo = pair
    url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
    for stream in (False, True):
        body = {"model": "bad-stream", "stream": stream, "messages": [{"role": "user", "content": "x"}]}
        resp = _post(url, key, body)
        assert resp.status_code == 502 and resp.headers["Content-Type"] == "application/json", resp.text
        assert "pulling the stream" in resp.json()["error"]["message"]
        assert "signature" not in resp.text and "agent_id" not in resp.text


def test_a_hostile_stream_server_is_bounded(pair, monkeypatch):
    """A stream whose line never ends, or which never ends: 502 / an error event, not unbounded memory."""
    import http.server

    from agentcp.llm_agent_utils import LLMAgent

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            piece = b"x" * 4096 if "line" in self.path else b"data: a\n" * 512
            try:
                for _ in range(10_000):
                    self.wfile.write(piece)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(LLMAgent, "MAX_LINE", 16 * 1024)
    monkeypatch.setattr(LLMAgent, "MAX_STREAM_BYTES", 16 * 1024)
    try:
        caller, echo = pair
        url, key = caller.get_llm_url(echo.id), caller.get_llm_api_key()
        body = {"model": "hostile-stream", "messages": [{"role": "user", "content": "x"}]}
        hostile_url[0] = f"http://127.0.0.1:{server.server_address[1]}/line?s=1"
        resp = _post(url, key, body)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "stream_too_large"
        hostile_url[0] = f"http://127.0.0.1:{server.server_address[1]}/endless?s=1"
        resp = _post(url, key, dict(body, stream=True), stream=True)
        assert resp.status_code == 200  # the first chunk came: the limit is met mid-stream
        events = _events(resp)
        assert events[-1]["error"]["code"] == "stream_too_large" and "[DONE]" not in events
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
