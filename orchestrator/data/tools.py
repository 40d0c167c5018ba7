"""Tool calling in the formats LLaMA-Factory names by `tool_format`.

Three jobs per format: the tool list (a JSON string of function schemas, as in glaive-style data) becomes text
appended to the system message; a function-call message (JSON of one call {"name", "arguments"} or a list of them)
becomes the assistant's text; and generated text is parsed back into calls. The texts are the exact strings
LLaMA-Factory trains on, so the same data gives the same tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple


class FunctionCall(NamedTuple):
    name: str
    arguments: str  # JSON text of the arguments


Tools = list[dict[str, Any]]
Extracted = str | list[FunctionCall]


@dataclass(frozen=True)
class ToolFormat:
    name: str
    describe_tools: Callable[[Tools], str]
    render_calls: Callable[[list[FunctionCall]], str]
    extract_calls: Callable[[str], Extracted]


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The bare function schema of an OpenAI-style {"type": "function", "function": {...}} entry."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict[str, Any]) -> dict[str, Any]:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _calls_from_json(objects: Any, arguments_key: str) -> list[FunctionCall] | None:
    objects = objects if isinstance(objects, list) else [objects]
    try:
        return [FunctionCall(item["name"], _json(item[arguments_key])) for item in objects]
    except (KeyError, TypeError):
        return None


# default: a ReAct-like "Action / Action Input" text.


def _default_param(name: str, param: dict[str, Any], required: list[str]) -> str:
    notes = ", required" if name in required else ""
    enum = ", should be one of [{}]".format(", ".join(map(str, param["enum"]))) if param.get("enum") else ""
    items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
    return f"  - {name} ({param.get('type', '')}{notes}): {param.get('description', '')}{enum}{items}\n"


def _default_tools(tools: Tools) -> str:
    blocks, names = [], []
    for tool in map(_schema, tools):
        params = tool.get("parameters", {})
        required = params.get("required", [])
        args = "".join(_default_param(n, p, required) for n, p in params.get("properties", {}).items())
        blocks.append(
            f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
        )
        names.append(tool["name"])
    example = '{"input": "hello world", "num_beams": 5}'
    return (
        "You have access to the following tools:\n" + "".join(blocks) + "Use the following format if using a tool:\n"
        f"```\nAction: tool name (one of [{', '.join(names)}])\n"
        f"Action Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{example}```)\n```\n"
    )


def _default_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


_ACTION = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)


def _default_extract(text: str) -> Extracted:
    calls = []
    for name, raw in _ACTION.findall(text):
        try:
            arguments = json.loads(raw.strip().strip('"').strip("`"))
        except json.JSONDecodeError:
            return text
        calls.append(FunctionCall(name.strip(), _json(arguments)))
    return calls or text


# glm4: ChatGLM's Chinese system prompt, one call as "name\n{arguments}".

_GLM4_INTRO = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
_GLM4_HINT = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _glm4_tools(tools: Tools) -> str:
    sections = [f"\n\n## {tool['name']}\n\n{_json(tool, indent=4)}{_GLM4_HINT}" for tool in map(_schema, tools)]
    return _GLM4_INTRO + "".join(sections)


def _glm4_calls(calls: list[FunctionCall]) -> str:
    if len(calls) > 1:
        raise ValueError("the glm4 tool format cannot express parallel function calls")
    return f"{calls[0].name}\n{calls[0].arguments}"


def _glm4_extract(text: str) -> Extracted:
    if "\n" not in text:
        return text
    name, raw = text.split("\n", maxsplit=1)
    try:
        arguments = json.loads(raw.strip())
    except json.JSONDecodeError:
        return text
    return [FunctionCall(name, _json(arguments))]


# llama3: Llama 3.1 JSON tool calling (tools in the system message).


def _today() -> str:
    return datetime.now().strftime("%d %b %Y")


def _llama3_tools(tools: Tools) -> str:
    schemas = "".join(_json(_wrapped(tool), indent=4) + "\n\n" for tool in tools)
    return (
        f"Cutting Knowledge Date: December 2023\nToday Date: {_today()}\n\n"
        "You have access to the following functions. To call a function, please respond with JSON for a function "
        'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        "value}. Do not use variables.\n\n" + schemas
    )


def _llama3_calls(calls: list[FunctionCall]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _json(objects[0] if len(objects) == 1 else objects)


def _json_extract(arguments_key: str) -> Callable[[str], Extracted]:
    def extract(text: str) -> Extracted:
        try:
            objects = json.loads(text.strip())
        except json.JSONDecodeError:
            return text
        calls = _calls_from_json(objects, arguments_key)
        return text if calls is None else calls

    return extract


# mistral: v0.3 [AVAILABLE_TOOLS] / [TOOL_CALLS].


def _mistral_tools(tools: Tools) -> str:
    return "[AVAILABLE_TOOLS] " + _json([_wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[FunctionCall]) -> str:
    return _json([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


# qwen: Qwen 2.5 / 3 <tools> and <tool_call> tags.


def _qwen_tools(tools: Tools) -> str:
    schemas = "".join("\n" + _json(_wrapped(tool)) for tool in tools)
    return (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{schemas}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call>"
    )


def _qwen_calls(calls: list[FunctionCall]) -> str:
    bodies = [_json({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "\n".join(f"<tool_call>\n{body}\n</tool_call>" for body in bodies)


_TOOL_CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)


def _qwen_extract(text: str) -> Extracted:
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            call = json.loads(body.strip())
        except json.JSONDecodeError:
            return text
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            return text
        calls.append(FunctionCall(call["name"], _json(call["arguments"])))
    return calls or text


TOOL_FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat("default", _default_tools, _default_calls, _default_extract),
        ToolFormat("glm4", _glm4_tools, _glm4_calls, _glm4_extract),
        ToolFormat("llama3", _llama3_tools, _llama3_calls, _json_extract("parameters")),
        ToolFormat("mistral", _mistral_tools, _mistral_calls, _json_extract("arguments")),
        ToolFormat("qwen", _qwen_tools, _qwen_calls, _qwen_extract),
    )
}


def known_tool_formats() -> list[str]:
    return sorted(TOOL_FORMATS)


def get_tool_format(name: str) -> ToolFormat:
    """The named tool format (KeyError for an unknown name)."""
    if name not in TOOL_FORMATS:
        raise KeyError(name)
    return TOOL_FORMATS[name]


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {text[:200]!r}") from error


def render_tools(tool_format: str, tools: str) -> str:
    """System-message text describing `tools` (a JSON list of function schemas); "" for an empty list."""
    schemas = _loads(tools, "tool description")
    return get_tool_format(tool_format).describe_tools(schemas) if len(schemas) != 0 else ""


def parse_function_message(content: str) -> list[FunctionCall]:
    """The calls of a function message: JSON of one {"name", "arguments"} object or a list of them."""
    objects = _loads(content, "function message")
    objects = objects if isinstance(objects, list) else [objects]
    return [FunctionCall(item["name"], _json(item["arguments"])) for item in objects]


def _search(words: tuple[str, str] | None, text: str) -> re.Match[str] | None:
    if not words or len(words) != 2:
        return None
    return re.search(f"{re.escape(words[0])}(.*?){re.escape(words[1])}", text, re.DOTALL)


def render_function_call(
    tool_format: str,
    content: str,
    thought_words: tuple[str, str] | None = None,
    tool_call_words: tuple[str, str] | None = None,
) -> str:
    """Assistant text of a function message.

    A call wrapped in tool-call words keeps the text around it in front; otherwise a thought (between the thought
    words) is moved in front of the rendered calls and the rest must be the calls' JSON.
    """
    render = get_tool_format(tool_format).render_calls
    wrapped = _search(tool_call_words, content)
    if wrapped is not None:
        return content.replace(wrapped.group(0), "") + render(parse_function_message(wrapped.group(1)))
    thought = _search(thought_words, content)
    if thought is None:
        return render(parse_function_message(content))
    return thought.group(0) + render(parse_function_message(content.replace(thought.group(0), "")))


def extract_tool_calls(tool_format: str, text: str) -> Extracted:
    """The calls in generated `text`, or the text itself when it holds none (or they do not parse)."""
    return get_tool_format(tool_format).extract_calls(text)
