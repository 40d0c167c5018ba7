"""Preference and reinforcement learning options (rm, dpo, kto, ppo stages)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param


class RlhfArgs(BaseModel):
    pref_beta: float = param(0.1, "Beta of the preference loss.", gt=0)
    pref_ftx: float = param(
        0.0, "Weight of the supervised (SFT) loss on the chosen response added to the DPO or KTO loss.", ge=0
    )
    pref_loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = param(
        "sigmoid", "Preference loss used by DPO training."
    )
    dpo_label_smoothing: float = param(0.0, "Label smoothing of the DPO loss, in [0, 0.5].", ge=0, le=0.5)
    kto_chosen_weight: float = param(1.0, "Weight of the loss on desirable (chosen) examples in KTO.", ge=0)
    kto_rejected_weight: float = param(1.0, "Weight of the loss on undesirable (rejected) examples in KTO.", ge=0)
    simpo_gamma: float = param(0.5, "Target reward margin of the SimPO loss.", ge=0)
    ppo_buffer_size: int = param(1, "Number of mini-batches in one PPO experience buffer.", ge=1)
    ppo_epochs: int = param(4, "PPO optimisation epochs per experience batch.", ge=1)
    ppo_score_norm: bool = param(False, "Normalise reward scores in PPO.")
    ppo_target: float = param(6.0, "Target KL of PPO's adaptive KL controller.", gt=0)
    ppo_whiten_rewards: bool = param(False, "Whiten rewards before computing PPO advantages.")
    ref_model: str | None = param(
        None,
        "Reference model for DPO, KTO or PPO; default: the LoRA policy with its adapter disabled, else the initial model.",
    )
    ref_model_adapters: str | None = param(None, "Adapter(s) to load on the reference model.")
    ref_model_quantization_bit: Literal[4, 8] | None = param(
        None, "Load the reference model (ref_model) quantized to 4 or 8 bits, with quantization_method."
    )
    reward_model: str | None = param(None, "Reward model used by PPO.")
    reward_model_adapters: str | None = param(None, "Adapter(s) to load on the reward model.")
    reward_model_quantization_bit: Literal[4, 8] | None = param(
        None, "Load the full reward model quantized to 4 or 8 bits, with quantization_method."
    )
    reward_model_type: Literal["lora", "full", "api"] = param(
        "lora", "Kind of reward model for PPO: a LoRA adapter, a full model or an API endpoint."
    )
    reward_api_timeout_s: float = param(
        30.0, "ppo with reward_model_type api: seconds to wait for one scoring request.", source="loom", gt=0
    )
    reward_api_retries: int = param(
        3,
        "ppo with reward_model_type api: retries of a failed scoring request (backoff 0.5 s doubling).",
        source="loom",
        ge=0,
    )
    precompute_ref_logps: bool = param(
        False,
        "dpo/kto: compute every row's reference log-probabilities once, before training, in a Ray Data pass over "
        "actors holding the reference (cached with tokenized_path); the training workers then hold no reference "
        "model.",
        source="loom",
    )
