"""Two real gloo processes running Loom's stage loop without Ray: each strategy (DDP, DeepSpeed ZeRO, FSDP2) trains
the same tiny model on the same rows, checkpoints, and resumes. `LocalRunIO` stands in for Ray Train's report and
checkpoint merge (each rank's folder copied into one checkpoint directory), so the loop, the strategies and the
checkpoint files are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from workers.context import DistContext
from workers.order import ArrowRows


def training_rows(count: int = 64, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows of varied lengths over the tiny vocabulary; labels equal inputs (pre-training style)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        ids = rng.integers(10, 400, size=int(rng.integers(8, 24))).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def prepared_rows(cfg: Any) -> list[dict[str, Any]]:
    """The config's (local JSON) datasets through the same pure conversion and processor as Ray Data runs, in this
    process: what a stage's workers receive, without Ray."""
    from orchestrator.data.formats import convert
    from orchestrator.data.processors import PROCESSORS, ProcessorOptions
    from orchestrator.data.registry import resolve_datasets
    from orchestrator.data.templates import resolve_template
    from orchestrator.data.tokenizer import TokenizerSpec, for_data, load_tokenizer
    from orchestrator.stages import processor_name

    specs, problems = resolve_datasets(cfg.dataset_names(), cfg.dataset_dir, stage=cfg.stage)
    assert not problems, problems
    tokenizer = for_data(load_tokenizer(TokenizerSpec.from_config(cfg)))
    template = resolve_template(cfg.template)
    examples = []
    for spec in specs:
        for path in spec.files:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            raw = (
                json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]
            )
            examples += [convert(row, spec, cfg.stage) for row in raw]
    options = ProcessorOptions(cutoff_len=cfg.cutoff_len)
    columns = PROCESSORS[processor_name(cfg.stage)](tokenizer, template, examples, options).columns
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return rows[: cfg.max_samples] if cfg.max_samples else rows


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array of the values (as Ray Data hands list columns over), even when the lists are equally long."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class LocalRunIO:
    """Ray Train's side of the loop on plain files: shards, report (a barrier) and checkpoint merging."""

    def __init__(self, ctx: DistContext, rows: list[dict[str, Any]], batch_size: int, storage: str):
        self.ctx, self.rows, self.batch_size, self.storage = ctx, rows, batch_size, storage

    def train_rows(self) -> ArrowRows:
        return ArrowRows.from_rows(self.rows)  # the same row choice as on Ray (workers/order.py)

    def batches(self, split: str, epoch: int) -> Iterator[dict[str, Any]]:
        shard = self.rows[self.ctx.rank :: self.ctx.world_size]
        for start in range(0, len(shard), self.batch_size):
            chunk = shard[start : start + self.batch_size]
            yield {key: object_column([row[key] for row in chunk]) for key in chunk[0]}

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        target = os.path.join(self.storage, f"checkpoint-{metrics['step']:06d}")
        self.ctx.barrier()
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        self.ctx.barrier()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        names = sorted(n for n in os.listdir(self.storage) if n.startswith("checkpoint-")) if os.path.isdir(
            self.storage
        ) else []  # fmt: skip
        yield os.path.join(self.storage, names[-1]) if names else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(model) if self.ctx.world_size > 1 else model


def run_strategy(raw_config: dict[str, Any], storage: str, output_dir: str, rank: int, world: int,
                 rows: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    """One rank of a Loom run of `raw_config` (validated like the driver does) over `rows` (default: the stage's
    rows from its datasets, or `training_rows()` for pt/sft)."""
    from orchestrator.config import validate_config
    from orchestrator.plan import make_plan, with_absolute_paths
    from workers.runner import make_runner

    cfg = with_absolute_paths(validate_config(raw_config))
    if rows is None:
        rows = training_rows() if cfg.stage in ("pt", "sft") else prepared_rows(cfg)
    plan = replace(make_plan(cfg, train_rows=len(rows)), output_dir=output_dir, run_dir=storage)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    make_runner(cfg, plan, ctx, LocalRunIO(ctx, rows, cfg.per_device_train_batch_size, storage)).run()


def worker(rank: int, world: int, port: int, jobs: list[tuple[dict[str, Any], str, str, str | None]]) -> None:
    """Entry of each spawned process: join the gloo group, then run every job in order. A job is (config, storage,
    output_dir, resume_from): with `resume_from`, rank 0 first copies that checkpoint into the job's storage, so the
    run resumes from it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for raw_config, storage, output_dir, resume_from in jobs:
            if resume_from and rank == 0:
                shutil.copytree(resume_from, os.path.join(storage, os.path.basename(resume_from)))
            dist.barrier()
            torch.manual_seed(0)
            run_strategy(raw_config, storage, output_dir, rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Gloo's C++ threads can abort the interpreter's finalization ("terminate called without an active exception",
    # SIGABRT; seen once in CI after an rm ZeRO-3 job had finished, pytorch/pytorch#179291): every job's results are
    # on disk by now, so a rank that succeeded leaves without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
