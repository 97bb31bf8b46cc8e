"""AgentID.ping_aid, send_instruction_message and send_form_message between two agents on the fake network."""
from __future__ import annotations

import json
import time

from conftest import delivered, until

from agentcp.message import AgentFormItemResultBlock, AgentInstructionBlock


def _online(agents, *names):
    made = [agents(name) for name in names]
    for aid in made:
        aid.online()
    return made


def _pair(agents, network):
    a, b = _online(agents, "alice", "bob")
    sid = a.create_session("chat", "")
    assert sid and a.invite_member(sid, b.id)
    network.messages.wait_for(lambda: b.id in network.messages.members(sid))
    return a, b, sid


def test_ping_aid_measures_the_round_trip_and_the_peer_answers_by_itself(agents, network):
    a, b = _online(agents, "alice", "bob")
    seen_by_b = []
    b.add_message_handler(seen_by_b.append)
    seconds = a.ping_aid(b.id)
    assert isinstance(seconds, float) and 0 < seconds < 10
    pings = [c for c in network.messages.commands("session_message", a.id) if '%22ping%22' in c["message"]]
    answers = [c for c in network.messages.commands("session_message", b.id) if "ping_result" in c["message"]]
    assert len(pings) == 1 and len(answers) == 1
    sid = pings[0]["session_id"]
    relayed = [m for m in network.messages.messages(sid) if '%22ping%22' in m["message"]]
    assert answers[0]["ref_msg_id"] == relayed[0]["message_id"]  # the answer refers to the ping as b received it
    assert seen_by_b == []  # the ping never reached b's handlers
    assert a.session_manager.get(sid) is None and sid not in a.message_handlers_session_map  # one-off session left
    network.messages.wait_for(lambda: a.id not in network.messages.members(sid))
    assert a.ping_aid(b.id) < 10  # again: a new one-off session each time


def test_ping_aid_without_an_answer_is_10000(agents, network):
    (a,) = _online(agents, "alice")
    start = time.monotonic()
    assert a.ping_aid("ghost.example.com", timeout=8) == 10000  # the server says it is offline
    assert time.monotonic() - start < 8  # answered by the offline notice, not by the timeout
    b = agents("bob")
    b.online()
    assert a.ping_aid(b.id, timeout=0) == 10000  # no answer can arrive in no time


def test_send_instruction_message_really_sends_the_instruction(agents, network):
    a, b, sid = _pair(agents, network)
    routed, others = [], []
    b.add_message_handler(routed.append, router="calc")
    b.add_message_handler(others.append)
    block = AgentInstructionBlock(cmd="calc", params={"x": 1, "y": 2}, description="add x and y")
    result = a.send_instruction_message(sid, b.id, block)
    assert result and delivered(result)
    msg = until(lambda: routed, what="instruction")[0]
    assert msg["instruction"] == {"cmd": "calc", "params": {"x": 1, "y": 2}, "description": "add x and y",
                                  "model": ""}
    assert b.get_content_from_message(msg) == "add x and y"
    assert a.send_instruction_message(sid, [b.id], {"cmd": "calc"}, ref_msg_id=msg["message_id"])
    assert until(lambda: len(routed) == 2) and routed[1]["ref_msg_id"] == msg["message_id"]
    assert b.get_content_from_message(routed[1]) == "calc"
    assert others == []
    assert a.send_instruction_message("", b.id, block) is None  # 0.1.99: None for an empty session
    assert not a.send_instruction_message(sid, b.id, None)  # nothing to send: a failed result
    assert not a.send_instruction_message(sid, b.id, {"params": {}})


def test_send_form_message_answers_a_form(agents, network):
    a, b, sid = _pair(agents, network)
    forms, results = [], []
    a.add_message_handler(forms.append)
    b.add_message_handler(results.append)
    form = {"type": "form", "status": "success", "timestamp": 1, "content": [
        {"id": "q1", "description": "Proceed?", "form_type": "single_select",
         "params": [{"type": "text", "id": "yes", "content": "Yes"}, {"type": "text", "id": "no", "content": "No"}],
         "result": ""}]}
    assert b.send_message(sid, [a.id], [form])
    asked = until(lambda: forms, what="form")[0]
    answer = [AgentFormItemResultBlock(id="q1", result="yes"), {"id": "q2", "result": "later"}]
    result = a.send_form_message(sid, [b.id], answer, asked["message_id"])
    assert result and delivered(result)
    got = until(lambda: results, what="form result")[0]
    block = json.loads(got["message"])[0]
    assert block["type"] == "form_result"
    assert block["content"] == {"result": [{"id": "q1", "result": "yes"}, {"id": "q2", "result": "later"}]}
    assert got["ref_msg_id"] == asked["message_id"] and got["sender"] == a.id
    assert not a.send_form_message(sid, [b.id], ["yes"], asked["message_id"])  # results need ids
    assert not a.send_form_message("", [b.id], answer, "")
