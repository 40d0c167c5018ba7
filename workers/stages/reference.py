"""The frozen reference policy of dpo, kto and ppo, built once per worker through the strategy.

With LoRA and no `ref_model`, the reference is the policy itself with its adapter disabled: no second copy of the
weights in memory. Otherwise it is `ref_model` (default: the policy's own base, `model_name_or_path`) with
`ref_model_adapters` merged in, frozen and prepared by the strategy (replicated under DDP and ZeRO-1/2, sharded under
FSDP and ZeRO-3).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from orchestrator.quantization import frozen_bits
from orchestrator.stages import reference_source

from ..collate import IGNORE_INDEX, model_inputs
from ..losses import sequence_logps
from ..model import load_frozen_model


class Reference:
    def __init__(self, cfg: Any, strategy: Any, policy: torch.nn.Module):
        self.shares_policy = cfg.finetuning_type == "lora" and not cfg.ref_model
        if self.shares_policy:
            self.model = policy
            return
        with strategy.loading():
            model = load_frozen_model(cfg, *reference_source(cfg), frozen_bits(cfg, "reference"), strategy.ctx.device)
        self.model = strategy.prepare_frozen(model)

    def _mode(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if self.shares_policy else contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._mode():
            output = self.model(**model_inputs(batch))
        return output[0] if isinstance(output, tuple) else output.logits  # a ValueHeadModel answers a tuple

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed log-probabilities of the labels, and the label counts."""
        return sequence_logps(self.logits(batch), batch["labels"])


class PrecomputedReference:
    """precompute_ref_logps: the reference's log-probs arrived with the batch (computed by Ray Data before
    training); the workers hold no reference model."""

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["ref_logps"], (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=-1).float()


def make_reference(cfg: Any, strategy: Any, policy: torch.nn.Module) -> Reference | PrecomputedReference:
    if cfg.precompute_ref_logps:
        strategy.ctx.print0("reference: log-probs precomputed by Ray Data; no reference model on the workers")
        return PrecomputedReference()
    reference = Reference(cfg, strategy, policy)
    where = "the policy with its adapter disabled" if reference.shares_policy else "a frozen model"
    strategy.ctx.print0(f"reference: {where} ({', '.join(filter(None, reference_source(cfg)))})")
    return reference
