"""The `loom` command as users run it: killed and resumed, and submitted with `ray job submit`."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from orchestrator.preflight import latest_committed_checkpoint
from tests.conftest import VENV_BIN
from tests.tracker_files import mlflow_runs, swanlab_experiments, tensorboard_scalars, wandb_runs


def write_yaml(folder, raw: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def steps_logged(output_dir: str) -> list[int]:
    path = os.path.join(output_dir, "trainer_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line)["step"] for line in handle if line.strip()]


def checkpoints(run_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-")) if os.path.isdir(run_dir) else []


def committed(run_dir: str) -> bool:
    return latest_committed_checkpoint(run_dir) is not None


def committed_step(run_dir: str) -> int:
    """The step of the latest checkpoint Ray committed (the one a restart resumes from)."""
    return int(re.search(r"step (\d+)", latest_committed_checkpoint(run_dir)).group(1))


def start_slow_run(config: str, env: dict, log_path, delay_s: float) -> subprocess.Popen:
    """`loom train` in its own process group, each step slowed so the test can interrupt it mid-run."""
    with open(log_path, "w") as log:
        return subprocess.Popen([str(VENV_BIN / "loom"), "train", config], env={**env, "LOOM_STEP_DELAY_S": str(delay_s)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_past_a_committed_checkpoint(proc, run_dir: str, output_dir: str, step: int, log_path) -> None:
    """Until a checkpoint is committed (listed in Ray's run snapshot) and training has logged `step`."""
    deadline = time.time() + 300
    while not (committed(run_dir) and max(steps_logged(output_dir), default=0) >= step):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def _logged_after(path, offset: int, pattern: str) -> bool:
    with open(path, errors="replace") as handle:
        handle.seek(offset)
        return re.search(pattern, handle.read()) is not None


def kill_and_time_recovery(kill, proc, log_path, output_dir: str, committed_step: int, also=None) -> dict[str, float]:
    """Run `kill`, then until the run ends note the seconds after it at which Ray decided to retry, the run resumed
    from its checkpoint, and a step past that checkpoint was logged again; `also` adds named conditions."""
    trainer_log = os.path.join(output_dir, "trainer_log.jsonl")
    inode, offset = os.stat(trainer_log).st_ino, log_path.stat().st_size  # a resumed run rewrites the trainer log
    checks = {
        "retry decided": lambda: _logged_after(log_path, offset, r"\[FailurePolicy\] RETRY"),
        "resumed": lambda: _logged_after(log_path, offset, r"resumed from step"),
        "training again": lambda: (
            os.path.exists(trainer_log)
            and os.stat(trainer_log).st_ino != inode
            and max(steps_logged(output_dir), default=0) > committed_step
        ),
        **(also or {}),
    }
    kill()
    killed, seen = time.monotonic(), {}
    while proc.poll() is None and time.monotonic() - killed < 280:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = round(time.monotonic() - killed, 1)
        time.sleep(0.1)
    seen["run ended"] = round(time.monotonic() - killed, 1)
    return seen


def kill_a_worker_and_finish(ray_cluster, raw: dict, tmp_path, after_step: int) -> tuple[int, dict, str]:
    """`loom train` of `raw` (with ray_max_failures), one Ray Train worker process SIGKILLed once a checkpoint is
    committed and `after_step` is logged; waits for the run to end. Returns the committed step at the kill, the
    recovery times and the run's log."""
    config, log = write_yaml(tmp_path / "project", raw), tmp_path / "run.log"
    run_dir = os.path.join(raw["ray_storage_path"], raw["ray_run_name"])
    proc = start_slow_run(config, ray_cluster.env(), log, delay_s=1.0)
    try:
        wait_past_a_committed_checkpoint(proc, run_dir, raw["output_dir"], after_step, log)
        committed_at_kill = committed_step(run_dir)
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        assert workers, "no Ray Train worker process found"
        kill = functools.partial(os.kill, int(workers[-1]), signal.SIGKILL)
        seen = kill_and_time_recovery(kill, proc, log, raw["output_dir"], committed_at_kill)
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return committed_at_kill, seen, log.read_text()


def submit_job(ray_cluster, project, *entrypoint: str) -> str:
    """`ray job submit` of `entrypoint` with `project` as the working dir; returns its output (asserting success)."""
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir",
               str(project), "--entrypoint-num-cpus", "0", "--", *entrypoint]  # fmt: skip
    env = {k: v for k, v in ray_cluster.env().items() if k != "RAY_ADDRESS"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_killed_run_resumes_from_its_checkpoint_and_ends_at_the_configured_step(ray_cluster, train_config, tmp_path):
    """The driver and all it started killed mid-run; the same command resumes. Under FSDP, so the restart also
    reloads an optimizer state sharded over the two workers (one torch.distributed.checkpoint file per rank)."""
    raw = train_config(max_steps=12, save_steps=3, ray_run_name="killed", fsdp="full_shard auto_wrap")
    config = write_yaml(tmp_path / "project", raw)
    run_dir = os.path.join(raw["ray_storage_path"], "killed")
    proc = start_slow_run(config, ray_cluster.env(), tmp_path / "first.log", delay_s=1.5)
    wait_past_a_committed_checkpoint(proc, run_dir, raw["output_dir"], 4, tmp_path / "first.log")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = steps_logged(raw["output_dir"])
    assert before and max(before) < 12, before  # really interrupted mid-run
    with open(os.path.join(raw["output_dir"], "loom_run.json")) as handle:
        assert json.load(handle)["status"] == "running"

    second = subprocess.run([str(VENV_BIN / "loom"), "train", config], env=ray_cluster.env(), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    start = next((line for line in second.stdout.splitlines() if line.startswith("final")), second.stdout[-2000:])
    assert "resume from checkpoint-000003 (step 3)" in start
    assert "resumed from step 3" in second.stdout + second.stderr
    assert steps_logged(raw["output_dir"]) == list(range(1, 13))  # nothing lost, nothing counted twice
    assert checkpoints(run_dir) == [f"checkpoint-{s:06d}" for s in (3, 6, 9, 12)]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(f"{run_dir}/checkpoint-000003/optimizer"))
    with open(os.path.join(raw["output_dir"], "loom_run.json")) as handle:
        assert json.load(handle)["status"] == "finished"
    # Exact resumption: the same run uninterrupted ends on the same weights (each rank's rows are a function of the
    # seed, epoch, rank and position, not of Ray Data's block hand-out: workers/order.py).
    straight = {**raw, "ray_run_name": "straight", "output_dir": str(tmp_path / "straight")}
    done = subprocess.run([str(VENV_BIN / "loom"), "train", write_yaml(tmp_path / "straight-project", straight)],
                          env=ray_cluster.env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed, uninterrupted = final_weights(raw["output_dir"]), final_weights(straight["output_dir"])
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted)
    assert worst < 1e-5, f"killed at step {max(before)} and resumed: largest weight difference {worst}"


def final_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    name = (
        "adapter_model.safetensors"
        if os.path.isfile(os.path.join(output_dir, "adapter_model.safetensors"))
        else "model.safetensors"
    )
    return load_file(os.path.join(output_dir, name))


PLANTED = "hf_PLANTEDsecret0123456789abcdef"  # a hub token in the config: it must never be written anywhere


def files_holding(secret: str, *folders) -> list[str]:
    found = []
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    if secret.encode() in handle.read():
                        found.append(path)
    return found


def test_same_yaml_runs_under_ray_job_submit(ray_cluster, train_config, tmp_path):
    """The job also carries a hub token in its config: no file the run writes, no line of its output, and none of
    Ray's session logs holds it (docs/SECURITY.md)."""
    raw = train_config(max_steps=4, save_steps=2, ray_run_name="job", hf_hub_token=PLANTED,
                       report_to="tensorboard,mlflow")  # both record the config: without the token  # fmt: skip
    project = tmp_path / "project"
    write_yaml(project, raw)
    (project / "notes.txt").write_text("the working dir is uploaded to the cluster\n")
    output = submit_job(ray_cluster, project, "loom", "train", "cfg.yaml")
    assert "succeeded" in output and "checkpoint-000004" in output
    assert steps_logged(raw["output_dir"]) == [1, 2, 3, 4]
    assert checkpoints(os.path.join(raw["ray_storage_path"], "job")) == ["checkpoint-000002", "checkpoint-000004"]
    assert PLANTED not in output
    ray_logs = "/tmp/ray/session_latest/logs"
    assert os.path.isdir(ray_logs) and files_holding(PLANTED, project) == [
        str(project / "cfg.yaml")
    ]  # the search works
    assert files_holding(PLANTED, raw["output_dir"], raw["ray_storage_path"], ray_logs) == []
    (mlflow,) = mlflow_runs(os.path.join(raw["output_dir"], "mlruns"))
    assert "hf_hub_token" not in mlflow["params"] and mlflow["params"]["max_steps"] == "4"
    assert [s for s, _ in tensorboard_scalars(os.path.join(raw["output_dir"], "runs"))["train/loss"]] == [1, 2, 3, 4]


def test_killed_dpo_worker_is_restarted_from_the_latest_checkpoint(ray_cluster, train_config, tmp_path, monkeypatch):
    """ray_max_failures: a worker process killed mid-run restarts the worker group from the committed checkpoint.
    A LoRA dpo run (its reference: the policy with the adapter disabled) under DeepSpeed ZeRO-2 with the optimizer
    offloaded to the CPU: each rank reloads its own optimizer partition, and every step is logged once. Every
    tracker watches it, in its offline or local mode, and the restarted workers reopen the same tracker runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    zero2_offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    raw = train_config(max_steps=8, save_steps=2, ray_max_failures=1, ray_run_name="retry", deepspeed=zero2_offload,
                       stage="dpo", dataset="loom_demo_pref", cutoff_len=96, report_to="all",
                       swanlab_mode="local")  # fmt: skip
    run_dir = os.path.join(raw["ray_storage_path"], "retry")
    committed_at_kill, seen, output = kill_a_worker_and_finish(ray_cluster, raw, tmp_path, after_step=3)
    print(f"\nworker killed, committed step {committed_at_kill}; seconds after the kill: {json.dumps(seen)}")
    assert "resumed from step" in output and "strategy deepspeed" in output
    assert steps_logged(raw["output_dir"]) == list(range(1, 9))  # the steps redone after the restart appear once
    with open(os.path.join(raw["output_dir"], "trainer_log.jsonl")) as handle:
        margins = [json.loads(line)["rewards/margins"] for line in handle]
    assert margins[-1] > margins[0], margins  # the resumed run goes on learning the preference
    shards = set(os.listdir(os.path.join(run_dir, checkpoints(run_dir)[-1], "deepspeed")))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards, shards
    assert_trackers_hold_the_log(raw["output_dir"], margins, committed_at_kill)


def assert_trackers_hold_the_log(output_dir: str, margins: list[float], resumed_from: int) -> None:
    """Each tracker's own files hold every logged step's DPO margin, the restart's attempt in the same tracker run
    where the tracker allows it (wandb and mlflow by id; tensorboard in its folder; swanlab local as a second
    experiment). wandb's offline writer buffers: a SIGKILLed attempt may leave none of its rows on disk (seen here:
    an empty first file), so the rows asked of it are those of the attempt that finished."""
    expected = list(zip(range(1, 9), margins, strict=True))
    scalars = tensorboard_scalars(os.path.join(output_dir, "runs"))
    assert [(s, pytest.approx(v, abs=1e-5)) for s, v in scalars["train/rewards/margins"]] == expected
    (mlflow,) = mlflow_runs(os.path.join(output_dir, "mlruns"))
    assert sorted({step for step, _ in mlflow["metrics"]["train/rewards/margins"]}) == list(range(1, 9))
    assert mlflow["params"]["stage"] == "dpo" and mlflow["status"] == "FINISHED"
    wandb = wandb_runs(output_dir)
    assert len(wandb) == 2 and len({run["id"] for run in wandb}) == 1  # the restart reopened the run
    last = {row["train/global_step"]: row["train/rewards/margins"] for run in wandb for row in run["history"]}
    assert sorted(last.items())[-(8 - resumed_from) :] == expected[resumed_from:]
    assert wandb[-1]["config"]["stage"] == "dpo" and "hf_hub_token" not in wandb[-1]["config"]
    experiments = swanlab_experiments(os.path.join(output_dir, "swanlog"))
    assert max(step for run in experiments.values() for step, _ in run["train/rewards/margins"]) == 8


def test_save_only_model_checkpoints_have_no_optimizer_and_a_restart_starts_it_afresh(
    ray_cluster, train_config, tmp_path
):
    """save_only_model: no checkpoint holds optimizer state; a worker killed mid-run restarts from the committed
    checkpoint with a fresh optimizer (said once), and every step is still logged once."""
    raw = train_config(max_steps=6, save_steps=2, ray_max_failures=1, ray_run_name="model-only", save_only_model=True)
    run_dir = os.path.join(raw["ray_storage_path"], "model-only")
    committed_at_kill, _, output = kill_a_worker_and_finish(ray_cluster, raw, tmp_path, after_step=3)
    names = checkpoints(run_dir)
    assert names and all(not os.path.exists(os.path.join(run_dir, name, "optimizer.pt")) for name in names)
    assert {"model", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(os.path.join(run_dir, names[-1])))
    assert f"checkpoint step {committed_at_kill} holds no optimizer state" in output
    assert steps_logged(raw["output_dir"]) == list(range(1, 7))
