"""`loom tune`: a validated Sweep -> a Ray Tune experiment whose trials are full Loom runs.

Each trial is a Tune function (0.01 CPU of its own) that builds the trial's config and runs the same path as
`loom train` (checks, data, TorchTrainer fit); `TuneReportCallback` forwards what the workers report (at each
checkpoint and at the last step) to Tune, so ASHA sees a result per checkpoint.

Data: when the sweep searches only keys that cannot change the prepared data (learning rate, LoRA and optimizer
settings, steps, batch sizes: sweep.TRAINING_ONLY_KEYS), the driver prepares it once and every trial trains on
those materialized datasets. Otherwise each trial prepares its own, exactly as `loom train` does, so any key
(cutoff_len, template, seed, ...) can be searched. A restored sweep prepares again when trials are left to run.

Layout: <storage_path>/<name>/ is the Tune experiment (restored when the same command runs again), and
<storage_path>/<name>/runs/<trial id>/ is each trial's Loom run dir (checkpoints; output/ unless the base sets
output_dir, which then holds one folder per trial).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from .config.loader import validate_config
from .config.schema import without_secrets
from .errors import ConfigError, PlanError, Problem, TrainingError
from .paths import is_uri
from .plan import make_plan, placement_problems, with_absolute_paths
from .preflight import preflight_data, read_marker
from .sweep import Sweep, SweepOutcome, TrialRow, absolute_base, best_trial, one_at_a_time, trial_config

SWEEP_RECORD = "loom_sweep.json"  # the sweep an experiment was started with; a resume must match it
BEST_CONFIG = "best_config.yaml"
TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer; {"CPU": 0} is refused by Tune


def driver_checks(sweep: Sweep, base_dir: str) -> dict[str, Any]:
    """Files, datasets, tokenizer and module names for each searched value, before any trial; the absolute base."""
    problems: list[Problem] = []
    base_cfg = None
    for raw in one_at_a_time(sweep):
        cfg = with_absolute_paths(validate_config(raw, source=sweep.source), base_dir)
        base_cfg = base_cfg or cfg
        try:
            preflight_data(cfg, sweep.source)
        except ConfigError as error:
            searched = {d.key: raw.get(d.key) for d in sweep.space}
            problems += [Problem(p.key, f"with {_values(searched)}: {p.message}") for p in error.problems]
    if problems:
        raise ConfigError(_unique(problems), source=sweep.source)
    return absolute_base(sweep.base, base_cfg)


def check_sweep_placement(sweep: Sweep, base_dir: str, nodes: list[dict[str, float]]) -> None:
    """Each trial's worker bundles, plus the trial function's own sliver of CPU, must fit the cluster."""
    problems = []
    total_cpu = sum(node.get("CPU", 0.0) for node in nodes)
    for raw in one_at_a_time(sweep):
        plan = make_plan(validate_config(raw), base_dir)
        found = placement_problems(plan, nodes)
        workers_cpu = plan.num_workers * plan.resources_per_worker.get("CPU", 0.0)
        if not found and workers_cpu + TRIAL_CPU > total_cpu:
            found = [
                f"a trial needs {TRIAL_CPU} CPU beside its workers' {workers_cpu:g}; the cluster has {total_cpu:g}"
            ]
        problems += found
    if problems:
        raise PlanError("a trial's worker bundles cannot be placed on this cluster:\n  - " + "\n  - ".join(problems))


def run_sweep(sweep: Sweep, address: str | None = None, base_dir: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep and collect one row per trial, the best one and its config."""
    from ray import tune

    from .launch import cluster_nodes, connect

    base_dir = base_dir or os.getcwd()
    base = driver_checks(sweep, base_dir)
    # An embedded Ray gets one logical CPU more than the cores: the trial functions' slivers and Ray Data then never
    # wait on CPUs that the trials' workers hold (logical CPUs are scheduling tokens, not cores).
    connect(address, num_cpus=(os.cpu_count() or 1) + 1)
    check_sweep_placement(sweep, base_dir, cluster_nodes())
    restoring = tune.Tuner.can_restore(sweep.experiment_dir)
    if restoring:
        _check_same_sweep(sweep)
    share = sweep.shares_data() and (not restoring or _has_trials_to_run(sweep))
    data = shared_data(sweep, base, base_dir) if share else None  # None: each trial prepares its own

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, runs_dir=sweep.runs_dir, base_dir=base_dir, data=data),
        {"CPU": TRIAL_CPU},
    )
    if restoring:
        tuner = tune.Tuner.restore(sweep.experiment_dir, trainable, resume_unfinished=True, resume_errored=True)
        start = f"resumed the experiment in {sweep.experiment_dir}"
    else:
        _record_sweep(sweep)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=search_algorithm(sweep, seed=validate_config(base).seed),
                scheduler=make_scheduler(sweep),
                num_samples=sweep.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path, verbose=1),
        )
        start = "fresh"
    results = tuner.fit()
    rows = [_row(sweep, base, result) for result in results]
    rows.sort(key=lambda r: r.trial_id)
    best = best_trial(rows, sweep.mode)
    outcome = SweepOutcome(sweep=sweep, trials=rows, best=best, start=start)
    if best is None:
        errors = [f"{r.trial_id}: {r.error}" for r in rows if r.error]
        raise TrainingError(
            "no trial reported " + sweep.metric + (":\n  " + "\n  ".join(errors) if errors else "") +
            f"\n(experiment {sweep.experiment_dir}; run the same command again to resume)"
        )  # fmt: skip
    outcome.best_config = {**base, **best.params}
    if not is_uri(sweep.experiment_dir):
        written = without_secrets(outcome.best_config)
        with open(os.path.join(sweep.experiment_dir, BEST_CONFIG), "w", encoding="utf-8") as handle:
            if len(written) < len(outcome.best_config):
                left_out = ", ".join(sorted(set(outcome.best_config) - set(written)))
                handle.write(f"# {left_out} left out (secrets are never written): set again, or use the environment\n")
            yaml.safe_dump(written, handle, sort_keys=False)
    return outcome


