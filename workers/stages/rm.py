"""Reward modelling: a value head scores the last non-pad token of each sequence; the pairwise loss
-log sigmoid(s_chosen - s_rejected) in fp32, averaged over pairs across all ranks. Logs the accuracy (chosen scored
above rejected) and the mean scores; saved as the model or adapter plus value_head.safetensors."""

from __future__ import annotations

from typing import Any

import torch

from ..collate import pad_pairs
from ..losses import pairwise_ranking_loss
from ..model import build_model
from ..value_head import ValueHeadModel, last_token_index
from .base import BaseStage, StageOutput, add_metric
from .dpo import split_pairs


def scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One score per row: the value head at the row's last attended token."""
    values = model(with_logits=False, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).values
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(batch["attention_mask"])]


class Stage(BaseStage):
    def build_model(self, resume_dir: str | None) -> torch.nn.Module:
        model = ValueHeadModel(build_model(self.cfg, resume_dir, self.tokenizer, self.ctx.device), train_lm_head=False)
        if resume_dir:
            model.load_head(resume_dir)
        return model

    def collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return pad_pairs(columns, self.tokenizer.pad_token_id, self.cfg.ignore_pad_token_for_loss)

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return batch["input_ids"].shape[0] / 2

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        chosen, rejected = split_pairs(scores(model, batch).float())
        metrics: dict = {}
        add_metric(metrics, "accuracy", (chosen > rejected).float())
        add_metric(metrics, "scores/chosen", chosen)
        add_metric(metrics, "scores/rejected", rejected)
        return StageOutput(pairwise_ranking_loss(chosen, rejected).sum(), metrics)
