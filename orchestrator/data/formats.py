"""Format converters: a raw row -> Loom's canonical example, built as LLaMA-Factory's converters build theirs.

The canonical example (the processors consume it):
    prompt:   [{"role": "user" | "assistant" | "observation" | "function", "content": str}, ...]  odd length
    response: [{"role": "assistant" | "function", "content": str}, ...]  sft 1, ranking 2 (chosen, rejected), kto 1
    system: str, tools: str ("" when none), kto_tag: bool | None,
    invalid: str | None  (why the row must be dropped; the processors count drops by this reason)
"""

from __future__ import annotations

import json
from typing import Any

from ..stages import STAGES
from .registry import READ_ERROR, ROW_COLUMN, DatasetSpec

Message = dict[str, str]
Example = dict[str, Any]

# Where a role may stand in a conversation: user / observation turns, then assistant / function turns, alternating.
TURN_ROLES = (("user", "observation"), ("assistant", "function"))
TOOL_RESPONSE_SEPARATOR = "\n</tool_response>\n<tool_response>\n"
THINKING_OFF = "detailed thinking off"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return str(value) if isinstance(value, (bool, int, float)) else json.dumps(value, ensure_ascii=False)


def _tools(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _get(row: dict[str, Any], spec: DatasetSpec, role: str) -> Any:
    column = spec.column(role)
    return row.get(column) if column else None


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _example(prompt: list, response: list, system: str = "", tools: str = "", kto_tag: bool | None = None) -> Example:
    return {"prompt": prompt, "response": response, "system": system, "tools": tools, "kto_tag": kto_tag,
            "invalid": None}  # fmt: skip


def _invalid(reason: str, system: str = "", tools: str = "") -> Example:
    return {**_example([], [], system, tools), "invalid": reason}


def _kto_tag(row: dict[str, Any], spec: DatasetSpec) -> bool | None:
    value = _get(row, spec, "kto_tag")
    return value if spec.column("kto_tag") and isinstance(value, bool) else None


# ---- alpaca -------------------------------------------------------------------------------------------------------


def convert_alpaca(row: dict[str, Any], spec: DatasetSpec) -> Example:
    """history pairs as earlier turns, "instruction\\ninput" as the last user turn, output (or chosen/rejected)."""
    system, tools = _text(_get(row, spec, "system")), _tools(_get(row, spec, "tools"))
    prompt, reason = _history(_get(row, spec, "history"))
    if reason:
        return _invalid(reason, system, tools)
    query = [_text(value) for value in (_get(row, spec, "prompt"), _get(row, spec, "query")) if value]
    prompt.append(_message("user", "\n".join(query)))
    kto_tag = _kto_tag(row, spec)
    return _example(prompt, _alpaca_response(row, spec, kto_tag), system, tools, kto_tag)


def _history(history: Any) -> tuple[list[Message], str | None]:
    turns: list[Message] = []
    if not isinstance(history, list):
        return turns, None
    for index, pair in enumerate(history, start=1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return [], f"history entry {index} is not a [prompt, response] pair"
        turns += [_message("user", _text(pair[0])), _message("assistant", _text(pair[1]))]
    return turns, None


def _alpaca_response(row: dict[str, Any], spec: DatasetSpec, kto_tag: bool | None) -> list[Message]:
    response = _get(row, spec, "response")
    if kto_tag is not None:
        return [_message("assistant", _text(response))]
    chosen, rejected = _get(row, spec, "chosen"), _get(row, spec, "rejected")
    if spec.ranking and isinstance(chosen, str) and isinstance(rejected, str):
        return [_message("assistant", chosen), _message("assistant", rejected)]
    return [_message("assistant", response)] if isinstance(response, str) else []


# ---- sharegpt and openai ------------------------------------------------------------------------------------------


def convert_sharegpt(row: dict[str, Any], spec: DatasetSpec) -> Example:
    """Tagged messages; a leading system message is the system prompt; roles must alternate."""
    messages, system, tools, reason = _messages(row, spec)
    if reason:
        return _invalid(reason, system, tools)
    turns, reason = _sharegpt_turns(messages, spec)
    return _split(turns, reason, row, spec, system, tools)


def convert_openai(row: dict[str, Any], spec: DatasetSpec) -> Example:
    """OpenAI chat messages: assistant tool_calls become function turns, consecutive tool results one observation."""
    messages, system, tools, reason = _messages(row, spec)
    if reason:
        return _invalid(reason, system, tools)
    turns, reason = _openai_turns(messages, spec)
    return _split(turns, reason, row, spec, _openai_system(system, tools), tools)


def _messages(row: dict[str, Any], spec: DatasetSpec) -> tuple[list[dict], str, str, str | None]:
    """The messages, the system prompt (a leading system message wins over the system column) and the tools."""
    messages = _get(row, spec, "messages")
    system, tools = _text(_get(row, spec, "system")), _tools(_get(row, spec, "tools"))
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return [], system, tools, f"column {spec.column('messages')!r} does not hold a list of messages"
    system_tag = spec.tag("system_tag")
    if messages and system_tag and messages[0].get(spec.tag("role_tag")) == system_tag:
        system, messages = _text(messages[0].get(spec.tag("content_tag"))), messages[1:]
    return messages, system, tools, None


def _role_names(spec: DatasetSpec) -> dict[str, str]:
    """Tag value -> canonical role; unset tags match nothing."""
    names = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
             "function_tag": "function", "system_tag": "system"}  # fmt: skip
    return {spec.tag(tag): role for tag, role in names.items() if spec.tag(tag)}


def _content(value: Any, where: str) -> tuple[str, str | None]:
    if value is None or isinstance(value, str):
        return value or "", None
    return "", f"the content of {where} is not text"


def _sharegpt_turns(messages: list[dict], spec: DatasetSpec) -> tuple[list[Message], str | None]:
    roles, turns = _role_names(spec), []
    for index, message in enumerate(messages):
        tag = message.get(spec.tag("role_tag"))
        role = _role(roles, tag)
        reason = _order_problem(index, role, tag, "message")
        content, bad_content = _content(message.get(spec.tag("content_tag")), f"message {index + 1}")
        if reason or bad_content:
            return [], reason or bad_content
        turns.append(_message(role, content))
    return turns, None


def _role(roles: dict[str, str], tag: Any) -> str | None:
    return roles.get(tag) if isinstance(tag, str) else None


def _order_problem(index: int, role: str | None, tag: Any, noun: str) -> str | None:
    expected = TURN_ROLES[index % 2]
    if role in expected:
        return None
    return f"{noun} {index + 1} has role {tag!r} where the role must be {' or '.join(expected)} (wrong role order)"


def _openai_turns(messages: list[dict], spec: DatasetSpec) -> tuple[list[Message], str | None]:
    roles, turns, results = _role_names(spec), [], []
    calling_tags = {spec.tag("assistant_tag"), spec.tag("function_tag")} - {None}
    for index, message in enumerate(messages, start=1):
        tag, content = message.get(spec.tag("role_tag")), message.get(spec.tag("content_tag"))
        role = _role(roles, tag)
        if isinstance(tag, str) and tag in calling_tags and message.get("tool_calls"):
            role, content = "function", _tool_calls(message["tool_calls"])
        elif role == "observation":
            results.append(_text(content))
            continue
        if results:  # tool results in a row are one observation turn
            turns.append(_message("observation", TOOL_RESPONSE_SEPARATOR.join(results)))
            results = []
        content, reason = _content(content, f"message {index}")
        if role is None or reason:
            return [], reason or f"message {index} has an unknown role {tag!r}"
        turns.append(_message(role, content))
    # LLaMA-Factory drops tool results that end the conversation (nothing follows them); so does Loom.
    for index, turn in enumerate(turns):
        if reason := _order_problem(index, turn["role"], turn["role"], "turn"):
            return [], reason
    return turns, None


def _tool_calls(calls: Any) -> str:
    calls = calls if isinstance(calls, list) else [calls]
    functions = [call.get("function") if isinstance(call, dict) else call for call in calls]
    return json.dumps(functions, ensure_ascii=False)


def _openai_system(system: str, tools: str) -> str:
    """LLaMA-Factory's openai converter marks a system prompt "detailed thinking off" unless there are tools or
    the prompt already says which; Loom does the same so both build the same examples."""
    if tools:
        return system + "\n" if system else system
    if not system:
        return THINKING_OFF
    return system if "detailed thinking on" in system or THINKING_OFF in system else f"{system}\n{THINKING_OFF}"


def _split(
    turns: list[Message], reason: str | None, row: dict[str, Any], spec: DatasetSpec, system: str, tools: str
) -> Example:
    """Aligned turns -> prompt and response: the last turn, the kto-tagged last turn, or chosen and rejected."""
    reason = reason or _count_problem(len(turns), spec.ranking)
    if reason:
        return _invalid(reason, system, tools)
    kto_tag = _kto_tag(row, spec)
    if kto_tag is not None:
        return _example(turns[:-1], turns[-1:], system, tools, kto_tag)
    if not spec.ranking:
        return _example(turns[:-1], turns[-1:], system, tools)
    pair, reason = _ranking_pair(row, spec)
    return _invalid(reason, system, tools) if reason else _example(turns, pair, system, tools)


def _count_problem(count: int, ranking: bool) -> str | None:
    if count == 0:
        return "the conversation has no messages"
    if not ranking and count % 2:
        return "the conversation has an odd number of messages: it must end with an assistant (or function) turn"
    if ranking and not count % 2:
        return "a ranking conversation must end with a user (or observation) turn, answered by chosen and rejected"
    return None


def _ranking_pair(row: dict[str, Any], spec: DatasetSpec) -> tuple[list[Message], str | None]:
    roles, pair = _role_names(spec), []
    for name in ("chosen", "rejected"):
        message = _get(row, spec, name)
        if not isinstance(message, dict):
            return [], f"{name} is not a message"
        tag = message.get(spec.tag("role_tag"))
        content, reason = _content(message.get(spec.tag("content_tag")), f"the {name} message")
        role = _role(roles, tag)
        if role not in TURN_ROLES[1] or reason:
            return [], reason or f"the {name} message has role {tag!r}; an assistant or function message is expected"
        pair.append(_message(role, content))
    return pair, None


# ---- entry points -------------------------------------------------------------------------------------------------

CONVERTERS = {"alpaca": convert_alpaca, "sharegpt": convert_sharegpt, "openai": convert_openai}


def parse_row(text: str) -> dict[str, Any]:
    """A row read as JSON text (see readers.py) -> its dict; a clear error for text that is not a JSON object."""
    if text.startswith(READ_ERROR):
        raise ValueError(text.removeprefix(READ_ERROR))
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"a row is not valid JSON ({error}): {text[:200]!r}") from None
    if not isinstance(row, dict):
        raise ValueError(f"a row is not a JSON object: {text[:200]!r}")
    return row


