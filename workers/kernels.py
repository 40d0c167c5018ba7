"""GPU kernels: enable_liger_kernel (Liger's Triton kernels), use_unsloth and use_unsloth_gc.

What each key means (LLaMA-Factory's semantics, measured against the installed packages):

- enable_liger_kernel: swap a model's RMSNorm, SwiGLU MLP and rotary embedding (the family's set) for Liger's Triton
  kernels, on the training model only. Loom patches the loaded instance (liger-kernel's per-family apply function
  with `model=`), before LoRA. Liger's loss kernels stay off: Loom's stages compute every loss from the logits
  (summed over the labelled tokens of a step, across ranks), and liger's cross-entropy patch would replace
  torch.nn.functional.cross_entropy for the whole process. CUDA only.
- use_unsloth: load the base model through unsloth's FastLanguageModel (its own attention, MLP and LoRA kernels)
  and add the adapter with its get_peft_model, instead of transformers + PEFT. LoRA only, one GPU, one worker.
- use_unsloth_gc: unsloth's gradient checkpointing, which needs no unsloth package: each checkpointed layer's saved
  input is kept in (pinned) host memory instead of GPU memory and copied back for the recompute. transformers 5
  builds exactly this in (`activation_checkpointing_enable(offload=True)`). Pinned memory needs an accelerator.
- mixture_of_depths: refused in its config field (orchestrator/config/model.py): no implementation runs on
  transformers 5.

Pure module: no torch, transformers or kernel package at import. The driver calls kernel_problems(cfg); the workers
call apply_liger_kernel, load_with_unsloth / unsloth_peft and enable_offloaded_checkpointing.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

LIGER_PIP = "liger-kernel"
UNSLOTH_PIP = "unsloth"
# The options Loom passes to every liger apply function (each takes the ones its signature names); the rest keep
# liger's defaults for the family (rope, rms_norm, swiglu or geglu, layer_norm...).
LIGER_OPTIONS = {"cross_entropy": False, "fused_linear_cross_entropy": False}
# Modules unsloth's get_peft_model trains whole beside LoRA (others it refuses); normalization layers are allowed too.
UNSLOTH_WHOLE_MODULES = ("embed_tokens", "lm_head")
# Packages whose versions unsloth patches or pins; an installed unsloth is checked against what it declares for them.
UNSLOTH_CHECKED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")

# ---------------------------------------------------------------- Liger


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(distribution: str) -> str | None:
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


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (liger patches the causal LM and its decoder layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def liger_patch(model: Any) -> tuple[Callable[..., None], dict[str, bool]]:
    """The installed liger-kernel's apply function for this model's type and the options Loom gives it. Imports
    liger-kernel (and triton) but runs no kernel: CPU-safe. ValueError names the supported types."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(_base_model(model), "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise ValueError(f"enable_liger_kernel: model type {model_type!r} has no Liger kernels in liger-kernel "
                         f"{_version(LIGER_PIP)}; supported: {supported}")  # fmt: skip
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    accepted = inspect.signature(apply).parameters
    return apply, {key: value for key, value in LIGER_OPTIONS.items() if key in accepted}


def liger_kernels_on(apply: Callable[..., None], options: dict[str, bool]) -> list[str]:
    """The kernels an apply function turns on with these options: its boolean parameters that end up true."""
    parameters = inspect.signature(apply).parameters.values()
    return [p.name for p in parameters if isinstance(p.default, bool) and options.get(p.name, p.default)]


