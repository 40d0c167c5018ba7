"""Sweep files for `loom tune`: a base config, a search space over its keys, a metric, a search and a scheduler.

Pure: reading and validating a sweep, the per-trial config, and the result table. No Ray import; tune.py turns a
validated Sweep into Ray Tune objects. A sweep is checked as a whole before any trial starts: the base config with
every value the space can produce (each grid/choice value, the low and high end of each range) must be a valid Loom
config, and every report a trial makes must carry the metric, since Ray Tune stops the whole sweep otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config.loader import dedupe, read_config_file, validate_config
from .config.optimizers import OptimizerArgs
from .config.schema import LoomConfig, without_secrets
from .errors import ConfigError, Problem
from .paths import LOCAL_PATH_KEYS, is_safe_name, resolve_path
from .suggest import did_you_mean

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGES = ("uniform", "loguniform", "randint")
# Set per trial by `loom tune`, so they cannot be searched over.
PER_TRIAL_KEYS = {
    "ray_run_name": "each trial's run is named after its trial id",
    "ray_storage_path": "trial runs go under <storage_path>/<name>/runs",
    "output_dir": "each trial writes to <output_dir>/<trial id> (or its run dir)",
    "overwrite_output_dir": "trials never replace a finished run, so an interrupted sweep can resume",
}
# Keys that never change the prepared (tokenized) data. When a sweep searches only these, its trials share one
# preparation done on the driver; any other key (cutoff_len, template, seed, ...) makes each trial prepare its own.
# A key missing here only costs time (per-trial preparation), never correctness.
TRAINING_ONLY_KEYS = frozenset(OptimizerArgs.model_fields) | {
    "finetuning_type", "pure_bf16", "additional_target", "lora_alpha", "lora_dropout", "lora_rank", "lora_target",
    "loraplus_lr_ratio", "loraplus_lr_embedding", "use_rslora", "use_dora", "pissa_init", "pissa_iter",
    "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "optim", "logging_steps",
    "save_steps", "save_total_limit", "eval_steps", "bf16", "fp16", "gradient_checkpointing", "neftune_noise_alpha",
    "ray_num_workers", "resources_per_worker", "placement_strategy", "ray_max_failures", "ray_upload_retries",
    "ray_min_workers", "ray_resize_interval_s", "deepspeed", "fsdp", "fsdp_config",
}  # fmt: skip
METRIC_ALIASES = {"loss": "loss", "train_loss": "loss", "eval_loss": "eval_loss"}
EXHAUSTIVE_PROBES = 64  # check every combination of probe values up to this many; one key at a time beyond
TRIAL_RUNS = "runs"  # <storage_path>/<name>/runs/<trial id>: each trial's Loom run dir


class AshaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    time_attr: Literal["step", "training_iteration"] = Field(
        "step", description="What ASHA counts: optimizer steps (survives a resume) or reports."
    )
    max_t: int | None = Field(None, ge=1, description="The longest a trial runs, in time_attr units.")
    grace_period: int | None = Field(None, ge=1, description="No trial is stopped before this; default: save_steps.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at each rung.")


class SweepArgs(BaseModel):
    """What a sweep file may hold (validated before the search space and the base config)."""

    model_config = ConfigDict(extra="forbid")

    base: str | dict[str, Any]
    search_space: dict[str, Any]
    metric: Literal["loss", "train_loss", "eval_loss"] = "loss"
    mode: Literal["min", "max"] = "min"
    search_alg: Literal["random", "grid"] = "random"
    scheduler: Literal["fifo", "asha"] = "fifo"
    asha: AshaOptions | None = None
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    name: str | None = Field(None, min_length=1)
    storage_path: str | None = None


@dataclass(frozen=True)
class Dimension:
    """One searched key: `values` are the grid/choice values, or (low, high) of a range."""

    key: str
    kind: str
    values: tuple

    def probe_values(self) -> tuple:
        """Values that stand for all the ones this dimension can produce."""
        return self.values

    def describe(self) -> str:
        if self.kind in RANGES:
            return f"{self.key}: {self.kind} [{self.values[0]}, {self.values[1]}]"
        return f"{self.key}: {self.kind} {list(self.values)}"


@dataclass(frozen=True)
class Sweep:
    source: str
    base: dict[str, Any]  # the raw base config (paths as the user wrote them)
    space: tuple[Dimension, ...]
    metric: str  # the name Loom reports: loss or eval_loss
    mode: str
    search_alg: str
    scheduler: str
    asha: dict[str, Any] | None  # complete ASHA arguments (defaults filled in) when scheduler is asha
    num_samples: int
    max_concurrent_trials: int
    name: str
    storage_path: str  # absolute (or a URI)

    @property
    def experiment_dir(self) -> str:
        return f"{self.storage_path}/{self.name}"

    @property
    def runs_dir(self) -> str:
        return f"{self.experiment_dir}/{TRIAL_RUNS}"

    def grid_kinds(self) -> tuple[str, ...]:
        """Kinds that are enumerated rather than sampled: grid, and choice too under search_alg grid."""
        return ("grid", "choice") if self.search_alg == "grid" else ("grid",)

    def shares_data(self) -> bool:
        """Whether every trial trains on the same prepared data (only training-only keys are searched)."""
        return all(d.key in TRAINING_ONLY_KEYS for d in self.space) and not self.base.get("streaming")

    def trial_count(self) -> int:
        """Ray Tune's count: every grid combination, num_samples times (ranges and choices are sampled per trial)."""
        combos = math.prod(len(d.values) for d in self.space if d.kind in self.grid_kinds())
        return combos * self.num_samples

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must share with the interrupted one (Tune cannot change a space mid-experiment)."""
        return {
            "base": without_secrets(self.base),  # a rotated token is the same sweep, and is never written
            "space": [[d.key, d.kind, list(d.values)] for d in self.space],
            "metric": self.metric,
            "mode": self.mode,
            "search_alg": self.search_alg,
            "scheduler": self.scheduler,
            "asha": self.asha,
            "num_samples": self.num_samples,
        }

    def describe(self) -> str:
        lines = [
            f"sweep         {self.name}  ({self.trial_count()} trials, {self.max_concurrent_trials} at a time)",
            f"experiment    {self.experiment_dir}",
            f"objective     {self.mode} {self.metric}   search {self.search_alg}   scheduler {self.scheduler}"
            + (f" {json.dumps(self.asha, sort_keys=True)}" if self.asha else ""),
        ]
        lines += [f"space         {d.describe()}" for d in self.space]
        return "\n".join(lines)


def load_sweep(path: str, overrides: dict[str, Any] | None = None, base_dir: str | None = None) -> Sweep:
    """Read and validate a sweep file; `overrides` (key=value from the command line) apply to the base config."""
    raw = read_config_file(path)
    default_name = os.path.splitext(os.path.basename(path))[0]
    return validate_sweep(raw, source=path, sweep_dir=os.path.dirname(os.path.abspath(path)),
                          default_name=default_name, overrides=overrides, base_dir=base_dir)  # fmt: skip


def validate_sweep(
    raw: dict[str, Any],
    source: str = "sweep",
    sweep_dir: str | None = None,
    default_name: str | None = None,
    overrides: dict[str, Any] | None = None,
    base_dir: str | None = None,
) -> Sweep:
    """A Sweep, or one ConfigError listing every problem of the sweep, its search space and its base config."""
    base_dir = base_dir or os.getcwd()
    problems: list[Problem] = []
    known = {}
    for key, value in raw.items():
        if key in SweepArgs.model_fields:
            known[key] = value
        else:
            problems.append(Problem(str(key), _did_you_mean(f"unknown sweep key (given {value!r})", str(key),
                                                            list(SweepArgs.model_fields), "see README `loom tune`")))  # fmt: skip
    args, bad = _sweep_args(known, problems)
    base, base_source = _read_base(args.base if args else known.get("base"), sweep_dir or base_dir, problems, bad)
    if base is not None and overrides:
        base = {**base, **overrides}
    space = _parse_space(known.get("search_space"), args.search_alg if args else "random", problems, bad)
    if args is None or base is None or space is None:  # the keys that parsed are still checked below
        raise ConfigError(dedupe(problems) or [Problem("sweep", "cannot be read")], source=source)

    configs = _check_probes(base, space, base_source, problems)
    metric = METRIC_ALIASES[args.metric]
    for overrides_, cfg in configs:
        message = report_problem(cfg, metric, args.scheduler)
        if message:
            problems.append(Problem("metric", _with(overrides_, message)))
    asha = _asha_arguments(args, [cfg for _, cfg in configs], problems) if configs else None
    if problems:
        raise ConfigError(dedupe(problems), source=source)
    if args.name and not is_safe_name(args.name):
        raise ConfigError([Problem("name", f"given {args.name!r}; a sweep name is one folder name under storage_path "
                                           "(letters, digits and -_., not starting with a dot)")], source=source)  # fmt: skip
    hashed = "loom-tune-" + _digest({"base": without_secrets(base), "space": known.get("search_space")})
    name = args.name or (default_name if default_name and is_safe_name(default_name) else hashed)
    storage = args.storage_path or base.get("ray_storage_path") or LoomConfig.model_fields["ray_storage_path"].default
    return Sweep(
        source=source,
        base=base,
        space=space,
        metric=metric,
        mode=args.mode,
        search_alg=args.search_alg,
        scheduler=args.scheduler,
        asha=asha,
        num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent_trials,
        name=name,
        storage_path=resolve_path(storage, base_dir),
    )


def _sweep_args(known: dict[str, Any], problems: list[Problem]) -> tuple[SweepArgs | None, set[str]]:
    try:
        return SweepArgs.model_validate(known), set()
    except ValidationError as error:
        bad = set()
        for item in error.errors():
            loc = [str(part) for part in item["loc"]]
            top = loc[0] if loc else "sweep"
            key = ".".join(loc[:2]) if top == "asha" and len(loc) > 1 else top
            if top in bad and top != "asha":
                continue
            bad.add(top)
            given = _lookup(known, loc)
            if item["type"] == "literal_error":
                choices = re.findall(r"'([^']*)'", item["msg"])
                message = _did_you_mean(f"given {given!r}; allowed: {', '.join(choices)}", str(given), choices, "")
            elif item["type"] == "extra_forbidden":
                message = _did_you_mean(f"unknown key (given {given!r})", loc[-1], list(AshaOptions.model_fields), "")
            else:
                message = f"given {given!r}; {item['msg'].lower()}"
            problems.append(Problem(key, message))
    return None, bad


def _lookup(data: Any, loc: list[str]) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def _read_base(base: Any, sweep_dir: str, problems: list[Problem], bad: set[str]) -> tuple[dict | None, str]:
    if "base" in bad:
        return None, "base"
    if base is None:
        problems.append(Problem("base", "missing: a config file (relative to the sweep file) or an inline mapping"))
        return None, "base"
    if isinstance(base, dict):
        return dict(base), "base"
    path = resolve_path(base, sweep_dir)
    try:
        return read_config_file(path), path
    except ConfigError as error:
        problems += [Problem("base", p.message) for p in error.problems]
        return None, path


def _parse_space(space: Any, search_alg: str, problems: list[Problem], bad: set[str]) -> tuple[Dimension, ...] | None:
    if "search_space" in bad:
        return None
    if not isinstance(space, dict) or not space:
        problems.append(Problem("search_space", "missing or empty: a mapping of config keys to distributions"))
        return None
    dims = []
    for key, spec in space.items():
        where = f"search_space.{key}"
        if key not in LoomConfig.model_fields:
            problems.append(Problem(where, _did_you_mean("not a Loom config key", str(key),
                                                         list(LoomConfig.model_fields), "see docs/FEATURES.md")))  # fmt: skip
            continue
        if key in PER_TRIAL_KEYS:
            problems.append(
                Problem(where, f"set per trial by loom tune ({PER_TRIAL_KEYS[key]}); it cannot be searched")
            )
            continue
        dim = _parse_dimension(key, spec, search_alg, problems)
        if dim is not None:
            dims.append(dim)
    return tuple(dims)


def _parse_dimension(key: str, spec: Any, search_alg: str, problems: list[Problem]) -> Dimension | None:
    where = f"search_space.{key}"
    example = "e.g. {grid: [8, 16]} or {loguniform: [1.0e-4, 1.0e-2]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(Problem(where, f"given {spec!r}; one of {', '.join(DISTRIBUTIONS)} with its values, {example}"))
        return None
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        problems.append(Problem(where, _did_you_mean(f"unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}",
                                                     str(kind), list(DISTRIBUTIONS), "")))  # fmt: skip
        return None
    if not isinstance(values, list) or not values:
        problems.append(Problem(where, f"{kind} needs a non-empty list of values, given {values!r}"))
        return None
    values = [_number(v) for v in values]
    if kind in ("grid", "choice"):
        return Dimension(key, kind, tuple(values))
    if search_alg == "grid":
        problems.append(
            Problem(where, f"{kind} samples values, but search_alg grid enumerates them: use grid or choice")
        )
        return None
    numeric = _numeric_type(key)
    if numeric is None:
        problems.append(Problem(where, f"{kind} needs a numeric key; {key} is not one: use grid or choice"))
        return None
    if numeric is int and kind != "randint":
        problems.append(Problem(where, f"{key} is an integer; {kind} would sample fractions: use randint or grid"))
        return None
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        problems.append(Problem(where, f"{kind} needs [low, high] numbers, given {values!r}"))
        return None
    low, high = values
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        problems.append(Problem(where, f"randint needs whole numbers, given {values!r}"))
    elif low >= high:
        problems.append(Problem(where, f"{kind} needs low < high, given {values!r}"))
    elif kind == "loguniform" and low <= 0:
        problems.append(Problem(where, f"loguniform needs low > 0, given {values!r}"))
    else:
        return Dimension(key, kind, (low, high))
    return None


def _numeric_type(key: str) -> type | None:
    annotation = LoomConfig.model_fields[key].annotation
    options = typing.get_args(annotation) or (annotation,)
    if float in options:
        return float
    if int in options and bool not in options:
        return int
    return None


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(value: Any) -> Any:
    """`1e-4` is a string to YAML 1.1; in a search space it is the number it looks like."""
    if isinstance(value, str) and _FLOAT.match(value.strip()) and any(c in value for c in ".eE"):
        return float(value)
    return value


def _probe_overrides(space: tuple[Dimension, ...]) -> list[dict[str, Any]]:
    """Every combination of probe values when that is small, else each key's values one at a time."""
    if not space:
        return [{}]
    if math.prod(len(d.probe_values()) for d in space) <= EXHAUSTIVE_PROBES:
        return [
            dict(zip([d.key for d in space], combo, strict=True))
            for combo in itertools.product(*(d.probe_values() for d in space))
        ]
    first = {d.key: d.probe_values()[0] for d in space}
    return [{**first, d.key: v} for d in space for v in d.probe_values()]


