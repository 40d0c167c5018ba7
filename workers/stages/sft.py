"""Supervised fine-tuning: labels are the response tokens; prompts are masked by the supervised processor."""

from .causal_lm import CausalLMStage as Stage  # noqa: F401
