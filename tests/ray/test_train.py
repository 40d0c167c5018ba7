"""Real training on the session's local Ray cluster: 2 CPU workers, tiny model, real files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from orchestrator.config import validate_config
from orchestrator.errors import DataError, PlanError
from orchestrator.launch import train


def run(raw: dict, ray_cluster):
    return train(validate_config(raw), source="test", address=ray_cluster.gcs_address)


def logged(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def assert_loss_went_down(records: list[dict]) -> None:
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


OPTIMIZER_FILES = {  # where each strategy keeps the optimizer state in a checkpoint (sharded ones: per rank)
    "ddp": {"optimizer.pt"},
    "zero3_bf16": {f"deepspeed/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)},
    "fsdp": {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"},
}


def assert_checkpoint_layout(run_dir: str, steps: list[int], strategy: str = "ddp") -> None:
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-"))
    assert names == [f"checkpoint-{s:06d}" for s in steps], names
    for name in names:
        folder = os.path.join(run_dir, name)
        files = {os.path.relpath(os.path.join(root, f), folder) for root, _, found in os.walk(folder) for f in found}
        expected = {"scheduler.pt", "rng_state.pt", "trainer_state.json", "loom_checkpoint.json"}
        assert expected | OPTIMIZER_FILES[strategy] <= files, sorted(files)
        assert any(f.startswith("model/") and f.endswith(".safetensors") for f in files), sorted(files)
    with open(os.path.join(run_dir, names[-1], "trainer_state.json")) as handle:
        state = json.load(handle)
    assert state["global_step"] == steps[-1] and state["finished"] is True


def test_sft_lora_trains_saves_an_adapter_and_refuses_to_overwrite(
    ray_cluster, train_config, tiny_model, tmp_path, monkeypatch
):
    """The storage is a `ray_storage_filesystem` factory over the local disk whose first checkpoint write in each
    process fails (tests/flaky_fs.py): rank 0 retries that upload and every checkpoint still comes out complete."""
    from tests.flaky_fs import FLAKY_LOG_ENV

    monkeypatch.setenv(FLAKY_LOG_ENV, str(tmp_path / "injected.log"))
    raw = train_config(finetuning_type="lora", lora_rank=8, save_total_limit=2, save_steps=3,
                       ray_storage_filesystem="tests.flaky_fs:flaky_local_storage")  # fmt: skip
    outcome = run(raw, ray_cluster)
    injected = (tmp_path / "injected.log").read_text().splitlines()
    assert len(injected) == 1 and "/checkpoint-000003/" in injected[0], injected
    records = logged(outcome.output_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["tokens_seen"] > records[0]["tokens_seen"] > 0
    assert_loss_went_down(records)
    assert_checkpoint_layout(outcome.plan.run_dir, [6, 8])  # every 3 steps + the last, 2 kept
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loom_run.json"} <= set(
        os.listdir(outcome.output_dir)
    )

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, outcome.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(outcome.output_dir)
    assert model(**tokenizer("Add 1 and 2.", return_tensors="pt")).logits.shape[-1] == base.config.vocab_size

    with pytest.raises(PlanError, match="already finished"):
        run(raw, ray_cluster)


def test_sft_freeze_with_neat_packing_under_fsdp_changes_only_the_trainable_layers(
    ray_cluster, train_config, tiny_model
):
    raw = train_config(finetuning_type="freeze", freeze_trainable_layers=1, learning_rate=5e-3, packing=True,
                       neat_packing=True, fsdp="full_shard auto_wrap")  # fmt: skip
    outcome = run(raw, ray_cluster)
    assert_loss_went_down(logged(outcome.output_dir))
    assert_checkpoint_layout(outcome.plan.run_dir, [4, 8], "fsdp")
    assert outcome.data_summary["train_examples"] < 128 and 0.8 < outcome.data_summary["block_fill"] <= 1
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(outcome.output_dir).state_dict()
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed and all(".layers.1." in name for name in changed), changed


def test_sft_full_under_deepspeed_zero3_with_validation_split(ray_cluster, train_config, tiny_model):
    """ZeRO-3 partitions every weight over the two workers; the saved model is gathered into plain transformers
    weights, and each rank's optimizer partition is in the checkpoint."""
    zero3 = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    raw = train_config(finetuning_type="full", learning_rate=1e-3, val_size=0.25, do_eval=True,
                       eval_strategy="steps", eval_steps=4, bf16=True, deepspeed=zero3)  # fmt: skip
    outcome = run(raw, ray_cluster)
    records = logged(outcome.output_dir)
    assert_loss_went_down(records)
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert outcome.data_summary["eval_examples"] == 32 and outcome.data_summary["train_examples"] == 96
    assert_checkpoint_layout(outcome.plan.run_dir, [4, 8], "zero3_bf16")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(outcome.output_dir).state_dict()
    assert tuned.keys() == base.keys() and all(tuned[k].shape == base[k].shape for k in base)  # gathered, not shards
    assert all(not torch.equal(tuned[k], base[k]) for k in base if k.endswith("proj.weight"))


