"""Small parsers for values LLaMA-Factory accepts in two spellings (a dict or a JSON string, a comma list)."""

from __future__ import annotations

import json
from typing import Any


def as_dict(value: Any) -> dict:
    """A dict given either as a mapping or as a JSON object string."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        parsed = json.loads(value)
        if not isinstance(parsed, dict):
            raise ValueError(f"expected a JSON object, got {type(parsed).__name__}")
        return parsed
    raise ValueError(f"expected a dict or a JSON object string, got {type(value).__name__}")


def split_csv(value: str | None) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`; None -> []."""
    if not value:
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]
