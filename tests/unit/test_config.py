"""Config loading and validation: every problem reported together, with key, value given and what is allowed."""

from __future__ import annotations

import os

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.config import LoomConfig, load_config, validate_config
from orchestrator.config.loader import parse_overrides
from orchestrator.errors import ConfigError
from tests.helpers import DEMO_DATA, REPO


def base(model_dir: str, **extra) -> dict:
    return {
        "model_name_or_path": model_dir,
        "dataset": "loom_demo_sft",
        "dataset_dir": str(DEMO_DATA),
        "resources_per_worker": {"CPU": 1},
        **extra,
    }


def problems(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    return {p.key: p.message for p in caught.value.problems}


def test_valid_config_keeps_values_and_defaults(model_dir):
    cfg = validate_config(base(model_dir, lora_rank=16, template="default"))
    assert cfg.lora_rank == 16
    assert cfg.effective_lora_alpha() == 32
    assert cfg.cutoff_len == 2048 and cfg.stage == "sft" and cfg.finetuning_type == "lora"


def test_ten_mistakes_are_reported_together(model_dir):
    raw = base(
        model_dir,
        lora_rnak=8,  # 1 misspelled key
        stage="sfft",  # 2 wrong literal
        cutoff_len=-5,  # 3 out of range
        learning_rate="fast",  # 4 wrong type
        template="defualt",  # 5 unknown template
        neat_packing=True,  # 6 contradiction (no packing); also not built yet
        pref_beta=0.2,  # 7 DPO-only key with stage sft
        fp16=True,  # 8 needs a GPU
        media_dir="media",  # 9 not supported yet
        lora_dropout=1.5,  # 10 out of range
    )
    found = problems(raw)
    expected = {
        "lora_rnak", "stage", "cutoff_len", "learning_rate", "template",
        "neat_packing", "pref_beta", "fp16", "media_dir", "lora_dropout",
    }  # fmt: skip
    assert expected <= set(found), found
    assert "did you mean 'lora_rank'" in found["lora_rnak"]
    assert "did you mean 'sft'" in found["stage"] and "allowed: pt, sft" in found["stage"]
    assert "-5" in found["cutoff_len"] and "greater than or equal to 1" in found["cutoff_len"]
    assert "did you mean 'default'" in found["template"]
    assert "only used with stage dpo" in found["pref_beta"]
    assert "not supported yet" in found["media_dir"]


def test_error_message_names_source_and_counts(model_dir):
    with pytest.raises(ConfigError) as caught:
        validate_config(base(model_dir, lora_rnak=1, stage="x"), source="cfg.yaml")
    text = str(caught.value)
    assert text.startswith("2 problems in cfg.yaml:")
    assert "  - lora_rnak: unknown key (given 1)" in text


@pytest.mark.parametrize(
    ("extra", "key", "phrase"),
    [
        ({"pissa_convert": True}, "pissa_convert", "needs pissa_init"),
        ({"finetuning_type": "full", "lora_rank": 16}, "lora_rank", "only used with finetuning_type 'lora'"),
        ({"finetuning_type": "lora", "freeze_trainable_layers": 4}, "freeze_trainable_layers", "'freeze'"),
        ({"bf16": True, "fp16": True, "resources_per_worker": {"GPU": 1}}, "fp16", "choose one"),
        ({"do_eval": True}, "val_size", "nothing to evaluate"),
        ({"stage": "ppo"}, "reward_model", "ppo needs a reward model"),
        ({"stage": "dpo", "pref_loss": "orpo", "ref_model": "x/y"}, "ref_model", "reference-free"),
        ({"stage": "dpo", "pref_loss": "ipo", "dpo_label_smoothing": 0.1}, "dpo_label_smoothing", "sigmoid only"),
        ({"stage": "kto", "pref_loss": "ipo"}, "pref_loss", "only used with stage dpo"),
        (
            {"stage": "ppo", "reward_model": "http://x", "reward_model_type": "api", "val_size": 0.1},
            "val_size",
            "no evaluation loss",
        ),
        ({"interleave_probs": "0.5,0.5"}, "interleave_probs", "needs mix_strategy interleave"),
        ({"mix_strategy": "interleave_over", "interleave_probs": "0.5,0.6"}, "interleave_probs", "1 datasets"),
        ({"stage": "rm", "packing": True}, "packing", "not 'rm'"),
        ({"tool_format": "qwen2"}, "tool_format", "known: "),
        ({"eval_dataset": "loom_demo_sft", "val_size": 0.1}, "val_size", "use one of them"),
        ({"eval_on_each_dataset": True}, "eval_on_each_dataset", "needs eval_dataset"),
        ({"overwrite_cache": True}, "overwrite_cache", "needs tokenized_path"),
        ({"resources_per_worker": "{not json"}, "resources_per_worker", "given"),
        ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker", ">= 0"),
        ({"model_name_or_path": "./no/such/model"}, "model_name_or_path", "does not exist"),
        ({"dataset": None}, "dataset", "required"),
        ({"report_to": "tensorboard,wandbb"}, "report_to", "did you mean 'wandb'"),
        ({"flash_attn": "fa2"}, "flash_attn", "GPU"),
        (
            {"gradient_checkpointing_kwargs": {"use_reentrnt": False}},
            "gradient_checkpointing_kwargs",
            "did you mean 'use_reentrant'",
        ),
        ({"gradient_checkpointing_kwargs": {"debug": "yes"}}, "gradient_checkpointing_kwargs", "a bool is expected"),
        ({"compute_accuracy": True}, "compute_accuracy", "nothing is evaluated"),
        (
            {"gradient_checkpointing": True, "disable_gradient_checkpointing": True},
            "gradient_checkpointing",
            "true too",
        ),
        ({"compute_dtype": "bfloat16"}, "compute_dtype", "refused"),
        ({"dataloader_num_workers": 4}, "dataloader_num_workers", "refused"),
        ({"ray_storage_path": "s3://bucket/runs"}, "output_dir", "required when ray_storage_path is a URI"),
        ({"output_dir": "s3://bucket/model"}, "output_dir", "local or shared path"),
    ],
)
def test_contradictions_and_unsupported_values(model_dir, extra, key, phrase):
    found = problems(base(model_dir, **extra))
    assert key in found, found
    assert phrase in found[key]


def test_json_string_resources_and_gpu_detection(model_dir):
    cfg = validate_config(base(model_dir, resources_per_worker='{"CPU": 2, "GPU": 1}'))
    assert cfg.worker_resources() == {"CPU": 2.0, "GPU": 1.0}
    assert cfg.gpus_per_worker() == 1.0


def test_overrides_are_typed_yaml_scalars():
    values, errors = parse_overrides(["lora_rank=16", "bf16=true", "learning_rate=1e-4", "template=default", "oops"])
    assert values == {"lora_rank": 16, "bf16": True, "learning_rate": 1e-4, "template": "default"}
    assert [p.key for p in errors] == ["oops"]


def test_load_yaml_file_with_overrides(tmp_path, model_dir):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base(model_dir, lora_rank=4)))
    cfg = load_config(str(path), ["lora_rank=32", "seed=7"])
    assert (cfg.lora_rank, cfg.seed) == (32, 7)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_config_is_frozen_and_round_trips(model_dir):
    cfg = validate_config(base(model_dir))
    again = LoomConfig.model_validate(cfg.model_dump())
    assert again == cfg
    with pytest.raises(ValidationError):
        cfg.lora_rank = 3


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith(("sweep_", "pipeline_"))),
    ids=lambda p: p.name,
)  # sweep_*.yaml (`loom tune`) and pipeline_*.yaml (`loom pipeline`) are loaded by their own tests
def test_every_shipped_config_loads(path, model_dir, monkeypatch):
    """Each example config validates (model path swapped for a stand-in; relative paths from the repo root)."""
    monkeypatch.chdir(REPO)
    overrides = [f"model_name_or_path={model_dir}"]
    if "reward_model: " in path.read_text():  # a ppo config names the output of an rm run: a stand-in for it
        reward = os.path.join(model_dir, "reward")
        os.makedirs(reward)
        for name in ("adapter_config.json", "value_head.safetensors"):
            open(os.path.join(reward, name), "w").close()
        overrides.append(f"reward_model={reward}")
    cfg = load_config(str(path), overrides)
    assert cfg.dataset_names(), path


