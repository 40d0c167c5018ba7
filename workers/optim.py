"""Optimizer and learning-rate schedule from the config's transformers-style keys."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.config.values import as_dict


def parameter_groups(cfg: Any, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]  # ZeRO-3 partitions keep ds_shape
    return [
        {"params": [p for p, m in zip(trainable, matrix, strict=True) if m], "weight_decay": cfg.weight_decay},
        {"params": [p for p, m in zip(trainable, matrix, strict=True) if not m], "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(cfg, model)
    adam = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optim in ("adamw_torch", "adamw_hf"):
        return torch.optim.AdamW(groups, **adam)
    if cfg.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, fused=True, **adam)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    if cfg.optim == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.learning_rate)
    if cfg.optim == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate)
    if cfg.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"optimizer {cfg.optim!r} is not supported")


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=as_dict(cfg.lr_scheduler_kwargs) if cfg.lr_scheduler_kwargs else None,
    )
