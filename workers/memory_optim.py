"""The memory-saving optimizers of orchestrator/optimizers.py: GaLore, APOLLO, BAdam and Adam-mini.

Each builder returns a torch Optimizer whose state_dict holds tensors and plain values only, so a checkpoint of it
loads with `weights_only=True` (workers/checkpoint.load_state) and a resumed run takes the same next step.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import torch

from orchestrator.optimizers import chosen, layerwise
from orchestrator.values import split_csv

from .param_groups import parameter_groups

# Projector classes a GaLore or APOLLO state may hold; rebuilt from their attributes on load (nothing else is).
PROJECTORS = {
    "galore": "galore_torch.galore_projector:GaLoreProjector",
    "apollo_random": "apollo_torch.random_projector:GradientProjector",
    "apollo_svd": "apollo_torch.svd_projector:GaLoreProjector",
}


def _projector_class(key: str) -> type:
    module, _, name = PROJECTORS[key].partition(":")
    return getattr(importlib.import_module(module), name)


def _pack(state: dict[str, Any]) -> dict[str, Any]:
    projector = state.get("projector")
    if projector is None:
        return state
    key = next(k for k in PROJECTORS if isinstance(projector, _projector_class(k)))
    return {**state, "projector": {"class": key, **vars(projector)}}


def _unpack(saved: dict[str, Any], param: torch.nn.Parameter) -> Any:
    projector = object.__new__(_projector_class(saved["class"]))
    projector.__dict__.update({k: v.to(param.device) if isinstance(v, torch.Tensor) else v
                               for k, v in saved.items() if k != "class"})  # fmt: skip
    return projector


class PortableProjectors:
    """Mixed into GaLore's and APOLLO's AdamW: their projector objects travel as plain attribute dicts. They are
    set aside while torch loads the rest, which would cast their strings (proj_type) as if they were sequences."""

    def state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()  # type: ignore[misc]
        return {**packed, "state": {index: _pack(state) for index, state in packed["state"].items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = {index: dict(state) for index, state in state_dict["state"].items()}
        projectors = {index: state.pop("projector") for index, state in states.items() if "projector" in state}
        super().load_state_dict({**state_dict, "state": states})  # type: ignore[misc]
        params = [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]
        for index, saved in projectors.items():
            self.state[params[index]]["projector"] = _unpack(saved, params[index])  # type: ignore[attr-defined]


def _portable(cls: type) -> type:
    return type(f"Portable{cls.__name__}", (PortableProjectors, cls), {})


def target_weights(model: torch.nn.Module, targets: str) -> list[torch.nn.Parameter]:
    """The weight matrices of the linear modules `targets` names (`all`: every one but the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = split_csv(targets)
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and module.weight.requires_grad
        and ("all" in wanted or name.split(".")[-1] in wanted)
    ]  # fmt: skip


def projected_groups(cfg: Any, model: torch.nn.Module, family: str) -> list[dict[str, Any]]:
    """The target matrices in one group with the projection's settings; every other parameter as AdamW has it."""
    projected = target_weights(model, getattr(cfg, f"{family}_target"))
    chosen_ids = {id(p) for p in projected}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in chosen_ids]} for g in parameter_groups(cfg, model)]
    settings = {"rank": getattr(cfg, f"{family}_rank"), "update_proj_gap": getattr(cfg, f"{family}_update_interval"),
                "scale": getattr(cfg, f"{family}_scale"), "proj_type": getattr(cfg, f"{family}_proj_type")}  # fmt: skip
    if family == "apollo":
        settings.update(proj=cfg.apollo_proj, scale_type=cfg.apollo_scale_type)
    return [g for g in rest if g["params"]] + [{"params": projected, "weight_decay": cfg.weight_decay, **settings}]