def apply_liger_kernel(model: Any) -> str:
    """Swap the loaded model's layers for Liger's kernels (call it on the base model, before LoRA, on a CUDA worker)
    and say what was patched. liger-kernel also rebinds the family's module-level rotary function and layer classes,
    so every model of that family built later in this process (a reference model, say) gets the kernels too."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("enable_liger_kernel: Liger's kernels are Triton GPU kernels and this worker has no CUDA "
                           "device; the driver refuses the key for workers without a GPU")  # fmt: skip
    apply, options = liger_patch(model)
    apply(model=_base_model(model), **options)
    off = ", ".join(name for name, value in options.items() if not value)
    on = ", ".join(liger_kernels_on(apply, options))
    return f"liger-kernel {_version(LIGER_PIP)} {apply.__name__}: {on}" + (f" (off: {off})" if off else "")


# ---------------------------------------------------------------- unsloth


def unsloth_checkpointing(cfg: Any) -> bool | str:
    """unsloth's use_gradient_checkpointing: "unsloth" (its offloaded variant, what LLaMA-Factory always passes)
    while gradient checkpointing is on, False when the config turns it off."""
    return "unsloth" if cfg.uses_gradient_checkpointing() else False


def load_with_unsloth(
    model_path: str,
    *,
    dtype: Any,
    max_length: int,
    gradient_checkpointing: bool | str,
    token: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    load_in_4bit: bool = False,
    device_map: Any = None,
) -> Any:
    """A causal LM loaded by unsloth's FastLanguageModel onto this worker's GPU (its tokenizer is dropped: Loom
    loads its own). model_path is the base model, or an adapter folder (a resumed checkpoint, or the one adapter of
    adapter_name_or_path): unsloth then loads the base named in its adapter_config.json with the adapter on top,
    trainable, and unsloth_peft is not called. max_length is cutoff_len (unsloth sizes its RoPE cache from it);
    gradient_checkpointing is unsloth_checkpointing(cfg). unsloth loads in 4 bit unless told otherwise: Loom says
    so explicitly."""
    import torch
    from unsloth import FastLanguageModel

    try:
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_path,
            max_seq_length=max_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            full_finetuning=False,
            token=token,
            trust_remote_code=trust_remote_code,
            revision=revision,
            device_map=device_map if device_map is not None else {"": torch.cuda.current_device()},
            use_gradient_checkpointing=gradient_checkpointing,
            fix_tokenizer=False,
        )
    except NotImplementedError as error:  # LLaMA-Factory falls back to transformers here; Loom says so instead
        raise RuntimeError(f"use_unsloth: unsloth {_version(UNSLOTH_PIP)} cannot load {model_path!r}: {error}; "
                           "remove use_unsloth") from error  # fmt: skip
    return model


def unsloth_peft(
    model: Any,
    *,
    rank: int,
    alpha: int,
    dropout: float,
    targets: list[str],
    max_length: int,
    gradient_checkpointing: bool | str,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: bool | str = True,
    modules_to_save: list[str] | None = None,
    seed: int = 42,
) -> Any:
    """A fresh LoRA adapter through unsloth's get_peft_model (the same LoRA Loom's lora_config builds: rank, alpha,
    dropout, resolved target names, rsLoRA, DoRA, PiSSA init), which also installs unsloth's LoRA kernels and its
    gradient checkpointing."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        use_gradient_checkpointing=gradient_checkpointing,
        random_state=seed,
        max_seq_length=max_length,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        modules_to_save=modules_to_save or None,
    )


def enable_offloaded_checkpointing(model: Any, checkpoint_kwargs: dict[str, Any]) -> None:
    """use_unsloth_gc: gradient checkpointing whose saved layer inputs wait in pinned host memory (transformers 5's
    offload variant; LLaMA-Factory's own copy of unsloth's does the same). Needs an accelerator for pinned memory:
    on a CPU-only worker the first training forward raises."""
    target = model
    while not hasattr(target, "activation_checkpointing_enable") and hasattr(target, "get_base_model"):
        target = target.get_base_model()
    target.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(checkpoint_kwargs), offload=True)
    target.config.use_cache = False


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
        installed = _version(requirement.name)
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


def _zero3(cfg: Any) -> bool:
    if cfg.deepspeed is None:
        return False
    from orchestrator.parallelism import load_json_setting, zero_stage

    try:
        return zero_stage(load_json_setting(cfg.deepspeed)) == 3
    except (ValueError, TypeError):  # an unreadable deepspeed setting is reported by the parallelism checks
        return False


def _no_gpu(key: str, what: str, cfg: Any) -> tuple[str, str]:
    return (key, f"{what}, and the workers have no GPU (resources_per_worker {cfg.worker_resources()}): give each "
                 f"worker one, e.g. resources_per_worker {{\"GPU\": 1}}, or leave {key} false")  # fmt: skip


def liger_problems(cfg: Any, model_type: str | None) -> list[tuple[str, str]]:
    if not cfg.enable_liger_kernel:
        return []
    if cfg.gpus_per_worker() == 0:
        return [_no_gpu("enable_liger_kernel", "Liger's kernels are Triton kernels for CUDA GPUs", cfg)]
    if not _installed("liger_kernel"):
        return [("enable_liger_kernel", f"needs the {LIGER_PIP} package on the workers (it brings triton): "
                                        f"pip install -c constraints.txt {LIGER_PIP}")]  # fmt: skip
    supported = liger_model_types()
    if model_type is not None and model_type not in supported:
        return [("enable_liger_kernel", f"model type {model_type!r} has no Liger kernels in {LIGER_PIP} "
                                        f"{_version(LIGER_PIP)}; supported: {', '.join(supported)}")]  # fmt: skip
    return []


def unsloth_problems(cfg: Any) -> list[tuple[str, str]]:
    if not cfg.use_unsloth:
        return []
    if cfg.gpus_per_worker() == 0:
        return [_no_gpu("use_unsloth", "unsloth's kernels run on a CUDA GPU", cfg)]
    problems = []
    if not _installed("unsloth"):
        problems.append(("use_unsloth", f"needs the {UNSLOTH_PIP} package on the workers: pip install "
                                        f"{UNSLOTH_PIP} (check first that it keeps Loom's torch, transformers, "
                                        "trl and datasets: it declares its own bounds on them)"))  # fmt: skip
    else:
        broken = unsloth_version_problems()
        if broken and os.environ.get("DISABLE_VERSION_CHECK", "").strip().lower() not in ("1", "true", "yes", "on"):
            problems.append(("use_unsloth", f"unsloth {_version(UNSLOTH_PIP)} declares {'; '.join(broken)}: it "
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
    if _zero3(cfg):
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
