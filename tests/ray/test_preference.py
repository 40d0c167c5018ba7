"""rm, dpo and kto on the session's Ray cluster: 2 CPU workers, the tiny model, Loom's demo preference sets (the
preferred answer ends with " Thanks.", the other with " Whatever."), each with the effect its stage names."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DEMO_DATA
from tests.ray.test_train import assert_checkpoint_layout, logged, run


@pytest.fixture
def preference_config(train_config):
    def build(**extra) -> dict:
        defaults = {"dataset": "loom_demo_pref", "cutoff_len": 96, "max_samples": 160, "val_size": 32,
                    "do_eval": True, "eval_strategy": "steps", "eval_steps": 8}  # fmt: skip
        return train_config(**{**defaults, **extra})

    return build


def score_without_loom(base: str, adapter: str, texts: list[str]) -> torch.Tensor:
    """A reward model as any user can load it: transformers + peft + value_head.safetensors, no Loom code."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    head = load_file(os.path.join(adapter, "value_head.safetensors"))
    scores = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
        scores.append(hidden @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0])
    return torch.stack(scores)


def test_rm_lora_scores_held_out_chosen_above_rejected(trained_reward_model, tiny_model):
    """The session's reward model (tests/conftest.py: 8 steps, 32 held-out pairs evaluated every 8)."""
    output_dir, run_dir = trained_reward_model.output_dir, trained_reward_model.run_dir
    records = logged(output_dir)
    final = records[-1]
    assert final["eval_accuracy"] >= 0.9 and final["eval_scores/chosen"] > final["eval_scores/rejected"], final
    assert trained_reward_model.data_summary["eval_examples"] == 32  # held-out pairs, never trained on
    assert_checkpoint_layout(run_dir, [4, 8])
    assert os.path.isfile(os.path.join(run_dir, "checkpoint-000008", "model", "value_head.safetensors"))
    assert {"adapter_model.safetensors", "value_head.safetensors"} <= set(os.listdir(output_dir))
    prompt = "Human: Add 12 and 30.\nAssistant:"
    chosen, rejected = score_without_loom(tiny_model, output_dir,
                                          [f"{prompt}12 + 30 = 42. Thanks.", f"{prompt}12 + 30 = 42. Whatever."])  # fmt: skip
    assert chosen > rejected


def test_dpo_full_under_zero3_with_a_partitioned_reference(ray_cluster, preference_config, tiny_model):
    """Full dpo under DeepSpeed ZeRO-3: the policy and its frozen reference (a copy of the initial model, in an
    inference engine) are both partitioned over the two workers; the saved weights are gathered transformers
    weights. The held-out reward margin starts at 0 (policy == reference) and must grow."""
    raw = preference_config(stage="dpo", finetuning_type="full", learning_rate=1e-3,
                            deepspeed={"zero_optimization": {"stage": 3}})  # fmt: skip
    outcome = run(raw, ray_cluster)
    records = logged(outcome.output_dir)
    assert abs(records[0]["loss"] - 0.693147) < 1e-3  # step 1: policy == reference, -log sigmoid(0)
    final = records[-1]
    assert final["eval_rewards/margins"] > 0.5 and final["eval_rewards/accuracies"] >= 0.9, final
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(outcome.output_dir).state_dict()
    assert all(tuned[k].shape == base[k].shape for k in base)  # gathered, not partitions
    assert any(not torch.equal(tuned[k], base[k]) for k in base)


def test_kto_freeze_on_precomputed_reference_moves_the_rewards_apart(ray_cluster, preference_config, tiny_model):
    """kto with freeze fine-tuning (last layer only), its reference log-probs (of each example and of its mismatched
    KL completion) precomputed by Ray Data actors, so the workers hold only the policy."""
    raw = preference_config(stage="kto", dataset="loom_demo_kto", finetuning_type="freeze",
                            freeze_trainable_layers=1, pref_beta=0.2, precompute_ref_logps=True)  # fmt: skip
    outcome = run(raw, ray_cluster)
    assert outcome.data_summary["reference"].startswith("precomputed")
    final = logged(outcome.output_dir)[-1]
    assert final["eval_rewards/chosen"] - final["eval_rewards/rejected"] > 0.5, final
    assert final["kl"] >= 0
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(outcome.output_dir).state_dict()
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed and all(".layers.1." in name for name in changed), changed


def test_preference_configs_with_the_wrong_data_stop_at_the_driver(ray_cluster, preference_config):
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        run(preference_config(stage="dpo", pref_loss="simpo", ref_model=str(DEMO_DATA), dpo_label_smoothing=0.1),
            ray_cluster)  # fmt: skip
    assert "label smoothing is defined for pref_loss sigmoid" in str(caught.value)
    assert "reference-free" in str(caught.value)
    with pytest.raises(ConfigError, match="needs ranking datasets"):
        run(preference_config(stage="dpo", dataset="loom_demo_sft"), ray_cluster)
    with pytest.raises(ConfigError, match="needs a kto_tag column"):
        run(preference_config(stage="kto", dataset="loom_demo_sft"), ray_cluster)


def test_precomputed_reference_gives_the_online_loss(ray_cluster, preference_config, tiny_model):
    """precompute_ref_logps: Ray Data actors add each pair's reference log-probs to the data. On the same batch,
    the dpo stage's loss from those columns equals its loss with the online reference (the LoRA policy with its
    adapter disabled), for a policy that differs from the reference. (kto trains on them in the test above.)"""
    from orchestrator.config import validate_config
    from orchestrator.data.prepare import prepare_data
    from orchestrator.preflight import preflight
    from workers.context import single_process_context
    from workers.model import load_tokenizer_for
    from workers.stages import make_stage
    from workers.strategy import DDPStrategy

    cfg = validate_config(preference_config(stage="dpo", precompute_ref_logps=True, max_samples=48, val_size=0,
                                            do_eval=False, eval_strategy="no", eval_steps=None))  # fmt: skip
    data = prepare_data(cfg, preflight(cfg, "test"))
    rows = data.train.take_batch(8, batch_format="numpy")
    assert data.summary["reference"].startswith("precomputed")
    # Scored in blocks spread over the actors (one per worker), the rows keep the order prepared without them.
    assert data.train.num_blocks() >= cfg.ray_num_workers
    plain = prepare_data(cfg.model_copy(update={"precompute_ref_logps": False}), preflight(cfg, "test"))
    ids = [list(row["chosen_input_ids"]) for row in data.train.iter_rows()]
    assert ids == [list(row["chosen_input_ids"]) for row in plain.train.iter_rows()]
    ctx, tokenizer = single_process_context(), load_tokenizer_for(cfg)
    losses = {}
    for precomputed in (False, True):
        stage_cfg = cfg.model_copy(update={"precompute_ref_logps": precomputed})
        stage = make_stage(stage_cfg, ctx, tokenizer)
        torch.manual_seed(0)
        model = stage.build_model(None)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)  # the policy moves away from its reference
        strategy = DDPStrategy(stage_cfg, ctx, lambda m: m)
        strategy.setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
        stage.prepare(strategy)
        columns = rows if precomputed else {k: v for k, v in rows.items() if not k.startswith("ref_")}
        batch = stage.collate(columns)
        assert ("ref_logps" in batch) is precomputed
        with torch.no_grad():
            losses[precomputed] = float(stage.forward(model, batch).loss_sum)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True] != pytest.approx(8 * 0.693147)
