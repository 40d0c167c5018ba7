"""The stage protocol: how a stage turns a Ray Data batch into tensors and tensors into a loss."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Stage(Protocol):
    name: str

    def collate(
        self, columns: dict[str, Any], pad_token_id: int, ignore_pad_token_for_loss: bool
    ) -> dict[str, torch.Tensor]:
        """Model inputs of one micro-batch from the tokenized columns."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed loss of the micro-batch and the number of positions it covers."""
