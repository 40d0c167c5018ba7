"""The driver side of the inference commands: check what is asked, then open the engine once.

Every problem (config keys, the model folder, the backend on this machine) is reported together before any weight
loads, as for training.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.console import quiet_process
from orchestrator.errors import ConfigError, Problem

from .backends import load_engine
from .engine import Conversation, Engine, Sampling
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

    problems = (export_problems(cfg) if for_export else backend_problems(cfg)) + model_problems(cfg, training=False)
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    quiet_process()
    return load_engine(cfg, source, for_export)


def run_predict(cfg: Any, model_dir: str | None = None, source_name: str = "config", address: str | None = None
                ) -> dict[str, Any]:  # fmt: skip
    """`loom predict`: every check first (stage, datasets, model, backend), then generation on the cluster."""
    from orchestrator.launch import connect
    from orchestrator.plan import with_absolute_paths
    from orchestrator.preflight import model_problems

    from .predict import predict, predict_problems

    cfg = with_absolute_paths(cfg)
    problems = predict_problems(cfg) + backend_problems(cfg) + model_problems(cfg, training=False)
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    connect(address)
    _wait_for_room(cfg)
    return predict(cfg, source, source_name)


def _wait_for_room(cfg: Any) -> None:
    """The model actors' bundles can be held now (a busy cluster is refused after ray_placement_wait_s, as for
    training, instead of a map that waits for actors without end)."""
    from orchestrator.launch import check_free
    from orchestrator.plan import make_plan

    check_free(make_plan(cfg), cfg.ray_placement_wait_s)


def export(cfg: Any, model_dir: str | None = None, source_name: str = "config") -> tuple[ModelSource, str]:
    from .export import export_model

    engine = open_engine(cfg, model_dir, source_name, for_export=True)
    return engine.source, export_model(cfg, engine)


def answer(cfg: Any, model_dir: str | None, prompt: str) -> str:
    """One reply to one user message (loom generate, the quickstart's sample)."""
    engine = open_engine(cfg, model_dir)
    return engine.chat(Conversation([{"role": "user", "content": prompt}]), Sampling.from_config(cfg))[0].text


def run_serve(cfg: Any, model_dir: str | None, source_name: str, address: str | None, scale: Any,
              detach: bool = False) -> str:  # fmt: skip
    """`loom serve`: every check first (model, backend, the replicas' placement), then the app on Ray Serve.
    Returns the URL; the app stays up until `serve_until_stopped` ends (or, detached, until `loom serve --stop`)."""
    from dataclasses import replace

    from orchestrator.launch import check_free, cluster_nodes, connect
    from orchestrator.plan import make_plan, placement_problems
    from orchestrator.preflight import model_problems

    from .api import ApiSettings
    from .serve import deploy

    settings = ApiSettings.from_env()
    problems = backend_problems(cfg) + model_problems(cfg, training=False)
    if detach and not (address or os.environ.get("RAY_ADDRESS")):
        problems.append(Problem("--detach", "needs a cluster (--address or RAY_ADDRESS): an embedded Ray stops "
                                            "with this command"))  # fmt: skip
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    connect(address)
    bundles = replace(make_plan(cfg), num_workers=scale.min_replicas, min_workers=0)
    missing = placement_problems(bundles, cluster_nodes())
    if missing:
        raise ConfigError([Problem("resources_per_worker", f"{m} (one bundle per replica)") for m in missing],
                          source=source_name)  # fmt: skip
    check_free(bundles, cfg.ray_placement_wait_s)  # Serve would wait for replicas without end
    return deploy(cfg, source, settings, scale)


def run_eval(cfg: Any, model_dir: str | None = None, source_name: str = "config", address: str | None = None
             ) -> dict[str, Any]:  # fmt: skip
    """`loom eval`: the task, its files, save_dir and the model checked first; then the questions on the cluster.
    Scoring reads logits, so it always runs on transformers (infer_backend does not apply)."""
    from orchestrator.launch import connect
    from orchestrator.plan import with_absolute_paths
    from orchestrator.preflight import model_problems

    from .evaluate import eval_problems, evaluate

    cfg = with_absolute_paths(cfg)
    subjects, problems = eval_problems(cfg)
    problems += model_problems(cfg, training=False)
    if problems:
        raise ConfigError(problems, source=source_name)
    source = resolve_source(cfg, model_dir)
    connect(address)
    _wait_for_room(cfg)
    return evaluate(cfg, source, subjects)
