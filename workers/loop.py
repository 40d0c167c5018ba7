"""The stage loop: micro-batches -> accumulation windows -> optimizer steps, with logging, eval and checkpoints.

It talks to Ray only through `RunIO` (see entry.py), so the cadence and resume logic read as plain Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from orchestrator.config.schema import without_secrets
from orchestrator.data.templates import get_template, missing_stop_words
from orchestrator.data.tokenizer import template_name
from orchestrator.environment import enabled
from orchestrator.optimizers import layerwise
from orchestrator.paths import checkpoint_kind, checkpoint_weights
from orchestrator.plan import RUN_MARKER, RunPlan, accumulation_for

from .checkpoint import (
    TrainState,
    list_files,
    load_component,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from .context import DistContext
from .model import load_tokenizer_for, parameter_report, parameter_status
from .optim import build_optimizer, build_scheduler
from .order import ArrowRows, StepLayout, epoch_order, step_indices
from .pissa import PissaInitial
from .stages import make_stage
from .stages.base import merge_metrics, reduce_metrics
from .strategy import make_strategy
from .trackers import TrackerRun, Trackers
from .trainlog import TrainerLog

# Debug knob: seconds to sleep after each optimizer step, so failure tests can interrupt a run mid-way.
STEP_DELAY_S = float(os.environ.get("LOOM_STEP_DELAY_S", "0"))

# LLaMA-Factory's RECORD_VRAM: each logged step also records every worker's peak device memory (forwarded to the
# workers by the driver, as LOOM_* variables are).
RECORD_VRAM = enabled(os.environ, "RECORD_VRAM")


class RunIO(Protocol):
    def batches(self, split: str, epoch: int) -> Iterator[dict[str, Any]]: ...

    def train_rows(self) -> ArrowRows | None: ...  # the whole training table, or None when it is streamed

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass
class StepResult:
    loss: float  # this rank's share of the step's global mean loss (the shares add up to the mean over ranks)
    tokens: int
    metrics: dict[str, list[float]]  # name -> [sum, count] on this rank


@dataclass
class Window:
    """What happened since the last log line on this rank."""

    loss_total: float = 0.0
    steps: int = 0
    tokens: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.loss_total += result.loss
        self.steps += 1
        self.tokens += result.tokens
        merge_metrics(self.metrics, result.metrics)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def windows(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def skip(batches: Iterator[Any], count: int) -> Iterator[Any]:
    for _ in range(count):
        if next(batches, None) is None:
            break
    return batches


def due(step: int, every: int | None, total: int) -> bool:
    return bool(every) and (step % every == 0 or step == total)


class StageRunner:
    """Holds the model, optimizer and state of one worker and advances them step by step."""

    def __init__(self, cfg: Any, plan: RunPlan, ctx: DistContext, io: RunIO):
        started = time.perf_counter()
        self.cfg, self.plan, self.ctx, self.io = cfg, plan, ctx, io
        self.schedule = plan.schedule
        self.tokenizer = load_tokenizer_for(cfg)
        left_out = missing_stop_words(self.tokenizer, get_template(template_name(cfg)))
        if left_out:
            ctx.print0(f"template {template_name(cfg)}: stop words {left_out} are not in the tokenizer and no example "
                       "contains them; generation stops without them (LLaMA-Factory adds them as unused tokens)")  # fmt: skip
        self.stage = make_stage(cfg, ctx, self.tokenizer)
        seed_everything(cfg.seed)
        with io.latest_checkpoint() as resume_dir:
            if resume_dir:
                verify_checkpoint(resume_dir)
            self.strategy = make_strategy(cfg, ctx, io.prepare_model)
            with self.strategy.loading():
                model = self.stage.build_model(self._starting_weights(resume_dir))
            ctx.print0(parameter_report(model))
            if cfg.print_param_status:
                ctx.print0(parameter_status(model))
            self.model, self.optimizer = self.strategy.setup(model, lambda module: build_optimizer(cfg, module))
            if layerwise(cfg) and cfg.max_grad_norm:
                ctx.print0(f"max_grad_norm {cfg.max_grad_norm} is not applied: layer-wise optimizers step each "
                           "parameter as its gradient arrives, before the whole gradient could be clipped")  # fmt: skip
            if cfg.torch_compile:  # the wrapped model, so DDP's buckets split the graph (saving reads the module)
                self.model = torch.compile(self.model)
            self.stage.prepare(self.strategy)
            # pissa_convert: the adapter before any step, which the conversion at the end subtracts (rank 0's)
            self.pissa = (
                PissaInitial.capture(self.strategy.module, resume_dir) if cfg.pissa_convert and ctx.is_main else None
            )
            self.scheduler = build_scheduler(cfg, self.strategy.lr_optimizer, self.schedule.warmup_steps,
                                             self.total_steps * self.optimizer_steps_per_step)  # fmt: skip
            self.state = self._resume(resume_dir) if resume_dir else TrainState(total_steps=self.total_steps)
            tracker_ids = (load_component(resume_dir, "trackers") or {}) if resume_dir else {}
            # load_best_model_at_end: the best checkpoint so far, {"step", "value"}, carried in every checkpoint
            self.best: dict[str, Any] | None = load_component(resume_dir, "best_model") if resume_dir else None
        self.log = TrainerLog(os.path.join(plan.output_dir, "trainer_log.jsonl")) if ctx.is_main else None
        self.trackers = self._open_trackers(tracker_ids) if ctx.is_main and plan.trackers else None
        if cfg.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 and self.strategy.name == "ddp" else None
        self.placement: list[dict[str, Any]] = []  # rank -> node, gathered when the run starts
        # Elastic runs keep the global batch whatever the number of workers, by the accumulation steps.
        self.accumulation = accumulation_for(plan.global_batch_size, plan.per_device_batch_size, ctx.world_size)
        if plan.min_workers:
            ctx.print0(f"elastic: {ctx.world_size} workers x {plan.per_device_batch_size} x {self.accumulation} "
                       f"accumulation = {ctx.world_size * plan.per_device_batch_size * self.accumulation} examples "
                       f"per step (configured {plan.global_batch_size})")  # fmt: skip
        took = time.perf_counter() - started
        ctx.print0(f"strategy {self.strategy.name}; worker setup (tokenizer, model, optimizer) took {took:.1f} s")

    def _starting_weights(self, resume_dir: str | None) -> str | None:
        """The weights folder the model starts from: the checkpoint Ray Train handed over, else a transformers
        checkpoint named by resume_from_checkpoint (its weights only), else none (the configured model)."""
        explicit = self.cfg.resume_from_checkpoint
        if resume_dir:
            return checkpoint_weights(resume_dir)
        if explicit and checkpoint_kind(explicit) == "transformers":
            self.ctx.print0(f"resume_from_checkpoint: the weights of {explicit}; optimizer, schedule and data afresh")
            return explicit
        return None

    optimizer_steps_per_step = 1  # rollout stages take several optimizer steps per logged step

    def _open_trackers(self, saved_ids: dict[str, str]) -> Trackers:
        run = TrackerRun(output_dir=self.plan.output_dir, logging_dir=self.plan.logging_dir,
                         run_name=self.cfg.run_name or self.plan.run_name,
                         config=without_secrets(self.cfg.model_dump(mode="json")),
                         start_step=self.state.global_step, run_id=None)  # fmt: skip
        trackers = Trackers(self.plan.trackers, run, self.cfg, saved_ids, self.ctx.print0)
        self.ctx.print0(f"trackers: {', '.join(self.plan.trackers)}" + (" (reopened)" if saved_ids else ""))
        return trackers

    def _resume(self, folder: str) -> TrainState:
        """Optimizer (through the strategy), scheduler, stage state, RNG and data position from a verified
        checkpoint."""
        state = restore_checkpoint(folder, self.ctx.rank)
        if state.optimizer_saved:
            self.strategy.load_optimizer(folder)
        else:
            self.ctx.print0(f"save_only_model: checkpoint step {state.global_step} holds no optimizer state; the "
                            "optimizer starts afresh (its moments at zero), the schedule and data go on")  # fmt: skip
        self.scheduler.load_state_dict(load_component(folder, "scheduler"))
        self.stage.load_state_dict(load_component(folder, "stage_state") or {})
        if state.world_size and state.world_size != self.ctx.world_size:
            self.ctx.print0(f"elastic: the checkpoint was written by {state.world_size} workers, "
                            f"this attempt has {self.ctx.world_size}")  # fmt: skip
            state = state.rescaled_to(self.ctx.world_size)
        position = f"{state.rows_in_epoch} rows" if state.rows_in_epoch else f"{state.batches_in_epoch} micro-batches"
        self.ctx.print0(f"resumed from step {state.global_step} (epoch {state.epoch}, {position} into it)")
        return state

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def _precision(self) -> contextlib.AbstractContextManager:
        if (self.cfg.bf16 or self.cfg.fp16) and self.strategy.autocast:
            dtype = torch.bfloat16 if self.cfg.bf16 else torch.float16
            return torch.autocast(self.ctx.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device) for k, v in self.stage.collate(columns).items()}

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation

    def step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One logged step from the micro-batches of rows it consumes: here, one optimizer step."""
        return self.train_step([self._collate(columns) for columns in micro_batches])

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over an accumulation window. The loss is the mean over the units (tokens, pairs,
        examples) of the whole window on all ranks: the window's count is summed over ranks first, and since DDP,
        ZeRO and FSDP average gradients over ranks, each rank's loss sum is scaled by world size / global count."""
        (global_count,) = self.ctx.sum([sum(self.stage.count(b) for b in batches)])
        scale = self.ctx.world_size / max(global_count, 1.0)
        share, metrics = 0.0, {}
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with self.strategy.micro_batch(last), self._precision():
                output = self.stage.forward(self.model, batch)
                loss = output.loss_sum * scale
            self.strategy.backward(self.scaler.scale(loss) if self.scaler else loss, last)
            share += float(output.loss_sum.detach()) / max(global_count, 1.0)
            merge_metrics(metrics, output.metrics)
        self.strategy.optimizer_step(self.scaler)
        self.scheduler.step()
        tokens = sum(self.stage.tokens(b) for b in batches)
        return StepResult(share, tokens, metrics)

    def evaluate(self, split: str = "eval") -> dict[str, float]:
        """The split's loss (mean over all ranks' units) and the stage's metrics."""
        self.model.eval()
        loss_total, count, metrics = 0.0, 0.0, {}
        with torch.no_grad(), self._precision():
            for columns in self.io.batches(split, 0):
                batch = self._collate(columns)
                output = self.stage.forward(self.model, batch)
                loss_total, count = loss_total + float(output.loss_sum), count + self.stage.count(batch)
                merge_metrics(metrics, output.metrics)
        self.model.train()
        merge_metrics(metrics, {"loss": (loss_total, count)})
        return reduce_metrics(self.ctx, metrics, ("loss",) + self.stage.spec.metrics)

    def run(self) -> TrainState:
        self.placement = self.ctx.gather(
            {"rank": self.ctx.rank, "node_ip": self.ctx.node_ip, "node_id": self.ctx.node_id}
        )
        self.ctx.print0(
            "placement: "
            + ", ".join(f"rank {w['rank']} on {w['node_ip']} (node {w['node_id'][:8]})" for w in self.placement)
        )
        if self.log:
            self.log.truncate_after(self.state.global_step)
            self._write_marker("running")
        self.model.train()
        started, first_step = time.perf_counter(), self.state.global_step
        window = Window()
        rows = self.io.train_rows()
        while self.state.global_step < self.total_steps:
            for micro_batches in self._steps_of_epoch(rows):
                window.add(self.step(micro_batches))
                self.state.global_step += 1
                self.state.batches_in_epoch += len(micro_batches)
                self.state.rows_in_epoch += self._layout().rows_per_step
                window = self._after_step(window)
                if self.state.global_step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batches_in_epoch = self.state.rows_in_epoch = 0
        self.ctx.print0(
            f"trained steps {first_step + 1}-{self.state.global_step} in {time.perf_counter() - started:.1f} s"
        )
        self.finish()
        return self.state

    def _layout(self) -> StepLayout:
        return StepLayout(self.ctx.world_size, self.ctx.rank, self.cfg.per_device_train_batch_size,
                          self.micro_batches_per_step)  # fmt: skip

    def _steps_of_epoch(self, rows: ArrowRows | None) -> Iterator[list[dict[str, Any]]]:
        """Each step's micro-batches for this rank from the saved position on: chosen by workers/order.py for a
        materialized training set (exact on resume), in Ray Data's order for a streamed one (resumed by skipping
        this rank's micro-batches, so the rows after a restart depend on how Ray Data hands blocks out)."""
        if rows is None:
            batches = skip(self.io.batches("train", self.state.epoch), self.state.batches_in_epoch)
            yield from windows(batches, self.micro_batches_per_step)
            return
        shuffle = not self.cfg.disable_shuffling
        order = epoch_order(len(rows), self.cfg.shuffle_seed(), self.state.epoch, shuffle)
        for indices in step_indices(order, self.state.rows_in_epoch, self._layout()):
            yield [rows.take(part) for part in indices]

    def _after_step(self, window: Window) -> Window:
        if STEP_DELAY_S:
            time.sleep(STEP_DELAY_S)
        step, sched = self.state.global_step, self.schedule
        log_now = due(step, sched.logging_every, self.total_steps) or (step == 1 and self.cfg.logging_first_step)
        save_now = due(step, sched.save_every, self.total_steps)  # save_strategy "no": no checkpoints at all
        eval_now = due(step, sched.eval_every, self.total_steps) or (step == self.total_steps and self.cfg.do_eval)
        if not (log_now or save_now or eval_now):
            return window
        metrics: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}  # wall clock: the driver's rates
        loss_total, tokens = self.ctx.sum([window.loss_total, window.tokens])
        stage_metrics = reduce_metrics(self.ctx, window.metrics, self.stage.spec.metrics)
        self.state.tokens_seen += int(tokens)
        if log_now:
            elapsed = time.perf_counter() - window.started
            metrics.update(
                loss=round(loss_total / max(window.steps, 1), 6),
                **stage_metrics,
                learning_rate=self.scheduler.get_last_lr()[0],
                epoch=round(step / sched.steps_per_epoch, 4),
                tokens_seen=self.state.tokens_seen,
            )
            if self.cfg.include_effective_tokens_per_second:
                metrics["effective_tokens_per_sec"] = round(tokens / max(elapsed, 1e-9), 2)
            if RECORD_VRAM:  # every rank's peak so far, rank by rank (a collective: every rank logs at this step)
                metrics["memory_peak_gb"] = [round(gb, 3) for gb in self.ctx.gather(self.ctx.peak_memory_gb())]
        if eval_now:
            for split in self.plan.eval_splits:  # "eval", or "eval_<dataset>" per dataset
                metrics.update({f"{split}_{name}": value for name, value in self.evaluate(split).items()})
        if save_now and self.plan.best_metric in metrics:
            self._track_best(step, metrics[self.plan.best_metric])
        if self.log and (log_now or eval_now):
            self.log.append(metrics)
            if self.trackers:
                self.trackers.log(metrics)
        if save_now or step == self.total_steps:
            # ray.train.report is a barrier that costs seconds per call (measured by bench/overhead.py), so it is
            # called at checkpoints and at the end only; every logged step is in trainer_log.jsonl.
            self.io.report(metrics, self._save_checkpoint() if save_now else None)
        return Window()

    def _track_best(self, step: int, value: float) -> None:
        if self.best is None or (value > self.best["value"] if self.plan.best_greater else value < self.best["value"]):
            self.best = {"step": step, "value": value}

    def _save_checkpoint(self) -> str | None:
        """Each writing rank fills a fresh local folder (rank 0 alone under DDP, every rank its optimizer shard under
        DeepSpeed/FSDP); Ray merges the folders. Rank 0's manifest lists every rank's files and is written last."""
        rng_states = self.ctx.gather(rng_state())
        self.state.finished = self.state.global_step >= self.total_steps
        self.state.world_size = self.ctx.world_size
        self.state.optimizer_saved = not self.cfg.save_only_model
        weights = self.strategy.full_state_dict()  # a collective when the weights are sharded
        writes = self.ctx.is_main or (self.strategy.sharded and self.state.optimizer_saved)
        folder = tempfile.mkdtemp(prefix=f"loom-ckpt-{self.state.global_step}-") if writes else None
        if self.state.optimizer_saved:
            self.strategy.save_optimizer(folder)
        written = self.ctx.gather(list_files(folder) if folder else {})
        if self.ctx.is_main:
            others = {name: size for files in written[1:] for name, size in files.items()}
            components = {"scheduler": self.scheduler.state_dict(), "stage_state": self.stage.state_dict()}
            if self.trackers:
                components["trackers"] = self.trackers.ids()  # a restart reopens the same tracker runs
            if self.best is not None:
                components["best_model"] = self.best
            if self.pissa:
                self.pissa.add_to(folder)
            save_checkpoint(folder, self.strategy.module, self.state, rng_states, weights=weights,
                            components=components, other_ranks_files=others, workers=self.placement)  # fmt: skip
        return folder

    def finish(self) -> None:
        """Rank 0 writes the final model or adapter and tokenizer into output_dir, the marker last."""
        weights = self.strategy.full_state_dict()  # a collective when the weights are sharded
        if self.ctx.is_main:
            model = self.strategy.module
            model.config.use_cache = True
            if self.best and self.best["step"] != self.state.global_step:
                self._write_best_model()
            else:
                model.save_pretrained(self.plan.output_dir, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(self.plan.output_dir)
            if self.pissa:
                converted = self.pissa.convert(model, self.plan.output_dir)
                self.ctx.print0(f"pissa_convert: {converted} is a LoRA adapter for the original base model")
            self._write_marker("finished")
            if self.cfg.push_to_hub:
                self._push_to_hub()
            if self.cfg.plot_loss:  # drawn where the log is: rank 0's output_dir
                from orchestrator.plots import plot_log

                plot_log(self.plan.output_dir, self.cfg.stage)
            if self.trackers:
                self.trackers.close()
        self.ctx.barrier()

    def _write_best_model(self) -> None:
        """load_best_model_at_end: output_dir gets the best checkpoint's model folder as it was saved, copied from
        the run's storage (Ray kept that checkpoint: it ranks them by the same metric)."""
        from pyarrow import fs as pafs

        from orchestrator import storage

        step, value = self.best["step"], self.best["value"]
        filesystem, run_dir = storage.resolve(self.plan.run_dir, storage.storage_filesystem(self.cfg))
        source = f"{run_dir}/checkpoint-{step:06d}/model"
        os.makedirs(self.plan.output_dir, exist_ok=True)
        pafs.copy_files(source, self.plan.output_dir, source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        self.ctx.print0(f"load_best_model_at_end: output_dir holds step {step}'s model ({self.plan.best_metric} "
                        f"{value}), not step {self.state.global_step}'s")  # fmt: skip

    def _push_to_hub(self) -> None:
        """The model is saved whatever happens here: a failed upload is reported, not a failed run (a retry would
        only find the run finished)."""
        from orchestrator.hub import push_output

        try:
            url = push_output(
                self.cfg, self.plan.output_dir, f"Loom run {self.plan.run_name}, step {self.state.global_step}"
            )
            self.ctx.print0(f"push_to_hub: uploaded {self.plan.output_dir} to {url}")
        except Exception as error:  # the Hub's and the network's errors alike
            self.ctx.print0(
                f"push_to_hub FAILED: {type(error).__name__}: {error} (the model is in {self.plan.output_dir})"
            )

    def _write_marker(self, status: str) -> None:
        os.makedirs(self.plan.output_dir, exist_ok=True)
        path = os.path.join(self.plan.output_dir, RUN_MARKER)
        record = {
            "status": status,
            "run_name": self.plan.run_name,
            "run_dir": self.plan.run_dir,
            "step": self.state.global_step,
            "total_steps": self.total_steps,
            "stage": self.cfg.stage,
            "finetuning_type": self.cfg.finetuning_type,
            "best_model": self.best,  # load_best_model_at_end: the step output_dir's model is from
            "workers": self.placement,  # rank -> node of the current attempt
        }
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        os.replace(path + ".tmp", path)
