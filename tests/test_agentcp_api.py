"""AgentCP/AgentID pure API: handler registration, message parsing helpers, Mermaid/Workflow, cheap import."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from agentcp import AgentCP, AgentID, Mermaid, Workflow
from agentcp.message import AgentInstructionBlock, AssistantMessageBlock, OpenAIMessage


@pytest.fixture
def aid(tmp_path):
    acp = AgentCP(str(tmp_path), run_proxy=False)
    return AgentID("alice.example.com", acp.app_path, acp.seed_password, None, "https://acp3.example.com")


def test_agentid_attributes(aid, tmp_path):
    assert aid.id == "alice.example.com" and aid.ap == "example.com"
    assert aid.get_agent_private_path().endswith("AIDs/alice.example.com/private")
    assert aid.get_app_path() == aid.get_agent_public_path()
    assert aid.get_aid_info()["aid"] == "alice.example.com"
    for attr in ("ap_client", "heartbeat_client", "session_manager", "db_manager", "file_client"):
        assert getattr(aid, attr) is None
    assert aid.status()["state"] == "offline"


def test_handler_registration(aid):
    @aid.message_handler()
    async def h1(msg):
        pass

    def h2(msg):
        pass

    assert h1 in aid.message_handlers
    aid.add_message_handler(h2)
    aid.add_message_handler(h2, "session-1")
    aid.add_message_handler(h2, router="cmd")
    assert aid.message_handlers == [h1, h2]
    assert aid.message_handlers_session_map == {"session-1": h2}
    assert aid.message_handlers_router_map == {"cmd": h2}
    aid.remove_message_handler(h2, "session-1")
    aid.remove_message_handler(h1, "")
    assert aid.message_handlers == [h2] and aid.message_handlers_session_map == {}


def test_message_helpers(aid):
    blocks = [{"type": "content", "status": "success", "timestamp": 1,
               "content": json.dumps({"text": "hi", "files": []})}, {"type": "tool_call", "content": {"x": 1}}]
    msg = {"session_id": "s", "sender": "b.example.com", "receiver": "alice.example.com",
           "message": json.dumps(blocks)}
    assert aid.get_sender_from_message(msg) == "b.example.com"
    assert aid.get_session_id_from_message(msg) == "s"
    assert aid.get_receiver_from_message(msg) == "alice.example.com"
    assert aid.get_sender_from_message("nope") is None
    assert aid.get_content_array_from_message(msg) == blocks
    assert aid.get_content_from_message(msg) == "hi"
    assert aid.get_content_from_message(msg, "tool_call") == {"x": 1}
    assert aid.get_content_from_message(msg, "image") is None
    text_only = {"message": json.dumps([{"type": "text", "content": "plain"}])}
    assert aid.get_content_from_message(text_only) == "plain"
    assert aid.get_content_array_from_message({"message": ""}) == []
    assert aid.get_content_array_from_message({"message": "{bad"}) == []
    assert aid.get_content_array_from_message({"message": json.dumps({"a": 1})}) == [{"a": 1}]
    assert aid.get_content_array_from_message({"message": [{"a": 1}]}) == [{"a": 1}]
    with pytest.raises(AttributeError):
        aid.get_content_array_from_message("not a dict")


def test_sending_while_offline_fails_truthfully(aid):
    try:
        result = aid.send_message_content("s", ["b.example.com"], "hello")  # tries online() first, as 0.1.99
        assert not result and result == False and result.status == "failed"  # noqa: E712 (0.1.99 compared to bools)
        assert "not online" in result.error
        assert aid.send_message_content("", ["b.example.com"], "hello") is None
        assert asyncio.run(aid.send_stream_message("s", [], None)) is None  # no stream without a connection
    finally:
        aid.offline()


def test_message_blocks():
    block = AssistantMessageBlock(type="content", status="success", timestamp=1, content="x")
    assert block.__dict__ == {"type": "content", "status": "success", "timestamp": 1, "block_id": None,
                              "content": "x", "type_format": "", "trace_id": ""}
    assert AgentInstructionBlock(cmd="go").model == ""
    m = OpenAIMessage()
    assert m.timeout == 100 and m.model is None
    m.model = "gpt"
    assert json.loads(m.to_json()) == {"model": "gpt", "timeout": 100}


def test_mermaid_and_workflow(tmp_path):
    (tmp_path / "flow.mmd").write_text("graph LR\nA[Producer]\nB[Consumer]\nA-->|data|B\n", encoding="utf-8")
    m = Mermaid.from_file(str(tmp_path), "flow")
    assert m.graph_type == "graph" and m.graph_direction == "LR"
    assert m.node_dict == {"A": "Producer", "B": "Consumer"} and m.edges == [("A", "data", "B")]
    assert Mermaid.read_mermaid_code(str(tmp_path), "missing") == ""
    assert Mermaid("pie\n").graph_type is None

    received = []

    class Producer:
        @Workflow.output_port("data")
        def produce(self, x):
            return x * 2

    class Consumer:
        @Workflow.input_port("data")
        async def consume(self, value):
            received.append(value)

    p, c = Producer(), Consumer()
    wf = Workflow(m)
    assert wf.addnode(p, "Producer").addnode(c, "Consumer") is wf
    wf.start()
    assert p.produce(21) == 42
    assert received == [42]
    store = Workflow.getstorage()
    store["k"] = 1
    assert Workflow.getstorage("k") == 1
    Workflow.clearstorage()
    assert Workflow.getstorage("k", 5) == 5


def test_mermaid_edge_forms():
    m = Mermaid("graph TD\nA --> B\nB -- go --> C\nC -> D\n")
    assert m.edges == [("A", "", "B"), ("B", "go", "C"), ("C", "", "D")]


def test_import_is_cheap():
    code = ("import sys, threading; n = threading.active_count(); import agentcp; "
            "heavy = [m for m in ('requests', 'cryptography', 'agentcp.agentcp', 'socket') if m in sys.modules]; "
            "print(heavy, threading.active_count() - n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout.strip()
    heavy, extra = out.rsplit(" ", 1)
    assert extra == "0"
    assert "requests" not in heavy and "cryptography" not in heavy and "agentcp.agentcp" not in heavy


def test_agentcp_constructor_rules(tmp_path):
    with pytest.raises(Exception):
        AgentCP("")
    acp = AgentCP(str(tmp_path), "", "pw", False, 20, 0, True)
    assert acp.get_agent_data_path() == acp.app_path
    assert len(acp.seed_password) == 64
    assert acp.ca_client is None and acp.ep_url is None and acp.aid_map == {}
    assert not acp.shutdown_flag.is_set() and acp.exit_hook_func is None
