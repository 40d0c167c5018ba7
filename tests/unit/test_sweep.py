"""Sweep files for `loom tune`: validation before any trial, the search space, trial configs and the result table."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import ConfigError
from orchestrator.sweep import (
    Dimension,
    SweepOutcome,
    TrialRow,
    best_trial,
    load_sweep,
    one_at_a_time,
    trial_config,
    validate_sweep,
)
from tests.helpers import DEMO_DATA, REPO


def base(**extra) -> dict:
    raw = {"model_name_or_path": "org/some-model", "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
           "template": "default", "resources_per_worker": {"CPU": 1}, "max_steps": 40, "save_steps": 10,
           "logging_steps": 5}  # fmt: skip
    return {**raw, **extra}


def sweep(space: dict | None = None, **extra) -> dict:
    return {"base": base(), "search_space": space or {"learning_rate": {"grid": [1.0e-4, 1.0e-3]}}, **extra}


def problems(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_sweep(raw, default_name="t")
    return {p.key: p.message for p in caught.value.problems}


def test_the_quickstart_sweep_loads():
    s = load_sweep(str(REPO / "configs" / "sweep_quickstart.yaml"), base_dir=str(REPO))
    assert s.name == "sweep_quickstart" and s.metric == "eval_loss" and s.mode == "min"
    assert s.base["ray_run_name"] == "quickstart"  # base: quickstart.yaml, found next to the sweep file
    assert s.trial_count() == 4  # lora_rank grid of 2 x num_samples 2 (learning_rate is sampled per trial)
    assert s.asha == {"time_attr": "step", "max_t": 85, "grace_period": 20, "reduction_factor": 2.0}
    assert s.experiment_dir == str(REPO / "loom_quickstart" / "sweeps" / "sweep_quickstart")
    assert s.runs_dir.endswith("/sweep_quickstart/runs")
    assert [d.key for d in s.space] == ["learning_rate", "lora_rank"]


def test_every_problem_is_reported_together_with_did_you_mean():
    found = problems({
        "base": base(),
        "serch_space": {},
        "search_space": {
            "lerning_rate": {"loguniform": [1e-4, 1e-2]},
            "lora_rank": {"log_uniform": [4, 64]},
            "output_dir": {"grid": ["a", "b"]},
        },
        "metric": "eval_los",
        "scheduler": "ashaa",
        "num_samples": 0,
    })  # fmt: skip
    assert "did you mean 'search_space'" in found["serch_space"]
    assert "did you mean 'learning_rate'" in found["search_space.lerning_rate"]
    assert "did you mean 'loguniform'" in found["search_space.lora_rank"]
    assert "set per trial" in found["search_space.output_dir"]
    assert "did you mean 'eval_loss'" in found["metric"] and "did you mean 'asha'" in found["scheduler"]
    assert "greater than or equal to 1" in found["num_samples"]


def test_every_value_the_space_can_produce_must_validate():
    found = problems(sweep({
        "learning_rate": {"grid": [1.0e-4, -1.0]},
        "lora_rank": {"uniform": [4, 64]},
        "lora_dropout": {"loguniform": [0.0, 0.1]},
        "template": {"randint": [1, 3]},
        "warmup_ratio": {"uniform": [0.5, 2.0]},
        "lr_scheduler_type": {"choice": ["cosine", "cosin"]},
    }))  # fmt: skip
    assert "learning_rate=-1.0" in found["search_space.learning_rate"]
    assert "integer" in found["search_space.lora_rank"] and "randint" in found["search_space.lora_rank"]
    assert "low > 0" in found["search_space.lora_dropout"]
    assert "numeric" in found["search_space.template"]
    assert "warmup_ratio=2.0" in found["search_space.warmup_ratio"]  # the high end of the range is checked
    assert "did you mean 'cosine'" in found["search_space.lr_scheduler_type"]


def test_bad_base_and_missing_base_file(tmp_path):
    found = problems({"base": base(lora_rnak=8), "search_space": {"learning_rate": {"grid": [1e-3]}}})
    assert "did you mean 'lora_rank'" in found["base.lora_rnak"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "missing.yaml", "search_space": {"learning_rate": {"grid": [1e-3]}}}))
    with pytest.raises(ConfigError, match=r"missing\.yaml' does not exist"):
        load_sweep(str(path))


def test_yaml_exponents_are_numbers_and_choice_values_keep_their_type(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("base: {}\nsearch_space:\n  learning_rate: {loguniform: [1e-4, 1e-2]}\n".replace(
        "{}", yaml.safe_dump(base(), default_flow_style=True).strip()))  # fmt: skip
    s = load_sweep(str(path), base_dir=str(tmp_path))
    assert s.space == (Dimension("learning_rate", "loguniform", (1e-4, 1e-2)),)
    assert s.name == "lr" and s.storage_path == str(tmp_path / "saves")  # the base's default storage, from cwd


def test_trial_count_is_grid_combinations_times_samples():
    space = {"learning_rate": {"grid": [1e-4, 1e-3]}, "lora_rank": {"grid": [4, 8, 16]},
             "lora_dropout": {"choice": [0.0, 0.1]}}  # fmt: skip
    assert validate_sweep(sweep(space, num_samples=2)).trial_count() == 12  # choice is sampled per trial
    assert validate_sweep(sweep(space, search_alg="grid")).trial_count() == 12  # grid enumerates choices too
    found = problems(sweep({"learning_rate": {"uniform": [1e-4, 1e-3]}}, search_alg="grid"))
    assert "use grid or choice" in found["search_space.learning_rate"]


def test_every_report_must_carry_the_metric():
    # Loom reports at each checkpoint; loss is there only when the checkpoint step is also a logging step.
    found = problems(sweep(base=base(save_steps=12)))
    assert "save_steps a whole multiple of logging_steps" in found["metric"]
    found = problems(sweep(metric="eval_loss"))
    assert "eval_loss needs evaluation" in found["metric"]
    ok = base(val_size=0.1, eval_strategy="steps", eval_steps=5)
    assert validate_sweep(sweep(base=ok, metric="eval_loss")).metric == "eval_loss"
    found = problems(sweep(base={**ok, "eval_steps": 3}, metric="eval_loss"))
    assert "eval every 3" in found["metric"]
    assert validate_sweep(sweep(base=base(save_strategy="no", logging_steps=7))).metric == "loss"  # one final report
    assert validate_sweep(sweep(metric="train_loss")).metric == "loss"
    # a combination of searched values is checked too, not only each value alone
    found = problems(sweep({"save_steps": {"grid": [10, 12]}, "logging_steps": {"grid": [2, 5]}}))
    assert "save_steps=12" in found["metric"]


def test_asha_options():
    s = validate_sweep(sweep(scheduler="asha"))
    assert s.asha == {"time_attr": "step", "max_t": 40, "grace_period": 10, "reduction_factor": 2.0}
    s = validate_sweep(sweep({"max_steps": {"grid": [20, 60]}}, scheduler="asha", asha={"reduction_factor": 3}))
    assert s.asha["max_t"] == 60 and s.asha["reduction_factor"] == 3
    found = problems(sweep(base=base(max_steps=-1), scheduler="asha"))
    assert "max_steps is not set" in found["asha.max_t"]
    found = problems(sweep(asha={"grace_perod": 2, "max_t": 10}))
    assert "did you mean 'grace_period'" in found["asha.grace_perod"]
    found = problems(sweep(asha={"max_t": 10}))
    assert "scheduler is 'fifo'" in found["asha"]
    found = problems(sweep(base=base(save_strategy="no"), scheduler="asha"))
    assert "intermediate reports" in found["metric"]
    found = problems(sweep(scheduler="asha", asha={"max_t": 5, "grace_period": 10}))
    assert "more than max_t" in found["asha.grace_period"]


def test_trial_configs_get_their_own_run_and_output_dir():
    s = validate_sweep(sweep(name="lr", storage_path="/data/sweeps"))
    raw = trial_config({**s.base, "ray_run_name": "mine", "overwrite_output_dir": True}, {"learning_rate": 1e-3},
                       "abc_00001", s.runs_dir)  # fmt: skip
    assert raw["ray_run_name"] == "abc_00001" and raw["ray_storage_path"] == "/data/sweeps/lr/runs"
    assert raw["learning_rate"] == 1e-3 and raw["overwrite_output_dir"] is False and "output_dir" not in raw
    raw = trial_config({**s.base, "output_dir": "/out/"}, {}, "abc_00001", s.runs_dir)
    assert raw["output_dir"] == "/out/abc_00001"
    assert [p["learning_rate"] for p in one_at_a_time(s)] == [1e-4, 1e-3]


def test_trials_share_the_driver_prepared_data_only_when_no_data_key_is_searched():
    assert validate_sweep(sweep({"learning_rate": {"grid": [1e-4]}, "lora_rank": {"grid": [4, 8]}})).shares_data()
    assert not validate_sweep(sweep({"cutoff_len": {"grid": [64, 128]}})).shares_data()
    assert not validate_sweep(sweep({"seed": {"grid": [1, 2]}})).shares_data()  # the shuffle follows the seed


def test_a_sweep_name_is_one_safe_folder_name_and_a_token_does_not_change_the_default():
    for bad in ("../up", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="a sweep name is one folder name"):
            validate_sweep(sweep(name=bad))
    assert validate_sweep(sweep(), default_name="my sweep").name.startswith("loom-tune-")  # the file stem is unsafe
    plain, with_token = sweep(), sweep()
    with_token["base"] = {**with_token["base"], "hf_hub_token": "hf_rotated"}
    assert validate_sweep(plain).name == validate_sweep(with_token).name


def test_table_and_best():
    s = validate_sweep(sweep(name="lr"))
    rows = [
        TrialRow("a_00000", {"learning_rate": 1e-4}, "finished", metric=2.5, step=40),
        TrialRow("a_00001", {"learning_rate": 1e-3}, "stopped", metric=2.1, step=10),
        TrialRow("a_00002", {"learning_rate": 1e-2}, "error", error="TrainingError: boom"),
    ]
    best = best_trial(rows, "min")
    assert best.trial_id == "a_00001" and best_trial(rows, "max").trial_id == "a_00000"
    table = SweepOutcome(sweep=s, trials=rows, best=best, start="fresh").table().splitlines()
    assert table[0].split() == ["trial", "learning_rate", "loss", "step", "status"]
    assert table[2].split() == ["a_00001", "0.001", "2.1", "10", "stopped", "<-", "best"]
    assert table[3].split() == ["a_00002", "0.01", "-", "-", "error"] and table[-1] == "a_00002: TrainingError: boom"


def test_tune_command_exits_2_on_a_bad_sweep_and_checks_a_good_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep({"lerning_rate": {"grid": [1e-3]}})))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(sweep()))
    assert main(["tune", str(path), "lora_rank=4", "--check"]) == 0
    out = capsys.readouterr().out
    assert "sweep         s  (2 trials, 1 at a time)" in out and "check         ok" in out


def test_the_space_becomes_tune_objects():
    """No cluster: only Tune's search-space and scheduler objects."""
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.tune import make_scheduler, param_space, search_algorithm

    space = {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "lora_rank": {"choice": [4, 8]},
             "max_steps": {"grid": [20, 40]}, "gradient_accumulation_steps": {"randint": [1, 2]}}  # fmt: skip
    s = validate_sweep(sweep(space, scheduler="asha", max_concurrent_trials=3, num_samples=2))
    converted = param_space(s)
    assert converted["max_steps"] == {"grid_search": [20, 40]}
    assert (converted["learning_rate"].lower, converted["learning_rate"].upper) == (1e-4, 1e-2)
    assert converted["lora_rank"].categories == [4, 8]
    assert {converted["gradient_accumulation_steps"].sample() for _ in range(50)} == {1, 2}  # both ends included
    assert search_algorithm(s, seed=1).max_concurrent == 3  # Tune ignores TuneConfig's limit beside a search_alg
    scheduler = make_scheduler(s)
    assert isinstance(scheduler, ASHAScheduler)


