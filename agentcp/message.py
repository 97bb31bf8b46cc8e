"""Message-block dataclasses (names, fields and defaults as agentcp 0.1.99; no ``openai`` import).

The SDK sends a block by taking ``obj.__dict__``, so nested dataclasses are not converted; applications usually
send plain dicts, which pass through unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

__all__ = [
    "OpenAIMessage",
    "AssistantMessageBlock",
    "AgentInstructionBlock",
    "AgentSelectItemBlock",
    "AgentFormInputItemBlock",
    "AgentFormBlock",
    "AgentFormItemResultBlock",
    "AgentFormResultBlock",
    "AgentAddFriendBlock",
    "AgentFileBlock",
    "AgentCreateOrderBlock",
    "AgentOrderBlock",
]

_OPENAI_FIELDS = (
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "reasoning_effort", "response_format", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "web_search_options",
    "extra_headers", "extra_query", "extra_body",
)


class OpenAIMessage:
    """An OpenAI chat-completion request body: every parameter an attribute (``None``), ``timeout=100``."""

    def __init__(self) -> None:
        for name in _OPENAI_FIELDS:
            setattr(self, name, None)
        self.timeout = 100

    def to_json(self) -> str:
        data = {k: v for k, v in vars(self).items() if v is not None and not k.startswith("_")}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=lambda o: getattr(o, "__dict__", str(o)))


@dataclass
class AgentInstructionBlock:
    cmd: str
    params: Optional[dict] = None
    description: Optional[str] = None
    model: str = ""


@dataclass
class AgentSelectItemBlock:
    type: Literal["text", "image", "video", "audio"]
    id: str
    content: str


@dataclass
class AgentFormInputItemBlock:
    id: str
    name: str
    description: str


@dataclass
class AgentFormBlock:
    id: str
    description: str
    params: Optional[Union[List[AgentSelectItemBlock], AgentFormInputItemBlock]]
    form_type: Literal["single_select", "multiple_select", "time", "input"] = "single_select"
    result: Optional[str] = ""


@dataclass
class AgentFormItemResultBlock:
    id: str
    result: str


@dataclass
class AgentFormResultBlock:
    result: Optional[List[AgentFormItemResultBlock]] = None


@dataclass
class AgentAddFriendBlock:
    aid: str
    description: str


@dataclass
class AgentFileBlock:
    name: str
    url: str
    content: str
    description: str
    type: str
    encode: str


@dataclass
class AgentCreateOrderBlock:
    total_amount: int
    description: str
    initiator_aid: str
    player_aid: str
    payment_method: str
    service_period: int


@dataclass
class AgentOrderBlock:
    total_amount: int
    description: str
    initiator_aid: str
    player_aid: str
    payment_method: str
    service_period: int
    guarantor_aid: str
    order_no: str
    status: Literal["success", "pending", "failed", "canceled"]
    order_query_url: str
    qr_code_url: str


@dataclass
class AssistantMessageBlock:
    type: Literal[
        "llm", "content", "search", "reasoning_content", "error", "file", "image", "tool_call",
        "text/event-stream", "video", "audio", "form", "form_result", "add_agent", "create_order", "order",
    ]
    status: Literal["success", "loading", "cancel", "error", "reading", "optimizing"]
    timestamp: int
    block_id: Optional[str] = None
    content: Optional[
        Union[
            str, AgentCreateOrderBlock, AgentOrderBlock, OpenAIMessage, AgentFormResultBlock, AgentAddFriendBlock,
            AgentFileBlock, List[AgentFormBlock],
        ]
    ] = None
    type_format: str = ""
    trace_id: Optional[str] = ""
