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
from .data.registry import DatasetSpec, resolve_datasets
from .errors import ConfigError, PlanError, Problem
from .paths import TRANSFORMERS_STATE, checkpoint_kind, is_uri
from .plan import RUN_MARKER, RunPlan
from .storage import storage_filesystem
from .values import split_csv


def data_problems(cfg: Any) -> tuple[list[DatasetSpec], list[Problem]]:
    return resolve_datasets(cfg.dataset_names(), cfg.dataset_dir, stage=cfg.stage, seed=cfg.seed)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def model_problems(cfg: Any, training: bool = True) -> list[Problem]:
    """A local model folder, checked in the order a worker loads it: its config, its weights, its tokenizer (and
    the template's tokens), then the module names in the config against the model built on the meta device. The
    first of config or weights that fails is the one problem reported: what follows depends on it."""
    folder = cfg.model_name_or_path
    if not folder or not os.path.isdir(folder):
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.model import module_name_problems
    from workers.model_knobs import config_knob_problems

    from .environment import remote_code_imports

    remote_code_imports(cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        return [Problem("model_name_or_path", f"cannot read the model in {folder!r}: {_first_line(error)}")]
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(folder)):
        return [Problem("model_name_or_path", f"{folder!r} holds a model config but no weights (*.safetensors or "
                                              "*.bin files)")]  # fmt: skip
    problems = tokenizer_problems(cfg)
    found = module_name_problems(cfg, model) + config_knob_problems(cfg, config, cfg.cutoff_len if training else None)
    return problems + [Problem(key, message) for key, message in found]


def tokenizer_problems(cfg: Any) -> list[Problem]:
    from .data.tokenizer import TokenizerSpec, load_tokenizer

    try:
        load_tokenizer(TokenizerSpec.from_config(cfg))
    except (OSError, ValueError) as error:
        if "template" in str(error):
            return [Problem("template", str(error))]
        return [Problem("model_name_or_path", f"cannot load the tokenizer in {cfg.model_name_or_path!r}: "
                                              f"{_first_line(error)}")]  # fmt: skip
    return []


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@dataclass(frozen=True)
class DataSpecs:
    train: list[DatasetSpec]
    eval: list[DatasetSpec]


def file_problems(cfg: Any) -> tuple[DataSpecs, list[Problem]]:
    """The datasets, evaluation datasets, model folder, tokenizer and template, and module names, checked."""
    specs, problems = data_problems(cfg)
    eval_specs: list[DatasetSpec] = []
    if cfg.eval_dataset:
        eval_specs, eval_problems = resolve_datasets(
            split_csv(cfg.eval_dataset), cfg.dataset_dir, key="eval_dataset", stage=cfg.stage, seed=cfg.seed
        )
        problems += eval_problems
    return DataSpecs(specs, eval_specs), problems + model_problems(cfg)


def preflight_data(cfg: Any, source: str) -> DataSpecs:
    """Training and evaluation dataset specs when everything checks out; otherwise one ConfigError with every
    problem (datasets, evaluation datasets, tokenizer and template, module names)."""
    specs, problems = file_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return specs


# The keys the file checks read: when one of them is wrong, its default would be checked instead, so the file checks
# wait for the next round.
FILE_CHECK_KEYS = frozenset({"stage", "dataset", "dataset_dir", "eval_dataset", "model_name_or_path", "template",
                             "trust_remote_code", "finetuning_type", "lora_target", "seed"})  # fmt: skip


def checked_config(path: str | None, overrides: list[str] | None = None, purpose: str = "train") -> Any:
    """The config, validated; when it has problems, the file checks run too (on the keys that were valid) so that
    config, dataset and model problems are reported in one message."""
    from .config import load_config
    from .plan import with_absolute_paths

    try:
        return load_config(path, overrides, purpose=purpose)
    except ConfigError as error:
        if error.partial is None or FILE_CHECK_KEYS & set(error.keys):
            raise
        fields = type(error.partial).model_fields
        defaults = {key: fields[key].default for key in error.keys if key in fields}  # the wrong values left out
        _, more = file_problems(with_absolute_paths(error.partial.model_copy(update=defaults)))
        reported = set(error.keys)
        raise ConfigError(error.problems + [p for p in more if p.key not in reported], source=error.source) from None


