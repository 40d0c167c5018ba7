"""Stage pipelines: `loom pipeline FILE` runs a list of stages (e.g. sft -> rm -> ppo) as one job.

Each stage is a normal Loom run named after the stage, under `<storage_path>/<pipeline name>/`, whose model goes to
`<storage_path>/<pipeline name>/<stage>/output`. A later stage takes an earlier one's output by reference,
`{from: sft}`, for the keys that name models (adapter_name_or_path, reward_model, ref_model, ...). The whole pipeline
is validated before its first stage starts: every stage's config, datasets, template and module names, with the
outputs of earlier stages taken as given. Rerunning the same command skips finished stages and resumes the
interrupted one from its latest checkpoint.

Reading and validating a pipeline is pure (no Ray); `run_pipeline` hands each stage to `launch.train`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .config.checks import promised_outputs
from .config.loader import dedupe, read_config_file, validate_config
from .config.schema import LoomConfig
from .errors import ConfigError, Problem
from .paths import is_safe_name, resolve_path

# Keys whose value may be `{from: <earlier stage>}`: that stage's output folder (its model or adapter).
REFERENCE_KEYS = ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "reward_model",
                  "reward_model_adapters")  # fmt: skip
# Set by the pipeline for every stage: its layout under <storage_path>/<name>/, and never overwriting (reruns resume).
PIPELINE_KEYS = ("ray_storage_path", "ray_run_name", "run_name", "output_dir", "overwrite_output_dir")


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    config: str | dict[str, Any]  # a config file (relative to the pipeline file) or an inline mapping
    overrides: dict[str, Any] = {}  # keys set on top of the config; model keys may be {from: <stage>}


class PipelineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # default: the pipeline file's name
    storage_path: str | None = None  # default: the first stage's ray_storage_path
    stages: list[StageEntry]


@dataclass(frozen=True)
class PipelineStage:
    name: str
    config: LoomConfig  # references resolved to the earlier stages' output folders
    references: dict[str, str]  # key -> the stage it comes from

    @property
    def output_dir(self) -> str:
        return self.config.output_dir


@dataclass(frozen=True)
class Pipeline:
    name: str
    root: str  # <storage_path>/<name>: each stage's run dir and output are inside
    stages: tuple[PipelineStage, ...]

    def describe(self) -> str:
        lines = [f"pipeline      {self.name} ({len(self.stages)} stages) in {self.root}"]
        for stage in self.stages:
            taken = ", ".join(f"{key} <- {source}" for key, source in stage.references.items())
            lines.append(f"  {stage.name:<11} stage {stage.config.stage}, {stage.config.finetuning_type}"
                         + (f"; {taken}" if taken else ""))  # fmt: skip
        return "\n".join(lines)


def _reference(value: Any) -> str | None:
    if isinstance(value, dict) and set(value) == {"from"} and isinstance(value["from"], str):
        return value["from"]
    return None


def _stage_raw(entry: StageEntry, where: str, folder: str, problems: list[Problem]) -> dict[str, Any] | None:
    if isinstance(entry.config, dict):
        return dict(entry.config)
    path = resolve_path(entry.config, folder)
    try:
        return read_config_file(path)
    except ConfigError as error:
        problems += [Problem(f"{where}.config", f"{path}: {p.message}") for p in error.problems]
    except OSError as error:
        problems.append(Problem(f"{where}.config", f"cannot read {path}: {error}"))
    return None


def _references(entry: StageEntry, where: str, earlier: dict[str, PipelineStage], seen: set[str],
                problems: list[Problem]) -> dict[str, str]:  # fmt: skip
    """key -> source stage for every `{from: ...}`; problems for malformed, unknown or later sources (an earlier
    stage with problems of its own is left out quietly: its problems are reported)."""
    found = {}
    for key, value in entry.overrides.items():
        source, at = _reference(value), f"{where}.overrides.{key}"
        if source is None:
            if isinstance(value, dict) and "from" in value:
                problems.append(Problem(at, f"given {value!r}; a reference is {{from: <stage>}}"))
        elif key not in REFERENCE_KEYS:
            problems.append(Problem(at, f"cannot take a stage's output; only {', '.join(REFERENCE_KEYS)} can"))
        elif source in seen - {entry.name} and source not in earlier:
            continue
        elif source not in earlier:
            problems.append(Problem(at, f"{{from: {source}}} names no earlier stage; earlier: "
                                        f"{', '.join(earlier) or 'none'}"))  # fmt: skip
        else:
            found[key] = source
    return found


def _wants_adapter(key: str, cfg: LoomConfig) -> bool:
    """Whether `key` of the consuming config takes a LoRA adapter (else a whole model folder)."""
    if key == "reward_model":
        return cfg.reward_model_type == "lora"
    return key in ("adapter_name_or_path", "ref_model_adapters", "reward_model_adapters")


def fit_problems(where: str, key: str, cfg: LoomConfig, source: PipelineStage) -> list[Problem]:
    """The source stage writes what the key takes: a reward model for the reward keys, a policy otherwise; an
    adapter where the key takes one, a whole model where it does not."""
    made = source.config
    wants_reward = key.startswith("reward_model")
    if wants_reward != (made.stage == "rm"):
        wanted = "a reward model (stage rm)" if wants_reward else "a policy, not a reward model"
        return [Problem(where, f"takes {wanted}, but stage {source.name!r} trains stage {made.stage!r}")]
    if _wants_adapter(key, cfg) != (made.finetuning_type == "lora"):
        wanted = "a LoRA adapter" if _wants_adapter(key, cfg) else "a whole model folder"
        return [Problem(where, f"takes {wanted}, but stage {source.name!r} trains with {made.finetuning_type!r}")]
    return []


def load_pipeline(path: str, base_dir: str | None = None) -> Pipeline:
    """The validated pipeline, or one ConfigError with every problem of every stage."""
    base_dir = base_dir or os.getcwd()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        args = PipelineArgs.model_validate(read_config_file(path))
    except ValidationError as error:
        problems = [Problem(".".join(str(p) for p in e["loc"]) or "pipeline", e["msg"]) for e in error.errors()]
        raise ConfigError(problems, source=path) from None
    problems: list[Problem] = []
    name = args.name or os.path.splitext(os.path.basename(path))[0]
    if not is_safe_name(name):
        problems.append(Problem("name", f"given {name!r}; a pipeline name is one folder name (letters, digits, -_.)"))
    raws = [_stage_raw(entry, f"stages[{i}]", folder, problems) for i, entry in enumerate(args.stages)]
    storage = args.storage_path or next((r.get("ray_storage_path") for r in raws if r), None) or "saves"
    root = f"{resolve_path(storage, base_dir)}/{name}"
    stages: dict[str, PipelineStage] = {}
    seen: set[str] = set()
    for index, (entry, raw) in enumerate(zip(args.stages, raws, strict=True)):
        where = f"stages[{index}] ({entry.name})"
        duplicate = entry.name in seen
        seen.add(entry.name)
        if not is_safe_name(entry.name) or duplicate:
            problems.append(Problem(f"stages[{index}].name", f"given {entry.name!r}; stage names are unique folder "
                                                             "names (letters, digits, -_.)"))  # fmt: skip
            continue
        owned = sorted(set(entry.overrides) & set(PIPELINE_KEYS))
        if owned:
            problems.append(Problem(f"{where}.overrides", f"{', '.join(owned)} are set by the pipeline: each stage "
                                                          f"runs as {root}/{entry.name}"))  # fmt: skip
        references = _references(entry, where, stages, seen, problems)
        if raw is None or len(references) < sum(_reference(v) is not None for v in entry.overrides.values()):
            continue
        raw = {**raw, **entry.overrides, **{key: stages[source].output_dir for key, source in references.items()}}
        raw.update(ray_storage_path=root, ray_run_name=entry.name, output_dir=f"{root}/{entry.name}/output",
                   overwrite_output_dir=False, run_name=None)  # fmt: skip
        try:
            with promised_outputs(stages[source].output_dir for source in references.values()):
                cfg = validate_config(raw, source=where)
        except ConfigError as error:
            problems += [Problem(f"{where}.{p.key}", p.message) for p in error.problems]
            continue
        for key, source in references.items():
            problems += fit_problems(f"{where}.overrides.{key}", key, cfg, stages[source])
        stages[entry.name] = PipelineStage(entry.name, cfg, references)
    if not args.stages:
        problems.append(Problem("stages", "a pipeline needs at least one stage"))
    if problems:
        raise ConfigError(dedupe(problems), source=path)
    return Pipeline(name, root, tuple(stages.values()))


def check_pipeline(pipeline: Pipeline, source: str) -> dict[str, Any]:
    """Every stage's datasets, template and module names (preflight), reported together: stage name -> specs."""
    from .plan import with_absolute_paths
    from .preflight import preflight_data

    specs, problems = {}, []
    for index, stage in enumerate(pipeline.stages):
        try:
            specs[stage.name] = preflight_data(with_absolute_paths(stage.config), source)
        except ConfigError as error:
            problems += [Problem(f"stages[{index}] ({stage.name}).{p.key}", p.message) for p in error.problems]
    if problems:
        raise ConfigError(problems, source=source)
    return specs


def run_pipeline(pipeline: Pipeline, source: str, address: str | None = None) -> Iterator[tuple[str, PipelineStage,
                                                                                                   Any]]:  # fmt: skip
    """Check every stage (files, then on the cluster: placement and dataset columns), then run them in order:
    yields ("skipped", stage, None) for a stage whose output is already finished, else ("trained", stage,
    outcome) once it trained (or resumed and finished)."""
    from .launch import check_columns, check_placement, connect, train
    from .plan import make_plan, with_absolute_paths
    from .preflight import read_marker

    specs = check_pipeline(pipeline, source)
    connect(address)
    for stage in pipeline.stages:
        cfg = with_absolute_paths(stage.config)
        check_placement(make_plan(cfg))
        check_columns(cfg, specs[stage.name].train + specs[stage.name].eval)
    for stage in pipeline.stages:
        marker = read_marker(stage.output_dir)
        if marker and marker.get("status") == "finished":
            yield "skipped", stage, None
            continue
        yield "trained", stage, train(stage.config, source=f"{source} ({stage.name})", address=address)
