"""ppo on the session's Ray cluster, once for each reward_model_type, each raising the mean reward it logs.

The reward that the lora and full reward models learn, and that the api endpoint computes, prefers the end-of-text
token early (short answers): a preference a tiny policy can act on within a few PPO steps. The reward model is
trained on the tiny model's own samples (pairs of its answers to the same prompt, the shorter one chosen), as real
reward models are trained on their policy's outputs, so its scores mean something on what the policy generates.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import DEMO_DATA
from tests.ray.test_cli_runs import checkpoints, kill_a_worker_and_finish, steps_logged
from tests.ray.test_train import logged, run
from tests.reward_server import scoring_server

PPO_STEPS = 12


def shorter_is_better_pairs(tiny_model: str, folder) -> str:
    """Two sampled answers of the tiny model per demo prompt, the shorter one chosen: a ranking dataset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.demo import sft_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = sft_rows()
    prompts = [f"Human: {r['instruction']}" + (f"\n{r['input']}" if r["input"] else "") + "\nAssistant:" for r in rows]
    torch.manual_seed(0)
    pairs = []
    for start in range(0, len(prompts), 100):
        encoded = tokenizer(prompts[start : start + 100], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=16,
                                 num_return_sequences=2, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for index, row in enumerate(rows[start : start + 100]):
            a, b = texts[2 * index].strip(), texts[2 * index + 1].strip()
            if len(a) != len(b):
                chosen, rejected = sorted((a, b), key=len)
                pairs.append({"instruction": row["instruction"], "input": row["input"], "chosen": chosen,
                              "rejected": rejected})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.json").write_text(json.dumps(pairs))
    columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    (folder / "dataset_info.json").write_text(json.dumps({"shorter": {"file_name": "pairs.json", "ranking": True,
                                                                      "columns": columns}}))  # fmt: skip
    return str(folder)


@pytest.fixture(scope="module")
def reward_adapter(ray_cluster, tiny_model, tmp_path_factory) -> str:
    """A LoRA reward model (adapter + value_head.safetensors), trained once for this module's runs."""
    from orchestrator.config import validate_config
    from orchestrator.launch import train

    root = tmp_path_factory.mktemp("reward")
    raw = {"model_name_or_path": tiny_model, "dataset": "shorter", "dataset_dir": shorter_is_better_pairs(
               tiny_model, root / "data"), "template": "default", "stage": "rm", "cutoff_len": 64,
           "output_dir": str(root / "out"), "ray_storage_path": str(root / "saves"), "ray_run_name": "reward",
           "ray_num_workers": 2, "resources_per_worker": {"CPU": 1}, "per_device_train_batch_size": 8,
           "max_steps": 24, "save_steps": 24, "logging_steps": 24, "learning_rate": 5e-3,
           "lr_scheduler_type": "constant", "val_size": 32, "do_eval": True, "eval_strategy": "steps",
           "eval_steps": 24}  # fmt: skip
    outcome = train(validate_config(raw), source="test", address=ray_cluster.gcs_address)
    assert logged(outcome.output_dir)[-1]["eval_accuracy"] > 0.7  # it learnt the preference on held-out pairs
    return outcome.output_dir


@pytest.fixture
def ppo_config(train_config):
    def build(**extra) -> dict:
        defaults = {"stage": "ppo", "dataset": "loom_demo_sft", "cutoff_len": 64, "max_samples": None,
                    "per_device_train_batch_size": 8, "max_steps": PPO_STEPS, "save_steps": 6, "ppo_epochs": 4,
                    "max_new_tokens": 16, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}  # fmt: skip
        return train_config(**{**defaults, **extra})

    return build


def assert_reward_went_up(records: list[dict]) -> None:
    rewards = [r["reward"] for r in records]
    assert [r["step"] for r in records] == list(range(1, PPO_STEPS + 1))
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert {"kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "response_length", "rollout_time"} <= set(
        records[-1]
    )


def test_ppo_with_a_lora_reward_adapter_on_the_policy_base(ray_cluster, ppo_config, reward_adapter, tiny_model):
    outcome = run(ppo_config(reward_model_type="lora", reward_model=reward_adapter), ray_cluster)
    records = logged(outcome.output_dir)
    assert_reward_went_up(records)
    assert records[-1]["response_length"] < records[0]["response_length"]
    checkpoint = os.path.join(outcome.plan.run_dir, "checkpoint-000012")
    assert {"stage_state.pt", "scheduler.pt"} <= set(os.listdir(checkpoint))
    assert "value_head.safetensors" in os.listdir(os.path.join(checkpoint, "model"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), outcome.output_dir)
    assert list(tuned.peft_config) == ["default"]  # the reward adapter is not saved with the policy


def test_ppo_full_with_a_separate_reward_model(ray_cluster, ppo_config, reward_adapter, tiny_model):
    """Full fine-tuning of the policy (its reference: a frozen copy of the initial model) scored by a separate
    frozen reward model: the base with the rm adapter merged in, and its value head."""
    raw = ppo_config(finetuning_type="full", learning_rate=5e-4, reward_model_type="full", reward_model=tiny_model,
                     reward_model_adapters=reward_adapter)  # fmt: skip
    outcome = run(raw, ray_cluster)
    assert_reward_went_up(logged(outcome.output_dir))
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(outcome.output_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert tuned.keys() == base.keys() and any(not torch.equal(tuned[k], base[k]) for k in base)


def shorter_answer_score(text: str) -> float:
    return -len(text.split("Assistant:")[-1].split()) / 4


def test_ppo_api_reward_under_zero2_resumes_its_kl_coefficient_and_score_statistics(
    ray_cluster, ppo_config, tmp_path, tiny_model, monkeypatch
):
    """LoRA ppo under DeepSpeed ZeRO-2 scored by an HTTP endpoint (a bearer key) with ppo_score_norm; a worker is
    killed after a checkpoint and ray_max_failures restarts the group. Each step is logged once, the reward rises,
    and the KL coefficient and the running score statistics continue from the checkpoint instead of restarting."""
    monkeypatch.setenv("LOOM_REWARD_API_KEY", "sesame")
    with scoring_server(shorter_answer_score, key="sesame") as (url, received):
        raw = ppo_config(reward_model_type="api", reward_model=url, ppo_score_norm=True, ppo_target=1.0, ray_max_failures=1,
                         ray_run_name="ppo-retry", deepspeed={"zero_optimization": {"stage": 2}})  # fmt: skip
        at_kill, seen, output = kill_a_worker_and_finish(ray_cluster, raw, tmp_path, after_step=7)
    run_dir = os.path.join(raw["ray_storage_path"], "ppo-retry")
    print(f"\nppo worker killed, committed step {at_kill}; seconds after the kill: {json.dumps(seen)}")
    assert "resumed from step" in output and at_kill == 6
    assert steps_logged(raw["output_dir"]) == list(range(1, PPO_STEPS + 1))
    records = logged(raw["output_dir"])
    assert_reward_went_up(records)
    assert all(r["authorization"] == "Bearer sesame" for r in received)
    assert all(text.startswith("Human: ") for r in received for text in r["body"]["messages"])
    saved = {step: torch.load(os.path.join(run_dir, f"checkpoint-{step:06d}", "stage_state.pt"))
             for step in (6, 12)}  # fmt: skip
    # The coefficient a step uses is the one the previous step left: step 7 (after the restart) starts from the
    # value saved at step 6, and the score statistics hold every score of all 12 steps (16 per step), not 6.
    assert abs(saved[6]["kl_control"]["value"] - 0.2) > 1e-4  # it moved away from its initial 0.2 by step 6
    assert records[6]["kl_coef"] == pytest.approx(saved[6]["kl_control"]["value"], abs=1e-6)  # logged to 6 places
    assert saved[6]["score_stats"]["count"] == 6 * 16 and saved[12]["score_stats"]["count"] == 12 * 16
    assert checkpoints(run_dir)[-1] == "checkpoint-000012"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), raw["output_dir"])


def test_ppo_configs_stop_at_the_driver(ray_cluster, ppo_config, tmp_path):
    from orchestrator.errors import ConfigError

    cases = [
        (ppo_config(), "ppo needs a reward model"),
        (ppo_config(reward_model_type="api", reward_model="localhost:8000"), "needs an http(s) URL"),
        (ppo_config(reward_model=str(DEMO_DATA)), "has no adapter_config.json"),
        (ppo_config(reward_model_type="full", reward_model=str(DEMO_DATA), finetuning_type="full"), "no config.json"),
        (ppo_config(reward_model_type="api", reward_model="http://x", do_eval=True, val_size=8), "no evaluation loss"),
        (ppo_config(reward_model_type="api", reward_model="http://x", num_beams=2), "beam search"),
    ]
    for raw, phrase in cases:
        with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
            run(raw, ray_cluster)
