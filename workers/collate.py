"""Batching: pad token-id lists into tensors. Pure."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    ignore_pad_token_for_loss: bool = True,
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padded label positions are ignored by the loss (or the pad id)."""
    width = max(len(ids) for ids in input_ids)
    label_pad = IGNORE_INDEX if ignore_pad_token_for_loss else pad_token_id
    batch = {
        "input_ids": torch.full((len(input_ids), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(input_ids), width), dtype=torch.long),
        "labels": torch.full((len(input_ids), width), label_pad, dtype=torch.long),
    }
    for row, (ids, labs) in enumerate(zip(input_ids, labels, strict=True)):
        n = len(ids)
        batch["input_ids"][row, :n] = torch.tensor(ids, dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(labs, dtype=torch.long)
    return batch
