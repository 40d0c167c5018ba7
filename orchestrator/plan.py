"""config -> RunPlan: workers, bundles, paths and batch arithmetic. Pure: no Ray, no torch, no I/O but path math."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from .config.schema import without_secrets
from .parallelism import describe_sharding, load_json_setting
from .paths import LOCAL_PATH_KEYS, OUTPUT_PATH_KEYS, is_uri, resolve_path
from .stages import STAGES
from .trackers import requested

RUN_MARKER = "loom_run.json"  # written by rank 0 into output_dir: status running/finished, read by the driver

# Keys that do not change what is trained: they never change the derived run name.
_NAME_NEUTRAL = {
    "ray_run_name",
    "run_name",
    "overwrite_output_dir",
    "logging_steps",
    "print_param_status",
    "disable_tqdm",
    "ray_storage_shared",
    "ray_resize_interval_s",
    "ray_upload_retries",
    "report_to",  # a tracker watches a run; adding one to a run resumes it
    "logging_dir",
    "use_swanlab",
    "swanlab_project",
    "swanlab_workspace",
    "swanlab_run_name",
    "swanlab_mode",
}


@dataclass(frozen=True)
class Schedule:
    """Step arithmetic once the number of training rows is known."""

    train_rows: int | None  # None: streamed, size unknown
    rows_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    logging_every: int
    save_every: int | None
    eval_every: int | None


@dataclass(frozen=True)
class RunPlan:
    run_name: str
    storage_path: str
    run_dir: str
    output_dir: str
    num_workers: int
    resources_per_worker: dict[str, float]
    placement_strategy: str
    use_gpu: bool
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    max_failures: int
    checkpoints_to_keep: int | None
    save_strategy: str
    datasets: tuple[str, ...] = ()
    schedule: Schedule | None = None
    storage_shared: bool = False  # every node reaches the storage path (ray_storage_shared, or a user's filesystem)
    sharding: str = ""  # how the workers share the model (DDP, DeepSpeed ZeRO-n, FSDP2)
    min_workers: int = 0  # elastic: the fewest workers the run continues with (0: fixed at num_workers)
    resize_interval_s: float = 60.0
    stage: str = "sft"
    best_metric: str | None = None  # load_best_model_at_end: the logged metric Ray ranks checkpoints by
    best_greater: bool = False
    models: tuple[str, ...] = ()  # what each worker holds (the registry's say): policy, reference, reward
    eval_splits: tuple[str, ...] = ()  # the evaluation sets' names ("eval", or "eval_<dataset>"), set at launch
    trackers: tuple[str, ...] = ()  # what rank 0 logs to (orchestrator/trackers.py), resolved on the driver
    logging_dir: str = ""  # tensorboard's folder

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    def _elastic_line(self) -> str:
        steps = [f"{n} x {self.accumulation_at(n)} acc = {n * self.per_device_batch_size * self.accumulation_at(n)}"
                 for n in range(self.min_workers, self.num_workers + 1)]  # fmt: skip
        return f"elastic       {self.min_workers}-{self.num_workers} workers; examples per step: {', '.join(steps)}"

    def accumulation_at(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch with `world_size` workers (elastic runs)."""
        return accumulation_for(self.global_batch_size, self.per_device_batch_size, world_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        bundle = json.dumps(self.resources_per_worker, sort_keys=True)
        lines = [
            f"run name      {self.run_name}",
            f"run dir       {self.run_dir}",
            f"output dir    {self.output_dir}",
            f"workers       {self.num_workers} x {bundle}  strategy {self.placement_strategy}"
            f"  ({'GPU' if self.use_gpu else 'CPU'} training)",
            f"batch         {self.per_device_batch_size} per worker x {self.gradient_accumulation_steps} accumulation"
            f" x {self.num_workers} workers = {self.global_batch_size} examples per step",
            f"stage         {self.stage}: loss averaged over {STAGES[self.stage].unit}; models: {', '.join(self.models)}",
            f"sharding      {self.sharding}",
            f"retries       {self.max_failures}   checkpoints kept: {self.checkpoints_to_keep or 'all'}",
        ]
        if self.elastic:
            lines.insert(5, self._elastic_line())
        if self.trackers:
            lines.append(f"trackers      {', '.join(self.trackers)}")
        if self.datasets:
            lines.append(f"datasets      {', '.join(self.datasets)}")
        s = self.schedule
        if s:
            lines += [
                f"train rows    {s.train_rows} ({s.rows_per_worker} per worker)"
                if s.train_rows is not None
                else "train rows    streamed (size unknown; max_steps decides the run)",
                f"steps         {s.total_steps} ({s.steps_per_epoch} per epoch, {s.epochs:g} epochs)"
                f"  warmup {s.warmup_steps}",
                f"cadence       log every {s.logging_every}, save every {s.save_every or '-'},"
                f" eval every {s.eval_every or '-'}",
            ]
        else:
            lines.append("steps         known once the dataset is read (run `loom data` or `loom train`)")
        return "\n".join(lines)


def accumulation_for(global_batch: int, per_device: int, world_size: int) -> int:
    """The accumulation steps closest to `global_batch` examples per step (exact when it divides)."""
    return max(1, round(global_batch / (per_device * world_size)))


def derive_run_name(cfg: Any) -> str:
    """The user's name, or `loom-<stage>-<type>-<hash>` of the config, stable so the same command resumes."""
    if cfg.ray_run_name:
        return cfg.ray_run_name
    if cfg.run_name:
        return cfg.run_name
    # a rotated token must not start a new run: secrets are left out with the other keys that train nothing
    settings = {k: v for k, v in without_secrets(cfg.non_default_values()).items() if k not in _NAME_NEUTRAL}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"loom-{cfg.stage}-{cfg.finetuning_type}-{digest}"


def _cadence(value: float | None, total_steps: int) -> int | None:
    """A step interval; values below 1 are a share of the total steps (as transformers reads them)."""
    if value is None:
        return None
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)


