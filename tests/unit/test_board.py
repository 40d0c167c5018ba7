"""The board's logic without a browser or a cluster: the checks it shows as a config is typed, the pickers'
edits, a key's doc, and the loss curve's points (the browser test is tests/ray/test_board.py)."""

from __future__ import annotations

import os

import yaml

from orchestrator.board import check_text, dataset_names, job_folder, key_doc, loss_points, with_key
from tests.helpers import DEMO_DATA, REPO
from workers.trainlog import TrainerLog


def config(model_dir: str, **extra) -> str:
    return yaml.safe_dump({"model_name_or_path": model_dir, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
                           "resources_per_worker": {"CPU": 1}, "ray_run_name": "b", **extra})  # fmt: skip


def test_the_report_is_loom_plans_checks_or_its_plan(model_dir, tmp_path):
    assert "YAML error" in check_text("a: [1, 2", str(tmp_path)).report
    assert "not a mapping" in check_text("- a\n- b\n", str(tmp_path)).report
    bad = check_text(config(model_dir, lora_rnak=8, learning_rate=-1), str(tmp_path))
    assert bad.cfg is None and "`lora_rnak`" in bad.report and "did you mean 'lora_rank'" in bad.report
    assert "`learning_rate`" in bad.report  # every problem together
    good = check_text(config(model_dir), str(tmp_path))
    assert good.cfg is not None and good.report.startswith("**Valid.**") and "run name      b" in good.report


def test_pickers_set_one_key_and_the_dataset_picker_lists_the_registry():
    text = "stage: sft\ncutoff_len: 64\n"
    assert yaml.safe_load(with_key(text, "stage", "dpo")) == {"stage": "dpo", "cutoff_len": 64}
    assert with_key("a: [1", "stage", "dpo") == "a: [1"  # not YAML yet: left for the user to finish
    assert with_key(text, "stage", None) == text
    names = dataset_names(f"dataset_dir: {DEMO_DATA.relative_to(REPO)}\n", str(REPO))
    assert {"loom_demo_sft", "loom_demo_pref"} <= set(names)


def test_a_keys_doc_and_the_curve_from_the_log(tmp_path):
    assert "`lora_rank`" in key_doc("lora_rank") and "works" in key_doc("lora_rank")
    assert "not yet" in key_doc("media_dir") and key_doc("no_such_key") == ""
    log = TrainerLog(str(tmp_path / "trainer_log.jsonl"))
    log.append({"step": 1, "loss": 2.0})
    log.append({"step": 2, "loss": 1.5, "eval_loss": 1.8})
    assert loss_points(str(tmp_path)) == [
        {"step": 1, "value": 2.0, "series": "train loss"},
        {"step": 2, "value": 1.5, "series": "train loss"},
        {"step": 2, "value": 1.8, "series": "eval loss"},
    ]
    assert loss_points(str(tmp_path / "not-yet")) == []


def test_a_submitted_jobs_folder_holds_the_config_without_its_secrets(model_dir, tmp_path):
    token = "hf_PLANTEDsecret0123456789abcdef"
    checked = check_text(config(model_dir, hf_hub_token=token, learning_rate=1e-3), str(tmp_path))
    folder, variables = job_folder(checked.cfg)
    assert os.listdir(folder) == ["cfg.yaml"]
    written = open(os.path.join(folder, "cfg.yaml")).read()
    assert token not in written and yaml.safe_load(written)["learning_rate"] == 1e-3
    assert yaml.safe_load(written)["model_name_or_path"] == os.path.abspath(model_dir)  # paths made absolute
    assert variables == {"HF_TOKEN": token}