def shared_data(sweep: Sweep, base: dict[str, Any], base_dir: str) -> Any:
    """The datasets every trial trains on, prepared once here (the searched keys cannot change them)."""
    from .data.prepare import prepare_data
    from .launch import check_columns

    first = {d.key: d.probe_values()[0] for d in sweep.space}
    cfg = with_absolute_paths(validate_config({**base, **first}, source=sweep.source), base_dir)
    specs = preflight_data(cfg, sweep.source)
    check_columns(cfg, specs.train + specs.eval)
    return prepare_data(cfg, specs.train, specs.eval)


def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    space = {}
    for d in sweep.space:
        if d.kind in sweep.grid_kinds():
            space[d.key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:  # randint, both ends included (Tune's upper bound is exclusive)
            space[d.key] = tune.randint(d.values[0], d.values[1] + 1)
    return space


def search_algorithm(sweep: Sweep, seed: int) -> Any:
    """Random sampling and grid expansion, seeded so the same sweep samples the same values. The concurrency limit
    goes here: Tune ignores TuneConfig.max_concurrent_trials when it is handed a search algorithm."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent_trials)


def make_scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "asha":
        return ASHAScheduler(**sweep.asha)
    return FIFOScheduler()


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_trial(config: dict[str, Any], *, base: dict[str, Any], runs_dir: str, base_dir: str, data: Any) -> None:
    """One trial: the `loom train` path on the trial's config, its worker reports forwarded to Tune."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = validate_config(trial_config(base, config, trial_id, runs_dir), source=f"trial {trial_id}")
    plan = make_plan(with_absolute_paths(cfg, base_dir), base_dir)
    finished = finished_metrics(plan.output_dir, plan.run_dir)
    if finished is not None:  # trained before an interruption, but Tune had not recorded its last result
        tune.report(finished)
        return
    callbacks = [TuneReportCallback()]
    if data is not None:  # prepared on the driver: no Ray Data work left here
        from .launch import train_prepared

        train_prepared(cfg, data, base_dir=base_dir, callbacks=callbacks)
        return
    # Tune runs this function in the trial's placement group (one 0.01-CPU bundle) and pulls every task started
    # here into it, where Ray Data's operators (1 CPU each) cannot fit. The trial's data preparation and training
    # therefore run in a task outside that group, owned by this function: Ray ends it (and its trainer) when the
    # trial is stopped.
    task = ray.remote(_train).options(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)
    try:
        ray.get(task.remote(cfg, trial_id, base_dir, callbacks))
    except ray.exceptions.RayTaskError as error:
        raise error.as_instanceof_cause() from None


def _train(cfg: Any, trial_id: str, base_dir: str, callbacks: list) -> None:
    from .launch import _quiet_ray_data, train

    _quiet_ray_data()  # as `loom train` sets up its driver (connect() does it only when it connects)
    train(cfg, source=f"trial {trial_id}", base_dir=base_dir, callbacks=callbacks)


def finished_metrics(output_dir: str, run_dir: str) -> dict[str, Any] | None:
    """The last logged metrics (and last checkpoint) of a finished Loom run, or None."""
    marker = read_marker(output_dir)
    if not marker or marker.get("status") != "finished":
        return None
    with open(os.path.join(output_dir, "trainer_log.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    metrics: dict[str, Any] = {}
    for record in records:
        if record.get("step") == marker.get("step"):
            metrics.update(record)
    checkpoint = f"{run_dir}/checkpoint-{marker.get('step', 0):06d}"
    if metrics and os.path.isdir(checkpoint):
        metrics["checkpoint_path"] = checkpoint
    return metrics or None


def _row(sweep: Sweep, base: dict[str, Any], result: Any) -> TrialRow:
    metrics = dict(result.metrics or {})
    trial_id = metrics.get("trial_id") or os.path.basename(str(result.path).rstrip("/"))
    params = metrics.get("config") or _params_file(result.path)
    params = {d.key: params.get(d.key) for d in sweep.space}
    run_dir = f"{sweep.runs_dir}/{trial_id}"
    output_dir = trial_config(base, params, trial_id, sweep.runs_dir).get("output_dir") or f"{run_dir}/output"
    marker = read_marker(output_dir) or {}
    if result.error:
        status = "error"
    elif not metrics.get("step"):
        status = "not run"
    elif marker and metrics["step"] < marker.get("total_steps", 0):
        status = "stopped"  # by the scheduler, at the last step Tune saw (the run may have gone a little further)
    else:
        status = "finished"
    value = metrics.get(sweep.metric)
    return TrialRow(
        trial_id=trial_id,
        params=params,
        status=status,
        metric=float(value) if value is not None else None,
        step=metrics.get("step"),
        run_dir=run_dir,
        checkpoint=metrics.get("checkpoint_path"),
        output_dir=output_dir if status == "finished" else None,
        error=_last_line(result.error) if result.error else None,
    )


def _params_file(trial_path: str | None) -> dict[str, Any]:
    path = os.path.join(str(trial_path or ""), "params.json")
    if trial_path and not is_uri(str(trial_path)) and os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    return {}


def _last_line(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _has_trials_to_run(sweep: Sweep) -> bool:
    """Whether a restored experiment has trials left to run (a finished sweep needs no data prepared)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(sweep.experiment_dir).trials
    except Exception:  # noqa: BLE001 - an unreadable state is Tune's to report; preparing is the safe answer
        return True
    return len(trials) < sweep.trial_count() or any(t.status != "TERMINATED" for t in trials)


def _check_same_sweep(sweep: Sweep) -> None:
    path = os.path.join(sweep.experiment_dir, SWEEP_RECORD)
    if is_uri(path) or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    if recorded != json.loads(json.dumps(sweep.fingerprint(), default=str)):
        raise PlanError(
            f"{sweep.experiment_dir} holds sweep {sweep.name!r} started with a different base or search space; "
            "Ray Tune cannot change a sweep mid-way. Choose another name, or remove that folder to start over."
        )


def _record_sweep(sweep: Sweep) -> None:
    if is_uri(sweep.experiment_dir):
        return
    os.makedirs(sweep.experiment_dir, exist_ok=True)
    with open(os.path.join(sweep.experiment_dir, SWEEP_RECORD), "w", encoding="utf-8") as handle:
        json.dump(sweep.fingerprint(), handle, indent=2, default=str)


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, unique = set(), []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            unique.append(p)
    return unique
