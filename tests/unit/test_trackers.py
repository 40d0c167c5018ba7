"""Trackers without Ray: the registry's choices and driver checks, the metric names, and each adapter's real
offline files, including a second open that continues the same tracker run (as a restart does)."""

from __future__ import annotations

import dataclasses
import socket
from types import SimpleNamespace

import pytest

from orchestrator.trackers import TRACKERS, flat_params, requested, tracker_metrics, tracker_problems
from tests.tracker_files import mlflow_runs, swanlab_experiments, tensorboard_scalars, wandb_runs
from workers.trackers import TrackerRun, Trackers


def problems(report_to, env, use_swanlab=False, mode="cloud", key=None) -> dict[str, str]:
    """key -> its problems' messages, joined."""
    found: dict[str, str] = {}
    for p in tracker_problems(report_to, use_swanlab, mode, key, env):
        found[p.key] = f"{found[p.key]} | {p.message}" if p.key in found else p.message
    return found


def test_report_to_spellings_all_none_use_swanlab_and_wandb_disabled():
    assert requested("none", False, {}) == []
    assert requested("tensorboard, wandb", False, {}) == ["wandb", "tensorboard"]  # registry order
    assert requested(["mlflow"], True, {}) == ["mlflow", "swanlab"]
    assert requested("all", False, {}) == list(TRACKERS)  # the dev extra installs every one
    assert requested("all", False, {"WANDB_DISABLED": "true"}) == ["tensorboard", "mlflow", "swanlab"]


def test_the_driver_refuses_what_could_not_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login, no ~/.swanlab
    monkeypatch.chdir(tmp_path)
    found = problems("wandb,tensorbord", {})
    assert "did you mean 'tensorboard'" in found["report_to"]
    assert "WANDB_API_KEY" in problems("wandb", {})["report_to"]
    assert problems("wandb", {"WANDB_MODE": "offline"}) == {}
    assert problems("wandb", {"WANDB_API_KEY": "k"}) == {}
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k\n")  # what `wandb login` writes
    (tmp_path / ".netrc").chmod(0o600)
    assert problems("wandb", {}) == {}
    assert "API key" in problems("none", {}, use_swanlab=True)["swanlab_api_key"]
    assert problems("none", {}, use_swanlab=True, mode="local") == {}
    assert problems("swanlab", {}, key="k") == {}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    assert "does not answer" in problems("mlflow", {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})["report_to"]
    assert problems("mlflow", {"MLFLOW_TRACKING_URI": f"file:{tmp_path}/mlruns"}) == {}


def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_line(monkeypatch):
    monkeypatch.setitem(TRACKERS, "mlflow", dataclasses.replace(TRACKERS["mlflow"], module="no_such_mlflow"))
    assert "pip install 'mlflow-skinny'" in problems("mlflow", {})["report_to"]
    assert "mlflow" not in requested("all", False, {})  # `all` means the installed ones


def test_log_lines_are_named_as_the_trackers_expect():
    record = {"step": 3, "time": 1796222041.5, "loss": 0.5, "learning_rate": 1e-3, "eval_loss": 0.7, "eval_alpaca_loss": 0.8,
              "rewards/margins": 0.2, "memory_peak_gb": [1.5, 1.25], "note": "text", "finished": True}  # fmt: skip
    assert tracker_metrics(record) == {
        "train/global_step": 3, "train/loss": 0.5, "train/learning_rate": 1e-3, "eval/loss": 0.7,
        "eval/alpaca_loss": 0.8, "train/rewards/margins": 0.2, "train/memory_peak_gb/rank_0": 1.5,
        "train/memory_peak_gb/rank_1": 1.25,
    }  # fmt: skip
    assert flat_params({"a": 1, "deepspeed": {"zero_optimization": {"stage": 2}}, "b": "x" * 9}, limit=4) == {
        "a": "1", "deepspeed.zero_optimization.stage": "2", "b": "xxxx"}  # fmt: skip


SWANLAB = SimpleNamespace(swanlab_project="loom-test", swanlab_workspace=None, swanlab_run_name=None,
                          swanlab_mode="local", swanlab_api_key=None)  # fmt: skip


def run_and_reopen(tmp_path, monkeypatch) -> tuple[str, dict]:
    """Steps 1-4 logged, then (as after a restart from a step-2 checkpoint) a reopen that logs steps 3-6."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "out")
    run = TrackerRun(out, f"{out}/runs", "run", {"learning_rate": 0.1, "stage": "sft"}, 0, None)
    warnings: list[str] = []
    first = Trackers(tuple(TRACKERS), run, SWANLAB, {}, warnings.append)
    for step in range(1, 5):
        first.log({"step": step, "loss": 1.0 / step, "eval_loss": 2.0 / step})
    ids = first.ids()
    first.close()
    second = Trackers(tuple(TRACKERS), dataclasses.replace(run, start_step=2), SWANLAB, ids, warnings.append)
    for step in range(3, 7):
        second.log({"step": step, "loss": 1.0 / step})
    assert second.ids() == ids
    second.close()
    assert warnings == []
    return out, ids


def test_each_tracker_writes_the_logged_steps_and_a_reopen_continues_its_run(tmp_path, monkeypatch):
    out, ids = run_and_reopen(tmp_path, monkeypatch)
    assert set(ids) == {"wandb", "mlflow", "swanlab"}  # tensorboard's run is its folder
    losses = [(step, 1.0 / step) for step in range(1, 7)]

    scalars = tensorboard_scalars(f"{out}/runs")  # steps after the reopen's start were purged, then rewritten
    assert [(s, pytest.approx(v)) for s, v in scalars["train/loss"]] == losses
    assert [s for s, _ in scalars["eval/loss"]] == [1, 2]

    (mlflow,) = mlflow_runs(f"{out}/mlruns")  # one run, reopened by its id
    assert mlflow["id"] == ids["mlflow"] and mlflow["status"] == "FINISHED"
    assert mlflow["params"]["learning_rate"] == "0.1"
    assert sorted(set(mlflow["metrics"]["train/loss"])) == losses  # steps 3-4 twice: once per attempt

    first, second = wandb_runs(out)  # offline: one folder per attempt, one id, merged by `wandb sync`
    assert first["id"] == second["id"] == ids["wandb"] and first["config"]["learning_rate"] == 0.1
    logged = [(row["train/global_step"], row["train/loss"]) for run in (first, second) for row in run["history"]]
    assert logged == [(s, 1.0 / s) for s in (1, 2, 3, 4, 3, 4, 5, 6)]  # step metric: a resumed step stays in place

    experiments = swanlab_experiments(f"{out}/swanlog")  # local mode keeps the reopen as a second experiment
    assert experiments["run"]["train/loss"] == losses[:4] and experiments["run"]["eval/loss"][0] == (1, 2.0)
    assert experiments["run-2"]["train/loss"] == losses[2:]


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning(tmp_path):
    warnings: list[str] = []
    run = TrackerRun(str(tmp_path), str(tmp_path / "runs"), "run", {}, 0, None)
    trackers = Trackers(("tensorboard",), run, SWANLAB, {}, warnings.append)
    trackers._open["tensorboard"]._writer.close()  # its event file is gone from under it
    trackers._open["tensorboard"]._writer = None
    trackers.log({"step": 1, "loss": 1.0})
    assert warnings and "tracker tensorboard failed" in warnings[0]
    trackers.log({"step": 2, "loss": 1.0})  # nothing more is tried, nothing raised
    assert len(warnings) == 1
