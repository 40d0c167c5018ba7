"""The one way a config field is declared: default, one-line doc, support status.

The support status is what docs/FEATURES.md is generated from, and what the validator uses to refuse a
parameter whose feature Loom does not have (yet) when the user sets it to anything but its default.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..support import Support

__all__ = ["Support", "not_yet", "param", "refused"]


def param(
    default: Any,
    doc: str,
    *,
    support: Support = Support.WORKS,
    reason: str = "",
    source: str = "llamafactory",
    secret: bool = False,
    **constraints: Any,
) -> Any:
    """A config field. `source` is `llamafactory`, `transformers` (TrainingArguments) or `loom` (our extension).
    A `secret` one (a token, an API key) is never written to a file or printed (docs/SECURITY.md)."""
    if support is not Support.WORKS and not reason:
        raise ValueError(f"a field with support {support.value!r} needs a reason")
    extra = {"support": support.value, "reason": reason, "source": source, "secret": secret}
    return Field(default, description=doc, json_schema_extra=extra, **constraints)


def not_yet(default: Any, doc: str, reason: str = "not built yet", **kw: Any) -> Any:
    return param(default, doc, support=Support.NOT_YET, reason=reason, **kw)


def refused(default: Any, doc: str, reason: str, **kw: Any) -> Any:
    return param(default, doc, support=Support.REFUSED, reason=reason, **kw)
