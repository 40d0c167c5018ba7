"""Pipeline files (pure): layout, references to earlier stages' outputs, and every problem of every stage at once."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.pipeline import load_pipeline
from tests.helpers import DEMO_DATA, REPO


def write(tmp_path, stages: list[dict], **top) -> str:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, **top}))
    return str(path)


def stage_config(model_dir: str, **extra) -> dict:
    return {"model_name_or_path": model_dir, "dataset": "loom_demo_pref", "dataset_dir": str(DEMO_DATA),
            "template": "default", "resources_per_worker": {"CPU": 1}, **extra}  # fmt: skip


def test_the_demo_pipeline_resolves_its_references(monkeypatch, model_dir):
    monkeypatch.chdir(REPO)
    pipeline = load_pipeline(str(REPO / "configs" / "pipeline_demo.yaml"))
    sft, rm, ppo = pipeline.stages
    assert pipeline.root == str(REPO / "loom_quickstart" / "pipelines" / "demo")
    assert [s.config.stage for s in pipeline.stages] == ["sft", "rm", "ppo"]
    assert sft.output_dir == f"{pipeline.root}/sft/output" and sft.config.ray_run_name == "sft"
    assert rm.config.adapter_name_or_path == sft.output_dir
    assert ppo.config.adapter_name_or_path == sft.output_dir and ppo.config.reward_model == rm.output_dir
    assert ppo.references == {"adapter_name_or_path": "sft", "reward_model": "rm"}
    assert all(s.config.ray_storage_path == pipeline.root for s in pipeline.stages)
    assert "ppo         stage ppo, lora; adapter_name_or_path <- sft, reward_model <- rm" in pipeline.describe()


def test_every_problem_of_every_stage_is_reported_together(tmp_path, model_dir):
    stages = [
        {"name": "sft", "config": stage_config(model_dir, stage="sft", dataset="loom_demo_sft",
                                               learning_rate="fast")},
        {"name": "rm", "config": stage_config(model_dir, stage="rm", finetuning_type="full"),
         "overrides": {"adapter_name_or_path": {"from": "sft"}, "output_dir": "elsewhere"}},
        {"name": "ppo", "config": stage_config(model_dir, stage="ppo", dataset="loom_demo_sft"),
         "overrides": {"reward_model": {"from": "sft"}, "ref_model": {"from": "later"}, "template": {"from": "rm"}}},
        {"name": "ppo", "config": "no_such_file.yaml"},
    ]  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write(tmp_path, stages, name="../escape"))
    found = {p.key: p.message for p in caught.value.problems}
    assert "a pipeline name is one folder name" in found["name"]
    assert "valid number" in found["stages[0] (sft).learning_rate"]
    assert "set by the pipeline" in found["stages[1] (rm).overrides"]
    assert "names no earlier stage" in found["stages[2] (ppo).overrides.ref_model"]
    assert "cannot take a stage's output" in found["stages[2] (ppo).overrides.template"]
    assert "unique folder names" in found["stages[3].name"]
    assert any("no_such_file.yaml" in message for message in found.values())


def test_a_reference_must_fit_the_key_that_takes_it(tmp_path, model_dir):
    stages = [
        {"name": "sft", "config": stage_config(model_dir, stage="sft", dataset="loom_demo_sft")},
        {"name": "rm", "config": stage_config(model_dir, stage="rm", finetuning_type="full")},
        {"name": "ppo", "config": stage_config(model_dir, stage="ppo", dataset="loom_demo_sft"),
         "overrides": {"reward_model": {"from": "sft"}}},
        {"name": "dpo", "config": stage_config(model_dir, stage="dpo", finetuning_type="full"),
         "overrides": {"ref_model": {"from": "rm"}, "model_name_or_path": {"from": "sft"}}},
    ]  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write(tmp_path, stages))
    found = {p.key: p.message for p in caught.value.problems}
    assert "takes a reward model (stage rm), but stage 'sft' trains stage 'sft'" in found[
        "stages[2] (ppo).overrides.reward_model"]  # fmt: skip
    assert "a policy, not a reward model" in found["stages[3] (dpo).overrides.ref_model"]
    assert "takes a whole model folder, but stage 'sft' trains with 'lora'" in found[
        "stages[3] (dpo).overrides.model_name_or_path"]  # fmt: skip


def test_outputs_of_earlier_stages_are_taken_as_given(tmp_path, model_dir):
    """The rm adapter does not exist yet, so the ppo stage's file checks accept that one folder, and only it."""
    stages = [
        {"name": "rm", "config": stage_config(model_dir, stage="rm")},
        {"name": "ppo", "config": stage_config(model_dir, stage="ppo", dataset="loom_demo_sft"),
         "overrides": {"reward_model": {"from": "rm"}, "ref_model_adapters": str(tmp_path / "missing")}},
    ]  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write(tmp_path, stages, storage_path=str(tmp_path / "runs")))
    assert [p.key for p in caught.value.problems] == ["stages[1] (ppo).ref_model_adapters"]
    del stages[1]["overrides"]["ref_model_adapters"]
    pipeline = load_pipeline(write(tmp_path, stages, storage_path=str(tmp_path / "runs")))
    assert pipeline.stages[1].config.reward_model == str(tmp_path / "runs" / "pipe" / "rm" / "output")