def _projection_optimizer(cfg: Any, family: str) -> Any:
    adam = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if family == "galore":
        from galore_torch import GaLoreAdamW

        return lambda groups: _portable(GaLoreAdamW)(groups, no_deprecation_warning=True, **adam)
    from apollo_torch import APOLLOAdamW

    return lambda groups: _portable(APOLLOAdamW)(groups, scale_front=cfg.apollo_scale_front, **adam)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by that parameter's gradient hook as soon as the gradient is complete,
    which then frees it: no model-sized gradient is ever held. `step` does nothing (the hooks did it); the learning
    rate schedule drives every inner optimizer through the shared group dicts."""

    def __init__(self, inner: list[torch.optim.Optimizer]):
        self.inner = inner
        params = [p for optimizer in inner for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, dict(inner[0].defaults))
        self.param_groups = [group for optimizer in inner for group in optimizer.param_groups]
        for optimizer in inner:
            for param in (p for group in optimizer.param_groups for p in group["params"]):
                param.register_post_accumulate_grad_hook(self._stepper(optimizer))

    @staticmethod
    def _stepper(optimizer: torch.optim.Optimizer) -> Any:
        def step_and_free(_param: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    def step(self, closure: Any = None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)


def build_projection(cfg: Any, model: torch.nn.Module, family: str) -> torch.optim.Optimizer:
    groups, make = projected_groups(cfg, model, family), _projection_optimizer(cfg, family)
    if not layerwise(cfg):
        return make(groups)
    return LayerwiseOptimizer([make([{**group, "params": [p]}]) for group in groups for p in group["params"]])


def build_badam(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    from badam import BlockOptimizerRatio

    named = list(model.named_parameters())
    adam = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BAdam expect model")
        if cfg.badam_mode == "ratio":
            return BlockOptimizerRatio(param_groups=parameter_groups(cfg, model), named_parameters_list=named,
                                       update_ratio=cfg.badam_update_ratio, mask_mode=cfg.badam_mask_mode,
                                       verbose=cfg.badam_verbose, include_embedding=False, **adam)  # fmt: skip
        interval = sys.maxsize if cfg.badam_switch_interval == -1 else cfg.badam_switch_interval
        return _tracked_block_optimizer()(base_optimizer=torch.optim.AdamW(parameter_groups(cfg, model), **adam),
                                     named_parameters_list=named, switch_block_every=interval,
                                     start_block=cfg.badam_start_block, switch_mode=cfg.badam_switch_mode,
                                     verbose=cfg.badam_verbose)  # fmt: skip


def _tracked_block_optimizer() -> type:
    from badam import BlockOptimizer

    class Tracked(BlockOptimizer):
        """BAdam's layer mode, resumable: its state is the active block, the next one, the random order left, the
        step count and the inner Adam's moments (for the active block's parameters only, as BAdam keeps them)."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            del self.__dict__["state_dict"]  # BAdam binds the inner optimizer's; this class's own says more

        def switch_trainable_params(self, verbose: int | None = 1) -> None:
            self.active_block = self.current_block_idx
            super().switch_trainable_params(verbose)

        def state_dict(self) -> dict[str, Any]:
            return {"active_block": self.active_block, "next_block": self.current_block_idx,
                    "block_order": list(getattr(self, "block_order", [])), "global_step": self.global_step,
                    "base": self.base_optimizer.state_dict()}  # fmt: skip

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.current_block_idx = state_dict["active_block"]
            if self.switch_mode == "random":  # switching pops the next block from the order
                self.block_order = [*state_dict["block_order"], state_dict["next_block"]]
            self.switch_trainable_params(verbose=0)  # the saved block active again, the next one queued
            self.global_step = state_dict["global_step"]
            self.base_optimizer.load_state_dict(state_dict["base"])

    return Tracked


def build_adam_mini(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    config = model.config
    optimizer = Adam_mini(named_parameters=model.named_parameters(), lr=cfg.learning_rate,
                          betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                          dim=config.hidden_size, n_heads=config.num_attention_heads,
                          n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)  # fmt: skip
    # Adam-mini takes every CUDA device for a shard of the model; DDP workers hold whole replicas instead.
    optimizer.world_size = 1
    return optimizer


def build_memory_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """The family's optimizer over the unwrapped `model`, or None when the config switches none on."""
    family = chosen(cfg)
    if family is None:
        return None
    if family.name in ("galore", "apollo"):
        return build_projection(cfg, model, family.name)
    return build_badam(cfg, model) if family.name == "badam" else build_adam_mini(cfg, model)
