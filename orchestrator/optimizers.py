"""The memory-saving optimizer registry: one pure table that the driver's checks and the workers read.

Each family is switched on by one `use_*` key and replaces `optim`. The table says which package it needs, whether
it trains the whole model only, and where it cannot run on Loom's workers (and why). Pure: no Ray, no torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from .errors import Problem


@dataclass(frozen=True)
class OptimizerFamily:
    name: str
    switch: str  # the config key that turns it on
    module: str  # the package's import name
    pip: str
    doc: str
    full_only: bool = True  # it projects or switches whole weight matrices: finetuning_type full only
    layerwise_key: str = ""  # the key that makes it step each parameter as its gradient arrives


FAMILIES: dict[str, OptimizerFamily] = {
    family.name: family
    for family in (
        OptimizerFamily("galore", "use_galore", "galore_torch", "galore-torch",
                        "GaLore: Adam moments in a low-rank projection of each target matrix's gradient",
                        layerwise_key="galore_layerwise"),
        OptimizerFamily("apollo", "use_apollo", "apollo_torch", "apollo-torch",
                        "APOLLO: AdamW's scaling estimated in a random (or SVD) low-rank space, per channel or tensor",
                        layerwise_key="apollo_layerwise"),
        OptimizerFamily("badam", "use_badam", "badam", "badam",
                        "BAdam: Adam on one block of layers at a time (layer mode) or a sparse share of each "
                        "matrix (ratio mode)"),
        OptimizerFamily("adam_mini", "use_adam_mini", "adam_mini", "adam-mini",
                        "Adam-mini: one second moment per attention head or output neuron", full_only=False),
    )
}  # fmt: skip


def chosen(cfg: Any) -> OptimizerFamily | None:
    """The family a config switches on (the checks refuse more than one)."""
    return next((family for family in FAMILIES.values() if getattr(cfg, family.switch)), None)


def layerwise(cfg: Any) -> bool:
    family = chosen(cfg)
    return bool(family and family.layerwise_key and getattr(cfg, family.layerwise_key))


def optimizer_problems(cfg: Any) -> list[Problem]:
    on = [family for family in FAMILIES.values() if getattr(cfg, family.switch)]
    problems = [
        Problem(key, f"only used with {family.switch}: true (given {value!r})")
        for key, value in cfg.non_default_values().items()
        for family in FAMILIES.values()
        if key.startswith(f"{family.name}_") and family not in on
    ]
    if not on:
        return problems
    if len(on) > 1:
        return [Problem(on[1].switch, f"true together with {on[0].switch}; these optimizers replace one another, "
                                      "choose one")]  # fmt: skip
    family = on[0]
    if importlib.util.find_spec(family.module) is None:
        problems.append(Problem(family.switch, f"needs the {family.pip} package: pip install {family.pip}"))
    if family.full_only and cfg.finetuning_type != "full":
        problems.append(Problem(family.switch, f"{family.name} trains whole weight matrices: it needs finetuning_type "
                                               f"full, not {cfg.finetuning_type!r}"))  # fmt: skip
    if cfg.optim not in ("adamw_torch", "adamw_hf"):
        problems.append(Problem("optim", f"{cfg.optim!r} together with {family.switch}, which replaces the optimizer; "
                                         "leave optim at its default"))  # fmt: skip
    if cfg.deepspeed or cfg.fsdp:
        problems.append(Problem(family.switch, f"{family.name} runs on DDP workers here; DeepSpeed and FSDP build or "
                                               "shard the optimizer themselves: leave deepspeed and fsdp unset"))  # fmt: skip
    if family.name == "badam" and cfg.badam_switch_interval == 0:
        problems.append(Problem("badam_switch_interval", "given 0; the steps between block switches: a positive "
                                                         "number, or -1 for never"))  # fmt: skip
    if layerwise(cfg) and cfg.max_grad_norm and "max_grad_norm" in cfg.model_fields_set:  # the default: a note
        problems.append(Problem(family.layerwise_key, f"layer-wise {family.name} applies each gradient as it arrives, "
                                                      "before the whole gradient exists to be clipped: set "
                                                      f"max_grad_norm: 0 (given {cfg.max_grad_norm})"))  # fmt: skip
    problems += _single_worker_problems(cfg, family)
    return problems


def _single_worker_problems(cfg: Any, family: OptimizerFamily) -> list[Problem]:
    """Methods that update a parameter from its gradient's hook: before DDP has averaged it over the workers (so
    the replicas would drift apart) and before the accumulation window is complete."""
    if layerwise(cfg):
        key, what = family.layerwise_key, f"layer-wise {family.name} steps each parameter from its gradient's hook"
    elif family.name == "badam" and cfg.badam_mode == "ratio":
        key, what = "badam_mode", "ratio-wise BAdam sparsifies each gradient in its hook"
    else:
        return []
    needs = []  # one problem per key: what it needs, all of it
    if cfg.ray_num_workers > 1:
        needs.append(f"before DDP averages it over the workers: it needs ray_num_workers 1, not {cfg.ray_num_workers}")
    if cfg.gradient_accumulation_steps > 1 and layerwise(cfg):
        needs.append(f"so it cannot accumulate gradients: gradient_accumulation_steps must be 1, not "
                     f"{cfg.gradient_accumulation_steps}")  # fmt: skip
    return [Problem(key, f"{what}, {'; and '.join(needs)}")] if needs else []
