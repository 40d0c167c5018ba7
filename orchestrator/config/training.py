"""The transformers TrainingArguments keys that LLaMA-Factory configs use, with the same names and defaults."""

from typing import Literal

from pydantic import BaseModel

from .fields import param, refused

_TF = "transformers"
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adafactor", "sgd", "adagrad", "rmsprop")


class TrainingArgs(BaseModel):
    output_dir: str | None = param(
        None, "Where rank 0 writes the final model or adapter, tokenizer and trainer_log.jsonl.", source=_TF
    )
    overwrite_output_dir: bool = param(
        False, "Allow replacing a finished run and a non-empty output_dir instead of stopping.", source=_TF
    )
    do_train: bool = param(True, "Train the model.", source=_TF)
    do_eval: bool = param(False, "Evaluate on the validation split (val_size).", source=_TF)
    do_predict: bool = param(
        False, "After training, generate over the evaluation set on Ray (loom predict) and score it.", source=_TF
    )
    predict_with_generate: bool = param(
        False,
        "Prediction generates answers (required with do_predict: Loom's prediction always generates).",
        source=_TF,
    )
    eval_strategy: Literal["no", "steps", "epoch"] = param(
        "no", "When to evaluate: never, every eval_steps, each epoch.", source=_TF
    )
    eval_steps: float | None = param(
        None, "Evaluate every N optimizer steps (a fraction < 1 means that share of all steps).", gt=0, source=_TF
    )
    per_device_train_batch_size: int = param(8, "Examples per worker per micro-batch.", ge=1, source=_TF)
    per_device_eval_batch_size: int = param(8, "Examples per worker per evaluation batch.", ge=1, source=_TF)
    gradient_accumulation_steps: int = param(1, "Micro-batches accumulated into one optimizer step.", ge=1, source=_TF)
    learning_rate: float = param(5e-5, "Peak learning rate.", gt=0, source=_TF)
    weight_decay: float = param(0.0, "Decoupled weight decay (not applied to biases and norms).", ge=0, source=_TF)
    adam_beta1: float = param(0.9, "Adam beta1.", ge=0, lt=1, source=_TF)
    adam_beta2: float = param(0.999, "Adam beta2.", ge=0, lt=1, source=_TF)
    adam_epsilon: float = param(1e-8, "Adam epsilon.", gt=0, source=_TF)
    max_grad_norm: float = param(1.0, "Clip the gradient norm to this value (0 disables clipping).", ge=0, source=_TF)
    num_train_epochs: float = param(3.0, "Epochs to train when max_steps is not set.", gt=0, source=_TF)
    max_steps: int = param(-1, "Total optimizer steps; overrides num_train_epochs when > 0.", ge=-1, source=_TF)
    lr_scheduler_type: Literal[SCHEDULERS] = param("linear", "Learning-rate schedule.", source=_TF)
    lr_scheduler_kwargs: dict | str | None = param(
        None, "Extra arguments of the schedule (dict or JSON string).", source=_TF
    )
    warmup_ratio: float = param(0.0, "Share of the total steps spent warming up.", ge=0, le=1, source=_TF)
    warmup_steps: int = param(0, "Warm-up steps; overrides warmup_ratio when > 0.", ge=0, source=_TF)
    optim: Literal[OPTIMIZERS] = param("adamw_torch", "Optimizer.", source=_TF)
    logging_steps: float = param(
        500,
        "Write a trainer_log.jsonl line every N steps (a fraction < 1 means that share of all steps).",
        gt=0,
        source=_TF,
    )
    logging_first_step: bool = param(False, "Also log the first step.", source=_TF)
    save_strategy: Literal["no", "steps", "epoch"] = param(
        "steps", "When to checkpoint: never, every save_steps, each epoch.", source=_TF
    )
    save_steps: float = param(
        500, "Checkpoint every N optimizer steps (a fraction < 1 means that share of all steps).", gt=0, source=_TF
    )
    save_total_limit: int | None = param(
        None, "Keep at most this many checkpoints in the run directory.", ge=1, source=_TF
    )
    save_only_model: bool = param(
        False,
        "Checkpoints without the optimizer state (the largest part): a resume restarts the optimizer, while the "
        "weights, schedule, RNG and data position go on.",
        source=_TF,
    )
    seed: int = param(42, "Random seed for model init, shuffling and dropout.", source=_TF)
    data_seed: int | None = param(None, "Seed of the data shuffle; defaults to seed.", source=_TF)
    bf16: bool = param(False, "bf16 mixed precision (autocast).", source=_TF)
    fp16: bool = param(False, "fp16 mixed precision; needs GPU workers.", source=_TF)
    tf32: bool | None = param(None, "Allow TF32 matmuls on Ampere or newer GPUs.", source=_TF)
    gradient_checkpointing: bool | None = param(
        None,
        "Recompute activations in the backward pass; on by default unless disable_gradient_checkpointing.",
        source=_TF,
    )
    gradient_checkpointing_kwargs: str | dict | None = param(
        None,
        "Arguments of torch.utils.checkpoint (a mapping or JSON string): use_reentrant (wins over use_reentrant_gc), "
        "preserve_rng_state, determinism_check, debug.",
        source=_TF,
    )
    ddp_timeout: int = param(1800, "Seconds before a collective operation times out.", ge=1, source=_TF)
    ddp_find_unused_parameters: bool | None = param(
        None, "Let DDP tolerate parameters without gradients (default: on for freeze tuning).", source=_TF
    )
    dataloader_num_workers: int = refused(
        0, "DataLoader worker processes.", "Ray Data feeds the workers; use preprocessing_num_workers", source=_TF
    )
    remove_unused_columns: bool = refused(
        True, "Drop dataset columns the model does not take.", "Loom's collators pick the model inputs", source=_TF
    )
    include_num_input_tokens_seen: bool = param(
        False, "Count input tokens; Loom always logs tokens_seen, so this changes nothing.", source=_TF
    )
    run_name: str | None = param(
        None, "Run name for trackers; used as the run name when ray_run_name is unset.", source=_TF
    )
    report_to: str | list = param(
        "none",
        "Experiment trackers, logged from rank 0: wandb, tensorboard, mlflow, swanlab (a list or comma list), all "
        "(every installed one) or none; trainer_log.jsonl is always written.",
        source=_TF,
    )
    deepspeed: str | dict | None = param(
        None,
        'DeepSpeed config (a JSON file, JSON string or mapping): ZeRO stage 0-3, CPU offload; "auto" values are '
        "filled from this config.",
        source=_TF,
    )
    fsdp: str | list | bool | None = param(
        None,
        "Shard the model with FSDP2 instead of DDP: options full_shard or shard_grad_op, offload, auto_wrap.",
        source=_TF,
    )
    fsdp_config: str | dict | None = param(
        None,
        "FSDP settings (a JSON file, JSON string or mapping): transformer_layer_cls_to_wrap, reshard_after_forward, "
        "offload_params, version (2).",
        source=_TF,
    )
    resume_from_checkpoint: str | None = param(
        None,
        "Checkpoint folder to start from, when this run has none of its own: a Loom checkpoint of any run (weights, "
        "optimizer, schedule, data position), or a transformers / LLaMA-Factory checkpoint-N (its weights only).",
        source=_TF,
    )
    load_best_model_at_end: bool = param(
        False,
        "output_dir gets the model of the checkpoint with the best evaluation metric, not the last step's; Ray keeps "
        "that checkpoint whatever save_total_limit says. Every checkpoint step must be an evaluation step.",
        source=_TF,
    )
    metric_for_best_model: str | None = param(
        None, "The evaluation metric that picks the best checkpoint: loss (the default) or a stage metric.", source=_TF
    )
    greater_is_better: bool | None = param(
        None, "Whether a larger metric is better (default: false for a loss, true otherwise).", source=_TF
    )
    push_to_hub: bool = param(
        False,
        "Upload output_dir to the Hugging Face Hub when the run ends (rank 0, one commit); checked at the driver "
        "first: a token (hf_hub_token, HF_TOKEN or a login) and a Hub that answers (HF_ENDPOINT).",
        source=_TF,
    )
    hub_model_id: str | None = param(
        None, "Hub repository for push_to_hub (name or namespace/name; default: output_dir's name).", source=_TF
    )
    torch_compile: bool = param(
        False, "Compile the DDP model with torch.compile (inductor); the first steps pay the compilation.", source=_TF
    )
    neftune_noise_alpha: float | None = param(
        None, "NEFTune: uniform noise of this scale on the input embeddings, in training only.", gt=0, source=_TF
    )
    logging_dir: str | None = param(None, "TensorBoard's folder (default output_dir/runs).", source=_TF)
    disable_tqdm: bool = param(
        False, "Loom prints no progress bars in workers; accepted for compatibility.", source=_TF
    )
