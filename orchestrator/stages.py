"""The stage registry: one pure table that the driver's checks, the data layer and the workers all read.

Nothing else names stages. Each entry says which processor prepares the stage's data, what its datasets must be,
whether it packs, which extra models it needs, what it logs, which loop drives it and which worker module holds it.
Pure: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # dpo losses that compare the policy with itself, not with a reference


@dataclass(frozen=True)
class StageSpec:
    name: str
    doc: str
    processor: str  # orchestrator.data.processors.PROCESSORS key
    ranking: bool = False  # its datasets must be ranking (chosen/rejected) datasets; others must not be
    needs_columns: tuple[str, ...] = ()  # dataset roles it needs beyond the format's core (e.g. kto_tag)
    needs_response: bool = True  # alpaca datasets need a response column
    packs: bool = False  # packing is allowed
    packs_by_default: bool = False
    loop: str = "batch"  # "batch": one accumulation window = one optimizer step; "rollout": generate, then update
    unit: str = "tokens"  # what the loss is averaged over, across all ranks: tokens, pairs or examples
    value_head: bool = False  # the trained model carries a scalar value head (saved as value_head.safetensors)
    evaluates: bool = True  # has an evaluation loss over held-out rows (ppo is judged by its rewards instead)
    keys: tuple[str, ...] = ()  # config keys (prefixes) that only this stage (and others naming them) reads
    metrics: tuple[str, ...] = ()  # what it logs besides the loss
    module: str = ""  # workers.stages.<module> builds it

    def micro_batches_per_step(self, cfg: Any) -> int:
        """Micro-batches of prompts or examples each rank consumes per logged step."""
        buffer = cfg.ppo_buffer_size if self.loop == "rollout" else 1
        return cfg.gradient_accumulation_steps * buffer

    def uses_reference(self, cfg: Any) -> bool:
        if self.name == "dpo":
            return cfg.pref_loss not in REFERENCE_FREE_LOSSES
        return self.name in ("kto", "ppo")

    def models(self, cfg: Any) -> tuple[str, ...]:
        """The models a run of this stage holds: the trained policy (with its value head) and any frozen ones."""
        models = ("policy + value head" if self.value_head else "policy",)
        if self.uses_reference(cfg):
            models += ("reference (precomputed)" if cfg.precompute_ref_logps else "reference",)
        return models + ((f"reward ({cfg.reward_model_type})",) if self.name == "ppo" else ())


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")  # fmt: skip

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("pt", "pre-training: next-token loss on every token of packed text blocks", "pretrain",
                  needs_response=False, packs=True, packs_by_default=True, module="pt",
                  metrics=("accuracy",), keys=("compute_accuracy",)),  # token accuracy, at evaluation
        StageSpec("sft", "supervised fine-tuning: next-token loss on the response tokens", "supervised",
                  packs=True, module="sft", metrics=("accuracy",), keys=("compute_accuracy",)),
        StageSpec("rm", "reward modelling: a value head scores chosen above rejected (pairwise loss)", "pairwise",
                  ranking=True, unit="pairs", value_head=True,
                  metrics=("accuracy", "scores/chosen", "scores/rejected"), module="rm"),
        StageSpec("dpo", "direct preference optimisation, with every pref_loss", "pairwise", ranking=True,
                  unit="pairs", keys=("pref_", "dpo_", "simpo_", "ref_model", "precompute_ref"),
                  metrics=PREFERENCE_METRICS + ("sft_loss",), module="dpo"),
        StageSpec("kto", "Kahneman-Tversky optimisation on desirable/undesirable examples", "feedback",
                  needs_columns=("kto_tag",), unit="examples",
                  keys=("pref_beta", "pref_ftx", "kto_", "ref_model", "precompute_ref"),
                  metrics=("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"),
                  module="kto"),
        StageSpec("ppo", "proximal policy optimisation against a reward model", "unsupervised",
                  needs_response=False, loop="rollout", value_head=True,
                  keys=("ppo_", "reward_model", "reward_api_", "ref_model"),
                  metrics=("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "response_length",
                           "rollout_time", "update_time"),
                  evaluates=False, module="ppo"),
    )
}  # fmt: skip

BUILT = tuple(name for name, spec in STAGES.items() if spec.module)


def stages_reading(key: str) -> tuple[str, ...]:
    """The stages that read a stage-scoped key; () when the key is not stage-scoped."""
    return tuple(name for name, spec in STAGES.items() if any(key.startswith(prefix) for prefix in spec.keys))


def reference_source(cfg: Any) -> tuple[str, str | None]:
    """The model (and adapters merged into it) that serves as the frozen reference: `ref_model` with its adapters;
    for LoRA without one, the base with all but the trained adapter merged (the policy with its adapter disabled);
    otherwise the initial policy, `model_name_or_path`."""
    if cfg.ref_model:
        return cfg.ref_model, cfg.ref_model_adapters
    if cfg.finetuning_type == "lora":
        return cfg.model_name_or_path, ",".join(cfg.merged_adapters()) or None
    return cfg.model_name_or_path, None


def processor_name(stage: str, predict: bool = False) -> str:
    """Which processor prepares a stage's data (as LLaMA-Factory chooses); predicting takes prompts only."""
    return "unsupervised" if predict and stage == "sft" else STAGES[stage].processor
