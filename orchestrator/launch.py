"""The thin Ray layer: connect or start Ray, check placement, build data, run the TorchTrainer, return paths."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from .data.cache import cached_manifest
from .environment import enabled
from .errors import DataError, PlanError, TrainingError
from .plan import RunPlan, make_plan, placement_problems, storage_problems, with_absolute_paths
from .preflight import RunStart, clear_earlier_run, decide_run_start, preflight_data
from .progress import ProgressFollower
from .storage import ray_storage_path, storage_filesystem


@dataclass
class TrainOutcome:
    plan: RunPlan
    output_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    start: str
    timings: dict[str, float]


FORWARDED_PREFIXES = ("LOOM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "LLAMAFACTORY_VERBOSITY", "RECORD_VRAM",
                      "WANDB_", "MLFLOW_", "SWANLAB_")  # fmt: skip


# Ray Train's controller collects reports on this cadence (2 s by default), and a worker's report waits for it: with
# the default every checkpoint cost about 1.7 s of waiting here (bench/checkpoint_overhead.py), 0.15 s at 0.25 s.
# Ray Train 2.60 patches `print` in its workers to tee each line to the console and to its logger, whose handler
# prints it again: every worker line showed twice on the driver. Off, a line shows once (Ray's log monitor).
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# LLaMA-Factory's OPTIM_TORCH (on unless 0): the CUDA allocator's expandable segments (less fragmentation) and NCCL
# without record_stream, in every worker; a value the user set wins. Harmless on CPU workers.
OPTIM_TORCH_DEFAULTS = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}


def forwarded_env() -> dict[str, str]:
    """Driver environment the workers need too (offline mode, debug knobs): Ray workers do not inherit it.
    Ray Train settings the user did not set get Loom's defaults."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    defaults = {**RAY_TRAIN_DEFAULTS, **(OPTIM_TORCH_DEFAULTS if enabled(os.environ, "OPTIM_TORCH", "1") else {})}
    return {**{k: os.environ.get(k, v) for k, v in defaults.items()}, **forwarded}