def test_every_registered_stage_trains_and_data_preparation_needs_no_reward(model_dir):
    from orchestrator.stages import BUILT, STAGES

    assert BUILT == tuple(STAGES) == ("pt", "sft", "rm", "dpo", "kto", "ppo")
    raw = base(model_dir, stage="ppo")
    with pytest.raises(ConfigError, match="ppo needs a reward model"):
        validate_config(raw)
    assert validate_config(raw, purpose="data").stage == "ppo"  # `loom data` prepares the prompts without one


def test_an_empty_config_file_is_named_as_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert [p.key for p in caught.value.problems] == ["config"]
    assert "is empty" in caught.value.problems[0].message


@pytest.mark.parametrize("name", ["../../somewhere", "a/b", ".hidden", "..", "run name"])
def test_a_run_name_is_one_safe_folder_name(model_dir, name):
    """A run name that climbs out of ray_storage_path (seen: <storage>/../../evil/checkpoint-000002) is refused."""
    found = problems(base(model_dir, ray_run_name=name, run_name=name))
    assert "one folder name under ray_storage_path" in found["ray_run_name"]
    assert "one folder name" in found["run_name"]
    assert validate_config(base(model_dir, ray_run_name="dpo-v2.1_run")).ray_run_name == "dpo-v2.1_run"


