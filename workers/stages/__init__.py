"""One file per stage, each exposing `Stage`: a class following `base.Stage`, built from the config, the distributed
context and the tokenizer. Which module holds a stage is the registry's (orchestrator/stages.py) to say."""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.stages import STAGES

from ..context import DistContext
from .base import Stage


def make_stage(cfg: Any, ctx: DistContext, tokenizer: Any) -> Stage:
    spec = STAGES[cfg.stage]
    if not spec.module:
        raise ValueError(f"stage {cfg.stage!r} is not built yet")
    module = importlib.import_module(f"{__name__}.{spec.module}")
    return module.Stage(spec, cfg, ctx, tokenizer)
