"""Next-token prediction on (input_ids, labels): the training objective shared by pt and sft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..collate import model_inputs, pad_batch
from ..losses import causal_lm_loss_sum


@dataclass(frozen=True)
class CausalLMStage:
    name: str

    def collate(
        self, columns: dict[str, Any], pad_token_id: int, ignore_pad_token_for_loss: bool
    ) -> dict[str, torch.Tensor]:
        return pad_batch(
            columns["input_ids"],
            columns["labels"],
            pad_token_id,
            ignore_pad_token_for_loss,
            position_ids=columns.get("position_ids"),
            segment_ids=columns.get("segment_ids"),
        )

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(**model_inputs(batch)).logits
        return causal_lm_loss_sum(logits, batch["labels"])
