"""One file per stage, each exposing STAGE: an object following `base.Stage`."""

from __future__ import annotations

from .base import Stage


def get_stage(name: str) -> Stage:
    if name == "pt":
        from .pt import STAGE
    elif name == "sft":
        from .sft import STAGE
    else:
        raise ValueError(f"stage {name!r} is not built yet")
    return STAGE
