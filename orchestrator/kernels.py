"""The driver's checks of the GPU kernel keys (enable_liger_kernel, use_unsloth, use_unsloth_gc): which packages
and versions are installed, which model types Liger covers, which combinations cannot run. Reads package metadata
and source files only: nothing of torch, transformers or a kernel package is imported. workers/kernels.py applies
the kernels on the workers and says what each key means.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any

from orchestrator.quantization import weight_sharding

LIGER_PIP = "liger-kernel"
UNSLOTH_PIP = "unsloth"
# Modules unsloth's get_peft_model trains whole beside LoRA (others it refuses); normalization layers are allowed too.
UNSLOTH_WHOLE_MODULES = ("embed_tokens", "lm_head")
# Packages whose versions unsloth patches or pins; an installed unsloth is checked against what it declares for them.
UNSLOTH_CHECKED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def liger_model_types() -> list[str]:
    """The model types the installed liger-kernel has an apply function for, read from its source without importing
    it (importing pulls in triton and transformers: seconds). Empty when liger-kernel is not installed."""
    spec = importlib.util.find_spec("liger_kernel")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = os.path.join(list(spec.submodule_search_locations)[0], "transformers", "monkey_patch.py")
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError):
        tree = None
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id == "MODEL_TYPE_TO_APPLY_LIGER_FN" for t in node.targets):
                return sorted(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN  # layout changed: import it

    return sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)


def unsloth_version_problems() -> list[str]:
    """The installed unsloth's own requirements (torch, transformers, trl, peft, accelerate, datasets) that the
    installed versions break: unsloth patches those libraries' internals, so Loom does not run it outside them."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires(UNSLOTH_PIP) or []
    except metadata.PackageNotFoundError:
        return []
    broken = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name not in UNSLOTH_CHECKED:
            continue
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        installed = installed_version(requirement.name)
        if installed and not requirement.specifier.contains(installed.split("+")[0], prereleases=True):
            broken.append(f"{requirement.name}{requirement.specifier} (installed: {installed})")
    return broken


# ---------------------------------------------------------------- the driver's checks


