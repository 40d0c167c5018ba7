"""Fine-tuning method: stage, lora / freeze / full and their knobs."""

from typing import Literal

from pydantic import BaseModel

from .fields import param


class FinetuningArgs(BaseModel):
    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto"] = param(
        "sft", "Training stage (orchestrator/stages.py, docs/STAGES.md): pt, sft, rm, dpo, kto or ppo."
    )
    finetuning_type: Literal["lora", "freeze", "full"] = param(
        "lora", "Which parameters train: LoRA adapters, some layers, or all."
    )
    pure_bf16: bool = param(False, "Keep weights and activations in bf16 without mixed-precision autocast.")
    compute_accuracy: bool = param(
        False, "pt/sft: token accuracy (argmax against the label) at each evaluation, logged as eval_accuracy."
    )
    disable_shuffling: bool = param(False, "Read the training set in order instead of shuffling it.")
    plot_loss: bool = param(
        False, "When the run ends, draw training_loss.png (with a smoothed curve), training_eval_loss.png and the "
        "stage's metrics into output_dir (`loom plot` draws them at any time)."
    )  # fmt: skip
    include_effective_tokens_per_second: bool = param(
        False, "Log effective (non-padding) tokens per second in trainer_log.jsonl."
    )

    # LoRA
    additional_target: str | None = param(
        None, "Comma-separated modules besides LoRA layers that train fully and are saved with the adapter."
    )
    lora_alpha: int | None = param(None, "LoRA scaling factor; defaults to lora_rank * 2.", gt=0)
    lora_dropout: float = param(0.0, "Dropout on the LoRA branch.", ge=0.0, lt=1.0)
    lora_rank: int = param(8, "Rank of the LoRA update matrices.", gt=0)
    lora_target: str = param("all", "Comma-separated module names that get LoRA, or `all` for every linear layer.")
    loraplus_lr_ratio: float | None = param(
        None, "LoRA+: the B matrices (and 1-D parameters) learn at this many times learning_rate.", gt=0
    )
    loraplus_lr_embedding: float | None = param(1e-6, "LoRA+: the learning rate of a LoRA embedding's B.", gt=0)
    use_rslora: bool = param(False, "Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    use_dora: bool = param(False, "Weight-decomposed LoRA (DoRA).")
    pissa_init: bool = param(False, "Initialise the adapter with PiSSA (principal singular values).")
    pissa_iter: int | None = param(16, "Fast-SVD iterations for PiSSA; -1 runs a full SVD.", ge=-1)
    pissa_convert: bool = param(
        False,
        "Also save the trained PiSSA adapter as a plain LoRA adapter (twice the rank) for the original base model: "
        "output_dir/pissa_converted, beside the initial adapter output_dir/pissa_init.",
    )
    create_new_adapter: bool = param(
        False, "LoRA: merge every adapter of adapter_name_or_path into the base and train a fresh adapter on top."
    )

    # freeze
    freeze_trainable_layers: int = param(
        2, "Hidden layers that train: positive counts from the last layer, negative from the first."
    )
    freeze_trainable_modules: str = param(
        "all", "Comma-separated module names inside the trainable layers that train, or `all`."
    )
    freeze_extra_modules: str | None = param(
        None, "Comma-separated modules outside the hidden layers that train too (e.g. embed_tokens,lm_head)."
    )
