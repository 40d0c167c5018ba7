"""`loom tune` on the session's Ray cluster: a 2-trial grid over learning_rate under ASHA, each trial a Loom run."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from orchestrator.cli import main
from tests.ray.test_cli_runs import PLANTED, files_holding


def table_rows(text: str) -> dict[float, list[str]]:
    """The printed trial table: learning rate -> its columns (trial, learning_rate, loss, step, status, ...)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "learning_rate"])
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("best"):
            break
        cells = line.split()
        rows[float(cells[1])] = cells
    return rows


def field(text: str, name: str) -> str:
    return re.search(rf"^{name}\s+(.*)$", text, re.MULTILINE).group(1)


def test_asha_grid_sweep_stops_the_weak_trial_keeps_the_best_and_restores_as_done(
    ray_cluster, train_config, tmp_path, capsys
):
    base = train_config(
        ray_num_workers=1,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        cutoff_len=64,
        max_samples=32,
        hf_hub_token=PLANTED,
    )  # never written: not in best_config.yaml nor any file of the sweep
    sweep = {
        "base": base,
        # In this order, one trial at a time: the strong rate sets ASHA's bar at step 2, the weak one falls under it.
        "search_space": {"learning_rate": {"grid": [1.0e-2, 1.0e-6]}},
        "metric": "loss",
        "mode": "min",
        "search_alg": "grid",
        "scheduler": "asha",  # max_t 4 (max_steps), grace_period 2 (save_steps), reduction_factor 2
        "max_concurrent_trials": 1,
        "storage_path": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "lr_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))

    assert main(["tune", str(path), "--address", ray_cluster.gcs_address]) == 0
    out = capsys.readouterr().out
    assert "sweep         lr_sweep  (2 trials, 1 at a time)" in out and "start         fresh" in out, out
    rows = table_rows(out)
    strong, weak = rows[1.0e-2], rows[1.0e-6]
    assert strong[3:] == ["4", "finished", "<-", "best"], out
    assert weak[3:] == ["2", "stopped"] and float(weak[2]) > float(strong[2]), out
    best_id = strong[0]
    assert field(out, "best").split()[0] == best_id

    experiment = tmp_path / "sweeps" / "lr_sweep"
    checkpoint = field(out, "checkpoint")
    assert checkpoint == str(experiment / "runs" / best_id / "checkpoint-000004"), out
    assert os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
    assert os.path.isdir(experiment / "runs" / weak[0] / "checkpoint-000002")  # each trial is a Loom run
    assert field(out, "model") == os.path.join(base["output_dir"], best_id)  # <output_dir>/<trial id>
    assert os.path.isfile(os.path.join(base["output_dir"], best_id, "adapter_model.safetensors"))
    best_config = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert best_config["learning_rate"] == 1.0e-2 and best_config["max_steps"] == 4
    assert "hf_hub_token" not in best_config
    assert (experiment / "best_config.yaml").read_text().startswith("# hf_hub_token left out (secrets are never")
    assert files_holding(PLANTED, experiment, base["output_dir"]) == []

    # The same command again restores the experiment: nothing left to run, the same table and best.
    assert main(["tune", str(path), "--address", ray_cluster.gcs_address]) == 0
    again = capsys.readouterr().out
    assert "start         resumed" in again and field(again, "best").split()[0] == best_id
    assert table_rows(again) == rows
    # A rotated token is the same sweep (secrets are not part of its fingerprint).
    assert main(["tune", str(path), "hf_hub_token=hf_rotated", "--address", ray_cluster.gcs_address]) == 0
    assert "start         resumed" in capsys.readouterr().out

    # A changed sweep under the same name is refused rather than mixed into the old experiment.
    assert main(["tune", str(path), "max_steps=6", "--address", ray_cluster.gcs_address]) == 4
    assert "different base or search space" in capsys.readouterr().err


@pytest.mark.slow  # about 2 minutes here: 8 trials, 4 at a time, on 2 cores
@pytest.mark.timeout(900)
def test_eight_trials_four_at_a_time_finish_on_the_test_cluster_without_a_hang(
    ray_cluster, train_config, tmp_path, capsys
):
    """Load: 4 trials of one half-CPU worker each run at once on the 4 logical CPUs of the session's cluster (2
    cores), with the data prepared once before; every trial must finish, none may wait for CPUs that never free."""
    base = train_config(ray_num_workers=1, resources_per_worker={"CPU": 0.5}, max_steps=3, save_steps=3,
                        logging_steps=1, cutoff_len=64, max_samples=16)  # fmt: skip
    rates = [10.0**-e for e in range(2, 10)]
    sweep = {"base": base, "search_space": {"learning_rate": {"grid": rates}}, "metric": "loss", "mode": "min",
             "search_alg": "grid", "scheduler": "fifo", "max_concurrent_trials": 4,
             "storage_path": str(tmp_path / "sweeps")}  # fmt: skip
    path = tmp_path / "load.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["tune", str(path), "--address", ray_cluster.gcs_address]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert sorted(rows) == sorted(rates), out
    assert all(cells[3:5] == ["3", "finished"] for cells in rows.values()), out