def make_schedule(cfg: Any, train_rows: int | None) -> Schedule:
    """Step arithmetic. `train_rows` None: a streamed dataset of unknown size, where max_steps is the whole run
    and counts as one epoch."""
    if train_rows is None:
        rows_per_worker, micro, steps_per_epoch = 0, 0, max(1, cfg.max_steps)
    else:
        rows_per_worker = train_rows // cfg.ray_num_workers  # Ray's equal split drops the remainder
        micro = math.ceil(rows_per_worker / cfg.per_device_train_batch_size)
        steps_per_epoch = max(1, math.ceil(micro / STAGES[cfg.stage].micro_batches_per_step(cfg)))
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    save_every = {"steps": _cadence(cfg.save_steps, total), "epoch": steps_per_epoch, "no": None}[cfg.save_strategy]
    eval_every = {"steps": _cadence(cfg.eval_steps or cfg.logging_steps, total), "epoch": steps_per_epoch, "no": None}[
        cfg.eval_strategy
    ]
    return Schedule(
        train_rows=train_rows,
        rows_per_worker=rows_per_worker,
        micro_batches_per_epoch=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=total / steps_per_epoch,
        warmup_steps=warmup,
        logging_every=_cadence(cfg.logging_steps, total) or 1,
        save_every=save_every,
        eval_every=eval_every,
    )


