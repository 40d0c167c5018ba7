"""OpenAI's chat request and response shapes, and their translation to and from the engine's conversation.

Pure: pydantic models and functions, no model and no server, so every rule here is unit-tested in milliseconds.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine import Conversation, Reply, Sampling

ROLES = {"user": "user", "tool": "observation", "function": "observation", "assistant": "assistant"}


class ApiError(Exception):
    """An OpenAI-shaped error answer: status, message, the request field at fault, type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields Loom has no use for (user, seed, ...)


class FunctionSpec(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionSpec


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None


class ChatRequest(_Open):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False


class ScoreRequest(_Open):
    """LLaMA-Factory's /v1/score/evaluation request: texts to score with the reward model."""

    model: str
    messages: list[str] = Field(min_length=1)
    max_length: int | None = Field(None, ge=1)


def _text(message: Message, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text":
            raise ApiError(400, f"content part of type {part.type!r} is not supported: this model reads text only",
                           f"messages.{index}.content")  # fmt: skip
        parts.append(part.text or "")
    return "".join(parts)


def _calls_json(calls: list[ToolCall], index: int) -> str:
    objects = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            raise ApiError(400, "tool call arguments are not valid JSON", f"messages.{index}.tool_calls") from None
        objects.append({"name": call.function.name, "arguments": arguments})
    return json.dumps(objects, ensure_ascii=False)


def tools_json(tools: list[dict[str, Any]] | None) -> str | None:
    """The tool list as the template reads it: a JSON list of function schemas."""
    if not tools:
        return None
    schemas = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or "name" not in function:
            raise ApiError(400, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           f"tools.{index}")  # fmt: skip
        schemas.append(function)
    return json.dumps(schemas, ensure_ascii=False)


def conversation(request: ChatRequest) -> Conversation:
    """The request's messages in the template's roles: an optional leading system message, then user (or tool)
    and assistant turns alternating, ending with a user or tool message."""
    messages = list(request.messages)
    system = None
    if messages[0].role == "system":
        system = _text(messages[0], 0)
        messages = messages[1:]
    offset = len(request.messages) - len(messages)
    turns = []
    for position, message in enumerate(messages):
        index = position + offset
        if message.role == "system":
            raise ApiError(400, "only the first message may be a system message", f"messages.{index}.role")
        role = ROLES[message.role]
        asking = position % 2 == 0
        if asking != (role in ("user", "observation")):
            expected = "user or tool" if asking else "assistant"
            raise ApiError(400, f"message {index} has role {message.role!r}; turns alternate and this one must be "
                                f"{expected}", f"messages.{index}.role")  # fmt: skip
        if role == "assistant" and message.tool_calls:
            turns.append({"role": "function", "content": _calls_json(message.tool_calls, index)})
        else:
            turns.append({"role": role, "content": _text(message, index)})
    if not turns or len(turns) % 2 == 0:
        raise ApiError(400, "the last message must be from the user or a tool", "messages")
    return Conversation(turns, system, tools_json(request.tools))


def sampling(base: Sampling, request: ChatRequest) -> Sampling:
    return base.updated(do_sample=request.do_sample, temperature=request.temperature, top_p=request.top_p,
                        max_new_tokens=request.max_tokens, stop=request.stop, n=request.n)  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tool_calls_json(reply: Reply) -> list[dict[str, Any]]:
    return [{"id": new_id("call"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls]  # fmt: skip


def completion(model: str, replies: list[Reply]) -> dict[str, Any]:
    choices = []
    for index, reply in enumerate(replies):
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls_json(reply)}
        choices.append({"index": index, "message": message, "finish_reason": reply.finish_reason})
    prompt = replies[0].prompt_tokens if replies else 0
    produced = sum(r.completion_tokens for r in replies)
    usage = {"prompt_tokens": prompt, "completion_tokens": produced, "total_tokens": prompt + produced}
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}  # fmt: skip


def chunk(ident: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
