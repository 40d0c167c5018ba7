"""Load model and tokenizer, then make the right parameters trainable: lora, freeze or full."""

from __future__ import annotations

import re
from typing import Any

import torch

from orchestrator.data.tokenizer import TokenizerSpec, load_tokenizer
from orchestrator.environment import remote_code_imports
from orchestrator.values import as_dict, split_csv

from .model_knobs import configure

ATTENTION = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def load_tokenizer_for(cfg: Any) -> Any:
    return load_tokenizer(TokenizerSpec.from_config(cfg))


def model_dtype(cfg: Any) -> torch.dtype:
    return torch.bfloat16 if cfg.pure_bf16 else torch.float32


def load_model_config(
    cfg: Any, path: str, revision: str = "main", context: int | None = None, router_loss: bool = False
) -> Any:
    """The model's config with Loom's knobs applied (workers/model_knobs.py): RoPE scaled for `context` (the training
    length; None: an inference command's), the MoE router loss on for a model that trains."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=cfg.trust_remote_code,
                                        token=cfg.hf_hub_token, cache_dir=cfg.cache_dir)  # fmt: skip
    configure(config, cfg, context, router_loss)
    return config


def load_base_model(
    cfg: Any, source: str | None = None, trainable: bool = True, bits: int | None = None, device: Any = None
) -> torch.nn.Module:
    """The causal LM from `source` (default model_name_or_path), or randomly initialised for train_from_scratch;
    held in `bits` (quantization_method) when given, its k-bit weights placed on `device` (the worker's)."""
    from transformers import AutoModelForCausalLM

    remote_code_imports(cfg.trust_remote_code)
    path = source or cfg.model_name_or_path
    revision = cfg.model_revision if source is None else "main"
    config = load_model_config(cfg, path, revision, cfg.cutoff_len, router_loss=trainable)
    common = {"trust_remote_code": cfg.trust_remote_code, "token": cfg.hf_hub_token, "cache_dir": cfg.cache_dir}
    attn = ATTENTION[cfg.flash_attn]
    if cfg.train_from_scratch and source is None:
        return AutoModelForCausalLM.from_config(config, dtype=model_dtype(cfg), attn_implementation=attn,
                                                trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    quantized: dict[str, Any] = {}
    if bits is not None:
        from orchestrator.quantization import weight_sharding

        from .quantization import from_pretrained_kwargs

        quantized = from_pretrained_kwargs(cfg, bits, None if weight_sharding(cfg) else device)  # ZeRO-3/FSDP place
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        revision=revision,
        dtype=model_dtype(cfg),
        attn_implementation=attn,
        low_cpu_mem_usage=cfg.low_cpu_mem_usage,
        **common,
        **quantized,
    )
    if bits is None:
        return model
    from .quantization import quantize_after_load

    return quantize_after_load(model, cfg, bits, device or "cpu")


def load_frozen_model(
    cfg: Any, path: str, adapters: str | None, bits: int | None = None, device: Any = None
) -> torch.nn.Module:
    """A frozen causal LM from `path` with `adapters` (comma-separated) merged in; held in `bits`, its one adapter
    is attached instead (merging would re-quantize every targeted weight; the checks refuse more than one)."""
    from peft import PeftModel

    model = load_base_model(cfg, path, trainable=False, bits=bits, device=device)
    for adapter in split_csv(adapters):
        model = PeftModel.from_pretrained(model, adapter)
        model = model if bits is not None else model.merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target with `all` (the output head excluded)."""
    from .quantization import linear_types

    head, linear = model.get_output_embeddings(), linear_types()  # hqq's layers are not nn.Linear
    names = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear) and module is not head
    }
    return sorted(names)


def lora_targets(cfg: Any, model: torch.nn.Module) -> list[str]:
    targets = split_csv(cfg.lora_target)
    return linear_module_names(model) if targets == ["all"] else targets


def module_name_problems(cfg: Any, model: torch.nn.Module) -> list[tuple[str, str]]:
    """(key, message) for module names in the config that the model does not have. Run on a meta-device model."""
    problems = []
    leaf_names = {name.split(".")[-1] for name, _ in model.named_modules() if name}
    if cfg.finetuning_type == "lora":
        for target in lora_targets(cfg, model):
            if target not in leaf_names:
                problems.append(
                    (
                        "lora_target",
                        f"module {target!r} is not in the model; linear modules: {', '.join(linear_module_names(model))}",
                    )
                )
        for extra in split_csv(cfg.additional_target):
            if extra not in leaf_names:
                problems.append(("additional_target", f"module {extra!r} is not in the model"))
    for key in ("galore_target", "apollo_target"):
        linear = linear_module_names(model)
        for target in split_csv(getattr(cfg, key)):
            if getattr(cfg, f"use_{key.split('_')[0]}") and target != "all" and target not in linear:
                problems.append((key, f"module {target!r} is not a linear module of the model; have: "
                                      f"{', '.join(linear)}"))  # fmt: skip
    if cfg.finetuning_type == "freeze":
        hidden, other = _freeze_module_names(model)
        for name in split_csv(cfg.freeze_trainable_modules):
            if name != "all" and name not in hidden:
                problems.append(
                    (
                        "freeze_trainable_modules",
                        f"{name!r} is not a module of the hidden layers; have: {', '.join(sorted(hidden))}",
                    )
                )
        for name in split_csv(cfg.freeze_extra_modules):
            if name not in other:
                problems.append(
                    (
                        "freeze_extra_modules",
                        f"{name!r} is not a module outside the hidden layers; have: {', '.join(sorted(other))}",
                    )
                )
    return problems


def _freeze_module_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """Module names inside the numbered hidden layers, and names of parameters' parents outside them."""
    hidden, other = set(), set()
    for name, _ in model.named_parameters():
        match = _LAYER_INDEX.search(name)
        if match:
            hidden.add(name[match.end() :].split(".")[0])
        else:
            other.add(name.split(".")[-2] if "." in name else name)
    return hidden, other


def trainable_layer_ids(cfg: Any, layers: int) -> list[int]:
    """The hidden layers that train: freeze_trainable_layers counted from the last (positive) or the first
    (negative) layer; with use_llama_pro, the blocks `loom llama-pro` inserted (evenly strided)."""
    k = cfg.freeze_trainable_layers
    if cfg.use_llama_pro:
        from orchestrator.llama_pro import llama_pro_trainable_layers

        return llama_pro_trainable_layers(layers, k)
    return list(range(max(0, layers - k), layers) if k > 0 else range(min(-k, layers)))


def llama_pro_lora_targets(cfg: Any, model: torch.nn.Module, targets: list[str]) -> list[str]:
    """use_llama_pro with LoRA: the target modules inside the expanded blocks only, as full module names."""
    layers = set(trainable_layer_ids(cfg, model.config.num_hidden_layers))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and name.split(".")[-1] in targets and (m := _LAYER_INDEX.search(name)) and int(m.group(1)) in layers]  # fmt: skip


