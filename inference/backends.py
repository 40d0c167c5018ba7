"""The engine `infer_backend` names: the one place that knows every backend."""

from __future__ import annotations

from typing import Any

from .engine import Engine, HuggingFaceEngine
from .source import ModelSource


def load_engine(cfg: Any, source: ModelSource, for_export: bool = False) -> Engine:
    """The engine `infer_backend` names (vllm is checked at the driver: it needs CUDA and the vllm package). An
    export always merges with transformers, in the weights' own dtype."""
    if for_export:
        return HuggingFaceEngine(cfg, source, stored_dtype=True)
    if cfg.infer_backend == "vllm":
        from .vllm_engine import VllmEngine  # imports vllm: only where it is asked for

        return VllmEngine(cfg, source)
    return HuggingFaceEngine(cfg, source)
