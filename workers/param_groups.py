"""Parameter groups: weight decay on matrices only, or LoRA+'s groups; read by every optimizer Loom builds."""

from __future__ import annotations

from typing import Any

import torch


def _is_matrix(param: torch.nn.Parameter) -> bool:
    return len(getattr(param, "ds_shape", param.shape)) >= 2  # ZeRO-3 partitions keep ds_shape


def parameter_groups(cfg: Any, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed. With loraplus_lr_ratio, LoRA+
    groups instead (loraplus_groups)."""
    if getattr(cfg, "loraplus_lr_ratio", None):
        return loraplus_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio,
                               cfg.loraplus_lr_embedding)  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrix = [_is_matrix(p) for p in trainable]
    return [
        {"params": [p for p, m in zip(trainable, matrix, strict=True) if m], "weight_decay": cfg.weight_decay},
        {"params": [p for p, m in zip(trainable, matrix, strict=True) if not m], "weight_decay": 0.0},
    ]


def loraplus_groups(model: torch.nn.Module, lr: float, weight_decay: float, ratio: float,
                    embedding_lr: float) -> list[dict[str, Any]]:  # fmt: skip
    """LoRA+ (Hayou et al., 2024), grouped as LLaMA-Factory groups it: the B matrices (and 1-D parameters, not
    decayed) learn at ratio x lr, the A matrices and the rest at lr, a LoRA embedding's B at its own rate."""
    groups: dict[str, list[torch.nn.Parameter]] = {"a": [], "b": [], "b_no_decay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_B" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or not _is_matrix(param):
            groups["b" if _is_matrix(param) else "b_no_decay"].append(param)
        else:
            groups["a"].append(param)
    settings = {"a": (lr, weight_decay), "b": (lr * ratio, weight_decay), "b_no_decay": (lr * ratio, 0.0),
                "embedding": (embedding_lr, weight_decay)}  # fmt: skip
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1], "name": f"loraplus_{key}"}
            for key, params in groups.items() if params]  # fmt: skip
