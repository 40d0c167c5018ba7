"""dpo with each of its six losses, and dpo/kto under FSDP, on two real gloo processes running Loom's stage loop
(tests/strategy_harness.py: the real loop, strategies and checkpoint files; Ray Train is replaced by plain files).

The demo preference set prefers answers signed off with " Thanks." over " Whatever." (orchestrator/demo). Each run
trains on the first 240 pairs; the held-out chosen-minus-rejected margin (summed log-probabilities, the same measure
for every loss) is computed here from the saved model, without Loom's loop, before and after.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.helpers import DEMO_DATA, LLAMAFACTORY_DATA
from tests.strategy_harness import prepared_rows, worker

TRAIN_PAIRS = 240
LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")


def preference_config(tiny_model: str, **extra) -> dict:
    return {
        "model_name_or_path": tiny_model, "dataset": "loom_demo_pref", "dataset_dir": str(DEMO_DATA),
        "template": "default", "resources_per_worker": {"CPU": 1}, "ray_num_workers": 2, "stage": "dpo",
        "finetuning_type": "lora", "lora_rank": 8, "per_device_train_batch_size": 4, "max_steps": 8,
        "save_steps": 4, "logging_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
        "cutoff_len": 96, "max_samples": TRAIN_PAIRS, "disable_gradient_checkpointing": True, **extra,
    }  # fmt: skip


def spawn(jobs: list[tuple[dict, str, str, str | None]]) -> None:
    mp.start_processes(worker, args=(2, free_port(), jobs), nprocs=2, join=True, start_method="spawn")


def held_out_margin(model: torch.nn.Module, rows: list[dict]) -> float:
    """Mean over held-out pairs of log p(chosen) - log p(rejected), each summed over the response tokens."""
    from workers.collate import pad_pairs
    from workers.losses import sequence_logps

    columns = {key: [row[key] for row in rows] for key in rows[0]}
    batch = pad_pairs(columns, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = sequence_logps(logits, batch["labels"])
    chosen, rejected = logps.chunk(2)
    return float((chosen - rejected).mean())


def logged(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def held_out(tiny_model) -> list[dict]:
    from orchestrator.config import validate_config

    cfg = validate_config({**preference_config(tiny_model), "max_samples": None})
    return prepared_rows(cfg)[TRAIN_PAIRS:]


def test_each_dpo_loss_raises_the_held_out_margin(tiny_model, tmp_path, held_out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs = [(preference_config(tiny_model, pref_loss=loss), str(tmp_path / loss / "saves"),
             str(tmp_path / loss / "out"), None) for loss in LOSSES]  # fmt: skip
    spawn(jobs)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = held_out_margin(base, held_out)
    after = {}
    for loss in LOSSES:
        records = logged(str(tmp_path / loss / "out"))
        assert [r["step"] for r in records] == list(range(1, 9))
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(records[-1])
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / loss / "out")
        after[loss] = held_out_margin(tuned, held_out)
    print(f"\nheld-out margin before {before:.3f}, after: " + ", ".join(f"{k} {v:.3f}" for k, v in after.items()))
    assert all(margin > before + 1.0 for margin in after.values()), (before, after)
    first_losses = {loss: logged(str(tmp_path / loss / "out"))[0]["loss"] for loss in LOSSES}
    assert len({round(v, 4) for v in first_losses.values()}) == 6, first_losses  # six losses, six values
    assert abs(first_losses["sigmoid"] - 0.693147) < 1e-4  # policy == reference at step 1: -log sigmoid(0)


def test_dpo_with_a_reference_and_kto_under_fsdp(tiny_model, tmp_path, held_out):
    """Full dpo under FSDP: the reference is a frozen copy of the initial policy, sharded like it. kto with LoRA
    (its reference: the policy with the adapter disabled). Both write weights that load in transformers/peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fsdp = {"fsdp": "full_shard auto_wrap"}
    dpo = preference_config(tiny_model, finetuning_type="full", learning_rate=1e-3, **fsdp)
    kto = preference_config(tiny_model, stage="kto", dataset="loom_demo_kto", **fsdp)
    spawn([(dpo, str(tmp_path / "dpo" / "saves"), str(tmp_path / "dpo" / "out"), None),
           (kto, str(tmp_path / "kto" / "saves"), str(tmp_path / "kto" / "out"), None)])  # fmt: skip
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert held_out_margin(tuned, held_out) > held_out_margin(base, held_out) + 1.0
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= set(
        os.path.relpath(os.path.join(root, f), tmp_path / "dpo" / "saves" / "checkpoint-000008")
        for root, _, files in os.walk(tmp_path / "dpo" / "saves" / "checkpoint-000008") for f in files
    )  # fmt: skip
    kto_records = logged(str(tmp_path / "kto" / "out"))
    last = kto_records[-1]
    assert last["rewards/chosen"] - last["rewards/rejected"] > kto_records[0]["rewards/chosen"] - kto_records[0][
        "rewards/rejected"
    ] + 0.5, kto_records  # fmt: skip
    assert "kl" in last
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "kto" / "out")


