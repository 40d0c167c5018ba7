"""PPO's reward sources, by `reward_model_type`: one score per (prompt, response) sequence.

- `lora`: a second adapter ("reward") with its value head on the policy's own base model. It is loaded before the
  strategy wraps the policy, frozen, and selected per forward pass (PEFT's `adapter_names`), so the policy's own
  adapter and its trainable flags are never switched.
- `full`: a separate frozen causal LM (`reward_model`, with `reward_model_adapters` merged in) with its value head,
  prepared by the strategy like any frozen model.
- `api`: an HTTP endpoint taking LLaMA-Factory's request `{"model": ..., "messages": [text, ...]}` and answering
  `{"scores": [...]}` (Loom's and LLaMA-Factory's `/v1/score/evaluation`), with an optional bearer key
  (LOOM_REWARD_API_KEY), a timeout and retries.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from orchestrator.quantization import frozen_bits
from orchestrator.values import split_csv

from .model import load_frozen_model
from .value_head import ValueHeadModel, last_token_index, load_head_weights

REWARD_ADAPTER = "reward"
API_KEY_ENV = "LOOM_REWARD_API_KEY"


def score_at_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(attention_mask)].float()


def reward_head_folder(cfg: Any) -> str:
    """Where the reward model's value head is: beside its last adapter, else in the model folder."""
    adapters = split_csv(cfg.reward_model_adapters)
    return adapters[-1] if adapters else cfg.reward_model


class LoraReward:
    """The reward adapter on the policy's base. `attach` runs on the unwrapped policy before the strategy."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def attach(self, policy: ValueHeadModel) -> None:
        policy.body.load_adapter(self.cfg.reward_model, adapter_name=REWARD_ADAPTER, is_trainable=False)
        weights = load_head_weights(self.cfg.reward_model)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        self.head.load_state_dict(weights)
        self.head.requires_grad_(False)

    def prepare(self, strategy: Any) -> None:
        self.policy, self.head = strategy.module, self.head.to(strategy.ctx.device)

    @torch.no_grad()
    def scores(self, batch: dict[str, torch.Tensor], texts: list[str]) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        hidden = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], adapter_names=[REWARD_ADAPTER] * rows).hidden  # fmt: skip
        return score_at_last_token(self.head(hidden.float()).squeeze(-1), batch["attention_mask"])


class FullReward:
    """A separate frozen reward model with its value head."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def attach(self, policy: ValueHeadModel) -> None:
        pass

    def prepare(self, strategy: Any) -> None:
        with strategy.loading():
            body = load_frozen_model(self.cfg, self.cfg.reward_model, self.cfg.reward_model_adapters,
                                     frozen_bits(self.cfg, "reward"), strategy.ctx.device)  # fmt: skip
            model = ValueHeadModel(body)
        if not model.load_head(reward_head_folder(self.cfg)):
            raise FileNotFoundError(f"reward_model: no value_head.safetensors in {reward_head_folder(self.cfg)}")
        self.model = strategy.prepare_frozen(model)

    @torch.no_grad()
    def scores(self, batch: dict[str, torch.Tensor], texts: list[str]) -> torch.Tensor:
        values = self.model(with_logits=False, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).values  # fmt: skip
        return score_at_last_token(values, batch["attention_mask"])


class ApiReward:
    """Scores from an HTTP endpoint; a clear error naming the URL once the retries are spent."""

    def __init__(self, cfg: Any):
        self.url, self.timeout, self.retries = cfg.reward_model, cfg.reward_api_timeout_s, cfg.reward_api_retries

    def attach(self, policy: ValueHeadModel) -> None:
        pass

    def prepare(self, strategy: Any) -> None:
        self.device = strategy.ctx.device

    def _post(self, texts: list[str]) -> list[float]:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        body = json.dumps({"model": "model", "messages": texts}).encode()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            scores = json.loads(response.read())["scores"]
        if len(scores) != len(texts):
            raise ValueError(f"answered {len(scores)} scores for {len(texts)} texts")
        return [float(score) for score in scores]

    def scores(self, batch: dict[str, torch.Tensor], texts: list[str]) -> torch.Tensor:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return torch.tensor(self._post(texts), dtype=torch.float32, device=self.device)
            except urllib.error.HTTPError as caught:
                if 400 <= caught.code < 500 and caught.code not in (408, 429):  # a request it refuses: no retry
                    raise RuntimeError(f"reward API {self.url} refused the request: HTTP {caught.code} "
                                       f"{caught.reason} (LOOM_REWARD_API_KEY set: {API_KEY_ENV in os.environ})") from caught  # fmt: skip
                error = caught
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as caught:
                error = caught
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise RuntimeError(f"reward API {self.url} failed after {self.retries + 1} attempts: {error}") from error


REWARDS = {"lora": LoraReward, "full": FullReward, "api": ApiReward}


def make_reward(cfg: Any) -> LoraReward | FullReward | ApiReward:
    return REWARDS[cfg.reward_model_type](cfg)