def one_at_a_time(sweep: Sweep) -> list[dict[str, Any]]:
    """The base with each probe value of each key (the others at their first value): what the driver preflights."""
    first = {d.key: d.probe_values()[0] for d in sweep.space}
    seen, probes = set(), []
    for d in sweep.space:
        for value in d.probe_values():
            probe = {**first, d.key: value}
            marker = json.dumps(probe, sort_keys=True, default=str)
            if marker not in seen:
                seen.add(marker)
                probes.append({**sweep.base, **probe})
    return probes or [dict(sweep.base)]


def _check_probes(
    base: dict[str, Any], space: tuple[Dimension, ...], base_source: str, problems: list[Problem]
) -> list[tuple[dict[str, Any], LoomConfig]]:
    configs = []
    for overrides in _probe_overrides(space):
        try:
            cfg = validate_config({**base, **overrides}, source=base_source)
        except ConfigError as error:
            for p in error.problems:
                key = f"search_space.{p.key}" if p.key in overrides else f"base.{p.key}"
                problems.append(Problem(key, _with(overrides, p.message)))
            continue
        configs.append((overrides, cfg))
    return configs


def _with(overrides: dict[str, Any], message: str) -> str:
    if not overrides:
        return message
    return "with " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()) + ": " + message


# --- every report must carry the metric ---------------------------------------------------------------------------


