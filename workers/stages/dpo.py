"""Direct preference optimisation with every `pref_loss`: sigmoid, hinge, ipo, kto_pair (against a reference), and
the reference-free orpo and simpo. The loss is averaged over pairs across all ranks.

Log-probabilities are sums over the response tokens, length-averaged for ipo, orpo and simpo (as their papers and
LLaMA-Factory define them). `pref_ftx` adds the chosen response's length-normalised NLL on top of any loss.
"""

from __future__ import annotations

from typing import Any

import torch

from ..collate import model_inputs, pad_pairs
from ..losses import dpo_loss, orpo_loss, sequence_logps, simpo_loss
from .base import BaseStage, StageOutput, add_metric
from .reference import make_reference

LENGTH_AVERAGED = ("ipo", "orpo", "simpo")


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


def preference_loss(cfg: Any, policy: tuple[torch.Tensor, torch.Tensor], reference: tuple | None) -> tuple:
    """Per-pair losses and rewards of chosen and rejected for the configured pref_loss."""
    if cfg.pref_loss == "orpo":
        return orpo_loss(*policy, beta=cfg.pref_beta)
    if cfg.pref_loss == "simpo":
        return simpo_loss(*policy, beta=cfg.pref_beta, gamma=cfg.simpo_gamma)
    return dpo_loss(cfg.pref_loss, *policy, *reference, beta=cfg.pref_beta, label_smoothing=cfg.dpo_label_smoothing)


class Stage(BaseStage):
    def prepare(self, strategy: Any) -> None:
        super().prepare(strategy)
        uses = self.spec.uses_reference(self.cfg)
        self.reference = make_reference(self.cfg, strategy, strategy.module) if uses else None

    def collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pad_pairs(columns, self.tokenizer.pad_token_id, self.cfg.ignore_pad_token_for_loss)

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return batch["input_ids"].shape[0] / 2

    def _per_pair(self, logps: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.pref_loss in LENGTH_AVERAGED:
            logps = logps / counts.clamp(min=1)
        return split_pairs(logps)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        outputs = model(**model_inputs(batch))
        logps, counts = sequence_logps(outputs.logits, batch["labels"])
        policy = self._per_pair(logps, counts)
        reference = self._per_pair(*self.reference.logps(batch)) if self.reference else None
        losses, chosen_rewards, rejected_rewards = preference_loss(self.cfg, policy, reference)
        metrics: dict = {}
        if self.cfg.pref_ftx > 0:
            chosen_logps, chosen_counts = logps[: len(losses)], counts[: len(losses)]
            sft = -chosen_logps / chosen_counts.clamp(min=1)
            losses = losses + self.cfg.pref_ftx * sft
            add_metric(metrics, "sft_loss", sft)
        add_metric(metrics, "rewards/chosen", chosen_rewards)
        add_metric(metrics, "rewards/rejected", rejected_rewards)
        add_metric(metrics, "rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        add_metric(metrics, "rewards/margins", chosen_rewards - rejected_rewards)
        add_metric(metrics, "logps/chosen", policy[0])
        add_metric(metrics, "logps/rejected", policy[1])
        return StageOutput(self.with_router_loss(losses.sum(), outputs, len(losses)), metrics)
