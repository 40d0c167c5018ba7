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

from orchestrator.plan import RUN_MARKER, accumulation_for

from .checkpoint import TrainState, list_files, restore_checkpoint, rng_state, save_checkpoint, verify_checkpoint
from .context import DistContext
from .model import build_model, load_tokenizer_for, parameter_report, parameter_status
from .optim import build_optimizer, build_scheduler
from .stages import get_stage
from .strategy import make_strategy
from .trainlog import TrainerLog

# Debug knob: seconds to sleep after each optimizer step, so failure tests can interrupt a run mid-way.
STEP_DELAY_S = float(os.environ.get("LOOM_STEP_DELAY_S", "0"))


class RunIO(Protocol):
    def batches(self, split: str, epoch: int) -> Iterator[dict[str, Any]]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass
class Window:
    """What happened since the last log line on this rank."""

    loss_total: float = 0.0
    steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


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

    def __init__(self, cfg: Any, plan: dict[str, Any], ctx: DistContext, io: RunIO):
        started = time.perf_counter()
        self.cfg, self.plan, self.ctx, self.io = cfg, plan, ctx, io
        self.schedule = plan["schedule"]
        self.stage = get_stage(cfg.stage)
        self.tokenizer = load_tokenizer_for(cfg)
        seed_everything(cfg.seed)
        with io.latest_checkpoint() as resume_dir:
            if resume_dir:
                verify_checkpoint(resume_dir)
            self.strategy = make_strategy(cfg, ctx, io.prepare_model)
            with self.strategy.loading():
                model = build_model(cfg, os.path.join(resume_dir, "model") if resume_dir else None, self.tokenizer)
            ctx.print0(parameter_report(model))
            if cfg.print_param_status:
                ctx.print0(parameter_status(model))
            self.model, self.optimizer = self.strategy.setup(model, lambda module: build_optimizer(cfg, module))
            self.scheduler = build_scheduler(
                cfg, self.strategy.lr_optimizer, self.schedule["warmup_steps"], self.total_steps
            )
            self.state = self._resume(resume_dir) if resume_dir else TrainState(total_steps=self.total_steps)
        self.log = TrainerLog(os.path.join(plan["output_dir"], "trainer_log.jsonl")) if ctx.is_main else None
        if cfg.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 and self.strategy.name == "ddp" else None
        self.placement: list[dict[str, Any]] = []  # rank -> node, gathered when the run starts
        # Elastic runs keep the global batch whatever the number of workers, by the accumulation steps.
        self.accumulation = accumulation_for(plan["global_batch_size"], plan["per_device_batch_size"], ctx.world_size)
        if plan.get("min_workers"):
            ctx.print0(f"elastic: {ctx.world_size} workers x {plan['per_device_batch_size']} x {self.accumulation} "
                       f"accumulation = {ctx.world_size * plan['per_device_batch_size'] * self.accumulation} examples "
                       f"per step (configured {plan['global_batch_size']})")  # fmt: skip
        took = time.perf_counter() - started
        ctx.print0(f"strategy {self.strategy.name}; worker setup (tokenizer, model, optimizer) took {took:.1f} s")

    def _resume(self, folder: str) -> TrainState:
        """Optimizer (through the strategy), scheduler, RNG and data position from a verified checkpoint."""
        self.strategy.load_optimizer(folder)
        state = restore_checkpoint(folder, self.scheduler, self.ctx.rank)
        if state.world_size and state.world_size != self.ctx.world_size:
            self.ctx.print0(f"elastic: the checkpoint was written by {state.world_size} workers, "
                            f"this attempt has {self.ctx.world_size}")  # fmt: skip
            state = state.rescaled_to(self.ctx.world_size)
        self.ctx.print0(f"resumed from step {state.global_step} (epoch {state.epoch}, "
                        f"{state.batches_in_epoch} micro-batches into it)")  # fmt: skip
        return state

    @property
    def total_steps(self) -> int:
        return self.schedule["total_steps"]

    def _precision(self) -> contextlib.AbstractContextManager:
        if (self.cfg.bf16 or self.cfg.fp16) and self.strategy.autocast:
            dtype = torch.bfloat16 if self.cfg.bf16 else torch.float16
            return torch.autocast(self.ctx.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _collate(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = self.stage.collate(columns, self.tokenizer.pad_token_id, self.cfg.ignore_pad_token_for_loss)
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def train_step(self, window: list[dict[str, Any]]) -> tuple[float, int]:
        """One optimizer step over an accumulation window; loss normalised by the window's label count."""
        batches = [self._collate(columns) for columns in window]
        label_count = max(1, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        step_loss = 0.0
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with self.strategy.micro_batch(last), self._precision():
                loss_sum, _ = self.stage.loss_sum(self.model, batch)
                loss = loss_sum / label_count
            self.strategy.backward(self.scaler.scale(loss) if self.scaler else loss, last)
            step_loss += float(loss.detach())
        self.strategy.optimizer_step(self.scaler)
        self.scheduler.step()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return step_loss, tokens

    def evaluate(self, split: str = "eval") -> float:
        self.model.eval()
        loss_total, count = 0.0, 0
        with torch.no_grad(), self._precision():
            for columns in self.io.batches(split, 0):
                loss_sum, n = self.stage.loss_sum(self.model, self._collate(columns))
                loss_total, count = loss_total + float(loss_sum), count + n
        self.model.train()
        loss_total, count = self.ctx.sum([loss_total, count])
        return loss_total / max(count, 1)

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
        while self.state.global_step < self.total_steps:
            batches = skip(self.io.batches("train", self.state.epoch), self.state.batches_in_epoch)
            for micro_batches in windows(batches, self.accumulation):
                loss, tokens = self.train_step(micro_batches)
                self.state.global_step += 1
                self.state.batches_in_epoch += len(micro_batches)
                window.loss_total, window.steps, window.tokens = (
                    window.loss_total + loss,
                    window.steps + 1,
                    window.tokens + tokens,
                )
                window = self._after_step(window)
                if self.state.global_step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
        self.ctx.print0(
            f"trained steps {first_step + 1}-{self.state.global_step} in {time.perf_counter() - started:.1f} s"
        )
        self.finish()
        return self.state

    def _after_step(self, window: Window) -> Window:
        if STEP_DELAY_S:
            time.sleep(STEP_DELAY_S)
        step, sched = self.state.global_step, self.schedule
        log_now = due(step, sched["logging_every"], self.total_steps) or (step == 1 and self.cfg.logging_first_step)
        save_now = due(step, sched["save_every"], self.total_steps)  # save_strategy "no": no checkpoints at all
        eval_now = due(step, sched["eval_every"], self.total_steps) or (step == self.total_steps and self.cfg.do_eval)
        if not (log_now or save_now or eval_now):
            return window
        metrics: dict[str, Any] = {"step": step}
        loss_total, steps, tokens = self.ctx.sum([window.loss_total, window.steps, window.tokens])
        self.state.tokens_seen += int(tokens)
        if log_now:
            elapsed = time.perf_counter() - window.started
            metrics.update(
                loss=round(loss_total / max(steps, 1), 6),
                learning_rate=self.scheduler.get_last_lr()[0],
                epoch=round(step / sched["steps_per_epoch"], 4),
                tokens_seen=self.state.tokens_seen,
            )
            if self.cfg.include_effective_tokens_per_second:
                metrics["effective_tokens_per_sec"] = round(tokens / max(elapsed, 1e-9), 2)
        if eval_now:
            for split in self.plan.get("eval_splits", ["eval"]):  # "eval", or "eval_<dataset>" per dataset
                metrics[f"{split}_loss"] = round(self.evaluate(split), 6)
        if self.log and (log_now or eval_now):
            self.log.append(metrics)
        if save_now or step == self.total_steps:
            # ray.train.report is a barrier that costs seconds per call (measured by bench/overhead.py), so it is
            # called at checkpoints and at the end only; every logged step is in trainer_log.jsonl.
            self.io.report(metrics, self._save_checkpoint() if save_now else None)
        return Window()

    def _save_checkpoint(self) -> str | None:
        """Each writing rank fills a fresh local folder (rank 0 alone under DDP, every rank its optimizer shard under
        DeepSpeed/FSDP); Ray merges the folders. Rank 0's manifest lists every rank's files and is written last."""
        rng_states = self.ctx.gather(rng_state())
        self.state.finished = self.state.global_step >= self.total_steps
        self.state.world_size = self.ctx.world_size
        weights = self.strategy.full_state_dict()  # a collective when the weights are sharded
        writes = self.ctx.is_main or self.strategy.sharded
        folder = tempfile.mkdtemp(prefix=f"loom-ckpt-{self.state.global_step}-") if writes else None
        self.strategy.save_optimizer(folder)
        written = self.ctx.gather(list_files(folder) if folder else {})
        if self.ctx.is_main:
            others = {name: size for files in written[1:] for name, size in files.items()}
            module = self.strategy.module
            save_checkpoint(folder, module, self.scheduler, self.state, rng_states, None, weights, others)
        return folder

    def finish(self) -> None:
        """Rank 0 writes the final model or adapter and tokenizer into output_dir, the marker last."""
        weights = self.strategy.full_state_dict()  # a collective when the weights are sharded
        if self.ctx.is_main:
            model = self.strategy.module
            model.config.use_cache = True
            model.save_pretrained(self.plan["output_dir"], state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(self.plan["output_dir"])
            self._write_marker("finished")
        self.ctx.barrier()

    def _write_marker(self, status: str) -> None:
        os.makedirs(self.plan["output_dir"], exist_ok=True)
        path = os.path.join(self.plan["output_dir"], RUN_MARKER)
        record = {
            "status": status,
            "run_name": self.plan["run_name"],
            "run_dir": self.plan["run_dir"],
            "step": self.state.global_step,
            "total_steps": self.total_steps,
            "stage": self.cfg.stage,
            "finetuning_type": self.cfg.finetuning_type,
            "workers": self.placement,  # rank -> node of the current attempt
        }
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        os.replace(path + ".tmp", path)
