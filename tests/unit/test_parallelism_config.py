"""deepspeed / fsdp / fsdp_config checked at the driver, and DeepSpeed's "auto" values filled from the Loom config."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import validate_config
from orchestrator.errors import ConfigError
from orchestrator.parallelism import fsdp_settings, load_json_setting, resolve_deepspeed, strategy_name
from orchestrator.plan import with_absolute_paths
from tests.helpers import DEMO_DATA

LF_ZERO3 = {  # the shape of LLaMA-Factory's examples/deepspeed/ds_z3_config.json
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
}  # fmt: skip


def config(model_dir: str, **extra) -> dict:
    return {"model_name_or_path": model_dir, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
            "resources_per_worker": {"CPU": 1}, "ray_num_workers": 2, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 4, **extra}  # fmt: skip


def messages(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    return [str(p) for p in caught.value.problems]


def test_llamafactory_zero3_file_is_accepted_and_its_autos_filled(model_dir, tmp_path):
    path = tmp_path / "ds_z3.json"
    path.write_text(json.dumps(LF_ZERO3))
    cfg = with_absolute_paths(validate_config(config(model_dir, deepspeed=str(path), bf16=True)), str(tmp_path))
    assert cfg.deepspeed == LF_ZERO3 and strategy_name(cfg) == "deepspeed"  # the file travels as its content
    ds = resolve_deepspeed(load_json_setting(cfg.deepspeed), cfg, world_size=2, hidden_size=64)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2, 4, 16)  # fmt: skip
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (4096, 3686)
    assert zero["stage3_param_persistence_threshold"] == 640 and "zero_force_ds_cpu_optimizer" not in ds


def test_offload_without_an_optimizer_block_lets_loom_build_the_optimizer(model_dir):
    raw = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    cfg = validate_config(config(model_dir, deepspeed=raw))
    assert resolve_deepspeed(raw, cfg, 2, 64)["zero_force_ds_cpu_optimizer"] is False
    with_block = {**raw, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    ds = resolve_deepspeed(with_block, validate_config(config(model_dir, deepspeed=with_block)), 2, 64)
    params = {"lr": 5e-5, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}  # absent keys follow Loom too
    assert ds["optimizer"]["params"] == params and "zero_force_ds_cpu_optimizer" not in ds


def test_deepspeed_mistakes_are_reported_together(model_dir):
    raw = {
        "train_micro_batch_size_per_gpu": 8,  # the Loom config says 2
        "bf16": {"enabled": True},  # bf16 is off
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "overlap_comms": True},
    }
    found = "\n".join(messages(config(model_dir, deepspeed=raw)))
    assert "deepspeed.train_micro_batch_size_per_gpu: is 8 but the Loom config gives 2" in found
    assert "deepspeed.bf16.enabled: is True but bf16 is False" in found
    assert "deepspeed.scheduler: Loom schedules" in found and "offload_param.device: is 'nvme'; only cpu" in found
    assert (
        "deepspeed.zero_optimization.overlap_comms: Extra inputs" in found
    )  # DeepSpeed's own schema names the unknown key


def test_deepspeed_files_and_strings_that_are_not_configs(model_dir, tmp_path):
    assert "does not exist" in messages(config(model_dir, deepspeed="missing.json"))[0]
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in messages(config(model_dir, deepspeed=str(tmp_path / "bad.json")))[0]
    assert "stage: is 5" in messages(config(model_dir, deepspeed='{"zero_optimization": {"stage": 5}}'))[0]
    unknown_auto = {"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}
    assert any('allgather_bucket_size: is "auto"' in m for m in messages(config(model_dir, deepspeed=unknown_auto)))


def test_fsdp_options_and_config(model_dir):
    cfg = validate_config(config(model_dir, fsdp="shard_grad_op auto_wrap",
                                 fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))  # fmt: skip
    settings = fsdp_settings(cfg)
    assert strategy_name(cfg) == "fsdp" and not settings.reshard_after_forward and settings.wrap_layers
    assert settings.layer_classes == ("LlamaDecoderLayer",) and not settings.offload
    assert fsdp_settings(validate_config(config(model_dir, fsdp=["full_shard", "offload"]))).offload
    found = "\n".join(messages(config(model_dir, fsdp="full_shard auto_wrp hybrid_shard", deepspeed={},
                                      fsdp_config={"min_num_params": 100, "versoin": 2})))  # fmt: skip
    assert "did you mean 'auto_wrap'" in found and "hybrid sharding" in found
    assert "choose DeepSpeed or FSDP" in found and "use transformer_layer_cls_to_wrap" in found
    assert "did you mean 'version'" in found
    assert "fsdp_config: is set but fsdp is not" in messages(config(model_dir, fsdp_config={"version": 2}))[0]


@pytest.mark.parametrize("name", ["ds_z3.json", "ds_z2_offload.json"])
def test_shipped_deepspeed_configs_validate_and_resolve(model_dir, name, monkeypatch):
    from orchestrator.parallelism import leftover_auto
    from tests.helpers import REPO

    monkeypatch.chdir(REPO)  # configs name them relative to the working dir, as ray job submit runs them
    cfg = with_absolute_paths(validate_config(config(model_dir, deepspeed=f"configs/deepspeed/{name}", bf16=True)))
    ds = resolve_deepspeed(cfg.deepspeed, cfg, world_size=2, hidden_size=64)
    assert not leftover_auto(ds) and ds["bf16"]["enabled"] is True and ds["train_batch_size"] == 16
