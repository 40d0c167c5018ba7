"""The rollout loop (ppo): each logged step generates and scores a buffer of experience, then takes several
optimizer steps over it. Setup, cadence, logging, checkpoints and resume are the batch loop's (StageRunner); only
what one step is differs. A rollout stage gives `prompts` (from a micro-batch of rows), `rollout` (experience rows
and metrics) and `experience_batch` (rows -> tensors) in place of `collate`."""

from __future__ import annotations

import time
from typing import Any

import torch

from .loop import StageRunner, StepResult, windows
from .stages.base import merge_metrics


class RolloutRunner(StageRunner):
    @property
    def optimizer_steps_per_step(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.ppo_buffer_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation * self.cfg.ppo_buffer_size

    def step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        started = time.perf_counter()
        self.model.eval()
        with self._precision():
            rows, metrics = self.stage.rollout([self.stage.prompts(columns) for columns in micro_batches])
        self.model.train()
        rollout_s, started = time.perf_counter() - started, time.perf_counter()
        # The shuffle is a function of the seed and the step, so a resumed run replays the same mini-batches.
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.state.global_step)
        size = self.cfg.per_device_train_batch_size
        sums: dict[str, list[float]] = {}
        merge_metrics(sums, metrics)
        shares = []
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            mini_batches = [order[i : i + size] for i in range(0, len(order), size)]
            for window in windows(iter(mini_batches), self.accumulation):
                result = self.train_step([self.stage.experience_batch([rows[i] for i in batch]) for batch in window])
                shares.append(result.loss)
                merge_metrics(sums, result.metrics)
        merge_metrics(sums, {"rollout_time": (rollout_s, 1.0), "update_time": (time.perf_counter() - started, 1.0)})
        tokens = sum(len(row["prompt"]) + len(row["response"]) for row in rows)
        return StepResult(sum(shares) / max(len(shares), 1), tokens, sums)
