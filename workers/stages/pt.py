"""Pre-training: every token of the packed text blocks is a label (prepared by the pre-training processor)."""

from .causal_lm import CausalLMStage as Stage  # noqa: F401
