"""The bad-input battery, driver tier: mistakes in config keys, types, values and combinations, the command line,
YAML, dataset registries and files, and model folders, each stopped before Ray is reached (tests/bad_inputs.py
holds the promises each case is checked against; tests/ray/test_bad_data.py has the cases found while reading).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.bad_inputs import KEEP, Bad, alpaca_rows, check_refused, files_under, jsonl, registry, write_project

ALPACA = {"file_name": "rows.jsonl"}
ROWS = {"data/rows.jsonl": jsonl(alpaca_rows(8))}


def own_data(entries: dict, files: dict | None = None) -> dict:
    """A project dataset_dir holding dataset_info.json with `entries` and the given files."""
    return {"data/dataset_info.json": registry(**entries), **(files or ROWS)}


def no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)


def corrupt_config(model: Path) -> None:
    (model / "config.json").write_text("{ this is not json")


def no_weights(model: Path) -> None:
    for path in model.glob("*.safetensors"):
        path.unlink()


def odd_architecture(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))


OWN = {"dataset_dir": "{project}/data", "dataset": "mine"}

CASES = [
    # keys
    Bad("misspelled key", ("lora_rnak", "did you mean 'lora_rank'"), config={"lora_rnak": 8}),
    Bad("unknown key", ("frobnicate", "docs/FEATURES.md"), config={"frobnicate": True}),
    Bad("required key missing", ("model_name_or_path",), config={"model_name_or_path": KEEP}),
    Bad("dataset missing", ("dataset",), config={"dataset": KEEP}),
    Bad("not-yet key", ("media_dir", "not supported yet"), config={"media_dir": "media"}),
    Bad("refused key needs a GPU", ("fp16",), config={"fp16": True}),
    Bad("unknown tracker", ("report_to", "did you mean 'tensorboard'"), config={"report_to": "tensorbord"}),
    Bad("stage-scoped key under sft", ("pref_beta", "stage dpo"), config={"pref_beta": 0.2}),
    Bad(
        "lora key under full",
        ("lora_rank", "finetuning_type 'lora'"),
        config={"finetuning_type": "full", "lora_rank": 16},
    ),  # fmt: skip
    # types
    Bad("number as words", ("learning_rate", "fast"), config={"learning_rate": "fast"}),
    Bad("bool as words", ("do_sample", "maybe"), config={"do_sample": "maybe"}),
    Bad("list for a string", ("template",), config={"template": ["default"]}),
    Bad("epochs as words", ("num_train_epochs", "three"), config={"num_train_epochs": "three"}),
    Bad("mapping for a number", ("lora_rank",), config={"lora_rank": {"r": 8}}),
    # values
    Bad("negative length", ("cutoff_len", "-5"), config={"cutoff_len": -5}),
    Bad("zero batch", ("per_device_train_batch_size",), config={"per_device_train_batch_size": 0}),
    Bad("zero lora rank", ("lora_rank",), config={"lora_rank": 0}),
    Bad("unknown stage", ("stage", "did you mean 'sft'"), config={"stage": "sfft"}),
    Bad("unknown finetuning type", ("finetuning_type", "qlora"), config={"finetuning_type": "qlora"}),
    Bad("unknown template", ("template", "did you mean 'default'"), config={"template": "defualt"}),
    Bad("unknown scheduler", ("lr_scheduler_type",), config={"lr_scheduler_type": "cosine_forever"}),
    Bad("unknown mix strategy", ("mix_strategy",), config={"mix_strategy": "shuffle_all"}),
    Bad("val_size too large", ("val_size",), config={"val_size": 1.5}),
    Bad("zero workers", ("ray_num_workers",), config={"ray_num_workers": 0}),
    Bad("negative resources", ("resources_per_worker",), config={"resources_per_worker": {"CPU": -1}}),
    Bad("resources not a mapping", ("resources_per_worker",), config={"resources_per_worker": "lots"}),
    Bad("run name climbs out", ("ray_run_name", "../../evil"), config={"ray_run_name": "../../evil"}),
    Bad("run name with a slash", ("ray_run_name", "a/b"), config={"ray_run_name": "a/b"}),
    Bad("lora target not in the model", ("lora_target", "q_projj"), config={"lora_target": "q_projj"}),
    Bad(
        "freeze target not in the model",
        ("freeze_trainable_modules", "nothing_here"),
        config={"finetuning_type": "freeze", "freeze_trainable_modules": "nothing_here"},
    ),  # fmt: skip
    # combinations
    Bad("min workers above max", ("ray_min_workers",), config={"ray_min_workers": 3}),
    Bad("eval steps without eval", ("eval_steps",), config={"eval_steps": 5}),
    Bad("val_size with eval_dataset", ("val_size",), config={"val_size": 0.1, "eval_dataset": "loom_demo_sft"}),
    Bad("streaming without max_steps", ("max_steps",), config={"streaming": True, "max_steps": -1}),
    Bad(
        "fsdp and deepspeed",
        ("fsdp", "deepspeed"),
        config={"fsdp": "full_shard", "deepspeed": {"zero_optimization": {"stage": 2}}},
    ),  # fmt: skip
    Bad(
        "fsdp option misspelled", ("fsdp.auto_wrp", "did you mean 'auto_wrap'"), config={"fsdp": "full_shard auto_wrp"}
    ),  # fmt: skip
    Bad("deepspeed file missing", ("deepspeed", "ds_missing.json"), config={"deepspeed": "ds_missing.json"}),
    Bad(
        "deepspeed file not json",
        ("deepspeed", "ds.json"),
        config={"deepspeed": "ds.json"},
        files={"ds.json": "{stage: 2"},
    ),  # fmt: skip
    Bad(
        "elastic with zero",
        ("ray_min_workers", "ZeRO"),
        config={"ray_min_workers": 1, "deepspeed": {"zero_optimization": {"stage": 2}}},
    ),  # fmt: skip
    Bad("ppo without a reward model", ("reward_model",), config={"stage": "ppo", "dataset": "loom_demo_sft"}),
    Bad(
        "api reward model not a URL",
        ("reward_model",),
        config={"stage": "ppo", "reward_model_type": "api", "reward_model": "not-a-url"},
    ),  # fmt: skip
    Bad("dpo on an sft dataset", ("loom_demo_sft", "ranking"), config={"stage": "dpo"}),
    Bad("output_dir on an object store", ("output_dir",), config={"output_dir": "s3://bucket/out"}),
    Bad(
        "ten mistakes at once",
        ("lora_rnak", "stage", "cutoff_len", "learning_rate", "template"),
        config={"lora_rnak": 8, "stage": "sfft", "cutoff_len": -5, "learning_rate": "fast", "template": "defualt"},
    ),  # fmt: skip
    Bad(
        "config, dataset and model mistakes in one message",
        ("3 problems", "lora_rnak", "loom_demo_sfx", "q_projj"),
        config={"lora_rnak": 8, "dataset": "loom_demo_sfx", "lora_target": "q_projj"},
    ),  # fmt: skip
    # the command line
    Bad("override without =", ("learning_rate",), args=("learning_rate",)),
    Bad("override of an unknown key", ("lora_rnak", "did you mean 'lora_rank'"), args=("lora_rnak=8",)),
    Bad("override of the wrong type", ("cutoff_len", "abc"), args=("cutoff_len=abc",)),
    Bad("override out of range", ("lora_dropout",), args=("lora_dropout=7",)),
    # the config file
    Bad("empty config file", ("empty",), text=""),
    Bad("yaml syntax error", ("cfg.yaml", "line"), text="model_name_or_path: [unclosed\nstage: sft\n"),
    Bad("config is a list", ("cfg.yaml", "mapping"), text="- stage: sft\n- dataset: x\n"),
    Bad("config is not utf-8", ("cfg.yaml",), text=b"stage: \xff\xfe sft\n"),
    Bad("json config broken", ("cfg.json",), text='{"stage": "sft",', config_name="cfg.json"),
    Bad("yaml tabs", ("cfg.yaml",), text="stage:\tsft\n\tdataset: x\n"),
    # datasets and registries
    Bad(
        "unknown dataset",
        ("dataset", "loom_demo_sfx", "did you mean 'loom_demo_sft'"),
        config={"dataset": "loom_demo_sfx"},
    ),  # fmt: skip
    Bad("unknown eval dataset", ("eval_dataset", "nope_eval"), config={"eval_dataset": "nope_eval"}),
    Bad("dataset_dir missing", ("dataset_dir",), config={"dataset_dir": "{project}/no_such_dir"}),
    Bad("registry not json", ("dataset_info.json",), config=OWN, files={"data/dataset_info.json": "{oops", **ROWS}),
    Bad(
        "registry file missing",
        ("mine", "missing.jsonl"),
        config=OWN,
        files=own_data({"mine": {"file_name": "missing.jsonl"}}),
    ),  # fmt: skip
    Bad(
        "registry unknown formatting",
        ("mine", "formatting"),
        config=OWN,
        files=own_data({"mine": {**ALPACA, "formatting": "alpacca"}}),
    ),  # fmt: skip
    Bad(
        "registry unknown entry key",
        ("mine", "did you mean 'file_name'"),
        config=OWN,
        files=own_data({"mine": {"file_nam": "rows.jsonl"}}),
    ),  # fmt: skip
    Bad(
        "registry unknown column role",
        ("mine", "did you mean 'prompt'"),
        config=OWN,
        files=own_data({"mine": {**ALPACA, "columns": {"promt": "instruction"}}}),
    ),  # fmt: skip
    Bad("registry entry not a mapping", ("mine",), config=OWN, files=own_data({"mine": "rows.jsonl"})),
    Bad(
        "registry split of a local file",
        ("mine", "split"),
        config=OWN,
        files=own_data({"mine": {**ALPACA, "split": "test"}}),
    ),  # fmt: skip
    Bad(
        "kto set without a tag column",
        ("mine", "kto_tag"),
        config={**OWN, "stage": "kto"},
        files=own_data({"mine": {**ALPACA, "formatting": "sharegpt", "columns": {"messages": "conversations"}}}),
    ),  # fmt: skip
    # model folders
    Bad(
        "model folder missing",
        ("model_name_or_path", "no_model_here"),
        config={"model_name_or_path": "{project}/no_model_here"},
    ),  # fmt: skip
    Bad("model without a tokenizer", ("model_name_or_path", "tokenizer"), model=no_tokenizer),
    Bad("model with a corrupt config", ("model_name_or_path", "config.json"), model=corrupt_config),
    Bad("model without weights", ("model_name_or_path", "weights"), model=no_weights),
    Bad("model of an unknown architecture", ("model_name_or_path", "no-such-model"), model=odd_architecture),
    Bad("adapter folder missing", ("adapter_name_or_path",), config={"adapter_name_or_path": "{project}/no_adapter"}),
]


@pytest.fixture
def no_ray(monkeypatch):
    """These mistakes must be found before Ray is reached: reaching it fails the case."""

    def reached(*_, **__):
        raise AssertionError("the driver reached Ray: this mistake was not caught by the checks")

    monkeypatch.setattr("orchestrator.launch.connect", reached)


def test_the_battery_has_at_least_sixty_cases():
    from tests.ray.test_bad_data import DATA_CASES

    assert len(CASES) + len(DATA_CASES) >= 60 and len({c.id for c in CASES + DATA_CASES}) == len(CASES + DATA_CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_stops_at_the_driver(case, tiny_model, tmp_path, capfd, monkeypatch, no_ray):
    project = tmp_path / "project"
    argv = write_project(case, project, tiny_model)
    monkeypatch.chdir(project)  # relative paths in a config are read against the working dir
    before = files_under(project)
    code = main(argv)
    captured = capfd.readouterr()
    check_refused(case, project, code, captured.out + captured.err, before)
