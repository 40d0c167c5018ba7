"""The driver side of the inference commands: check what is asked, then open the engine once.

Every problem (config keys, the model folder, the backend on this machine) is reported together before any weight
loads, as for training.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.errors import ConfigError

from .backends import load_engine
from .engine import Conversation, Engine, Sampling, quiet_transformers
from .source import ModelSource, default_model_dir, model_source
from .vllm_engine import backend_problems


def resolve_source(cfg: Any, model_dir: str | None) -> ModelSource:
    """What to load: `model_dir` when given; else a training config's finished output_dir; else the config's model
    and adapters."""
    if model_dir is None:
        from orchestrator.plan import make_plan

        model_dir = default_model_dir(cfg, make_plan(cfg).output_dir)
    return model_source(cfg, os.path.abspath(model_dir) if model_dir else None)


def open_engine(cfg: Any, model_dir: str | None = None, source_name: str = "config", for_export: bool = False
                ) -> Engine:  # fmt: skip
    from orchestrator.preflight import model_problems

    from .export import export_problems

    problems = (export_problems(cfg) if for_export else backend_problems(cfg)) + model_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    quiet_transformers()
    return load_engine(cfg, source, for_export)


def run_predict(cfg: Any, model_dir: str | None = None, source_name: str = "config", address: str | None = None
                ) -> dict[str, Any]:  # fmt: skip
    """`loom predict`: every check first (stage, datasets, model, backend), then generation on the cluster."""
    from orchestrator.launch import connect
    from orchestrator.plan import with_absolute_paths
    from orchestrator.preflight import model_problems

    from .predict import predict, predict_problems

    cfg = with_absolute_paths(cfg)
    problems = predict_problems(cfg) + backend_problems(cfg) + model_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    connect(address)
    return predict(cfg, source, source_name)


def export(cfg: Any, model_dir: str | None = None, source_name: str = "config") -> tuple[ModelSource, str]:
    from .export import export_model

    engine = open_engine(cfg, model_dir, source_name, for_export=True)
    return engine.source, export_model(cfg, engine)


def answer(cfg: Any, model_dir: str | None, prompt: str) -> str:
    """One reply to one user message (loom generate, the quickstart's sample)."""
    engine = open_engine(cfg, model_dir)
    return engine.chat(Conversation([{"role": "user", "content": prompt}]), Sampling.from_config(cfg))[0].text
