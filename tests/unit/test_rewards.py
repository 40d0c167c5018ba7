"""ppo's api reward against a real HTTP server on loopback: LLaMA-Factory's request shape, the bearer key, retries,
and errors that name the URL."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import free_port
from tests.reward_server import scoring_server
from workers.rewards import ApiReward


def api_reward(url: str, retries: int = 2) -> ApiReward:
    reward = ApiReward(SimpleNamespace(reward_model=url, reward_api_timeout_s=5.0, reward_api_retries=retries))
    reward.prepare(SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cpu"))))
    return reward


def test_scores_come_back_in_order_with_the_bearer_key(monkeypatch):
    monkeypatch.setenv("LOOM_REWARD_API_KEY", "sesame")
    with scoring_server(lambda text: float(len(text)), key="sesame") as (url, received):
        scores = api_reward(url).scores({}, ["a", "abcd", "ab"])
    assert scores.tolist() == [1.0, 4.0, 2.0]
    assert received[0]["body"] == {"model": "model", "messages": ["a", "abcd", "ab"]}
    assert received[0]["authorization"] == "Bearer sesame"


def test_a_refused_request_fails_at_once_and_names_the_url(monkeypatch):
    monkeypatch.delenv("LOOM_REWARD_API_KEY", raising=False)
    with scoring_server(lambda text: 0.0, key="sesame") as (url, received):
        with pytest.raises(RuntimeError, match=f"reward API {url} refused the request: HTTP 401"):
            api_reward(url, retries=3).scores({}, ["x"])
    assert len(received) == 1  # a 401 is not retried


def test_an_unreachable_endpoint_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}/v1/score/evaluation"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"reward API {url} failed after 3 attempts"):
        api_reward(url, retries=2).scores({}, ["x"])
    assert time.perf_counter() - started >= 1.5  # backoff 0.5 s + 1 s between the three attempts