def apply_freeze(cfg: Any, model: torch.nn.Module) -> None:
    layer_ids = trainable_layer_ids(cfg, model.config.num_hidden_layers)
    modules = split_csv(cfg.freeze_trainable_modules)
    patterns = [f".{i}.{'' if m == 'all' else m + '.'}" for i in layer_ids for m in modules]
    extras = split_csv(cfg.freeze_extra_modules)
    for name, param in model.named_parameters():
        trainable = any(p in name for p in patterns) or any(f".{e}." in f".{name}" for e in extras)
        param.requires_grad_(trainable)
        if trainable and param.dtype != torch.float32 and not cfg.pure_bf16:
            param.data = param.data.float()


def lora_config(cfg: Any, model: torch.nn.Module) -> Any:
    from peft import LoraConfig, TaskType

    targets = lora_targets(cfg, model)
    init: Any = True
    if cfg.pissa_init:
        init = "pissa" if cfg.pissa_iter == -1 else f"pissa_niter_{cfg.pissa_iter}"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_lora_alpha(),
        lora_dropout=cfg.lora_dropout,
        target_modules=llama_pro_lora_targets(cfg, model, targets) if cfg.use_llama_pro else targets,
        modules_to_save=(
            split_csv(cfg.additional_target) + (embedding_module_names(model) if resizes_vocab(cfg) else [])
        )
        or None,  # fmt: skip
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=init,
    )


def apply_lora(cfg: Any, model: torch.nn.Module, resume_dir: str | None) -> torch.nn.Module:
    from peft import PeftModel, get_peft_model

    for path in cfg.merged_adapters():
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if resume_dir:  # the checkpoint's adapter holds everything trained so far
        return PeftModel.from_pretrained(model, resume_dir, is_trainable=True)
    adapters = cfg.adapters()
    if adapters and not cfg.create_new_adapter:  # training continues the last adapter
        return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
    return get_peft_model(model, lora_config(cfg, model))


def checkpointing_kwargs(cfg: Any) -> dict[str, Any]:
    """torch.utils.checkpoint's arguments: use_reentrant from use_reentrant_gc, then gradient_checkpointing_kwargs
    (which wins where both say use_reentrant)."""
    return {"use_reentrant": cfg.use_reentrant_gc, **as_dict(cfg.gradient_checkpointing_kwargs or {})}