def _whole(value: float | None) -> int | None:
    return int(value) if value is not None and value >= 1 and float(value).is_integer() else None


def _cadence(strategy: str, steps: float | None) -> tuple[str, int | None] | None:
    """("steps", N), ("epoch", None), ("steps", None) for a fraction of the total, or None for never."""
    if strategy == "no":
        return None
    return ("epoch", None) if strategy == "epoch" else ("steps", _whole(steps))


def _divides(metric: tuple[str, int | None] | None, report: tuple[str, int | None]) -> bool:
    if metric == ("steps", 1):
        return True
    if metric is None:
        return False
    if metric[0] == report[0] == "epoch":
        return True
    return metric[0] == report[0] == "steps" and None not in (metric[1], report[1]) and report[1] % metric[1] == 0


def report_problem(cfg: LoomConfig, metric: str, scheduler: str = "fifo") -> str | None:
    """Why some report of this config could lack `metric` (Loom reports at each checkpoint and at the last step)."""
    wants_eval = cfg.do_eval or cfg.eval_strategy != "no"
    if metric == "eval_loss" and not wants_eval:
        return "eval_loss needs evaluation: set val_size and eval_strategy (steps or epoch)"
    saves = _cadence(cfg.save_strategy, cfg.save_steps)
    if saves is None:
        if scheduler == "asha":
            return "asha compares trials at intermediate reports, which Loom makes at checkpoints: set save_strategy"
        return None  # one report, at the last step, where logging and evaluation always happen
    if metric == "loss":
        cadence, what = ("steps", _whole(cfg.logging_steps)), f"logging_steps={cfg.logging_steps:g}"
    else:
        steps = cfg.eval_steps or cfg.logging_steps
        cadence = _cadence(cfg.eval_strategy, steps)
        what = f"eval_strategy={cfg.eval_strategy}" + (
            f", eval every {steps:g}" if cfg.eval_strategy == "steps" else ""
        )
    if _divides(cadence, saves):
        return None
    save = f"save_strategy={cfg.save_strategy}" + (f", save_steps={cfg.save_steps:g}" if saves[0] == "steps" else "")
    key = "logging_steps" if metric == "loss" else "eval_steps"
    return (
        f"Loom reports {metric} to Tune at each checkpoint, so every checkpoint step must be a {key.split('_')[0]} "
        f"step ({save}; {what}): make save_steps a whole multiple of {key}"
    )


