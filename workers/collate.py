"""Batching: pad token-id lists into tensors. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def as_ids(row: Sequence[int]) -> torch.Tensor:
    """A row of token ids as a tensor. Ray Data hands rows out as read-only NumPy views, which torch cannot share
    safely (it warns on every batch): those are copied, a row being at most cutoff_len ids."""
    if isinstance(row, np.ndarray) and not row.flags.writeable:
        row = row.copy()
    return torch.as_tensor(row, dtype=torch.long)


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = as_ids(row)
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
    batch = pad_batch(ids, labels, pad_token_id, ignore_pad_token_for_loss)
    if "ref_chosen_logps" in columns:  # precomputed reference log-probs (precompute_ref_logps)
        batch["ref_logps"] = torch.cat([_floats(columns["ref_chosen_logps"]), _floats(columns["ref_rejected_logps"])])
    return batch


def _floats(values: Any) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.float32)


def pad_feedback(columns: dict[str, Any], pad_token_id: int, ignore_pad_token_for_loss: bool = True) -> dict[str, Any]:
    """KTO rows: the examples, their mismatched "KL" completions (`kl_` keys) and the desirable tags."""
    batch = pad_batch(columns["input_ids"], columns["labels"], pad_token_id, ignore_pad_token_for_loss)
    kl = pad_batch(columns["kl_input_ids"], columns["kl_labels"], pad_token_id, ignore_pad_token_for_loss)
    batch.update({f"kl_{name}": value for name, value in kl.items()})
    batch["desirable"] = torch.as_tensor([bool(tag) for tag in columns["kto_tags"]], dtype=torch.bool)
    if "ref_logps" in columns:  # precomputed reference log-probs (precompute_ref_logps)
        batch["ref_logps"], batch["kl_ref_logps"] = _floats(columns["ref_logps"]), _floats(columns["ref_kl_logps"])
    return batch


def pad_experience(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
                   per_token: dict[str, Sequence[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Prompt + response rows for rollouts: prompts left-padded to one width P, responses right-padded to R, so
    `logits[:, P - 1 : P - 1 + R]` predict the response tokens of every row. Position ids count attended tokens
    only (as generation numbered them). `per_token` values (one [len(response)] tensor per row) are right-padded
    to [B, R] with zeros."""
    width = max(len(p) for p in prompts)
    length = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), width + length), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids[row, width - len(prompt) : width] = as_ids(prompt)
        ids[row, width : width + len(response)] = as_ids(response)
        mask[row, width - len(prompt) : width + len(response)] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "response_mask": mask[:, width:].float(),
        "prompt_width": torch.tensor(width),
    }
    for name, rows in (per_token or {}).items():
        padded = torch.zeros(len(prompts), length, dtype=torch.float32)
        for row, values in enumerate(rows):
            padded[row, : len(values)] = values
        batch[name] = padded
    return batch


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned for generation: ids and attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = as_ids(row)
        mask[index, width - len(row) :] = 1
    return ids, mask


def trim_response(tokens: list[int], stop_ids: set[int], pad_id: int) -> list[int]:
    """Generated tokens up to and including the first stop token (padding after it dropped)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens
