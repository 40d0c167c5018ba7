"""The pure half of quantized loading (QLoRA): which methods exist, which bits a frozen model is held in, and
the driver's checks. No torch or transformers at import; workers/quantization.py loads the models.

Keys (LLaMA-Factory's names): `quantization_method` (bitsandbytes | hqq | eetq), `quantization_bit`,
`quantization_type` (nf4 | fp4, bitsandbytes 4-bit), `double_quantization` (bitsandbytes 4-bit),
`quantization_device_map` (inference only), and `ref_model_quantization_bit` / `reward_model_quantization_bit`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

from orchestrator.values import split_csv


@dataclass(frozen=True)
class QuantMethod:
    name: str
    module: str  # the import name that must be present
    pip: str  # what to install
    bits: tuple[int, ...]  # the quantization_bit values it takes
    needs_cuda: bool
    note: str = ""


METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (
        QuantMethod("bitsandbytes", "bitsandbytes", "bitsandbytes>=0.48", (4, 8), needs_cuda=False),
        QuantMethod("hqq", "hqq", "hqq>=0.2.1", (1, 2, 3, 4, 5, 6, 8), needs_cuda=False,
                    note="5 and 6 bits are stored in 8 (hqq packs them as uint8)"),
        QuantMethod("eetq", "kernels", "kernels>=0.18.2,<0.19", (8,), needs_cuda=True,
                    note="transformers 5 loads EETQ's CUDA kernel from the Hub (kernels-community/quantization-eetq) "
                         "through the `kernels` package; the `eetq` package is not used"),
    )
}  # fmt: skip

# The transformers 5.24 window for `kernels` (transformers.utils.import_utils.KERNELS_MIN/MAX_VERSION).
KERNELS_WINDOW = ("0.18.2", "0.19.0")


def uses_device_map_auto(cfg: Any) -> bool:
    return cfg.quantization_device_map == "auto"


def frozen_bits(cfg: Any, role: str) -> int | None:
    """The bits a frozen model is loaded in: role "reward": `reward_model_quantization_bit`; role "reference":
    `ref_model_quantization_bit`, except that a LoRA run without ref_model takes `quantization_bit`: its reference is
    the policy's own base (with the adapter disabled), and a copy of it loaded for precompute_ref_logps must be held
    the same way, or the implicit rewards start away from zero."""
    if role == "reward":
        return cfg.reward_model_quantization_bit
    if cfg.finetuning_type == "lora" and not cfg.ref_model:
        return cfg.quantization_bit
    return cfg.ref_model_quantization_bit


# ---------------------------------------------------------------- driver checks (pure)


def weight_sharding(cfg: Any) -> str | None:
    """How the weights are sharded over the workers: "zero3", "fsdp", or None (DDP, ZeRO-0/1/2)."""
    if cfg.fsdp and cfg.deepspeed is None:
        return "fsdp"
    if cfg.deepspeed is not None:
        from orchestrator.parallelism import load_json_setting, zero_stage

        try:
            return "zero3" if zero_stage(load_json_setting(cfg.deepspeed)) == 3 else None
        except (ValueError, TypeError):
            return None  # the parallelism checks report an unreadable deepspeed setting
    return None


def _reference_loaded(cfg: Any) -> str | None:
    """Why the reference is (or is not) a model of its own: None when it is; else the reason it is not."""
    from orchestrator.stages import STAGES

    if not STAGES[cfg.stage].uses_reference(cfg):
        if cfg.stage == "dpo":
            return f"pref_loss {cfg.pref_loss!r} is reference-free"
        return f"stage {cfg.stage} has no reference model"
    if cfg.finetuning_type == "lora" and not cfg.ref_model:
        return ("the reference is the LoRA policy's own base (its adapter disabled), held in quantization_bit, "
                "also when precomputed; set ref_model to load a reference of its own")  # fmt: skip
    return None


def _reward_loaded(cfg: Any) -> str | None:
    if cfg.stage != "ppo":
        return f"only stage ppo has a reward model, not {cfg.stage!r}"
    if cfg.reward_model_type != "full":
        return {"lora": "reward_model_type lora puts the reward adapter on the policy's own base (held in "
                        "quantization_bit)",
                "api": "reward_model_type api scores over HTTP: there is no reward model to load"}[cfg.reward_model_type]  # fmt: skip
    return None


def _installed_problem(method: QuantMethod) -> str | None:
    if importlib.util.find_spec(method.module) is None:
        return f"given {method.name!r}, which needs the {method.module} package: pip install '{method.pip}'"
    if method.name == "eetq":
        from packaging.version import Version

        found = Version(importlib.metadata.version("kernels"))
        if not Version(KERNELS_WINDOW[0]) <= found < Version(KERNELS_WINDOW[1]):
            return (f"given 'eetq': transformers 5.24 takes kernels >={KERNELS_WINDOW[0]},"
                    f"<{KERNELS_WINDOW[1]}, found {found}: pip install '{method.pip}'")  # fmt: skip
    return None


def quantization_problems(cfg: Any, purpose: str = "train") -> list[tuple[str, str]]:
    """(key, message) for every quantization setting that cannot work, before any worker starts.

    `purpose`: "train" (the workers) or "infer" (chat, api, predict on the driver), as in the config checks."""
    p: list[tuple[str, str]] = []
    method = METHODS[cfg.quantization_method]
    train = purpose == "train"
    loads: dict[str, int] = {}  # key -> bits, for every model this run holds quantized
    if cfg.quantization_bit is not None:
        loads["quantization_bit"] = cfg.quantization_bit
    for key, why_not in (
        ("ref_model_quantization_bit", _reference_loaded(cfg)),
        ("reward_model_quantization_bit", _reward_loaded(cfg)),
    ):
        bits, role = getattr(cfg, key), key.split("_")[0].replace("ref", "reference")
        if bits is None or not train:  # chat, api and predict load the policy only
            continue
        if why_not:
            p.append((key, f"given {bits}, but no {role} model of its own is loaded: {why_not}"))
        else:
            loads[key] = bits
    set_keys = cfg.model_fields_set

    # method keys with nothing quantized
    if not loads:
        for key in ("quantization_method", "quantization_type", "double_quantization", "quantization_device_map"):
            if key in set_keys:
                p.append((key, f"given {getattr(cfg, key)!r}, but no model is quantized: set quantization_bit "
                               "(or ref_model_quantization_bit / reward_model_quantization_bit)"))  # fmt: skip
        return p

    # the method: bits, package, device
    for key, bits in loads.items():
        if bits not in method.bits:
            p.append((key, f"given {bits}; quantization_method {method.name} takes "
                           f"{' or '.join(map(str, method.bits))} bits"))  # fmt: skip
    installed = _installed_problem(method)
    if installed:
        p.append(("quantization_method", installed))
    if method.needs_cuda and train and cfg.gpus_per_worker() == 0:
        p.append(("quantization_method", f"given {method.name!r}, which runs on CUDA only, but resources_per_worker "
                                         f"has no GPU ({cfg.resources_per_worker!r}); bitsandbytes and hqq run on "
                                         "CPU"))  # fmt: skip

    # keys the method would ignore
    bnb4 = method.name == "bitsandbytes" and 4 in loads.values()
    for key in ("quantization_type", "double_quantization"):
        if key in set_keys and not bnb4:
            p.append((key, f"given {getattr(cfg, key)!r}, but it applies to bitsandbytes 4-bit only (here "
                           f"{method.name}, {' and '.join(f'{b}-bit' for b in sorted(set(loads.values())))}); "
                           "leave it unset"))  # fmt: skip

    # device map: one worker owns its device; a map spreads one model over several (inference of 4-bit only)
    if cfg.quantization_device_map is not None:
        if train:
            p.append(("quantization_device_map", f"given {cfg.quantization_device_map!r}; a device map is for "
                                                 "inference: each training worker holds its model on its own device "
                                                 "(use deepspeed or fsdp to spread a model over workers)"))  # fmt: skip
        elif not (method.name == "bitsandbytes" and cfg.quantization_bit == 4):
            p.append(("quantization_device_map", f"given {cfg.quantization_device_map!r}; auto is for a "
                                                 "bitsandbytes 4-bit model (quantization_bit 4)"))  # fmt: skip

    if not train:  # an inference command attaches the adapter to the k-bit base (merging would re-quantize it)
        if cfg.quantization_bit is not None and len(adapters := split_csv(cfg.adapter_name_or_path)) > 1:
            p.append(("adapter_name_or_path", f"names {len(adapters)} adapters; a {cfg.quantization_bit}-bit model "
                                              "takes one: merge them into the base first (loom export)"))  # fmt: skip
        return p

    # the policy: QLoRA only
    if "quantization_bit" in loads:
        p += _policy_problems(cfg, method, loads["quantization_bit"])

    # frozen models: one adapter, attached unmerged
    for key, adapters_key in (("ref_model_quantization_bit", "ref_model_adapters"),
                              ("reward_model_quantization_bit", "reward_model_adapters")):  # fmt: skip
        count = len(split_csv(getattr(cfg, adapters_key)))
        if key in loads and count > 1:
            p.append((adapters_key, f"names {count} adapters; a model held in {loads[key]} bits takes one (merging "
                                    "into k-bit weights re-quantizes them): merge them into one model first"))  # fmt: skip

    # sharding
    sharded = weight_sharding(cfg)
    if sharded:
        where = "FSDP" if sharded == "fsdp" else "DeepSpeed ZeRO-3"
        for key, bits in loads.items():
            reason = _sharding_problem(method.name, bits, sharded)
            if reason:
                p.append((key, f"{method.name} {bits}-bit with {where}: {reason}"))
    return p


def _policy_problems(cfg: Any, method: QuantMethod, bits: int) -> list[tuple[str, str]]:
    p = []
    if cfg.finetuning_type != "lora":
        p.append(("quantization_bit", f"given {bits}; a quantized model trains LoRA adapters only (QLoRA): "
                                      f"finetuning_type lora, not {cfg.finetuning_type!r}"))  # fmt: skip
    if cfg.train_from_scratch:
        p.append(("quantization_bit", "train_from_scratch builds a random model (from_config), which is not "
                                      "quantized; quantization needs pretrained weights"))  # fmt: skip
    if cfg.pissa_init:
        p.append(("pissa_init", f"PiSSA's SVD needs the full-precision weights, not a {bits}-bit base (PEFT refuses "
                                "it); initialise PiSSA unquantized first"))  # fmt: skip
    if cfg.use_dora and method.name == "bitsandbytes" and bits == 8:
        p.append(("use_dora", "DoRA on an 8-bit bitsandbytes base fails on its second forward pass (measured on "
                              "CPU with bitsandbytes 0.50.2 and PEFT 0.21.2: the int8 matmul finds no column "
                              "statistics); use quantization_bit 4, which trains DoRA"))  # fmt: skip
    adapters = split_csv(cfg.adapter_name_or_path)
    merged = len(adapters) if cfg.create_new_adapter else max(len(adapters) - 1, 0)
    if merged:
        p.append(("adapter_name_or_path", f"given {len(adapters)} adapter(s)"
                                          f"{' with create_new_adapter' if cfg.create_new_adapter else ''}: {merged} "
                                          f"would be merged into the {bits}-bit base, which re-quantizes its weights "
                                          "(lossy); continue a single adapter, or merge them into an unquantized "
                                          "model first"))  # fmt: skip
    return p


def _sharding_problem(method: str, bits: int, sharded: str) -> str | None:
    """Why a k-bit model cannot be sharded this way (None: it can). Measured on CPU, 2 ranks over gloo, 3 LoRA
    steps: bitsandbytes 4-bit trains under FSDP2 and ZeRO-3 (its quantization state lives on the module, the
    packed bytes shard), 8-bit under ZeRO-3 (the Int8Params object keeps its statistics) but not FSDP2, which
    replaces the parameter by a plain one; hqq under FSDP2 but not ZeRO-3."""
    if method == "bitsandbytes" and bits == 8 and sharded == "fsdp":
        return (
            "FSDP2 re-creates the int8 weight as a plain parameter without its quantization statistics "
            "('Parameter' object has no attribute 'CB'); use 4 bits, or DeepSpeed ZeRO-3"
        )
    if method == "hqq" and sharded == "zero3":
        return (
            "ZeRO-3 loads each weight straight into its partition and Loom quantizes hqq after loading, so no "
            "rank holds a whole weight to quantize; use FSDP or ZeRO-1/2"
        )
    if method == "eetq":
        return "not verified (LLaMA-Factory refuses it as well); use DDP or ZeRO-1/2"
    return None
