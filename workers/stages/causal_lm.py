"""Next-token prediction on (input_ids, labels): the training objective shared by pt and sft."""

from __future__ import annotations

from typing import Any

import torch

from ..collate import IGNORE_INDEX, model_inputs, pad_batch
from ..losses import causal_lm_loss_sum, token_accuracy
from .base import BaseStage, StageOutput


class CausalLMStage(BaseStage):
    """The loss is averaged over labelled tokens of the whole step, across all ranks."""

    def collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pad_batch(
            columns["input_ids"],
            columns["labels"],
            self.tokenizer.pad_token_id,
            self.cfg.ignore_pad_token_for_loss,
            position_ids=columns.get("position_ids"),
            segment_ids=columns.get("segment_ids"),
        )

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        outputs = model(**model_inputs(batch))
        logits = outputs.logits
        loss_sum, labelled = causal_lm_loss_sum(logits, batch["labels"])
        loss_sum = self.with_router_loss(loss_sum, outputs, labelled)
        if self.cfg.compute_accuracy and not model.training:  # compute_accuracy: token accuracy at evaluation
            return StageOutput(loss_sum, {"accuracy": token_accuracy(logits.detach(), batch["labels"])})
        return StageOutput(loss_sum)