def _asha_arguments(args: SweepArgs, configs: list[LoomConfig], problems: list[Problem]) -> dict[str, Any] | None:
    if args.scheduler != "asha":
        if args.asha is not None:
            problems.append(Problem("asha", f"options given, but scheduler is {args.scheduler!r}; set scheduler: asha"))
        return None
    options = args.asha or AshaOptions()
    max_t, grace = options.max_t, options.grace_period
    if options.time_attr == "step":
        if max_t is None:
            steps = [cfg.max_steps for cfg in configs]
            if min(steps) > 0:
                max_t = max(steps)
            else:
                problems.append(Problem("asha.max_t", "needed: trials train by epochs (max_steps is not set), so "
                                                      "their step count is known only once the data is read"))  # fmt: skip
                return None
        if grace is None:
            saves = {_whole(cfg.save_steps) if cfg.save_strategy == "steps" else None for cfg in configs}
            grace = saves.pop() if len(saves) == 1 and None not in saves else 1
    else:
        max_t, grace = max_t or 100, grace or 1
    if grace > max_t:
        problems.append(Problem("asha.grace_period", f"{grace} is more than max_t {max_t}"))
    return {"time_attr": options.time_attr, "max_t": max_t, "grace_period": grace,
            "reduction_factor": options.reduction_factor}  # fmt: skip