def convert(row: dict[str, Any], spec: DatasetSpec, stage: str) -> Example:
    """A raw row (a dict, or a row of JSON text) -> the canonical example. Conversion does not depend on the
    stage (as in LLaMA-Factory); the processors check what each stage needs and count what they drop."""
    if ROW_COLUMN in row:
        row = parse_row(row[ROW_COLUMN])
    return CONVERTERS[spec.formatting](row, spec)


# The columns each format looks up (LLaMA-Factory fails on a named one that is missing; so does Loom, up front).
READ_ROLES = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools", "kto_tag"),
    "sharegpt": ("messages", "system", "tools", "kto_tag"),
    "openai": ("messages", "kto_tag"),  # its system and tools columns may be absent
}


def required_columns(spec: DatasetSpec, stage: str) -> list[str]:
    """Columns the dataset must have: those its entry names that the format reads, plus the format's core ones."""
    roles = READ_ROLES[spec.formatting] + (("chosen", "rejected") if spec.ranking else ())
    named = [spec.columns[role] for role in roles if spec.columns.get(role)]
    if spec.formatting != "alpaca":
        core = ["messages"]
    elif spec.ranking:
        core = ["prompt", "chosen", "rejected"]
    else:
        core = ["prompt", "response"] if STAGES[stage].needs_response else ["prompt"]
    needed = named + [spec.column(role) for role in core if spec.column(role)]
    return list(dict.fromkeys(needed))
