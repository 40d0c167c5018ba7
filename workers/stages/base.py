"""The stage protocol: how a stage builds its model, batches its rows and turns a batch into a loss and metrics.

A stage owns its normalisation: `count` says how many units (tokens, pairs, examples) a micro-batch holds before
the forward pass, so the loop can sum the window's count over all ranks first and make every loss the global mean
over units, not a mean of per-rank means. `forward` returns the loss *sum* and metric (sum, count) pairs; the loop
all-reduces those too when it logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from orchestrator.stages import StageSpec

from ..context import DistContext
from ..model import build_model

Metrics = dict[str, tuple[float, float]]  # name -> (sum, count) on this rank


@dataclass
class StageOutput:
    loss_sum: torch.Tensor  # summed over the micro-batch's units
    metrics: Metrics = field(default_factory=dict)


class Stage(Protocol):
    spec: StageSpec

    def build_model(self, resume_dir: str | None) -> torch.nn.Module:
        """The trainable model (weights from `resume_dir`'s model folder when resuming), before the strategy."""

    def prepare(self, strategy: Any) -> None:
        """After the strategy set up the policy: frozen models (reference, reward) through the strategy."""

    def collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Model inputs of one micro-batch from the tokenized columns (rollout stages build their batches from
        experience instead: workers/rollout.py)."""

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        """Units the micro-batch's loss is averaged over (counted before the forward pass)."""

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-pad tokens the micro-batch fed the model (for tokens_seen and tokens per second)."""

    def state_dict(self) -> dict[str, Any]:
        """Stage state saved with each checkpoint (e.g. PPO's KL coefficient); {} when there is none."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseStage:
    """What most stages share: config, context, tokenizer, the standard model, no frozen models, no state."""

    def __init__(self, spec: StageSpec, cfg: Any, ctx: DistContext, tokenizer: Any):
        self.spec, self.cfg, self.ctx, self.tokenizer = spec, cfg, ctx, tokenizer

    def build_model(self, resume_dir: str | None) -> torch.nn.Module:
        return build_model(self.cfg, resume_dir, self.tokenizer, self.ctx.device)

    def prepare(self, strategy: Any) -> None:
        self.strategy = strategy

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def with_router_loss(self, loss_sum: torch.Tensor, outputs: Any, units: float) -> torch.Tensor:
        """moe_aux_loss_coef: an MoE model's load-balancing loss (a mean over the forward's tokens) weighed in, as
        its own loss does. It is scaled by the micro-batch's units so that the loop's division by the window's units
        leaves coefficient x aux loss per unit, whatever the batch size."""
        aux = getattr(outputs, "aux_loss", None)
        if aux is None or not self.cfg.moe_aux_loss_coef:
            return loss_sum
        return loss_sum + self.cfg.moe_aux_loss_coef * aux.to(loss_sum.dtype) * units

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def add_metric(metrics: Metrics, name: str, values: torch.Tensor) -> None:
    """Add the sum and count of a 1-D tensor of per-unit values (an empty tensor adds nothing)."""
    metrics[name] = (float(values.detach().float().sum()), float(values.numel()))


def merge_metrics(into: dict[str, list[float]], metrics: Metrics | dict[str, list[float]]) -> None:
    """Add (sum, count) pairs into running [sum, count] lists."""
    for name, (total, count) in metrics.items():
        entry = into.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += count


def reduce_metrics(ctx: DistContext, sums: dict[str, list[float]], names: tuple[str, ...]) -> dict[str, float]:
    """Global means of the named metrics (one all-reduce; every rank passes the same names, zeros when absent)."""
    flat = [value for name in names for value in sums.get(name, [0.0, 0.0])]
    totals = ctx.sum(flat) if flat else []
    means = {}
    for index, name in enumerate(names):
        total, count = totals[2 * index], totals[2 * index + 1]
        if count:
            means[name] = round(total / count, 6)
    return means
