"""`loom pipeline`: sft -> rm -> ppo as one job, interrupted in its second stage, finished by the same command
submitted with `ray job submit`, without redoing the first stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import yaml

from tests.conftest import VENV_BIN
from tests.helpers import DEMO_DATA
from tests.ray.test_cli_runs import checkpoints, committed, steps_logged, submit_job


def stage(tiny_model: str, **extra) -> dict:
    return {"model_name_or_path": tiny_model, "dataset_dir": str(DEMO_DATA), "template": "default",
            "cutoff_len": 64, "max_samples": 96, "ray_num_workers": 2, "resources_per_worker": {"CPU": 1},
            "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2, "learning_rate": 5e-3,
            "lr_scheduler_type": "constant", **extra}  # fmt: skip


def test_pipeline_sft_rm_ppo_resumes_its_interrupted_stage_under_ray_job_submit(ray_cluster, tiny_model, tmp_path):
    pipeline = {
        "name": "chain", "storage_path": str(tmp_path / "runs"),
        "stages": [
            {"name": "sft", "config": stage(tiny_model, stage="sft", dataset="loom_demo_sft", max_steps=4)},
            {"name": "rm", "config": stage(tiny_model, stage="rm", dataset="loom_demo_pref", max_steps=8),
             "overrides": {"adapter_name_or_path": {"from": "sft"}}},
            {"name": "ppo", "config": stage(tiny_model, stage="ppo", dataset="loom_demo_sft", max_steps=2,
                                            max_new_tokens=8, ppo_epochs=1),
             "overrides": {"adapter_name_or_path": {"from": "sft"}, "reward_model": {"from": "rm"}}},
        ],
    }  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "pipe.yaml").write_text(yaml.safe_dump(pipeline))
    root = tmp_path / "runs" / "chain"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "loom"), "pipeline", str(project / "pipe.yaml")],
                                env={**ray_cluster.env(), "LOOM_STEP_DELAY_S": "1.0"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not (committed(str(root / "rm")) and max(steps_logged(str(root / "rm" / "output")), default=0) >= 3):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and all it started, in the middle of the rm stage
    proc.wait()
    sft_log = (root / "sft" / "output" / "trainer_log.jsonl").read_text()
    assert max(steps_logged(str(root / "rm" / "output"))) < 8 and not (root / "ppo").exists()

    output = submit_job(ray_cluster, project, "loom", "pipeline", "pipe.yaml")
    assert "stage sft     finished earlier, skipped" in output
    assert "resumed from step" in output and "stage rm " in output and "stage ppo " in output
    assert (root / "sft" / "output" / "trainer_log.jsonl").read_text() == sft_log  # the first stage not redone
    assert steps_logged(str(root / "rm" / "output")) == list(range(1, 9))  # each step once across both runs
    assert steps_logged(str(root / "ppo" / "output")) == [1, 2]
    assert checkpoints(str(root / "rm"))[-1] == "checkpoint-000008"
    with open(root / "ppo" / "output" / "loom_run.json") as handle:
        assert json.load(handle)["status"] == "finished"
    with open(root / "rm" / "output" / "adapter_config.json") as handle:
        assert json.load(handle)["r"] == 8  # the rm stage continued the sft adapter
