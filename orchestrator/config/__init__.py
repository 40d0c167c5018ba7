"""Typed, validated config: every LLaMA-Factory parameter plus Loom's extensions."""

from .loader import load_config, validate_config
from .schema import LoomConfig

__all__ = ["LoomConfig", "load_config", "validate_config"]
