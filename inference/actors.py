"""Model actors for the batch commands (predict, eval): one Ray Data map over a pool of actors that each load the
model once. The pool has `ray_num_workers` actors, each holding `resources_per_worker`, as training workers do."""

from __future__ import annotations

from typing import Any

from .source import ModelSource


def on_model_actors(dataset: Any, actor: type, cfg: Any, source: ModelSource, batch_size: int, **options: Any) -> Any:
    """`dataset` mapped batch by batch by actors built as `actor(cfg, source)`."""
    import ray

    resources = dict(cfg.worker_resources())
    cpus, gpus = resources.pop("CPU", 1.0), resources.pop("GPU", 0.0)
    return dataset.map_batches(
        actor, fn_constructor_args=(cfg, source), batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.ray_num_workers), num_cpus=cpus, num_gpus=gpus,
        resources=resources or None, **options,
    )  # fmt: skip
