"""train_loop_per_worker: the only worker module that touches ray.train."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from orchestrator.config.schema import LoomConfig
from orchestrator.paths import checkpoint_kind

from .context import DistContext
from .order import ArrowRows
from .runner import make_runner


class RayRunIO:
    """RunIO over Ray Train: the training table's blocks (or a streamed shard), evaluation shards, report (a
    barrier), checkpoints in the run's storage path."""

    def __init__(self, cfg: LoomConfig, ctx: DistContext, train_blocks: list[ray.ObjectRef] | None):
        self.cfg, self.ctx, self.train_blocks = cfg, ctx, train_blocks

    def train_rows(self) -> ArrowRows | None:
        """The materialized training set, every block of it: each rank picks its own rows (workers/order.py)."""
        return ArrowRows(ray.get(self.train_blocks)) if self.train_blocks is not None else None

    def batches(self, split: str, epoch: int) -> Iterator[dict[str, Any]]:
        shard = ray.train.get_dataset_shard(split)
        shuffle = split == "train" and not self.cfg.disable_shuffling
        batch_size = self.cfg.per_device_train_batch_size if split == "train" else self.cfg.per_device_eval_batch_size
        return iter(
            shard.iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                drop_last=False,
                local_shuffle_buffer_size=(self.cfg.buffer_size if self.cfg.streaming else batch_size * 16)
                if shuffle
                else None,
                local_shuffle_seed=self.cfg.shuffle_seed() + epoch if shuffle else None,
            )
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from .upload import ReportTiming, upload_checkpoint

        timing = ReportTiming(step=metrics["step"], rank=self.ctx.rank, checkpoint=bool(checkpoint_dir))
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint-{metrics['step']:06d}" if checkpoint_dir else None
        # The run's storage as Ray resolved it (the way Ray's docs name for a checkpoint_upload_fn's destination).
        storage = ray.train.get_context().get_storage()

        def upload(local: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
            destination = f"{storage.experiment_fs_path}/{dir_name}"
            with timing.uploading():
                upload_checkpoint(
                    local.path, storage.storage_filesystem, destination, retries=self.cfg.ray_upload_retries
                )
            return ray.train.Checkpoint(path=destination, filesystem=storage.storage_filesystem)

        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_fn=upload)
            timing.write()
        finally:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # the run has none of its own: resume_from_checkpoint's, when it is a Loom one
            explicit = self.cfg.resume_from_checkpoint
            yield explicit if explicit and checkpoint_kind(explicit) == "loom" else None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Layer-wise BAdam leaves all but the active block without gradients, a block that changes as it trains.
        badam_blocks = self.cfg.use_badam and self.cfg.badam_mode == "layer"
        find_unused = bool(self.cfg.ddp_find_unused_parameters) or badam_blocks
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})


def build_context() -> DistContext:
    context = ray.train.get_context()
    return DistContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        device=ray.train.torch.get_device(),
        node_id=ray.get_runtime_context().get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = LoomConfig.model_validate(loop_config["config"])
    ctx = build_context()
    io = RayRunIO(cfg, ctx, loop_config["train_blocks"])
    make_runner(cfg, loop_config["plan"], ctx, io).run()
