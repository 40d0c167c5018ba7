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
                          purpose="data")  # fmt: skip
    first = prepare_only(cfg, source="test", address=ray_cluster.gcs_address)
    assert first.summary["cache"].startswith("wrote")
    stored = keys(client, "tokenized/")
    assert "loom_cache.json" in stored and any(k.endswith(".parquet") and "/train/" in k for k in stored)
    again = prepare_only(cfg, source="test", address=ray_cluster.gcs_address)
    assert again.summary["cache"].startswith("reused") and again.summary["train_examples"] == 300


def _committed_on_s3(client, prefix: str) -> str | None:
    """The checkpoint Ray's run snapshot on the store lists as the latest committed one."""
    import json

    try:
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}checkpoint_manager_snapshot.json")["Body"].read()
        return json.loads(body)["latest_checkpoint_result"]["checkpoint_dir_name"]
    except Exception:  # noqa: BLE001 - not written yet, or written half: nothing committed to read
        return None


def _complete_on_s3(client, prefix: str) -> bool:
    """The checkpoint's manifest lists every file it holds with its size (what a restore verifies)."""
    import json

    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        sizes.update({item["Key"][len(prefix) :]: item["Size"] for item in page.get("Contents", [])})
    if "loom_checkpoint.json" not in sizes:
        return False
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}loom_checkpoint.json")["Body"].read())
    return all(sizes.get(name) == size for name, size in manifest["files"].items())


def test_a_store_gone_longer_than_the_retries_fails_naming_it_and_the_rerun_resumes(
    ray_cluster, train_config, s3, tmp_path
):
    """The object store goes away mid-run (a relay in front of moto is taken down): the next checkpoint's upload
    exhausts ray_upload_retries and the run fails naming the store and the checkpoint; the last committed checkpoint
    stays whole; once the store is back the same command resumes from it and finishes."""
    import os
    import re
    import signal
    import subprocess
    import time

    from tests.conftest import VENV_BIN
    from tests.outage import Relay
    from tests.ray.test_cli_runs import start_slow_run, steps_logged, write_yaml

    client, endpoint = s3
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    relay.up()
    raw = train_config(ray_storage_path=f"s3://{BUCKET}/outage", ray_storage_endpoint=relay.url, max_steps=8,
                       save_steps=2, ray_run_name="outage", ray_upload_retries=1, ray_max_failures=0)  # fmt: skip
    config, prefix = write_yaml(tmp_path / "project", raw), "outage/outage/"
    proc = start_slow_run(config, ray_cluster.env(), tmp_path / "first.log", delay_s=1.0)
    try:
        deadline = time.monotonic() + 240
        while _committed_on_s3(client, prefix) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        relay.down()  # the store is gone: connections refused
        assert proc.wait(timeout=240) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        relay.up()  # back, with everything it held
    output = (tmp_path / "first.log").read_text()
    failure = next(line for line in output.splitlines() if line.startswith("loom train: training failed"))
    assert re.search(r"training failed: (removing the old loom_checkpoint.json of|uploading \S+ of checkpoint) "
                     r"checkpoint-0000\d\d to s3:loom-runs/outage/outage/", failure), failure  # fmt: skip
    assert "failed 2 time(s) (ray_upload_retries=1)" in failure and "Could not connect" in failure, failure
    committed = _committed_on_s3(client, prefix)
    assert committed and _complete_on_s3(client, f"{prefix}{committed}/")  # the last committed one is intact
    before = max(steps_logged(raw["output_dir"]))
    second = subprocess.run([str(VENV_BIN / "loom"), "train", config], env=ray_cluster.env(), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    relay.down()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resume from {committed}" in second.stdout, (committed, before, second.stdout[-2000:])
    assert steps_logged(raw["output_dir"]) == list(range(1, 9))
