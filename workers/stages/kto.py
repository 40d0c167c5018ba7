"""Kahneman-Tversky optimisation: each example is desirable or undesirable; its reward beta * (log pi - log ref) is
pushed above (or below) the KL baseline z0. z0 is estimated from the mismatched completions the feedback processor
pairs with each prompt, averaged over all ranks, clamped at zero and computed without gradients. The loss is
averaged over examples across all ranks; `pref_ftx` adds the desirable responses' length-normalised NLL."""

from __future__ import annotations

from typing import Any

import torch

from ..collate import model_inputs, pad_feedback
from ..losses import kto_kl_baseline, kto_loss, sequence_logps
from .base import BaseStage, StageOutput, add_metric
from .reference import make_reference


def kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("kl_"): value for name, value in batch.items() if name.startswith("kl_")}


class Stage(BaseStage):
    def prepare(self, strategy: Any) -> None:
        super().prepare(strategy)
        self.reference = make_reference(self.cfg, strategy, strategy.module)

    def collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pad_feedback(columns, self.tokenizer.pad_token_id, self.cfg.ignore_pad_token_for_loss)

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["input_ids"].shape[0])

    def kl_baseline(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
        mismatched = kl_batch(batch)
        with torch.no_grad():
            policy, _ = sequence_logps(model(**model_inputs(mismatched)).logits, mismatched["labels"])
            reference, _ = self.reference.logps(mismatched)
        total, count = self.ctx.sum([float((policy - reference).sum()), float(policy.numel())])
        return kto_kl_baseline(total, count)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        z0 = self.kl_baseline(model, batch)
        outputs = model(**model_inputs(batch))
        logps, counts = sequence_logps(outputs.logits, batch["labels"])
        reference, _ = self.reference.logps(batch)
        desirable = batch["desirable"]
        losses, rewards = kto_loss(logps, reference, desirable, z0, beta=self.cfg.pref_beta,
                                   chosen_weight=self.cfg.kto_chosen_weight,
                                   rejected_weight=self.cfg.kto_rejected_weight)  # fmt: skip
        if self.cfg.pref_ftx > 0:
            losses = losses + self.cfg.pref_ftx * desirable.float() * (-logps / counts.clamp(min=1))
        metrics: dict = {"kl": (z0, 1.0)}
        add_metric(metrics, "rewards/chosen", rewards[desirable])
        add_metric(metrics, "rewards/rejected", rewards[~desirable])
        add_metric(metrics, "logps/chosen", logps[desirable])
        add_metric(metrics, "logps/rejected", logps[~desirable])
        return StageOutput(self.with_router_loss(losses.sum(), outputs, len(losses)), metrics)