def enable_gradient_checkpointing(cfg: Any, model: torch.nn.Module) -> None:
    kwargs = checkpointing_kwargs(cfg)
    if cfg.use_unsloth_gc:  # saved layer inputs wait in pinned host memory (workers/kernels.py)
        from .kernels import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model, kwargs)
    elif hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    if cfg.finetuning_type != "full" and kwargs["use_reentrant"]:
        # Reentrant checkpointing needs an input that requires grad, or frozen embeddings cut the graph.
        model.enable_input_require_grads()


def upcast(cfg: Any, model: torch.nn.Module) -> None:
    if cfg.upcast_layernorm:
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.data = param.data.float()
    if cfg.upcast_lmhead_output:
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda _module, _inputs, output: output.float())


def resizes_vocab(cfg: Any) -> bool:
    return bool(cfg.resize_vocab or cfg.new_special_tokens)


def fit_embeddings(model: torch.nn.Module, tokenizer: Any) -> bool:
    """Grow the embedding and output layers to the tokenizer (rounded up to a multiple of 64). New rows start at
    the mean of the old ones (transformers' mean_resizing), not at random. Returns whether anything changed."""
    if len(tokenizer) <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    return True


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the input and output embedding modules (trained whole when the vocabulary grows)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.split(".")[-1] for name, module in model.named_modules() if id(module) in wanted})


def build_model(cfg: Any, resume_dir: str | None = None, tokenizer: Any = None, device: Any = None) -> torch.nn.Module:
    """The trainable model: base weights (or the checkpoint's, for full/freeze; k-bit with quantization_bit, placed
    on `device`), then the fine-tuning method."""
    if cfg.use_unsloth:
        return _finish(cfg, build_unsloth_model(cfg, resume_dir, tokenizer))
    full_weights_from_checkpoint = resume_dir if cfg.finetuning_type != "lora" else None
    model = load_base_model(cfg, full_weights_from_checkpoint, bits=cfg.quantization_bit, device=device)
    if cfg.shift_attn:
        from .shift_attn import enable_shift_attn

        enable_shift_attn(model)
    if cfg.enable_liger_kernel:
        from .kernels import apply_liger_kernel

        print(apply_liger_kernel(model), flush=True)
    if resizes_vocab(cfg) and tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if cfg.finetuning_type == "lora":
        model = apply_lora(cfg, model, resume_dir)
    elif cfg.finetuning_type == "freeze":
        apply_freeze(cfg, model)
    else:
        model.requires_grad_(True)
    upcast(cfg, model)
    if cfg.uses_gradient_checkpointing():
        enable_gradient_checkpointing(cfg, model)
    return _finish(cfg, model)


def build_unsloth_model(cfg: Any, resume_dir: str | None, tokenizer: Any) -> torch.nn.Module:
    """use_unsloth: unsloth's loader and LoRA (its kernels and gradient checkpointing) instead of transformers and
    PEFT. A resumed checkpoint's adapter, or the one adapter of adapter_name_or_path, is loaded trainable."""
    from .kernels import load_with_unsloth, unsloth_checkpointing, unsloth_peft

    checkpointing = unsloth_checkpointing(cfg)
    adapters = cfg.adapters()
    source = resume_dir or (adapters[-1] if adapters else cfg.model_name_or_path)
    model = load_with_unsloth(source, dtype=model_dtype(cfg), max_length=cfg.cutoff_len,
                              gradient_checkpointing=checkpointing, token=cfg.hf_hub_token,
                              trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision)  # fmt: skip
    if resizes_vocab(cfg) and tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if source != cfg.model_name_or_path:  # an adapter, already trainable
        return model
    lora = lora_config(cfg, model)
    return unsloth_peft(model, rank=lora.r, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                        targets=list(lora.target_modules), max_length=cfg.cutoff_len,
                        gradient_checkpointing=checkpointing, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                        init_lora_weights=lora.init_lora_weights, modules_to_save=lora.modules_to_save,
                        seed=cfg.seed)  # fmt: skip


def _finish(cfg: Any, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.neftune_noise_alpha:
        add_neftune(model, cfg.neftune_noise_alpha)
    return model


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al., 2023): uniform noise in [-m, m] with m = alpha / sqrt(sequence length x hidden size)."""
    bound = alpha / float(embeddings.shape[1] * embeddings.shape[2]) ** 0.5
    return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """Noise on the input embeddings' output in training only: evaluation and generation see clean embeddings."""

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return neftune_noise(output, alpha) if module.training else output

    model.get_input_embeddings().register_forward_hook(hook)


def numel(param: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition of it here."""
    return getattr(param, "ds_numel", None) or param.numel()


def parameter_report(model: torch.nn.Module) -> str:
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def parameter_status(model: torch.nn.Module) -> str:
    return "\n".join(
        f"{name}: dtype={p.dtype} device={p.device} trainable={p.requires_grad}" for name, p in model.named_parameters()
    )
