"""How workers share the model: DDP (the default), DeepSpeed ZeRO (`deepspeed`), or FSDP2 (`fsdp`, `fsdp_config`).

Pure: the DeepSpeed JSON is read and its "auto" values are filled here, so the driver checks exactly what the
workers will run. Only `deepspeed_schema_problems` imports DeepSpeed, to validate the ZeRO block with its own schema.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import Problem
from .suggest import did_you_mean

ZERO_STAGES = (0, 1, 2, 3)
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
FSDP_REFUSED_OPTIONS = {
    "no_shard": "an unsharded FSDP is DDP: leave fsdp unset",
    "hybrid_shard": "hybrid sharding (replicate across nodes, shard within one) is not built yet",
    "hybrid_shard_zero2": "hybrid sharding (replicate across nodes, shard within one) is not built yet",
}
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "offload_params", "version")
FSDP_REFUSED_CONFIG = {
    "min_num_params": "FSDP2 shards by layer class; use transformer_layer_cls_to_wrap",
    "cpu_ram_efficient_loading": "every rank loads the model before sharding; meta-device loading is not built yet",
    "sync_module_states": "every rank loads the same weights, so there is nothing to synchronise",
    "activation_checkpointing": "use gradient_checkpointing, which works under FSDP",
    "backward_prefetch": "FSDP2 prefetches by itself",
    "forward_prefetch": "FSDP2 prefetches by itself",
    "use_orig_params": "FSDP2 always keeps the original parameters",
    "limit_all_gathers": "FSDP2 has no such switch",
    "state_dict_type": "checkpoints hold full transformers weights plus a sharded optimizer state",
}


def strategy_name(cfg: Any) -> str:
    if cfg.deepspeed is not None:
        return "deepspeed"
    if cfg.fsdp:
        return "fsdp"
    return "ddp"


# ---------------------------------------------------------------- DeepSpeed


def load_json_setting(value: Any, base_dir: str | None = None) -> dict[str, Any]:
    """A mapping setting (deepspeed, fsdp_config) given as a dict, a JSON string or a JSON file path.
    Raises ValueError saying what is wrong."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    text = str(value).strip()
    if text.startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"is not valid JSON: {error}") from None
    else:
        path = os.path.join(base_dir or os.getcwd(), os.path.expanduser(text))
        if not os.path.isfile(path):
            raise ValueError(f"file {text!r} does not exist (give a JSON file, a JSON string or a mapping)")
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"file {text!r} is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"must be a JSON object, got {type(loaded).__name__}")
    return loaded


