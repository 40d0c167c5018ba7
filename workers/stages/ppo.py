"""Proximal policy optimisation, Loom's own loop (TRL 1.x has no PPO trainer).

Each logged step: generate responses for `per_device_train_batch_size x gradient_accumulation_steps x
ppo_buffer_size` prompts per rank (the generation keys), score them (`reward_model_type`), compute old log-probs and
values (policy + value head), reference log-probs, per-token rewards with a KL penalty, GAE advantages (whitened)
and returns; then `ppo_epochs` passes over that experience in shuffled mini-batches of
`per_device_train_batch_size`, one optimizer step per `gradient_accumulation_steps` of them, with the clipped
policy loss plus 0.1 x the clipped value loss, averaged over response tokens across all ranks. The adaptive KL
coefficient (toward `ppo_target`) and the running score statistics (`ppo_score_norm`) are stage state, saved with
every checkpoint. Constants are LLaMA-Factory's (TRL 0.9's PPOConfig defaults).
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.data.templates import get_template, stop_token_ids
from orchestrator.data.tokenizer import template_name

from ..collate import left_pad, pad_experience, trim_response
from ..generation import Sampling, generate_kwargs
from ..losses import (
    AdaptiveKLController,
    RunningMoments,
    gae_advantages,
    kl_shaped_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
from ..model import build_model
from ..rewards import make_reward
from ..value_head import ValueHeadModel
from .base import BaseStage, Metrics, StageOutput, add_metric
from .reference import make_reference

GAMMA, LAM = 1.0, 0.95  # GAE
CLIP_RANGE, VALUE_CLIP_RANGE, VALUE_COEF = 0.2, 0.2, 0.1
INIT_KL_COEF, KL_HORIZON = 0.2, 10000
EXPERIENCE = ("old_logprobs", "old_values", "advantages", "returns")


def response_slice(batch: dict[str, torch.Tensor], per_position: torch.Tensor) -> torch.Tensor:
    """The positions that predict the response tokens: [P - 1, P - 1 + R)."""
    width, length = int(batch["prompt_width"]), batch["response_mask"].shape[1]
    return per_position[:, width - 1 : width - 1 + length]


def response_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    width = int(batch["prompt_width"])
    return batch["input_ids"][:, width:]


class Stage(BaseStage):
    def build_model(self, resume_dir: str | None) -> torch.nn.Module:
        model = ValueHeadModel(build_model(self.cfg, resume_dir, self.tokenizer, self.ctx.device))
        if resume_dir:
            model.load_head(resume_dir)
        self.reward = make_reward(self.cfg)
        self.reward.attach(model)  # a reward adapter joins the policy before the strategy wraps it
        return model

    def prepare(self, strategy: Any) -> None:
        super().prepare(strategy)
        self.reference = make_reference(self.cfg, strategy, strategy.module)
        self.reward.prepare(strategy)
        self.kl_control = AdaptiveKLController(INIT_KL_COEF, self.cfg.ppo_target, KL_HORIZON)
        self.score_stats = RunningMoments()

    def state_dict(self) -> dict[str, Any]:
        return {"kl_control": self.kl_control.state_dict(), "score_stats": self.score_stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.kl_control.load_state_dict(state["kl_control"])
            self.score_stats.load_state_dict(state["score_stats"])

    # ---- the update: a micro-batch of experience -> clipped policy and value losses ----

    def prompts(self, columns: dict[str, Any]) -> list[list[int]]:
        """The rollout's prompts from a micro-batch of rows (padded when generating)."""
        return [list(map(int, ids)) for ids in columns["input_ids"]]

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["response_mask"].sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"])  # fmt: skip
        logprobs = token_logprobs(response_slice(batch, output.logits), response_ids(batch))
        values = response_slice(batch, output.values)
        mask = batch["response_mask"]
        policy, clipped = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, CLIP_RANGE)
        value, _ = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, VALUE_CLIP_RANGE)
        tokens = float(mask.sum())
        metrics = {"policy_loss": (float(policy.detach()), tokens), "value_loss": (float(value.detach()), tokens),
                   "clipfrac": (float(clipped), tokens)}  # fmt: skip
        return StageOutput(policy + VALUE_COEF * value, metrics)

    def experience_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        per_token = {name: [row[name] for row in rows] for name in EXPERIENCE}
        batch = pad_experience([r["prompt"] for r in rows], [r["response"] for r in rows],
                               self.tokenizer.pad_token_id, per_token)  # fmt: skip
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    # ---- the rollout: prompts -> responses -> scores -> experience rows ----

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        stop_ids = stop_token_ids(self.tokenizer, get_template(template_name(self.cfg)))
        kwargs = generate_kwargs(Sampling.from_config(self.cfg), ids.shape[1], stop_ids, self.tokenizer,
                                 self.cfg.use_cache)  # fmt: skip
        with self.strategy.generating() as extra:
            out = self.strategy.module.body.generate(
                input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device), **kwargs, **extra
            )
        return [
            trim_response(row.tolist(), set(stop_ids), self.tokenizer.pad_token_id) for row in out[:, ids.shape[1] :]
        ]

    @torch.no_grad()
    def _score(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.ctx.device) for k, v in pad_experience(prompts, responses,
                                                                     self.tokenizer.pad_token_id).items()}  # fmt: skip
        texts = [
            self.tokenizer.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, responses, strict=True)
        ]
        scores = self.reward.scores(batch, texts)
        output = self.strategy.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"])  # fmt: skip
        logprobs = token_logprobs(response_slice(batch, output.logits), response_ids(batch))
        reference = token_logprobs(response_slice(batch, self.reference.logits(batch)), response_ids(batch))
        return {"mask": batch["response_mask"], "scores": scores, "logprobs": logprobs, "ref_logprobs": reference,
                "values": response_slice(batch, output.values)}  # fmt: skip

    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """ppo_score_norm: scores over the running mean/std of every score seen on every rank so far."""
        if not self.cfg.ppo_score_norm:
            return scores
        count, total, squares = self.ctx.sum([scores.numel(), float(scores.sum()), float((scores**2).sum())])
        mean = total / count
        self.score_stats.update(mean, max(squares / count - mean**2, 0.0), count)
        return self.score_stats.normalise(scores)

    def rollout(self, prompt_batches: list[list[list[int]]]) -> tuple[list[dict[str, Any]], Metrics]:
        """Experience rows (prompt, response, old log-probs and values, advantages, returns) and rollout metrics."""
        parts = []
        for prompts in prompt_batches:
            responses = self._generate(prompts)
            parts.append((prompts, responses, self._score(prompts, responses)))
        raw_scores = torch.cat([part[2]["scores"] for part in parts])
        scores = self._normalise(raw_scores).split([len(part[0]) for part in parts])
        rows, kls, advantages = [], [], []
        for (prompts, responses, scored), part_scores in zip(parts, scores, strict=True):
            mask = scored["mask"]
            rewards, kl = kl_shaped_rewards(part_scores, scored["logprobs"], scored["ref_logprobs"], mask,
                                            self.kl_control.value)  # fmt: skip
            if self.cfg.ppo_whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantage, returns = gae_advantages(rewards, scored["values"], mask, GAMMA, LAM)
            kls.append(kl.sum(dim=1))
            for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
                n = len(response)
                rows.append({"prompt": prompt, "response": response,
                             "old_logprobs": scored["logprobs"][index, :n].cpu(),
                             "old_values": scored["values"][index, :n].cpu(), "returns": returns[index, :n].cpu()})  # fmt: skip
                advantages.append(advantage[index, :n].cpu())
        whitened = masked_whiten(torch.cat(advantages), torch.ones(sum(len(a) for a in advantages)))
        for row, values in zip(rows, whitened.split([len(a) for a in advantages]), strict=True):
            row["advantages"] = values
        kl_per_sequence = torch.cat(kls)
        (kl_total, sequences) = self.ctx.sum([float(kl_per_sequence.sum()), kl_per_sequence.numel()])
        metrics: Metrics = {"kl_coef": (self.kl_control.value, 1.0)}
        self.kl_control.update(kl_total / max(sequences, 1), int(sequences))
        add_metric(metrics, "reward", raw_scores)
        add_metric(metrics, "kl", kl_per_sequence)
        add_metric(metrics, "response_length", torch.tensor([float(len(r["response"])) for r in rows]))
        return rows, metrics
