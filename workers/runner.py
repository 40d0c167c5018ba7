"""Which loop drives a stage: the batch loop (loop.py) or the rollout loop (rollout.py), as the registry says."""

from __future__ import annotations

from typing import Any

from orchestrator.plan import RunPlan
from orchestrator.stages import STAGES

from .context import DistContext
from .loop import RunIO, StageRunner
from .rollout import RolloutRunner


def make_runner(cfg: Any, plan: RunPlan, ctx: DistContext, io: RunIO) -> StageRunner:
    runner = RolloutRunner if STAGES[cfg.stage].loop == "rollout" else StageRunner
    return runner(cfg, plan, ctx, io)
