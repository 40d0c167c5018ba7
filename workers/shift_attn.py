"""Shifted sparse attention (S²-Attn, LongLoRA: Chen et al., 2023) for Llama-family models, in training only.

While a module trains, the sequence of length L is cut into groups of G = int(L * 1/4) tokens and every query attends
only to keys of its own group (causally, and never to padding). The first half of the heads uses the groups
[0, G), [G, 2G), ...; the second half uses groups shifted by G/2: [0, G/2), [G/2, 3G/2), ..., [L - G/2, L) (for an
odd G the shift is ceil(G/2)), so neighbouring groups exchange information through those heads. In eval mode (evaluation, generation) the function is
transformers' plain sdpa attention, so the fine-tuned model runs with full attention.

Choices where the reference implementations leave room:
- The shifted half's groups do not wrap around. LongLoRA's torch.roll version puts the first G/2 tokens in one group
  with the last G/2 tokens, so those early tokens see the end of the sequence (a leak of future tokens the authors
  acknowledge; their later flash-attn version partitions without wrapping). Here the tokens are still rolled into
  groups of G for batching, but a mask keeps the two half groups apart, so nothing is leaked.
- L need not be a multiple of G: the sequence is padded inside the function to the next multiple (padded keys are
  masked, padded queries dropped). LongLoRA and LLaMA-Factory raise/assert instead, which makes supervised
  fine-tuning with dynamic padding fail on most batches; LongLoRA's authors suggest padding as the remedy.
- When G < 2 (sequences shorter than 8 tokens) there is nothing to shift and plain causal attention is used.
- The mask the model built (causal, padding, packed sequences, sliding window) is honoured as is: each group's block
  is cut out of it, then restricted to the group.

Grouped-query attention: keys and values are repeated to the query heads first, so any head split works.
"""

from __future__ import annotations

from typing import Any

import torch

ATTN_NAME = "loom_shift_sdpa"
GROUP_SIZE_RATIO = 0.25  # LongLoRA's group_size_ratio: four groups per sequence

# Decoder families whose attention module calls transformers' AttentionInterface with (query, key, value, mask,
# dropout, scaling) and nothing the grouped path would drop (no softcap, no attention sinks, no per-head bias).
# LLaMA-Factory lists only "llama" (SUPPORTED_CLASS_FOR_S2ATTN); the others here share Llama's attention layout.
SHIFT_ATTN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports_shift_attn(model_type_or_config: Any) -> bool:
    """Whether S²-Attn can be used with this model type (a string, a config object or a config dict)."""
    if isinstance(model_type_or_config, str):
        model_type = model_type_or_config
    elif isinstance(model_type_or_config, dict):
        model_type = model_type_or_config.get("model_type")
    else:
        model_type = getattr(model_type_or_config, "model_type", None)
    return model_type in SHIFT_ATTN_MODEL_TYPES


def group_size_for(q_len: int, ratio: float = GROUP_SIZE_RATIO) -> int:
    """The group size for a sequence of q_len tokens; 0 means no grouping (plain attention)."""
    size = int(q_len * ratio)
    return size if size >= 2 else 0


def _allowed_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """A (batch, L, L) boolean 'may attend' view of transformers' 4D mask (boolean or additive); None: causal."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0, :, -length:] if attention_mask.ndim == 4 else attention_mask[..., -length:]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, length, length)


def _grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    group: int,
    shift: int,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of (b, h, L, d) heads within groups of `group` tokens; with a shift s > 0 the first group is the
    partial [0, s) and the others start at s, s + group, ... (s = ceil(group / 2) for the shifted heads)."""
    batch, heads, length, dim = query.shape
    padded = -(-length // group) * group
    groups = padded // group
    device = query.device
    if padded != length:
        extra = padded - length
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
    positions = torch.arange(padded, device=device)
    order = (positions + shift) % padded  # rolled order: token order[i] sits at slot i
    segment = (positions + group - shift) // group  # the group a token belongs to (no wrap-around)
    index = order.view(groups, group)  # (groups, G) token positions
    same = segment[index][:, :, None] == segment[index][:, None, :]
    real = index < length
    if allowed is None:  # causal on the original positions; no (L, L) matrix is ever built
        blocks = index[:, :, None] >= index[:, None, :]
    else:
        safe = index.clamp(max=length - 1)
        blocks = allowed[:, safe[:, :, None], safe[:, None, :]]  # (b, groups, G, G) cut out of the model's mask
    blocks = blocks & same & real[:, None, :]
    # padded queries attend to themselves only, so no row is empty (their outputs are dropped)
    blocks = blocks | ((~real)[:, :, None] & torch.eye(group, dtype=torch.bool, device=device))
    blocks = blocks.expand(batch, groups, group, group)

    def split(t: torch.Tensor) -> torch.Tensor:  # (b, h, Lp, d) -> (b * groups, h, G, d)
        t = t[:, :, order] if shift else t
        return t.reshape(batch, heads, groups, group, dim).transpose(1, 2).reshape(batch * groups, heads, group, dim)

    out = torch.nn.functional.scaled_dot_product_attention(
        split(query),
        split(key),
        split(value),
        attn_mask=blocks.reshape(batch * groups, 1, group, group),
        dropout_p=dropout,
        scale=scaling,
    )
    out = out.reshape(batch, groups, heads, group, dim).transpose(1, 2).reshape(batch, heads, padded, dim)
    if shift:
        out = out[:, :, torch.argsort(order)]
    return out[:, :, :length]


def shift_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: S²-Attn while `module.training`, transformers' sdpa otherwise.

    query (b, H, L, d), key/value (b, KV, L, d); returns (b, L, H, d) and no attention weights, like sdpa."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    length = query.shape[2]
    group = group_size_for(length)
    if not module.training or not group or key.shape[2] != length or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    repeats = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    batch, heads = query.shape[:2]
    allowed = _allowed_from_mask(attention_mask, batch, length)
    half = heads // 2
    shifted = _grouped_attention(
        query[:, half:], key[:, half:], value[:, half:], allowed, group, group - group // 2, dropout, scaling
    )
    if half:  # a single head is shifted only
        plain = _grouped_attention(query[:, :half], key[:, :half], value[:, :half], allowed, group, 0, dropout, scaling)
        shifted = torch.cat([plain, shifted], dim=1)
    return shifted.transpose(1, 2).contiguous(), None


def register_shift_attn() -> str:
    """Register the attention function and its mask format (sdpa's) with transformers; idempotent. Returns the name.

    Each process (every Ray worker) must call this before a model uses the name; enable_shift_attn does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, shift_sdpa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def enable_shift_attn(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded causal LM (or a PEFT model around one) to S²-Attn. Raises ValueError for unsupported models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if not supports_shift_attn(config):
        model_type = getattr(config, "model_type", None)
        raise ValueError(
            f"shift_attn (S²-Attn) supports the model types {', '.join(sorted(SHIFT_ATTN_MODEL_TYPES))}; "
            f"this model is {model_type!r}"
        )
    register_shift_attn()
    base.set_attn_implementation(ATTN_NAME)
    if base.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"{type(base).__name__} cannot switch its attention implementation to S²-Attn")
    return model


def shift_attn_enabled(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTN_NAME