class Stopwatch:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` / RAY_ADDRESS, or start an embedded one. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    from .console import SETUP_HOOK, quiet_process

    quiet_process()
    # Every process of the job (workers, Ray Train's controller, Ray Data's tasks) applies LOOM_VERBOSITY first.
    runtime_env = {"env_vars": forwarded_env(), "worker_process_setup_hook": SETUP_HOOK}
    quiet = {"log_to_driver": True, "logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address:
        ray.init(address=address, **quiet)
        started = False
    else:  # "local": a new embedded cluster. Without it Ray joins any cluster running on this machine (and refuses
        # num_cpus there), where the user named none.
        ray.init(address="local", num_cpus=num_cpus, **quiet)
        started = True
    _quiet_ray_data()
    return started


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()  # a live bar for people, none in logs and CI
    context.print_on_execution_start = False
    from .console import quiet_process

    quiet_process()  # again: importing Ray Data set its loggers' levels


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_placement(plan: RunPlan) -> None:
    """The bundles fit the cluster, and a local storage path is not split over several nodes' disks."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    nodes = [dict(node["Resources"]) for node in alive]
    problems = placement_problems(plan, nodes)
    if problems:
        raise PlanError(
            "the worker bundles (ray_num_workers x resources_per_worker) cannot be placed on this cluster:\n  - "
            + "\n  - ".join(problems)
            + "\n(ask for less per worker, fewer workers, or start the run on a cluster that has them)"
        )
    here = ray.get_runtime_context().get_node_id()
    driver = next((dict(node["Resources"]) for node in alive if node["NodeID"] == here), None)
    problems = storage_problems(plan, nodes, driver)
    if problems:
        raise PlanError("\n".join(problems))


def check_free(plan: RunPlan, wait_s: float) -> None:
    """The workers' bundles can be reserved now, and a CPU is free for Ray Data: on a cluster whose resources
    another job holds, Ray Train would wait for them without end (it retries a worker group that cannot start).
    A placement group of the bundles is asked for, waited for up to `wait_s`, and removed again at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # A task of one CPU, not a look at available_resources(): that view lags (it read empty right after a
    # placement group's removal in CI), the scheduler does not.
    probe = ray.remote(num_cpus=1)(_cpu_probe).remote()
    data_cpu, _ = ray.wait([probe], timeout=wait_s)
    if not data_cpu:
        ray.cancel(probe, force=True)
    count = plan.min_workers or plan.num_workers
    group = placement_group([dict(plan.resources_per_worker)] * count, strategy=plan.placement_strategy)
    try:
        reserved = group.wait(timeout_seconds=wait_s)
    finally:
        remove_placement_group(group)
    if reserved:  # an elastic run sizes itself by the free resources: let the view count the probe's back first
        _wait_until_free({k: v * count for k, v in plan.resources_per_worker.items()}, timeout_s=10)
    problems = []
    if not reserved:
        problems.append(f"{count} bundle{'s' if count != 1 else ''} of {plan.resources_per_worker} (ray_num_workers x "
                        f"resources_per_worker) could not be reserved within {wait_s:g} s (ray_placement_wait_s)")  # fmt: skip
    if not data_cpu:
        problems.append(f"no CPU came free within {wait_s:g} s to prepare the data with Ray Data")
    free = {k: v for k, v in ray.available_resources().items() if not k.startswith(("node:", "memory", "object_store"))}
    if problems:
        held = ", ".join(f"{k} {v:g}" for k, v in sorted(free.items())) or "nothing"
        raise PlanError("the cluster has room for this run, but not now: " + "; ".join(problems) +
                        f". Free now: {held}. Another job holds the rest (`ray status`, `ray list actors` show which); "
                        "run again when it is done.")  # fmt: skip


def _cpu_probe() -> bool:
    return True


def _wait_until_free(wanted: dict[str, float], timeout_s: float) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount for name, amount in wanted.items()):
            return
        time.sleep(0.1)


def check_columns(cfg: Any, specs: list) -> None:
    """Every dataset readable, with the columns its format needs; read in Ray tasks (small local files: here),
    reported before training."""
    from .data.formats import required_columns
    from .data.local import local_column_names, readable_here
    from .data.readers import DatasetReadError, column_names

    problems = []
    for spec in specs:
        try:
            names = local_column_names(spec) if readable_here([spec]) else column_names(spec)
        except DatasetReadError as error:
            problems.append(f"dataset {spec.name!r} ({spec.source}) cannot be read: {error}")
            continue
        missing = [c for c in required_columns(spec, cfg.stage) if c not in names]
        if missing:
            has = f"it has {names}" if names else "it has no rows"
            problems.append(f"dataset {spec.name!r} ({spec.source}): columns {missing} are missing; {has}")
    if problems:
        raise DataError("\n".join(problems))


def train(
    cfg: Any,
    source: str = "config",
    address: str | None = None,
    base_dir: str | None = None,
    callbacks: list | None = None,
) -> TrainOutcome:
    """The whole `loom train` path; `callbacks` (Ray Train UserCallbacks) reach the TorchTrainer, e.g. for Tune."""
    clock = Stopwatch()
    cfg = with_absolute_paths(cfg, base_dir)
    specs = preflight_data(cfg, source)
    cached_manifest(cfg, specs.train, specs.eval)  # a stale tokenized cache stops the run here, before Ray starts
    plan = make_plan(cfg, base_dir)
    start = decide_run_start(cfg, plan)
    clock.lap("checks")
    connect(address)
    clock.lap("ray start")
    check_placement(plan)
    check_free(plan, cfg.ray_placement_wait_s)
    check_columns(cfg, specs.train + specs.eval)

    from .data.prepare import prepare_data

    data = prepare_data(cfg, specs.train, specs.eval)
    clock.lap("data")
    return _fit_prepared(cfg, base_dir, data, start, clock, callbacks, progress=True)


def train_prepared(cfg: Any, data: Any, base_dir: str | None = None, callbacks: list | None = None) -> TrainOutcome:
    """The end of `loom train` on datasets prepared (and checked) elsewhere: a sweep whose trials all train on the
    same data prepares it once. Connects to nothing: Ray is already up."""
    clock = Stopwatch()
    cfg = with_absolute_paths(cfg, base_dir)
    plan = make_plan(cfg, base_dir)
    start = decide_run_start(cfg, plan)
    check_placement(plan)
    clock.lap("checks")
    return _fit_prepared(cfg, base_dir, data, start, clock, callbacks)


def _fit_prepared(
    cfg: Any,
    base_dir: str | None,
    data: Any,
    start: RunStart,
    clock: Stopwatch,
    callbacks: list | None,
    progress: bool = False,
) -> TrainOutcome:
    """`progress`: the driver draws the live progress line (`loom train`; a sweep's trials do not)."""
    train_rows = data.summary["train_examples"]
    if train_rows is not None and train_rows < cfg.ray_num_workers:
        raise DataError(too_few_examples(data.summary, cfg.ray_num_workers))
    plan = make_plan(cfg, base_dir, train_rows=train_rows, streaming=cfg.streaming)
    if start.clears_earlier:  # only now: every check has passed and the data is prepared
        clear_earlier_run(cfg, plan)
    follower = ProgressFollower(os.path.join(plan.output_dir, "trainer_log.jsonl"), plan.schedule.total_steps,
                                start.resume_step) if progress else contextlib.nullcontext()  # fmt: skip
    with follower:
        result = fit(cfg, plan, data, callbacks)
    clock.lap("fit")
    return TrainOutcome(
        plan=plan,
        output_dir=plan.output_dir,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
        data_summary=data.summary,
        start=start.describe,
        timings=clock.laps,
    )


def too_few_examples(summary: dict[str, Any], workers: int) -> str:
    """Why training cannot start on what preprocessing kept: per dataset, the rows read and why rows were dropped."""
    lines = [f"the training set has {summary['train_examples']} examples after preprocessing, fewer than {workers} "
             "workers (each needs at least one):"]  # fmt: skip
    for name, stats in summary.get("datasets", {}).items():
        dropped = sum(stats["dropped"].values())
        reasons = "; ".join(
            f"{count} {reason}" for reason, count in sorted(stats["dropped"].items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"  - dataset {name!r}: {stats['rows']} rows read, {dropped} dropped" + (f" ({reasons})" if reasons else "")
        )
    return "\n".join(lines)


@dataclass
class DataOutcome:
    summary: dict[str, Any]
    example: dict[str, Any] | None  # one prepared training row (token-id columns)
    timings: dict[str, float]


def prepare_only(cfg: Any, source: str = "config", address: str | None = None,
                 base_dir: str | None = None) -> DataOutcome:  # fmt: skip
    """`loom data`: every driver check, then prepare (and cache) the datasets without training."""
    clock = Stopwatch()
    cfg = with_absolute_paths(cfg, base_dir)
    specs = preflight_data(cfg, source)
    cached_manifest(cfg, specs.train, specs.eval)
    clock.lap("checks")
    connect(address)
    check_columns(cfg, specs.train + specs.eval)

    from .data.pipeline import stream_summary
    from .data.prepare import prepare_data

    if cfg.streaming:
        summary = stream_summary(cfg, specs.train)
        example = next(iter(prepare_data(cfg, specs.train, specs.eval).train.take(1)), None)
    else:
        data = prepare_data(cfg, specs.train, specs.eval)
        summary, example = data.summary, next(iter(data.train.take(1)), None)
    clock.lap("data")
    return DataOutcome(summary, example, clock.laps)


def checkpoint_config(plan: RunPlan) -> Any:
    """save_total_limit's retention; with load_best_model_at_end Ray keeps the best checkpoints by the metric (and
    always the latest, to resume from), so the best one is there when the run ends."""
    from ray.train import CheckpointConfig

    if plan.best_metric is None:
        return CheckpointConfig(num_to_keep=plan.checkpoints_to_keep)
    return CheckpointConfig(num_to_keep=plan.checkpoints_to_keep, checkpoint_score_attribute=plan.best_metric,
                            checkpoint_score_order="max" if plan.best_greater else "min")  # fmt: skip


def fit(cfg: Any, plan: RunPlan, data: Any, callbacks: list | None = None) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train import LoggingConfig as TrainLoggingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.entry import train_loop_per_worker

    from . import console

    # A materialized training set goes to every worker whole (its block references), so that each rank's rows are
    # a pure function of the seed, epoch, rank and position (workers/order.py); a streamed one is split by Ray Data.
    streamed = cfg.streaming
    datasets = {**({"train": data.train} if streamed else {}), **data.evals}
    train_blocks = None if streamed else data.train.to_arrow_refs()
    resources = dict(plan.resources_per_worker)
    filesystem = storage_filesystem(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(),
            "plan": replace(plan, eval_splits=tuple(data.evals)),
            "train_blocks": train_blocks,
        },  # fmt: skip
        torch_config=TorchConfig(timeout_s=cfg.ddp_timeout),
        scaling_config=ScalingConfig(
            num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers,
            elastic_resize_monitor_interval_s=plan.resize_interval_s,
            use_gpu=plan.use_gpu,
            resources_per_worker=resources,
            placement_strategy=plan.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=ray_storage_path(plan.storage_path, filesystem),
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=checkpoint_config(plan),
            callbacks=callbacks,
            # Ray Train's controller and workers filter its own records by this (LOOM_VERBOSITY).
            logging_config=TrainLoggingConfig(log_level=logging.getLevelName(console.level())),
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except Exception as error:  # Ray wraps worker errors; the user gets the root cause in one line plus the log path
        raise TrainingError(
            f"training failed: {_root_cause(error)}\n(see the worker logs above; run dir {plan.run_dir})"
        ) from error


def _root_cause(error: BaseException) -> str:
    """The first rank's own error, whole: Ray Train's message keeps only the tail of each traceback (long messages
    lose their start there), but its WorkerGroupError holds every rank's exception."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