def test_unplaceable_bundles_fail_fast(ray_cluster, train_config):
    with pytest.raises(PlanError, match=r"2 bundles of \{GPU: 1\} requested: needs 2 GPU, cluster has 0 GPU"):
        run(train_config(resources_per_worker={"GPU": 1}), ray_cluster)
    with pytest.raises(PlanError, match="needs 10 CPU"):
        run(train_config(ray_num_workers=10), ray_cluster)


def test_a_cluster_whose_cpus_another_job_holds_fails_fast_with_what_is_missing(ray_cluster, train_config):
    """The cluster could hold the run, but an actor of another job holds all 4 CPUs: without the check, Ray Data
    and then Ray Train would wait for them without end."""
    import time

    from tests.helpers import cpus_held

    started = time.monotonic()
    with cpus_held(4), pytest.raises(PlanError) as refused:
        run(train_config(ray_placement_wait_s=2), ray_cluster)
    message = str(refused.value)
    assert "could not be reserved within 2 s (ray_placement_wait_s)" in message, message
    assert "no CPU came free within 2 s to prepare the data" in message and "Free now:" in message, message
    assert time.monotonic() - started < 30
    assert not os.path.exists(train_config()["output_dir"])  # stopped before anything was written


def test_plan_command_checks_placement_on_the_cluster(ray_cluster, train_config, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(train_config(resources_per_worker={"GPU": 1})))
    assert main(["plan", str(path), "--address", ray_cluster.gcs_address]) == 4
    assert "needs 2 GPU, cluster has 0 GPU" in capsys.readouterr().out
    path.write_text(yaml.safe_dump(train_config()))
    assert main(["plan", str(path), "--address", ray_cluster.gcs_address]) == 0
    assert "placement     ok on the cluster" in capsys.readouterr().out


