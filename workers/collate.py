"""Batching: pad token-id lists into tensors. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_batch(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
    ignore_pad_token_for_loss: bool = True,
    position_ids: Sequence[Sequence[int]] | None = None,
    segment_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padded label positions are ignored by the loss (or the pad id).

    Packed rows also carry position ids (restarting per packed sequence; 0 on padding) and segment ids
    (which packed sequence each token belongs to; 0 on padding).
    """
    width = max(len(ids) for ids in input_ids)
    batch = {
        "input_ids": _padded(input_ids, width, pad_token_id),
        "attention_mask": _padded([[1] * len(ids) for ids in input_ids], width, 0),
        "labels": _padded(labels, width, IGNORE_INDEX if ignore_pad_token_for_loss else pad_token_id),
    }
    if position_ids is not None:
        batch["position_ids"] = _padded(position_ids, width, 0)
    if segment_ids is not None:
        batch["segment_ids"] = _padded(segment_ids, width, 0)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for a causal LM. Neatly packed rows (several segments) go without a 2-D attention mask:
    transformers then derives a block-diagonal causal mask from the restarting position ids, for eager and sdpa
    attention alike, and flash attention uses them as varlen boundaries."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
        if "segment_ids" in batch and int(batch["segment_ids"].max()) > 1:
            inputs["attention_mask"] = None
            inputs["use_cache"] = False  # transformers derives the packed mask only when no cache is in play
    return inputs


def pad_pairs(columns: dict[str, Any], pad_token_id: int, ignore_pad_token_for_loss: bool = True) -> dict[str, Any]:
    """chosen/rejected pairs as one batch of 2B rows, the chosen ones first, so one forward pass scores both."""
    ids = list(columns["chosen_input_ids"]) + list(columns["rejected_input_ids"])
    labels = list(columns["chosen_labels"]) + list(columns["rejected_labels"])
    return pad_batch(ids, labels, pad_token_id, ignore_pad_token_for_loss)


def pad_feedback(columns: dict[str, Any], pad_token_id: int, ignore_pad_token_for_loss: bool = True) -> dict[str, Any]:
    """KTO rows: the examples, their mismatched "KL" completions (`kl_` keys) and the desirable tags."""
    batch = pad_batch(columns["input_ids"], columns["labels"], pad_token_id, ignore_pad_token_for_loss)
    kl = pad_batch(columns["kl_input_ids"], columns["kl_labels"], pad_token_id, ignore_pad_token_for_loss)
    batch.update({f"kl_{name}": value for name, value in kl.items()})
    batch["desirable"] = torch.as_tensor([bool(tag) for tag in columns["kto_tags"]], dtype=torch.bool)
    return batch