def local_model_type(path: str | None) -> str | None:
    """model_type from a local model folder's config.json (None for a Hub id or an unreadable file)."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _no_gpu(key: str, what: str, cfg: Any) -> tuple[str, str]:
    return (key, f"{what}, and the workers have no GPU (resources_per_worker {cfg.worker_resources()}): give each "
                 f"worker one, e.g. resources_per_worker {{\"GPU\": 1}}, or leave {key} false")  # fmt: skip


def liger_problems(cfg: Any, model_type: str | None) -> list[tuple[str, str]]:
    if not cfg.enable_liger_kernel:
        return []
    if cfg.gpus_per_worker() == 0:
        return [_no_gpu("enable_liger_kernel", "Liger's kernels are Triton kernels for CUDA GPUs", cfg)]
    if not installed("liger_kernel"):
        return [("enable_liger_kernel", f"needs the {LIGER_PIP} package on the workers (it brings triton): "
                                        f"pip install -c constraints.txt {LIGER_PIP}")]  # fmt: skip
    supported = liger_model_types()
    if model_type is not None and model_type not in supported:
        return [("enable_liger_kernel", f"model type {model_type!r} has no Liger kernels in {LIGER_PIP} "
                                        f"{installed_version(LIGER_PIP)}; supported: {', '.join(supported)}")]  # fmt: skip
    return []


def unsloth_problems(cfg: Any) -> list[tuple[str, str]]:
    if not cfg.use_unsloth:
        return []
    if cfg.gpus_per_worker() == 0:
        return [_no_gpu("use_unsloth", "unsloth's kernels run on a CUDA GPU", cfg)]
    problems = []
    if not installed("unsloth"):
        problems.append(("use_unsloth", f"needs the {UNSLOTH_PIP} package on the workers: pip install "
                                        f"{UNSLOTH_PIP} (check first that it keeps Loom's torch, transformers, "
                                        "trl and datasets: it declares its own bounds on them)"))  # fmt: skip
    else:
        broken = unsloth_version_problems()
        if broken and os.environ.get("DISABLE_VERSION_CHECK", "").strip().lower() not in ("1", "true", "yes", "on"):
            problems.append(("use_unsloth", f"unsloth {installed_version(UNSLOTH_PIP)} declares {'; '.join(broken)}: it "
                                            "patches those libraries' code, so Loom does not run it outside them "
                                            "(install an unsloth release made for them, or DISABLE_VERSION_CHECK=1 "
                                            "to run anyway)"))  # fmt: skip
    if cfg.finetuning_type != "lora":
        problems.append(("use_unsloth", f"finetuning_type {cfg.finetuning_type!r}; Loom runs unsloth for LoRA "
                                        "training only (allowed: lora), as LLaMA-Factory describes "
                                        "the key"))  # fmt: skip
    if cfg.enable_liger_kernel:
        problems.append(("use_unsloth", "true together with enable_liger_kernel: both replace the same layers with "
                                        "their own kernels; choose one"))  # fmt: skip
    if cfg.ray_num_workers > 1:
        problems.append(("use_unsloth", f"ray_num_workers {cfg.ray_num_workers}; unsloth's open-source release "
                                        "trains on one GPU (its own source: multi-GPU is not yet supported), so "
                                        "use_unsloth needs ray_num_workers 1"))  # fmt: skip
    if cfg.gpus_per_worker() > 1:
        problems.append(("use_unsloth", f"{cfg.gpus_per_worker():g} GPUs per worker; unsloth loads the whole model "
                                        "onto one GPU: resources_per_worker with GPU 1"))  # fmt: skip
    if weight_sharding(cfg) == "zero3":
        problems.append(("use_unsloth", "with DeepSpeed ZeRO-3, which shards the weights unsloth's kernels read "
                                        "whole (LLaMA-Factory refuses it too): use ZeRO stage 0-2 or leave "
                                        "use_unsloth false"))  # fmt: skip
    if cfg.fsdp:
        problems.append(("use_unsloth", f"with fsdp {cfg.fsdp!r}: FSDP shards the weights unsloth's kernels read "
                                        "whole; leave fsdp unset"))  # fmt: skip
    attention_keys = {
        "flash_attn": cfg.flash_attn != "auto",
        "rope_scaling": cfg.rope_scaling,
        "shift_attn": cfg.shift_attn,
    }
    for key in (key for key, given in attention_keys.items() if given):
        problems.append((key, f"given {getattr(cfg, key)!r} with use_unsloth, whose loader brings its own attention "
                              "and RoPE code and does not take Loom's setting: leave it unset"))  # fmt: skip
    if cfg.train_from_scratch:
        problems.append(("use_unsloth", "with train_from_scratch: unsloth loads pretrained weights only"))
    adapters = [a for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    if len(adapters) > 1 or (adapters and cfg.create_new_adapter):
        what = f"{len(adapters)} adapters" if len(adapters) > 1 else "create_new_adapter"
        problems.append(("adapter_name_or_path", f"{what} with use_unsloth: unsloth loads one adapter together with "
                                                 "its base and trains it on (LLaMA-Factory also allows only one); "
                                                 "merge the others into the base first (loom export)"))  # fmt: skip
    others = [t for t in (cfg.additional_target or "").split(",") if t.strip()]
    others = [t.strip() for t in others if t.strip() not in UNSLOTH_WHOLE_MODULES and "norm" not in t]
    if others:
        problems.append(("additional_target", f"given {', '.join(others)}; with use_unsloth only "
                                              f"{', '.join(UNSLOTH_WHOLE_MODULES)} and normalization layers can be "
                                              "trained whole beside LoRA"))  # fmt: skip
    if cfg.stage == "ppo" and cfg.reward_model_type == "lora":
        problems.append(("use_unsloth", "with ppo and reward_model_type lora, which puts a second adapter on the "
                                        "policy's unsloth model (LLaMA-Factory refuses it too): use reward_model_type "
                                        "full or api"))  # fmt: skip
    return problems


def unsloth_gc_problems(cfg: Any) -> list[tuple[str, str]]:
    if not cfg.use_unsloth_gc:
        return []
    if not cfg.uses_gradient_checkpointing():
        return [("use_unsloth_gc", "true, but gradient checkpointing is off (disable_gradient_checkpointing or "
                                   "gradient_checkpointing false): use_unsloth_gc is a way of "
                                   "checkpointing")]  # fmt: skip
    if cfg.gpus_per_worker() == 0:
        return [_no_gpu("use_unsloth_gc", "it keeps checkpointed activations in pinned host memory instead of GPU "
                                          "memory (on a CPU worker they are in host memory already)", cfg)]  # fmt: skip
    return []


def kernel_problems(cfg: Any, model_type: str | None = None) -> list[tuple[str, str]]:
    """(key, message) for every kernel key the run cannot honour. model_type defaults to the local model folder's
    (a Hub id: the worker checks it when it loads the model)."""
    if model_type is None:
        model_type = local_model_type(cfg.model_name_or_path)
    return liger_problems(cfg, model_type) + unsloth_problems(cfg) + unsloth_gc_problems(cfg)