def test_missing_dataset_column_stops_before_workers(ray_cluster, train_config, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text(json.dumps({"instruction": "hi", "answer": "yo"}) + "\n")
    with pytest.raises(DataError, match=r"columns \['output'\] are missing"):
        run(train_config(dataset="rows.jsonl", dataset_dir=str(data)), ray_cluster)


def test_prepared_split_and_order_are_reproducible(ray_cluster, train_config):
    """A resumed run rebuilds its data: the same seed must give the same train/validation split and order."""
    from orchestrator.data.pipeline import build_datasets
    from orchestrator.preflight import preflight

    cfg = validate_config(train_config(val_size=0.2, max_samples=None))
    specs = preflight(cfg, "test")
    first, second = build_datasets(cfg, specs), build_datasets(cfg, specs)
    rows = lambda ds: [list(r["input_ids"]) for r in ds.take_all()]  # noqa: E731
    assert rows(first.train) == rows(second.train) and rows(first.eval) == rows(second.eval)
    assert len(rows(first.eval)) == 60 and len(rows(first.train)) == 240
    other = build_datasets(cfg.model_copy(update={"seed": 7}), specs)
    assert rows(other.train) != rows(first.train)
    in_order = build_datasets(cfg.model_copy(update={"disable_shuffling": True, "val_size": 0.0}), specs)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    assert tokenizer.decode(rows(in_order.train)[0]).startswith("Human: What is Loom?")  # the file's first row


def test_streaming_sft_with_one_evaluation_per_dataset(ray_cluster, train_config, tmp_path):
    """The training set is never materialized: workers read it as it is tokenized; each eval set reports its loss."""
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train.jsonl", 200), ("held_a.jsonl", 8), ("held_b.jsonl", 6)):
        with open(data / name, "w") as handle:
            for i in range(rows):
                handle.write(json.dumps({"instruction": f"{name} {i}", "output": f"answer {i}"}) + "\n")
    raw = train_config(dataset="train.jsonl", dataset_dir=str(data), max_samples=None, streaming=True,
                       buffer_size=64, eval_dataset="held_a.jsonl,held_b.jsonl", eval_on_each_dataset=True,
                       do_eval=True, max_steps=4, save_steps=4)  # fmt: skip
    outcome = run(raw, ray_cluster)
    assert outcome.data_summary["streaming"] is True and outcome.data_summary["train_examples"] is None
    assert outcome.plan.schedule.train_rows is None and outcome.plan.schedule.total_steps == 4
    records = logged(outcome.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"eval_held_a.jsonl_loss", "eval_held_b.jsonl_loss"} <= set(records[-1])


def test_loraplus_trains_the_b_matrices_at_ratio_times_the_learning_rate(ray_cluster, train_config):
    """LoRA+ on 2 CPU workers: the optimizer state the checkpoint holds has B's group at 16 x lr, A's at lr, and
    the B matrices, which start at zero, have moved."""
    raw = train_config(finetuning_type="lora", lora_rank=8, loraplus_lr_ratio=16, learning_rate=1e-3,
                       lr_scheduler_type="constant", max_steps=4, save_steps=4, ray_run_name="loraplus")  # fmt: skip
    outcome = run(raw, ray_cluster)
    state = torch.load(os.path.join(outcome.plan.run_dir, "checkpoint-000004", "optimizer.pt"), weights_only=False)
    lrs = {group["name"]: group["lr"] for group in state["param_groups"]}
    assert lrs["loraplus_a"] == pytest.approx(1e-3) and lrs["loraplus_b"] == pytest.approx(1.6e-2)
    from safetensors.torch import load_file

    adapter = load_file(os.path.join(outcome.output_dir, "adapter_model.safetensors"))
    assert all(float(w.abs().max()) > 0 for name, w in adapter.items() if "lora_B" in name)


def test_neftune_noise_changes_the_training_loss_and_never_the_evaluation(ray_cluster, train_config):
    """Every step trains on the same 8 rows (2 workers x 4) with a learning rate too small to move the weights, and
    evaluates on those 8 rows: the eval loss is the same at every step, so the weights did not move; the training
    loss differs from it and from step to step, which only NEFTune's noise can do. compute_accuracy adds the
    evaluation's token accuracy, the same at every step too, and never a training one."""
    raw = train_config(finetuning_type="lora", neftune_noise_alpha=5, learning_rate=1e-12, lr_scheduler_type="constant",
                       max_samples=8, eval_dataset="loom_demo_sft", do_eval=True, eval_strategy="steps", eval_steps=1,
                       max_steps=3, save_steps=3, ray_run_name="neftune", compute_accuracy=True)  # fmt: skip
    records = logged(run(raw, ray_cluster).output_dir)
    train_losses = [r["loss"] for r in records if "loss" in r]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(train_losses) == len(eval_losses) == 3
    assert max(eval_losses) - min(eval_losses) < 1e-5  # clean embeddings at evaluation, weights unmoved
    assert min(abs(loss - eval_losses[0]) for loss in train_losses) > 1e-3
    assert max(train_losses) - min(train_losses) > 1e-3  # a fresh draw of noise at every step
    accuracies = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(accuracies) == 3 and 0 <= accuracies[0] <= 1 and len(set(accuracies)) == 1  # weights unmoved
    assert not any("accuracy" in r for r in records)


def test_create_new_adapter_trains_a_fresh_adapter_over_a_finished_runs(ray_cluster, train_config, trained_sft):
    """The session's trained adapter merged into the base on both workers, a new adapter trained on top: what the
    run saves is the new adapter (different from the merged one), and the two together answer as one model."""
    from safetensors.torch import load_file

    raw = train_config(finetuning_type="lora", adapter_name_or_path=trained_sft.output_dir, create_new_adapter=True,
                       max_steps=2, save_steps=2, ray_run_name="new-adapter")  # fmt: skip
    outcome = run(raw, ray_cluster)
    new = load_file(os.path.join(outcome.output_dir, "adapter_model.safetensors"))
    old = load_file(os.path.join(trained_sft.output_dir, "adapter_model.safetensors"))
    assert new.keys() == old.keys()
    assert all(float((new[k] - old[k]).abs().max()) > 0 for k in new if "lora_B" in k)  # not the old one, continued
    assert all(float(new[k].abs().max()) < float(old[k].abs().max()) for k in new if "lora_B" in k)  # 2 steps from 0


def test_galore_on_two_workers_resumes_another_runs_checkpoint_to_the_same_weights(ray_cluster, train_config):
    """GaLore (full fine-tuning, DDP on 2 CPU workers) for 4 steps; a second run started by resume_from_checkpoint
    from the first run's step-2 checkpoint (projections and moments restored) ends on the same weights."""
    from safetensors.torch import load_file

    galore = {"finetuning_type": "full", "use_galore": True, "galore_rank": 4, "galore_update_interval": 2,
              "max_steps": 4, "save_steps": 2, "learning_rate": 1e-3, "disable_gradient_checkpointing": True}  # fmt: skip
    first = run(train_config(**galore, ray_run_name="galore-a"), ray_cluster)
    checkpoint = os.path.join(first.plan.run_dir, "checkpoint-000002")
    raw = train_config(**galore, ray_run_name="galore-b", resume_from_checkpoint=checkpoint,
                       output_dir=os.path.join(os.path.dirname(first.output_dir), "out-b"))  # fmt: skip
    second = run(raw, ray_cluster)
    assert second.start.startswith(f"resume from {checkpoint} (step 2")
    assert [r["step"] for r in logged(second.output_dir)] == [3, 4]
    a, b = (load_file(os.path.join(o.output_dir, "model.safetensors")) for o in (first, second))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"resumed GaLore run differs by {worst}"


def test_without_an_address_loom_starts_its_own_ray_beside_a_running_cluster(ray_cluster):
    """No --address and no RAY_ADDRESS: an embedded cluster, as documented, even while another Ray runs on this
    machine (the session's, from `ray start`), which Ray's default would join and where it refuses num_cpus."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import ray\nfrom orchestrator.launch import connect\nstarted = connect(num_cpus=1)\n"
             "print(started, ray.cluster_resources()['CPU'])\nray.shutdown()\n")  # fmt: skip
    env = {k: v for k, v in ray_cluster.env().items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "1.0"]
