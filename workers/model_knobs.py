"""Changes to a model's config before its weights load (RoPE scaling, the MoE router's auxiliary loss), and the
driver's checks of every knob that depends on the model's config (those two, shift_attn's model types, LLaMA Pro's
block count).

They act on the transformers config, so the driver checks them on the config alone (no weights) and the workers and
the inference engine apply them the same way.
"""

from __future__ import annotations

import math
from typing import Any

# LLaMA-Factory's fixed llama3 band (Meta's Llama 3.1 values): the low frequencies are scaled by the factor, the
# high ones kept, the band between interpolated.
LLAMA3_BAND = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
INFERENCE_ROPE_FACTOR = 2.0  # with no training length to size it from, an inference command doubles the context
ROPE_KEEPS_ORIGINAL = ("dynamic", "yarn", "llama3")  # scalings that also need the pretrained length

# model_type -> the config attribute that weighs the router's load-balancing loss. These models return `aux_loss`
# (unweighted) when `output_router_logits` is on; the stage adds coefficient x aux_loss to its own loss.
MOE_COEFFICIENT = {
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "jamba", "llama4",
                     "ernie4_5_moe"), "router_aux_loss_coef"),
    "jetmoe": "aux_loss_coef",
}  # fmt: skip


def pretrained_length(config: Any) -> int | None:
    """The context length the model was pretrained with (before any scaling already in its config)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)


def rope_problem(config: Any, kind: str, context: int | None) -> str | None:
    """Why `kind` scaling cannot apply to this model at this training length (None: it can)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        return f"model type {config.model_type!r} has no rotary position embedding that transformers can scale"
    if rope["rope_type"] not in ("default", kind):
        return (
            f"the model's RoPE is already scaled ({rope['rope_type']!r}, {_described(rope)}); leave rope_scaling unset"
        )
    base = pretrained_length(config)
    if base is None:
        return "the model's config has no max_position_embeddings to scale from"
    if rope["rope_type"] == kind:  # a model this run (or an earlier one) saved with the scaling applied
        return None
    if context is not None and context <= base:
        return (f"cutoff_len {context} fits in the model's {base} positions, so the scaling factor would be 1: "
                f"raise cutoff_len above {base}, or leave rope_scaling unset")  # fmt: skip
    return None


def _described(rope: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in rope.items() if k not in ("rope_type", "rope_theta"))


def scaled_rope(config: Any, kind: str, context: int | None) -> tuple[dict, int]:
    """The rope_parameters and max_position_embeddings for `kind` scaling: the factor is the whole multiple of the
    pretrained length that covers `context` (the training length), or 2 for inference (`context` None)."""
    base = pretrained_length(config)
    factor = float(math.ceil(context / base)) if context is not None else INFERENCE_ROPE_FACTOR
    rope = {"rope_theta": config.rope_parameters.get("rope_theta"), "rope_type": kind, "factor": factor}
    if kind in ROPE_KEEPS_ORIGINAL:
        rope["original_max_position_embeddings"] = base
    if kind == "llama3":
        rope.update(LLAMA3_BAND)
    return rope, int(base * factor)


def apply_rope_scaling(config: Any, kind: str | None, context: int | None) -> str | None:
    """Scale the config's RoPE in place; a line saying what changed (None when rope_scaling is unset)."""
    if kind is None:
        return None
    problem = rope_problem(config, kind, context)
    if problem:
        raise ValueError(f"rope_scaling {kind!r}: {problem}")
    base = pretrained_length(config)
    if config.rope_parameters["rope_type"] == kind:
        return f"rope_scaling {kind}: already in the model's config ({_described(config.rope_parameters)})"
    config.rope_parameters, config.max_position_embeddings = scaled_rope(config, kind, context)
    factor = config.rope_parameters["factor"]
    return f"rope_scaling {kind}: factor {factor:g}, context {base} -> {config.max_position_embeddings} positions"


def moe_problem(config: Any) -> str | None:
    if config.model_type in MOE_COEFFICIENT:
        return None
    return (f"model type {config.model_type!r} has no router loss Loom can weigh; MoE model types: "
            f"{', '.join(sorted(MOE_COEFFICIENT))}")  # fmt: skip


def apply_moe_aux_loss(config: Any, coefficient: float | None) -> None:
    """Return the router logits (so the model computes its load-balancing loss) weighed by `coefficient`."""
    if coefficient is None:
        return
    problem = moe_problem(config)
    if problem:
        raise ValueError(f"moe_aux_loss_coef: {problem}")
    config.output_router_logits = True
    setattr(config, MOE_COEFFICIENT[config.model_type], coefficient)


def config_knob_problems(cfg: Any, config: Any, context: int | None) -> list[tuple[str, str]]:
    """(key, message) for the knobs this model's config cannot take at training length `context` (None: inference);
    the driver runs it on the model's config."""
    problems = []
    if cfg.rope_scaling and (problem := rope_problem(config, cfg.rope_scaling, context)):
        problems.append(("rope_scaling", f"given {cfg.rope_scaling!r}: {problem}"))
    if cfg.moe_aux_loss_coef is not None and context is not None and (problem := moe_problem(config)):
        problems.append(("moe_aux_loss_coef", f"given {cfg.moe_aux_loss_coef}: {problem}"))
    if context is None:  # what follows changes training only
        return problems
    from .shift_attn import SHIFT_ATTN_MODEL_TYPES, supports_shift_attn

    if cfg.shift_attn and not supports_shift_attn(config):
        problems.append(("shift_attn", f"S²-Attn is built for model types {', '.join(sorted(SHIFT_ATTN_MODEL_TYPES))}"
                                       f" (Llama's attention layout); this model is {config.model_type!r}"))  # fmt: skip
    if cfg.use_llama_pro:
        problems += _llama_pro_problems(cfg, config)
    return problems


def _llama_pro_problems(cfg: Any, config: Any) -> list[tuple[str, str]]:
    from orchestrator.llama_pro import llama_pro_trainable_layers, read_llama_pro_info

    layers, k = config.num_hidden_layers, cfg.freeze_trainable_layers
    try:
        llama_pro_trainable_layers(layers, k)
    except ValueError as error:
        return [("freeze_trainable_layers", f"use_llama_pro: {error}")]
    made = read_llama_pro_info(cfg.model_name_or_path)
    if made and made.get("num_expand") != k:
        return [("freeze_trainable_layers", f"given {k}; the model was expanded by `loom llama-pro` with "
                                            f"{made['num_expand']} new blocks: set freeze_trainable_layers: "
                                            f"{made['num_expand']} to train exactly those")]  # fmt: skip
    return []


def configure(config: Any, cfg: Any, context: int | None, router_loss: bool) -> list[str]:
    """Apply the knobs to a loaded config: RoPE sized for `context` (the training length; None for inference, which
    doubles it), and the router loss for a model that trains. Returns what changed, in words."""
    notes = [apply_rope_scaling(config, cfg.rope_scaling, context)]
    if router_loss:
        apply_moe_aux_loss(config, cfg.moe_aux_loss_coef)
    return [note for note in notes if note]
