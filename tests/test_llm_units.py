"""Pure parts of the LLM gateway: keys, the OpenAI mapping, stream line parsing, 0.1.99's helpers."""
from __future__ import annotations

import json

import pytest

from agentcp.llm_agent_utils import (
    AttrDict,
    GatewayError,
    bounded_lines,
    fail_response,
    format_date,
    get_message_type,
    get_vaild_json,
    last_user_text,
    parse_sse_line,
    parse_stream_url,
)
from agentcp.llm_gateway import ChunkCollector, Keyring, as_chunk, as_completion, valid_aid


def test_keyring_keys_owners_and_refusals():
    ring = Keyring()
    key = ring.key_for("a.example.com")
    assert len(key) == 64 and int(key, 16) >= 0 and ring.key_for("a.example.com") == key
    assert ring.key_for("b.example.com") != key
    assert ring.owner(key) == "a.example.com"
    assert ring.owner(key[:-1]) is None and ring.owner("") is None and ring.owner(None) is None
    assert ring.owner(key + "x") is None and ring.owner("k" * 10_000) is None
    assert ring.add("a.example.com", "custom-key-0123456") is True
    assert ring.owner(key) == "a.example.com"  # earlier keys stay valid
    assert ring.key_for("a.example.com") == "custom-key-0123456"
    assert ring.add("b.example.com", "custom-key-0123456") is False  # belongs to another AID
    assert ring.add("b.example.com", "short") is False and ring.add("b.example.com", "has space 0123456789") is False
    by_aid, by_key = ring.maps()
    assert by_aid["a.example.com"] == "custom-key-0123456" and by_key[key] == "a.example.com"
    assert ring.key_for("nobody.example.com", create=False) is None


def test_valid_aid():
    assert valid_aid("echo.agentunion.cn") and valid_aid("a.b.c.d")
    for bad in ("echo", "a.b", "a..b.c", "a.b.c/", "../x.y.z", "a b.c.d", "x" * 250 + ".b.c", 3, None):
        assert not valid_aid(bad)


def test_completion_from_text_json_text_and_openai_json():
    done = as_completion("hi", "m", created=5)
    assert done["object"] == "chat.completion" and done["model"] == "m" and done["created"] == 5
    assert done["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                "finish_reason": "stop"}]
    assert as_completion(json.dumps({"text": "wrapped", "files": []}), "m")["choices"][0]["message"]["content"] \
        == "wrapped"
    assert as_completion({"a": 1}, "m")["choices"][0]["message"]["content"] == '{"a": 1}'
    own = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "c"},
                                   "finish_reason": "length"}], "usage": {"total_tokens": 3}}
    kept = as_completion(json.dumps(own), "m")
    assert kept["id"] == "x" and kept["usage"] == {"total_tokens": 3} and kept["model"] == "m"
    assert kept["choices"][0]["finish_reason"] == "length"


def test_chunks_and_their_collection():
    first = as_chunk("he", "m", "id1", 7, first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "he"}
    assert as_chunk("llo", "m", "id1", 7)["choices"][0]["delta"] == {"content": "llo"}
    own = {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}], "model": "agent-model"}
    kept = as_chunk(own, "m", "id1", 7)
    assert kept["model"] == "agent-model" and kept["id"] == "id1" and kept["object"] == "chat.completion.chunk"
    collector = ChunkCollector("m")
    for value in ("he", {"choices": [{"index": 0, "delta": {"content": "llo", "reasoning_content": "r"}}]}, own,
                  {"choices": [], "usage": {"total_tokens": 9}}):
        collector.add(value)
    done = collector.completion()
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "hello!", "reasoning_content": "r"}
    assert done["choices"][0]["finish_reason"] == "stop" and done["usage"] == {"total_tokens": 9}


def test_stream_lines():
    assert parse_sse_line("data: " + "%7B%22a%22%3A+1%7D") == ("value", {"a": 1})
    assert parse_sse_line("data: hello+world") == ("value", "hello world")
    assert parse_sse_line("plain") == ("value", "plain")
    assert parse_sse_line("event: done\r") == ("done", None)
    for skip in ("", ": keep-alive", "event: other"):
        assert parse_sse_line(skip) == ("skip", None)
    assert list(bounded_lines([b"a\nb", b"c\n", b"", b"d"], 10)) == ["a", "bc", "d"]
    with pytest.raises(GatewayError) as err:
        list(bounded_lines([b"x" * 11], 10))
    assert err.value.status == 502


def test_last_user_text():
    assert last_user_text({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": [{"type": "text", "text": "c"},
                                                                     {"type": "image_url", "image_url": {}},
                                                                     {"type": "text", "text": "d"}]}]}) == "cd"
    assert last_user_text({"messages": [{"role": "system", "content": "s"}]}) == ""
    assert last_user_text({"messages": "x"}) == "" and last_user_text(None) == ""


def test_helpers_of_0199():
    d = AttrDict({"a": {"b": [{"c": 1}]}, "n": None})
    assert d.a.b[0].c == 1 and isinstance(d.a, AttrDict)
    with pytest.raises(AttributeError):
        _ = d.missing
    d.x = {"y": 2}
    assert d.x.y == 2
    assert d.model_dump() == {"a": {"b": [{"c": 1}]}, "x": {"y": 2}}
    assert d.model_dump(exclude_none=False)["n"] is None
    assert fail_response("bad") == {"status": "error", "code": 400, "message": "bad"}
    assert len(format_date()) == 23 and format_date()[4] == "-" and format_date()[19] == "."
    assert get_message_type([{"type": "llm"}]) == "llm" and get_message_type([]) is None
    assert parse_stream_url("https://ts.x/pull?session_id=1&message_id=2") == (
        "https://ts.x/pull", {"session_id": "1", "message_id": "2"})
    assert get_vaild_json('{"a": 1}') == {"a": 1} and get_vaild_json("nope") is None and get_vaild_json(3) is None
    assert GatewayError(401, "no").body() == {"error": {"message": "no", "type": "invalid_request_error",
                                                        "param": None, "code": "invalid_api_key"}}
