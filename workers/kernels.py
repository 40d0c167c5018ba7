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

No torch, transformers or kernel package at import. The workers call apply_liger_kernel, load_with_unsloth /
unsloth_peft and enable_offloaded_checkpointing; the driver's checks are orchestrator/kernels.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from orchestrator.kernels import LIGER_PIP, UNSLOTH_PIP, installed_version

# The options Loom passes to every liger apply function (each takes the ones its signature names); the rest keep
# liger's defaults for the family (rope, rms_norm, swiglu or geglu, layer_norm...).
LIGER_OPTIONS = {"cross_entropy": False, "fused_linear_cross_entropy": False}
# ---------------------------------------------------------------- Liger


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
                         f"{installed_version(LIGER_PIP)}; supported: {supported}")  # fmt: skip
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
    return f"liger-kernel {installed_version(LIGER_PIP)} {apply.__name__}: {on}" + (f" (off: {off})" if off else "")


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
        raise RuntimeError(f"use_unsloth: unsloth {installed_version(UNSLOTH_PIP)} cannot load {model_path!r}: {error}; "
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