def _did_you_mean(message: str, given: str, choices: list[str], otherwise: str) -> str:
    hint = did_you_mean(given, choices)
    if hint:
        return message + hint
    return f"{message}; {otherwise}" if otherwise else message


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


# --- trials ---------------------------------------------------------------------------------------------------------


def absolute_base(base: dict[str, Any], cfg: LoomConfig) -> dict[str, Any]:
    """The raw base with the path keys it sets replaced by `cfg`'s (absolute) values, for trials on any node."""
    return {**base, **{k: getattr(cfg, k) for k in (*LOCAL_PATH_KEYS, "adapter_name_or_path") if k in base}}


def trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str, runs_dir: str) -> dict[str, Any]:
    """One trial's raw config: the base, the sampled values, and its own run name, storage and output dir."""
    raw = {**base, **sampled, "ray_run_name": trial_id, "ray_storage_path": runs_dir, "overwrite_output_dir": False}
    if base.get("output_dir"):
        raw["output_dir"] = f"{str(base['output_dir']).rstrip('/')}/{trial_id}"
    else:
        raw.pop("output_dir", None)  # the plan puts it in the trial's run dir
    return raw


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # finished, stopped (by the scheduler), error, pending
    metric: float | None = None
    step: int | None = None
    run_dir: str | None = None
    checkpoint: str | None = None
    output_dir: str | None = None
    error: str | None = None


@dataclass
class SweepOutcome:
    sweep: Sweep
    trials: list[TrialRow]
    best: TrialRow | None
    start: str  # "fresh" or "resumed ..."
    best_config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        keys = [d.key for d in self.sweep.space]
        header = ["trial", *keys, self.sweep.metric, "step", "status"]
        rows = [
            [
                t.trial_id,
                *(_fmt(t.params.get(k)) for k in keys),
                _fmt(t.metric),
                _fmt(t.step),
                t.status + ("  <- best" if self.best and t.trial_id == self.best.trial_id else ""),
            ]
            for t in self.trials
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
        lines += [f"{t.trial_id}: {t.error}" for t in self.trials if t.error]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def best_trial(trials: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [t for t in trials if t.metric is not None and not t.error and math.isfinite(t.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)