def zero_stage(ds: dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offloads(ds: dict[str, Any]) -> dict[str, str]:
    """{"offload_optimizer": device, "offload_param": device} for the offloads the ZeRO block turns on."""
    zero = ds.get("zero_optimization") or {}
    found = {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            found[key] = device
    return found


def _batch_values(cfg: Any, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }


def _optimizer_values(cfg: Any) -> dict[str, Any]:
    return {
        "lr": cfg.learning_rate,
        "betas": [cfg.adam_beta1, cfg.adam_beta2],
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }


def _hidden_values(hidden_size: int | None) -> dict[str, Any]:
    if not hidden_size:
        return {}
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def deepspeed_problems(cfg: Any, ds: dict[str, Any], world_size: int) -> list[tuple[str, str]]:
    """(path in the DeepSpeed config, message) for what contradicts the Loom config or is not built."""
    problems = []
    for key, value in _batch_values(cfg, world_size).items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            problems.append((key, f'is {given!r} but the Loom config gives {value!r}; use "auto" or {value!r}'))
    for precision in ("fp16", "bf16"):
        enabled = (ds.get(precision) or {}).get("enabled", "auto")
        wanted = bool(getattr(cfg, precision))
        if enabled != "auto" and bool(enabled) != wanted:
            problems.append((f"{precision}.enabled", f'is {enabled!r} but {precision} is {wanted}; use "auto"'))
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        problems.append(("zero_optimization.stage", f"is {stage!r}; allowed: 0, 1, 2, 3"))
    for key, device in offloads(ds).items():
        if device != "cpu":
            problems.append((f"zero_optimization.{key}.device", f"is {device!r}; only cpu offload is built"))
        if key == "offload_param" and stage != 3:
            problems.append((f"zero_optimization.{key}", f"needs stage 3 (stage is {stage!r})"))
    if "scheduler" in ds:
        problems.append(("scheduler", "Loom schedules the learning rate from lr_scheduler_type: remove this block"))
    optimizer_params = (ds.get("optimizer") or {}).get("params") or {}
    for key, value in _optimizer_values(cfg).items():
        given = optimizer_params.get(key, "auto")
        if given != "auto" and given != value:
            problems.append((f"optimizer.params.{key}", f"is {given!r} but the Loom config gives {value!r}"))
    return problems


def resolve_deepspeed(ds: dict[str, Any], cfg: Any, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    """The config DeepSpeed gets: every "auto" filled from the Loom config (as transformers fills them)."""
    resolved = copy.deepcopy(ds)
    for key, value in _batch_values(cfg, world_size).items():
        if resolved.get(key, "auto") == "auto":
            resolved[key] = value
    for precision in ("fp16", "bf16"):
        block = resolved.get(precision)
        if block is not None and block.get("enabled", "auto") == "auto":
            block["enabled"] = bool(getattr(cfg, precision))
        elif block is None and getattr(cfg, precision):
            resolved[precision] = {"enabled": True}
    optimizer_params = (resolved.get("optimizer") or {}).get("params")
    if optimizer_params is not None:
        for key, value in _optimizer_values(cfg).items():
            if optimizer_params.get(key, "auto") == "auto":
                optimizer_params[key] = value
    zero = resolved.setdefault("zero_optimization", {"stage": 0})
    for key, value in _hidden_values(hidden_size).items():
        if zero.get(key) == "auto":
            zero[key] = value
    # Loom builds the optimizer named by `optim` when the DeepSpeed config has none; DeepSpeed would refuse a
    # client optimizer with offload unless told that is intended.
    if "optimizer" not in resolved and offloads(resolved):
        resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    resolved.setdefault("steps_per_print", 10**9)  # Loom logs steps itself
    return resolved


def leftover_auto(ds: dict[str, Any], path: str = "") -> list[str]:
    """Paths of "auto" values nothing fills."""
    found = []
    for key, value in ds.items():
        where = f"{path}.{key}" if path else key
        if value == "auto":
            found.append(where)
        elif isinstance(value, dict):
            found += leftover_auto(value, where)
    return found


def deepspeed_schema_problems(ds: dict[str, Any]) -> list[tuple[str, str]]:
    """The ZeRO block checked by DeepSpeed's own schema (unknown keys, wrong types), with autos as placeholders."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError as error:  # pragma: no cover - deepspeed is a dependency
        return [("zero_optimization", f"DeepSpeed is not importable here: {error}")]
    try:
        DeepSpeedZeroConfig(**_placeholders(ds.get("zero_optimization") or {}))
    except Exception as error:  # pydantic's ValidationError, reported item by item
        errors = getattr(error, "errors", None)
        if not callable(errors):
            return [("zero_optimization", str(error))]
        return [
            (
                "zero_optimization." + ".".join(str(part) for part in item["loc"]),
                item["msg"] + (f" (given {item['input']!r})" if item.get("type") != "extra_forbidden" else ""),
            )
            for item in errors()
        ]
    return []


def _placeholders(block: dict[str, Any]) -> dict[str, Any]:
    return {k: (_placeholders(v) if isinstance(v, dict) else (1 if v == "auto" else v)) for k, v in block.items()}


# ---------------------------------------------------------------- FSDP


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool  # full_shard: True; shard_grad_op: False (ZeRO-2-like)
    offload: bool  # parameters, gradients and optimizer state kept on the CPU
    wrap_layers: bool  # shard each transformer layer as its own unit (auto_wrap); else one unit for the model
    layer_classes: tuple[str, ...]  # class names of the units; empty: the model's own _no_split_modules


def _fsdp_tokens(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return ["full_shard", "auto_wrap"] if value else []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [t for t in str(value).replace(",", " ").split() if t]


def load_fsdp_config(value: Any, base_dir: str | None = None) -> dict[str, Any]:
    return {} if value is None else load_json_setting(value, base_dir)


def fsdp_problems(cfg: Any, base_dir: str | None = None) -> list[Problem]:
    tokens = _fsdp_tokens(cfg.fsdp)
    problems = []
    for token in tokens:
        if token in FSDP_REFUSED_OPTIONS:
            problems.append(Problem(f"fsdp.{token}", FSDP_REFUSED_OPTIONS[token]))
        elif token not in FSDP_OPTIONS:
            problems.append(Problem(f"fsdp.{token}", f"unknown option {token!r}; allowed: "
                                            f"{', '.join(FSDP_OPTIONS)}{did_you_mean(token, FSDP_OPTIONS)}"))  # fmt: skip
    if "full_shard" in tokens and "shard_grad_op" in tokens:
        problems.append(Problem("fsdp", "full_shard and shard_grad_op are both given; choose one"))
    try:
        options = load_fsdp_config(cfg.fsdp_config, base_dir)
    except ValueError as error:
        return problems + [Problem("fsdp_config", str(error))]
    if options and not cfg.fsdp:
        problems.append(Problem("fsdp_config", "is set but fsdp is not (e.g. fsdp: full_shard auto_wrap)"))
    for key, value in options.items():
        if key in FSDP_REFUSED_CONFIG:
            problems.append(Problem(f"fsdp_config.{key}", FSDP_REFUSED_CONFIG[key]))
        elif key not in FSDP_CONFIG_KEYS:
            problems.append(Problem(f"fsdp_config.{key}", f"unknown key {key!r}; known: "
                                                   f"{', '.join(FSDP_CONFIG_KEYS)}{did_you_mean(key, FSDP_CONFIG_KEYS)}"))  # fmt: skip
        elif key == "version" and value != 2:
            problems.append(Problem("fsdp_config.version", f"{value!r}: Loom runs FSDP2 (fully_shard); use 2"))
    return problems


def fsdp_settings(cfg: Any, base_dir: str | None = None) -> FsdpSettings:
    tokens = _fsdp_tokens(cfg.fsdp)
    options = load_fsdp_config(cfg.fsdp_config, base_dir)
    classes = options.get("transformer_layer_cls_to_wrap") or ()
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    return FsdpSettings(
        reshard_after_forward=bool(options.get("reshard_after_forward", "shard_grad_op" not in tokens)),
        offload="offload" in tokens or bool(options.get("offload_params", False)),
        wrap_layers="auto_wrap" in tokens or bool(classes),
        layer_classes=tuple(classes),
    )


# ---------------------------------------------------------------- all strategies


def describe_sharding(cfg: Any) -> str:
    """One line for the plan: which strategy, and what it shards or offloads."""
    name = strategy_name(cfg)
    if name == "deepspeed":
        try:
            ds = load_json_setting(cfg.deepspeed)
        except ValueError:
            return "DeepSpeed (config unreadable)"
        moved = ", ".join(f"{key.split('_', 1)[1]} to {device}" for key, device in offloads(ds).items())
        return f"DeepSpeed ZeRO-{zero_stage(ds)}" + (f", offload {moved}" if moved else "")
    if name == "fsdp":
        settings = fsdp_settings(cfg)
        mode = "full_shard" if settings.reshard_after_forward else "shard_grad_op"
        units = "per layer" if settings.wrap_layers else "whole model as one unit"
        return f"FSDP2 {mode}, {units}" + (", offload to cpu" if settings.offload else "")
    return "DDP (every worker holds the whole model)"


def parallelism_problems(cfg: Any, base_dir: str | None = None) -> list[Problem]:
    """Every problem with deepspeed / fsdp / fsdp_config, checked at the driver."""
    problems: list[Problem] = []
    if cfg.deepspeed is not None and cfg.fsdp:
        problems.append(Problem("fsdp", "deepspeed is set too; choose DeepSpeed or FSDP"))
    if cfg.fsdp or cfg.fsdp_config:
        problems += fsdp_problems(cfg, base_dir)
        if cfg.fsdp and cfg.fp16:
            problems.append(Problem("fp16", "fp16 with FSDP is not built (no sharded gradient scaler); use bf16"))
    if cfg.deepspeed is not None:
        try:
            ds = load_json_setting(cfg.deepspeed, base_dir)
        except ValueError as error:
            return problems + [Problem("deepspeed", str(error))]
        found = deepspeed_problems(cfg, ds, cfg.ray_num_workers) + deepspeed_schema_problems(ds)
        unresolved = leftover_auto(resolve_deepspeed(ds, cfg, cfg.ray_num_workers, hidden_size=1))
        found += [(where, 'is "auto" but Loom has no value for it; give a number') for where in unresolved]
        problems += [Problem(f"deepspeed.{where}", message) for where, message in found]
        if cfg.pure_bf16:
            problems.append(Problem("pure_bf16", "DeepSpeed keeps fp32 master weights; use bf16: true with deepspeed"))
    return problems