def test_a_training_set_emptied_by_preprocessing_names_its_datasets_and_reasons():
    from orchestrator.launch import too_few_examples

    summary = {"train_examples": 0, "datasets": {
        "chats": {"rows": 30, "dropped": {"prompt turns must be odd (user, assistant, ..., user)": 28,
                                          "needs exactly one response": 2}, "truncated": 0},
        "extra": {"rows": 4, "dropped": {}, "truncated": 0}}}  # fmt: skip
    message = too_few_examples(summary, 2)
    assert message.splitlines() == [
        "the training set has 0 examples after preprocessing, fewer than 2 workers (each needs at least one):",
        "  - dataset 'chats': 30 rows read, 30 dropped (28 prompt turns must be odd (user, assistant, ..., user); "
        "2 needs exactly one response)",
        "  - dataset 'extra': 4 rows read, 0 dropped",
    ]


def test_a_secret_is_never_quoted_and_never_names_a_run(model_dir):
    from orchestrator.config.schema import without_secrets
    from orchestrator.plan import derive_run_name

    secret = "hf_PLANTED_secret_0123456789"
    assert LoomConfig.secret_keys() >= {"hf_hub_token", "ms_hub_token", "om_hub_token", "swanlab_api_key"}
    found = problems(base(model_dir, hf_hub_token=[secret], ms_hub_token=secret, swanlab_api_key=secret,
                          hf_hub_tokn=secret, stage="pt"))  # fmt: skip
    assert set(found) == {"hf_hub_token", "ms_hub_token", "swanlab_api_key", "hf_hub_tokn"}
    assert all(secret not in message and "not shown" in message for message in found.values()), found
    assert "did you mean 'hf_hub_token'" in found["hf_hub_tokn"]
    # a rotated token resumes the same run (the derived name hashes everything else)
    names = {derive_run_name(validate_config(base(model_dir, hf_hub_token=t))) for t in (None, secret, "hf_other")}
    assert len(names) == 1
    assert without_secrets({"hf_hub_token": secret, "lora_rank": 4}) == {"lora_rank": 4}