def test_ppo_under_fsdp_and_zero3_generates_in_step_and_saves_loadable_weights(tiny_model, tmp_path):
    """Sharded policies generate with every rank stepping together (synced_gpus; FSDP gathers its root unit around
    generate), score through an HTTP reward on loopback, and write weights that load in transformers/peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.reward_server import scoring_server

    def shorter(text: str) -> float:
        return -len(text.split("Assistant:")[-1].split()) / 4

    with scoring_server(shorter) as (url, received):
        common = {"stage": "ppo", "dataset": "loom_demo_sft", "reward_model_type": "api", "reward_model": url,
                  "max_new_tokens": 8, "ppo_epochs": 2, "max_steps": 3, "save_steps": 3, "max_samples": 64,
                  "cutoff_len": 64, "do_sample": True, "top_k": 0, "top_p": 1.0}  # fmt: skip
        fsdp = preference_config(tiny_model, **common, fsdp="full_shard auto_wrap")
        zero3 = preference_config(tiny_model, **common, finetuning_type="full", learning_rate=5e-4,
                                  deepspeed={"zero_optimization": {"stage": 3}})  # fmt: skip
        spawn([(fsdp, str(tmp_path / "fsdp" / "saves"), str(tmp_path / "fsdp" / "out"), None),
               (zero3, str(tmp_path / "zero3" / "saves"), str(tmp_path / "zero3" / "out"), None)])  # fmt: skip
    assert len(received) == 2 * 2 * 3  # two runs, two ranks, three rollouts each
    for name in ("fsdp", "zero3"):
        records = logged(str(tmp_path / name / "out"))
        assert [r["step"] for r in records] == [1, 2, 3] and all("reward" in r and "kl" in r for r in records)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "fsdp" / "out")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "out").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert all(tuned[k].shape == base[k].shape for k in base) and any(not torch.equal(tuned[k], base[k]) for k in base)


@pytest.mark.skipif(not LLAMAFACTORY_DATA.is_dir(), reason="LLaMA-Factory's demo data is not in ../shared")
def test_llamafactory_demo_sets_train_unchanged(tiny_model, tmp_path):
    """LLaMA-Factory's dpo_en_demo, kto_en_demo and (for ppo prompts) alpaca_en_demo, with its dataset_info.json."""
    import math

    from tests.reward_server import scoring_server

    common = {"dataset_dir": str(LLAMAFACTORY_DATA), "cutoff_len": 128, "max_samples": 32, "max_steps": 2,
              "save_steps": 2}  # fmt: skip
    with scoring_server(lambda text: float(len(text) % 7)) as (url, received):
        jobs = {
            "dpo": preference_config(tiny_model, **common, dataset="dpo_en_demo"),
            "kto": preference_config(tiny_model, **common, stage="kto", dataset="kto_en_demo"),
            "ppo": preference_config(tiny_model, **common, stage="ppo", dataset="alpaca_en_demo", max_new_tokens=8,
                                     reward_model_type="api", reward_model=url, ppo_epochs=1),
        }  # fmt: skip
        spawn([(raw, str(tmp_path / name / "saves"), str(tmp_path / name / "out"), None) for name, raw in jobs.items()])
    assert received
    for name in jobs:
        records = logged(str(tmp_path / name / "out"))
        assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records), records


def test_rm_full_under_ddp_and_zero3_saves_a_value_head_that_scores(tiny_model, tmp_path):
    """Full rm: under DDP the LM head (which scoring never reaches) is frozen, or DDP would wait for its gradients;
    under ZeRO-3 the value head is partitioned with the model and gathered on save."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    jobs = {"ddp": preference_config(tiny_model, stage="rm", finetuning_type="full", learning_rate=1e-3),
            "zero3": preference_config(tiny_model, stage="rm", finetuning_type="full", learning_rate=1e-3,
                                       deepspeed={"zero_optimization": {"stage": 3}})}  # fmt: skip
    spawn([(raw, str(tmp_path / name / "saves"), str(tmp_path / name / "out"), None) for name, raw in jobs.items()])
    for name in jobs:
        records = logged(str(tmp_path / name / "out"))
        assert records[-1]["accuracy"] > records[0]["accuracy"] and records[-1]["accuracy"] >= 0.9, records
        head = load_file(str(tmp_path / name / "out" / "value_head.safetensors"))
        assert head["v_head.summary.weight"].shape == (1, 64) and head["v_head.summary.bias"].shape == (1,)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "out")  # the body, in plain transformers
        assert model.config.hidden_size == 64
