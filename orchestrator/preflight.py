"""Driver-side checks that need files but not Ray: datasets, template tokens, module names, the run directory.

Everything found here is reported together with the config problems, before any worker starts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

from . import storage
from .config.values import split_csv
from .data.registry import DatasetSpec, resolve_datasets
from .errors import ConfigError, PlanError, Problem
from .paths import is_uri
from .plan import RUN_MARKER, RunPlan
from .storage import storage_filesystem


def data_problems(cfg: Any) -> tuple[list[DatasetSpec], list[Problem]]:
    return resolve_datasets(cfg.dataset_names(), cfg.dataset_dir, stage=cfg.stage, seed=cfg.seed)


def model_problems(cfg: Any) -> list[Problem]:
    """Module names in the config checked against the model's own structure, built on the meta device."""
    if not cfg.model_name_or_path or not os.path.isdir(cfg.model_name_or_path):
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.model import module_name_problems

    try:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        return [Problem("model_name_or_path", f"cannot read the model in {cfg.model_name_or_path!r}: {error}")]
    return [Problem(key, message) for key, message in module_name_problems(cfg, model)]


def tokenizer_problems(cfg: Any) -> list[Problem]:
    if not cfg.model_name_or_path or not os.path.isdir(cfg.model_name_or_path):
        return []
    from .data.tokenizer import TokenizerSpec, load_tokenizer

    try:
        load_tokenizer(TokenizerSpec.from_config(cfg))
    except (OSError, ValueError) as error:
        return [Problem("template" if "template" in str(error) else "model_name_or_path", str(error))]
    return []


@dataclass(frozen=True)
class DataSpecs:
    train: list[DatasetSpec]
    eval: list[DatasetSpec]


def preflight_data(cfg: Any, source: str) -> DataSpecs:
    """Training and evaluation dataset specs when everything checks out; otherwise one ConfigError with every
    problem (datasets, evaluation datasets, tokenizer and template, module names)."""
    specs, problems = data_problems(cfg)
    eval_specs: list[DatasetSpec] = []
    if cfg.eval_dataset:
        eval_specs, eval_problems = resolve_datasets(
            split_csv(cfg.eval_dataset), cfg.dataset_dir, key="eval_dataset", stage=cfg.stage, seed=cfg.seed
        )
        problems += eval_problems
    problems += tokenizer_problems(cfg) + model_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return DataSpecs(specs, eval_specs)


def preflight(cfg: Any, source: str) -> list[DatasetSpec]:
    """Training dataset specs when everything checks out; otherwise one ConfigError with every problem."""
    return preflight_data(cfg, source).train


def read_marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_MARKER)
    if is_uri(output_dir) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def prepare_run_dirs(cfg: Any, plan: RunPlan) -> str:
    """Decide fresh / resume / refuse for the run directory and output_dir. Returns what will happen, in words."""
    marker = read_marker(plan.output_dir)
    if cfg.overwrite_output_dir:
        _remove_run(plan, marker, storage_filesystem(cfg))
        return "overwrite: the earlier run with this name was removed; training starts from step 0"
    if marker and marker.get("status") == "finished":
        raise PlanError(
            f"run {plan.run_name!r} already finished ({plan.output_dir} holds its model, step {marker.get('step')}). "
            "Set overwrite_output_dir: true to train it again from scratch, or choose another ray_run_name."
        )
    if not marker and _non_empty(plan.output_dir):
        raise PlanError(
            f"output_dir {plan.output_dir} is not empty and was not written by a Loom run; "
            "choose another output_dir or set overwrite_output_dir: true."
        )
    if marker and marker.get("run_name") != plan.run_name:
        raise PlanError(
            f"output_dir {plan.output_dir} belongs to run {marker.get('run_name')!r}, not {plan.run_name!r}; "
            "choose another output_dir or set overwrite_output_dir: true."
        )
    latest = latest_committed_checkpoint(plan.run_dir, storage_filesystem(cfg))
    if latest:
        return f"resume from {latest}"
    return "fresh (an earlier attempt left no committed checkpoint)" if marker else "fresh"


def latest_committed_checkpoint(run_dir: str, filesystem: Any = None) -> str | None:
    """The checkpoint Ray Train will hand the workers: the latest one its run snapshot lists as committed."""
    filesystem, root = storage.resolve(run_dir, filesystem)
    snapshot = storage.read_json(filesystem, f"{root}/checkpoint_manager_snapshot.json")
    try:
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        step = storage.read_json(filesystem, f"{root}/{name}/trainer_state.json")["global_step"]
    except (KeyError, TypeError):
        return None  # no snapshot yet, or an unreadable one (Ray's to report); the run still starts
    return f"{name} (step {step})"


def _non_empty(folder: str) -> bool:
    return not is_uri(folder) and os.path.isdir(folder) and bool(os.listdir(folder))


def _remove_run(plan: RunPlan, marker: dict | None, filesystem: Any = None) -> None:
    filesystem, root = storage.resolve(plan.run_dir, filesystem)
    if storage.exists(filesystem, root):
        filesystem.delete_dir(root)
    if marker and os.path.isdir(plan.output_dir):
        shutil.rmtree(plan.output_dir)  # only a folder Loom wrote (it holds our marker) is deleted whole
