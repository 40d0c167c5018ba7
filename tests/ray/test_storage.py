"""Run storage and the tokenized cache on a real S3-compatible server (moto, on loopback), through pyarrow."""

from __future__ import annotations

import pytest

from orchestrator.config import validate_config
from orchestrator.errors import PlanError
from orchestrator.launch import prepare_only, train
from tests.conftest import BUCKET


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def test_pretraining_on_s3_storage_packs_text_learns_and_is_recognised_finished(
    ray_cluster, train_config, tiny_model, s3
):
    """One pt run: packing, learning, checkpoints in an S3-compatible bucket, and the finished run refused."""
    from tests.ray.test_train import assert_loss_went_down, logged

    client, endpoint = s3
    raw = train_config(stage="pt", dataset="loom_demo_pt", template=None, finetuning_type="lora", cutoff_len=64,
                       max_samples=None, gradient_accumulation_steps=2, ray_storage_path=f"s3://{BUCKET}/saves",
                       ray_storage_endpoint=endpoint)  # fmt: skip
    outcome = train(validate_config(raw), source="test", address=ray_cluster.gcs_address)
    assert_loss_went_down(logged(outcome.output_dir))
    assert outcome.plan.schedule.total_steps == 8
    # packed blocks are exactly cutoff_len long: tokens per example == 64
    assert outcome.data_summary["train_tokens"] == 64 * outcome.data_summary["train_examples"]
    stored = keys(client, "saves/test-run/")
    assert {"checkpoint-000004/loom_checkpoint.json", "checkpoint-000008/loom_checkpoint.json",
            "checkpoint-000008/trainer_state.json", "checkpoint_manager_snapshot.json"} <= stored  # fmt: skip
    assert outcome.checkpoint.endswith("saves/test-run/checkpoint-000008")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), outcome.output_dir) is not None
    with pytest.raises(PlanError, match="already finished"):
        train(validate_config(raw), source="test", address=ray_cluster.gcs_address)


def test_tokenized_cache_on_s3(ray_cluster, tiny_model, s3, tmp_path):
    client, endpoint = s3
    host = endpoint.removeprefix("http://")
    from tests.helpers import DEMO_DATA

    cfg = validate_config({"model_name_or_path": tiny_model, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
                           "template": "default", "cutoff_len": 64, "resources_per_worker": {"CPU": 1},
                           "tokenized_path": f"s3://{BUCKET}/tokenized?endpoint_override={host}&scheme=http"},
                          training=False)  # fmt: skip
    first = prepare_only(cfg, source="test", address=ray_cluster.gcs_address)
    assert first.summary["cache"].startswith("wrote")
    stored = keys(client, "tokenized/")
    assert "loom_cache.json" in stored and any(k.endswith(".parquet") and "/train/" in k for k in stored)
    again = prepare_only(cfg, source="test", address=ray_cluster.gcs_address)
    assert again.summary["cache"].startswith("reused") and again.summary["train_examples"] == 300
