"""Model loading and tokenizer options (LLaMA-Factory's "Model — basic" group)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet, param, refused

DERIVED = "derived by Loom from the rest of the config; do not set it"
TOKENIZER_CHANGES = "tokenizer changes arrive with the full data layer (issue 3)"
OTHER_HUBS = "ModelScope/Modelers hubs are not wired yet"


class ModelArgs(BaseModel):
    model_name_or_path: str | None = param(None, "Base model: a local path or a Hugging Face Hub repo id.")
    adapter_name_or_path: str | None = param(
        None, "Adapter(s) to load on top of the base model: local paths or Hub ids, comma-separated."
    )
    adapter_folder: str | None = param(
        None, "Subfolder of each adapter_name_or_path folder that holds the adapter (as PEFT's subfolder)."
    )
    cache_dir: str | None = param(None, "Local directory where downloaded models are cached.")
    use_fast_tokenizer: bool = param(True, "Use the fast (Rust) tokenizer when the model provides one.")
    resize_vocab: bool = param(
        False, "Resize the embedding layers to the tokenizer (implied by new_special_tokens, as in LLaMA-Factory)."
    )
    split_special_tokens: bool = param(False, "Tokenize special-token strings in text as plain text.")
    new_special_tokens: str | None = param(None, "Special tokens to add to the tokenizer, comma-separated.")
    model_revision: str = param("main", "Model revision to load: a branch, tag or commit id.")
    low_cpu_mem_usage: bool = param(True, "Load the model with reduced peak CPU memory.")
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = param(
        None,
        "RoPE scaling to train beyond the model's context: the factor is the whole multiple of its pretrained length "
        "that covers cutoff_len (inference commands double it); the trained model's config keeps it.",
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = param(
        "auto", "Attention implementation: auto, disabled (eager), sdpa or fa2 (FlashAttention-2)."
    )
    shift_attn: bool = param(
        False,
        "LongLoRA's shifted sparse attention (S²-Attn) while training: attention within groups of a quarter of the "
        "sequence, half the heads shifted by half a group (llama, mistral, qwen2, qwen3); full attention otherwise.",
    )
    mixture_of_depths: Literal["convert", "load"] | None = refused(
        None,
        "Mixture-of-depths: convert the model to MoD, or load an existing MoD model.",
        "the mixture-of-depth package LLaMA-Factory uses (1.2.0) is written for transformers 4: `import MoD` fails on "
        "transformers 5 (TRANSFORMERS_CACHE was removed) and its layer wrapper breaks on transformers 5's decoder "
        "layer calls",
    )
    use_unsloth: bool = param(
        False,
        "Load and LoRA-wrap the model with unsloth's kernels (training; one CUDA worker, LoRA; workers/kernels.py).",
    )
    use_unsloth_gc: bool = param(
        False, "Offloaded gradient checkpointing: checkpointed layer inputs wait in pinned host memory (CUDA workers)."
    )
    enable_liger_kernel: bool = param(
        False, "Liger's Triton kernels for the model's RMSNorm, SwiGLU and RoPE while training (CUDA workers)."
    )
    moe_aux_loss_coef: float | None = param(
        None,
        "Weight of an MoE model's router load-balancing loss, added to the pt/sft/dpo/kto loss (mixtral, qwen2_moe, "
        "qwen3_moe, olmoe, ...); higher balances the experts more.",
        ge=0,
    )
    disable_gradient_checkpointing: bool = param(False, "Turn gradient checkpointing off.")
    use_reentrant_gc: bool = param(True, "Use the reentrant variant of gradient checkpointing.")
    upcast_layernorm: bool = param(False, "Keep layernorm weights in fp32.")
    upcast_lmhead_output: bool = param(False, "Cast the lm_head output to fp32.")
    train_from_scratch: bool = param(False, "Initialise the model weights randomly instead of loading them.")
    infer_backend: Literal["huggingface", "vllm"] = param(
        "huggingface",
        "Inference engine of chat, api, serve and predict: huggingface (transformers generate) or "
        "vllm (CUDA only: refused at the driver on a machine without it).",
    )
    offload_folder: str = param(
        "offload",
        "Where weights that fit on no device wait, when an inference command spreads a quantized model over the "
        "devices (quantization_device_map: auto).",
    )
    use_cache: bool = param(True, "Use the KV cache during generation.")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = param(
        "auto", "Dtype of weights and activations at inference time."
    )
    hf_hub_token: str | None = param(
        None, "Hugging Face Hub token used to download gated or private models.", secret=True
    )
    ms_hub_token: str | None = not_yet(None, "ModelScope Hub token.", OTHER_HUBS, secret=True)
    om_hub_token: str | None = not_yet(None, "Modelers (OpenMind) Hub token.", OTHER_HUBS, secret=True)
    print_param_status: bool = param(False, "Print each parameter's dtype, device and trainable flag after loading.")
    trust_remote_code: bool = param(False, "Allow running code shipped with a model or dataset on the Hub.")
    compute_dtype: str | None = refused(None, "Dtype used to compute model outputs.", DERIVED)
    device_map: str | dict | None = refused(None, "Mapping of model modules onto devices.", DERIVED)
    model_max_length: int | None = refused(None, "Maximum input length of the model.", DERIVED, ge=1)
    block_diag_attn: bool = refused(
        False,
        "Use block-diagonal attention so packed sequences do not attend to each other.",
        "set by Loom from neat_packing; do not set it",
    )