def preflight(cfg: Any, source: str) -> list[DatasetSpec]:
    """Training dataset specs when everything checks out; otherwise one ConfigError with every problem."""
    return preflight_data(cfg, source).train


def read_marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_MARKER)
    if is_uri(output_dir) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class RunStart:
    """How a run starts, decided at the driver's checks without touching anything."""

    describe: str  # in words, for the user
    clears_earlier: bool = False  # overwrite_output_dir: remove the earlier run, once the data is prepared
    resume_step: int = 0  # the committed checkpoint's step a resumed run continues after


def decide_run_start(cfg: Any, plan: RunPlan) -> RunStart:
    """Fresh, resume, overwrite or refuse, from the run directory and output_dir. Reads only: an overwrite removes
    the earlier run later (`clear_earlier_run`), so a run that stops at a later check has removed nothing."""
    marker = read_marker(plan.output_dir)
    if cfg.overwrite_output_dir:
        if marker or storage.exists(*storage.resolve(plan.run_dir, storage_filesystem(cfg))):
            return _explicit_start(cfg, True) or RunStart(
                "overwrite: the earlier run with this name is removed; training starts from step 0", True
            )
        return _explicit_start(cfg) or RunStart("fresh (overwrite_output_dir: there was no earlier run to remove)")
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
    latest = committed_checkpoint(plan.run_dir, storage_filesystem(cfg))
    if latest:
        unused = "; resume_from_checkpoint is not used: the run has its own" if cfg.resume_from_checkpoint else ""
        return RunStart(f"resume from {latest[0]} (step {latest[1]}){unused}", resume_step=latest[1])
    return _explicit_start(cfg) or RunStart(
        "fresh (an earlier attempt left no committed checkpoint)" if marker else "fresh"
    )


def _explicit_start(cfg: Any, clears_earlier: bool = False) -> RunStart | None:
    """resume_from_checkpoint, for a run with no checkpoint of its own: a Loom checkpoint is resumed whole (Ray Train
    hands it to the workers); a transformers one gives the starting weights."""
    folder = cfg.resume_from_checkpoint
    if not folder:
        return None
    if checkpoint_kind(folder) == "loom":
        step = int(read_state_step(folder))
        return RunStart(f"resume from {folder} (step {step}, resume_from_checkpoint)", clears_earlier, step)
    return RunStart(f"fresh, from the weights of {folder} (a transformers checkpoint: the optimizer, schedule and "
                    "data start afresh)", clears_earlier)  # fmt: skip


def read_state_step(folder: str) -> int:
    with open(os.path.join(folder, TRANSFORMERS_STATE), encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


def clear_earlier_run(cfg: Any, plan: RunPlan) -> None:
    """The overwrite itself: the run directory, and output_dir when a Loom run wrote it (it holds our marker)."""
    filesystem, root = storage.resolve(plan.run_dir, storage_filesystem(cfg))
    if storage.exists(filesystem, root):
        filesystem.delete_dir(root)
    if read_marker(plan.output_dir) and os.path.isdir(plan.output_dir):
        shutil.rmtree(plan.output_dir)  # only a folder Loom wrote is deleted whole


def latest_committed_checkpoint(run_dir: str, filesystem: Any = None) -> str | None:
    """The checkpoint Ray Train will hand the workers, in words: `checkpoint-000006 (step 6)`."""
    latest = committed_checkpoint(run_dir, filesystem)
    return f"{latest[0]} (step {latest[1]})" if latest else None


def committed_checkpoint(run_dir: str, filesystem: Any = None) -> tuple[str, int] | None:
    """The checkpoint Ray Train will hand the workers (the latest one its run snapshot lists as committed): its
    folder name and step."""
    filesystem, root = storage.resolve(run_dir, filesystem)
    snapshot = storage.read_json(filesystem, f"{root}/checkpoint_manager_snapshot.json")
    try:
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        step = storage.read_json(filesystem, f"{root}/{name}/trainer_state.json")["global_step"]
    except (KeyError, TypeError):
        return None  # no snapshot yet, or an unreadable one (Ray's to report); the run still starts
    return name, int(step)


def _non_empty(folder: str) -> bool:
    return not is_uri(folder) and os.path.isdir(folder) and bool(os.listdir(folder))
