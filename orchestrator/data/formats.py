"""Format converters: a raw row -> the canonical example {prompt: [...], response: [...], system: str}."""

from __future__ import annotations

from typing import Any

from .registry import DatasetSpec


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def convert_alpaca(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """instruction (+ input) as the last user turn, history as earlier turns, output as the response."""
    prompt: list[dict[str, str]] = []
    history_column = spec.column("history")
    history = row.get(history_column) if history_column else None
    if isinstance(history, list):
        for turn in history:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                prompt.append({"role": "user", "content": _text(turn[0])})
                prompt.append({"role": "assistant", "content": _text(turn[1])})
    query = [_text(row.get(spec.column(role))) for role in ("prompt", "query") if spec.column(role)]
    prompt.append({"role": "user", "content": "\n".join(q for q in query if q)})
    response_value = row.get(spec.column("response")) if spec.column("response") else None
    response = [{"role": "assistant", "content": response_value}] if isinstance(response_value, str) else []
    system_column = spec.column("system")
    return {"prompt": prompt, "response": response, "system": _text(row.get(system_column)) if system_column else ""}


def convert_text(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """A plain-text row (pre-training): the text is the single prompt."""
    column = "text" if spec.file_type == "text" else (spec.column("prompt") or "text")
    return {"prompt": [{"role": "user", "content": _text(row.get(column))}], "response": [], "system": ""}


def required_columns(spec: DatasetSpec, stage: str) -> list[str]:
    if spec.file_type == "text":
        return []
    if stage == "pt":
        return [spec.column("prompt") or "text"]
    return [c for c in (spec.column("prompt"), spec.column("response")) if c]


def convert(row: dict[str, Any], spec: DatasetSpec, stage: str) -> dict[str, Any]:
    if stage == "pt":
        return convert_text(row, spec)
    return convert_alpaca(row, spec)