def test_a_trial_needs_its_workers_and_a_sliver_of_cpu():
    from orchestrator.errors import PlanError
    from orchestrator.tune import check_sweep_placement

    s = validate_sweep(sweep(base=base(ray_num_workers=2)))
    check_sweep_placement(s, "/tmp", [{"CPU": 3.0}])
    with pytest.raises(PlanError, match="a trial needs 0.01 CPU beside its workers' 2; the cluster has 2"):
        check_sweep_placement(s, "/tmp", [{"CPU": 2.0}])
    with pytest.raises(PlanError, match="needs 2 GPU"):
        check_sweep_placement(validate_sweep(sweep(base=base(ray_num_workers=2, resources_per_worker={"GPU": 1}))),
                              "/tmp", [{"CPU": 8.0}])  # fmt: skip


def test_a_run_that_finished_before_an_interruption_reports_its_last_metrics(tmp_path):
    """Tune restores a trial whose Loom run had finished but whose last result Tune never recorded."""
    import json

    from orchestrator.tune import finished_metrics

    out, run = tmp_path / "output", tmp_path / "run"
    out.mkdir()
    (run / "checkpoint-000004").mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text(
        "\n".join(
            json.dumps(r) for r in [{"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.5}, {"step": 4, "eval_loss": 1.7}]
        )
    )
    (out / "loom_run.json").write_text(json.dumps({"status": "running", "step": 4, "total_steps": 4}))
    assert finished_metrics(str(out), str(run)) is None
    (out / "loom_run.json").write_text(json.dumps({"status": "finished", "step": 4, "total_steps": 4}))
    assert finished_metrics(str(out), str(run)) == {
        "step": 4, "loss": 1.5, "eval_loss": 1.7, "checkpoint_path": f"{run}/checkpoint-000004"
    }  # fmt: skip