def make_plan(cfg: Any, base_dir: str | None = None, train_rows: int | None = None, streaming: bool = False) -> RunPlan:
    """The run plan; the schedule needs the prepared row count (or `streaming`, where max_steps decides)."""
    base_dir = base_dir or os.getcwd()
    run_name = derive_run_name(cfg)
    storage = resolve_path(cfg.ray_storage_path, base_dir)
    run_dir = f"{storage}/{run_name}"
    output_dir = resolve_path(cfg.output_dir, base_dir) if cfg.output_dir else f"{run_dir}/output"
    resources = cfg.worker_resources()
    return RunPlan(
        run_name=run_name,
        storage_path=storage,
        run_dir=run_dir,
        output_dir=output_dir,
        num_workers=cfg.ray_num_workers,
        resources_per_worker=resources,
        placement_strategy=cfg.placement_strategy,
        use_gpu=resources.get("GPU", 0) > 0,
        per_device_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        global_batch_size=cfg.global_batch_size(),
        max_failures=cfg.ray_max_failures,
        checkpoints_to_keep=cfg.save_total_limit,
        save_strategy=cfg.save_strategy,
        datasets=tuple(cfg.dataset_names()),
        schedule=make_schedule(cfg, train_rows) if train_rows is not None or streaming else None,
        storage_shared=cfg.ray_storage_shared or bool(cfg.ray_storage_filesystem),  # a user's filesystem: not local
        sharding=describe_sharding(cfg),
        min_workers=cfg.min_workers() if cfg.is_elastic() else 0,
        resize_interval_s=cfg.ray_resize_interval_s,
        stage=cfg.stage,
        best_metric=cfg.best_model_metric(),
        best_greater=cfg.best_is_greater(),
        models=STAGES[cfg.stage].models(cfg),
        trackers=tuple(requested(cfg.report_to, cfg.use_swanlab)),
        logging_dir=resolve_path(cfg.logging_dir, base_dir) if cfg.logging_dir else f"{output_dir}/runs",
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def placement_problems(plan: RunPlan, nodes: list[dict[str, float]]) -> list[str]:
    """Why the plan's bundles cannot be placed on a cluster whose alive nodes have these total resources."""
    bundle, count = plan.resources_per_worker, plan.min_workers or plan.num_workers  # elastic: enough to start
    wanted = f"{count} bundle{'s' if count != 1 else ''} of {_fmt(bundle)}"
    problems = []
    for resource, amount in sorted(bundle.items()):
        total = sum(node.get(resource, 0.0) for node in nodes)
        if amount * count > total:
            problems.append(
                f"{wanted} requested: needs {amount * count:g} {resource}, "
                f"cluster has {total:g} {resource} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
            )
    if problems:
        return problems
    per_node = [_capacity(node, bundle) for node in nodes]
    if max(per_node, default=0) == 0:
        return [f"{wanted} requested: no single node can hold one bundle"]
    if plan.placement_strategy == "STRICT_PACK" and max(per_node) < count:
        return [f"{wanted} requested with STRICT_PACK: the largest node holds {max(per_node)}"]
    if plan.placement_strategy == "STRICT_SPREAD" and sum(1 for c in per_node if c > 0) < count:
        usable = sum(1 for c in per_node if c > 0)
        return [f"{wanted} requested with STRICT_SPREAD: only {usable} node(s) can hold a bundle"]
    if sum(per_node) < count:
        return [f"{wanted} requested: the nodes hold only {sum(per_node)} whole bundles"]
    return []


def storage_problems(plan: RunPlan, nodes: list[dict[str, float]], driver_node: dict[str, float] | None) -> list[str]:
    """Why a local storage path cannot hold this run: its workers may land on several nodes (or on another node than
    the driver's, which reads the run dir), and each node would write checkpoints to its own disk. `nodes` are the
    alive nodes' total resources, `driver_node` the resources of the node the driver runs on."""
    if plan.storage_shared or (is_uri(plan.storage_path) and not plan.storage_path.startswith("file://")):
        return []
    hosts = sum(1 for node in nodes if _capacity(node, plan.resources_per_worker) > 0)
    driver_apart = driver_node is not None and _capacity(driver_node, plan.resources_per_worker) == 0
    spanned = hosts + (1 if driver_apart and hosts else 0)
    if spanned <= 1:
        return []
    where = f"{hosts} can hold a worker" + (", plus the driver's" if driver_apart else "")
    return [
        f"ray_storage_path {plan.storage_path!r} is a local path, but this run spans {spanned} nodes ({where}): "
        "each would write checkpoints to its own disk and a restart or resume would miss them. Use a URI every "
        "node reaches (s3://..., gs://...), or, if every node mounts this path and output_dir (NFS, a shared "
        "volume), set ray_storage_shared: true."
    ]


def _capacity(node: dict[str, float], bundle: dict[str, float]) -> int:
    fits = [math.floor(node.get(res, 0.0) / amount + 1e-9) for res, amount in bundle.items() if amount > 0]
    return min(fits) if fits else 1_000_000


def with_absolute_paths(cfg: Any, base_dir: str | None = None) -> Any:
    """The config with local paths made absolute, so workers (whose cwd differs) find the same files.

    Hub ids stay as they are: only paths that exist here, or that name where outputs go, are resolved.
    """
    base_dir = base_dir or os.getcwd()
    update = {}
    for key in LOCAL_PATH_KEYS:
        value = getattr(cfg, key)
        if not value or is_uri(value):
            continue
        candidate = resolve_path(value, base_dir)
        if key in OUTPUT_PATH_KEYS or os.path.exists(candidate):
            update[key] = candidate
    for key in ("deepspeed", "fsdp_config"):  # JSON files travel as their content: workers run elsewhere
        value = getattr(cfg, key)
        if isinstance(value, str) and os.path.isfile(resolve_path(value, base_dir)):
            update[key] = load_json_setting(value, base_dir)
    for key in ("adapter_name_or_path", "ref_model_adapters", "reward_model_adapters"):
        adapters = [a.strip() for a in (getattr(cfg, key) or "").split(",") if a.strip()]
        if adapters:
            update[key] = ",".join(
                resolve_path(a, base_dir) if os.path.exists(resolve_path(a, base_dir)) else a for a in adapters
            )
    return cfg.model_copy(update=update)
