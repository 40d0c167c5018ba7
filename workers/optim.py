"""Optimizer and learning-rate schedule from the config's transformers-style keys."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.optimizers import chosen
from orchestrator.values import as_dict

from .param_groups import parameter_groups


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    if chosen(cfg):  # GaLore, APOLLO, BAdam or Adam-mini, over the unwrapped model (their rules read its names)
        from .memory_optim import build_memory_optimizer

        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        return build_memory_optimizer(cfg, model.module if ddp else model)
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
