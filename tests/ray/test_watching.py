"""Watching a run: what a finished Ray run leaves for people to look at (tests/conftest.py: trained_sft)."""

from __future__ import annotations

import json
import os

from PIL import Image


def test_plot_loss_draws_the_curves_on_rank_0_when_the_run_ends(trained_sft):
    out = trained_sft.output_dir
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "trainer_log.jsonl"), encoding="utf-8")]
    assert steps == list(range(1, 13))
    pngs = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert pngs == ["training_loss.png"]  # sft without an eval set logs the loss only
    with Image.open(os.path.join(out, "training_loss.png")) as image:
        assert image.format == "PNG" and image.size == (640, 400)
    marker = json.load(open(os.path.join(out, "loom_run.json"), encoding="utf-8"))
    assert marker["status"] == "finished"  # drawn after the model and the marker were written


def test_loom_status_reads_steps_checkpoints_metrics_and_nodes_from_the_runs_storage(trained_sft, tmp_path, capsys):
    import shutil

    import yaml

    from orchestrator.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trained_sft.config))
    assert main(["status", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "state        finished" in shown and "steps        12 of 12 in checkpoint-000012" in shown
    assert "checkpoints  2: 000006, 000012" in shown and "logged       step 12" in shown
    assert "workers      2 on 1 node: rank 0 on" in shown
    log = [json.loads(line) for line in open(os.path.join(trained_sft.output_dir, "trainer_log.jsonl"))]
    assert main(["status", trained_sft.run_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["metrics"]["loss"] == log[-1]["loss"] and status["step"] == 12 == status["total_steps"]
    assert [c["complete"] for c in status["checkpoints"]] == [True, True] and len(status["workers"]) == 2
    copy = tmp_path / "copy"
    shutil.copytree(trained_sft.run_dir, copy)
    os.remove(copy / "checkpoint-000006" / "optimizer.pt")  # a checkpoint whose upload was cut short
    assert main(["status", str(copy)]) == 0
    assert "checkpoints  2: 000006 (incomplete), 000012" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "never")]) == 3
    assert "no run at" in capsys.readouterr().out


NOISE = ("Reporting training result", "TrainingReport(", "RayDeprecationWarning", "is not writable",
         "is_gradient_checkpointing", "Setting accelerator to CPU", "Progress bars disabled", "execution finished",
         "Requesting resources", "Started training worker group", "Loading weights", "Writing model shards",
         "Traceback")  # fmt: skip


def test_the_console_shows_loom_lines_and_a_verbosity_brings_the_libraries_back(ray_cluster, tiny_model, tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import _small_run

    def train(folder: str, **env: str) -> str:
        raw = _small_run(tiny_model, tmp_path / folder, dataset="loom_demo_sft", max_samples=32, max_steps=4,
                         save_steps=2, val_size=0.25, eval_steps=2, eval_strategy="steps")  # fmt: skip
        config = tmp_path / f"{folder}.yaml"
        config.write_text(yaml.safe_dump(raw))
        loom = os.path.join(os.path.dirname(sys.executable), "loom")
        done = subprocess.run([loom, "train", str(config)], capture_output=True, text=True, timeout=600,
                              env={**ray_cluster.env(), **env})  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    quiet = train("quiet", RECORD_VRAM="1")
    assert "final         " in quiet and "checkpoint    " in quiet  # Loom's own lines
    assert "progress      step 4/4 (100%)  loss " in quiet  # not a terminal: one plain line per logged step
    assert len([line for line in quiet.splitlines() if "trained steps 1-4" in line]) == 1  # a worker line, once
    assert [line for line in quiet.splitlines() if any(noise in line for noise in NOISE)] == []
    logged = [json.loads(line) for line in open(tmp_path / "quiet" / "out" / "trainer_log.jsonl") if '"loss"' in line]
    peaks = [record["memory_peak_gb"] for record in logged]  # RECORD_VRAM: each rank's peak (RSS on CPU workers)
    assert len(peaks) == 4 and all(len(p) == 2 and all(0.05 < gb < 16 for gb in p) for p in peaks)
    assert all(list(rank) == sorted(rank) for rank in zip(*peaks, strict=True))  # a peak only grows
    loud = train("loud", LOOM_VERBOSITY="info")
    assert "Reporting training result" in loud and "Started training worker group" in loud


def test_a_verbosity_that_is_not_a_level_is_refused_naming_the_variable(monkeypatch, capsys, tmp_path):
    from orchestrator.cli import main

    monkeypatch.delenv("LOOM_VERBOSITY", raising=False)
    monkeypatch.setenv("LLAMAFACTORY_VERBOSITY", "loud")
    assert main(["status", str(tmp_path)]) != 0
    error = capsys.readouterr().err
    assert "LLAMAFACTORY_VERBOSITY: given 'loud'; one of debug, info, warning, error" in error
