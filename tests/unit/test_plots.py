"""plot_loss / loom plot: the curves hold exactly the logged numbers, named as LLaMA-Factory names the files."""

from __future__ import annotations

import json

from PIL import Image

from orchestrator.cli import main
from orchestrator.plots import figures, plot_log, plotted_keys, smoothed


def write_log(folder, records, stage=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    if stage:
        (folder / "loom_run.json").write_text(json.dumps({"status": "running", "stage": stage}))


DPO_LOG = [{"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "learning_rate": 1e-4},
           {"step": 2, "loss": 0.61, "rewards/accuracies": 0.75, "eval_loss": 0.66},
           {"step": 3, "loss": 0.55, "rewards/accuracies": 1.0, "rewards/margins": 0.4}]  # fmt: skip


def test_the_smoothed_curve_is_an_average_that_lags_the_loss():
    assert smoothed([]) == [] and smoothed([2.0]) == [2.0]
    values = [4.0, 1.0, 1.0, 1.0]
    curve = smoothed(values)
    assert curve[0] == 4.0 and all(1.0 < c < 4.0 for c in curve[1:]) and curve == sorted(curve, reverse=True)


def test_each_stage_metric_in_the_log_gets_its_own_curve_with_the_logged_points():
    assert plotted_keys("dpo", DPO_LOG) == ["loss", "eval_loss", "rewards/accuracies", "rewards/margins"]
    assert plotted_keys("sft", DPO_LOG) == ["loss", "eval_loss"]  # sft logs no reward metrics
    drawn = figures(DPO_LOG, "dpo", "run")
    assert list(drawn) == ["training_loss.png", "training_eval_loss.png", "training_rewards_accuracies.png",
                           "training_rewards_margins.png"]  # fmt: skip
    loss = drawn["training_loss.png"].axes[0].lines
    assert loss[0].get_xydata().tolist() == [[1, 0.69], [2, 0.61], [3, 0.55]]  # the original points
    assert loss[1].get_ydata().tolist() == smoothed([0.69, 0.61, 0.55])
    accuracy = drawn["training_rewards_accuracies.png"].axes[0].lines[0].get_xydata().tolist()
    assert accuracy == [[1, 0.5], [2, 0.75], [3, 1.0]]
    assert drawn["training_eval_loss.png"].axes[0].lines[0].get_xydata().tolist() == [[2, 0.66]]


def test_loom_plot_writes_pngs_for_a_running_or_finished_output_dir(tmp_path, capsys):
    run = tmp_path / "out"
    write_log(run, DPO_LOG, stage="dpo")  # the last line is being written: skipped
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed][:2] == ["training_loss.png", "training_eval_loss.png"]
    with Image.open(run / "training_loss.png") as image:
        assert image.format == "PNG" and image.size == (640, 400)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".png") == sorted(p.rsplit("/", 1)[1] for p in printed)
    assert plot_log(str(run), out_dir=str(tmp_path / "elsewhere")) and (tmp_path / "elsewhere").is_dir()


def test_loom_plot_of_a_folder_without_a_log_says_where_the_log_lives(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) != 0
    error = capsys.readouterr().err
    assert "has no trainer_log.jsonl" in error and "Traceback" not in error
