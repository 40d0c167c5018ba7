"""LLaMA-Factory's environment variables that Loom reads on the driver: refused with their Ray meaning, switches
that change what happens (ALLOW_EXTRA_ARGS, OPTIM_TORCH, ENABLE_SHORT_CONSOLE), and the start-up version check."""

from __future__ import annotations

import subprocess

import pytest

from orchestrator.cli import main
from orchestrator.config import validate_config
from orchestrator.environment import environment_problems, installed_version_problems, version_problems
from orchestrator.errors import ConfigError
from orchestrator.launch import forwarded_env
from tests.conftest import VENV_BIN
from tests.helpers import DEMO_DATA


def messages(env: dict[str, str]) -> dict[str, str]:
    return {p.key: p.message for p in environment_problems(env)}


def test_torchrun_variables_are_refused_with_what_they_mean_on_ray():
    found = messages({"NNODES": "2", "NPROC_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1", "FORCE_TORCHRUN": "1"})
    assert set(found) == {"NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "FORCE_TORCHRUN", "ray_num_workers"}
    assert "ray_num_workers: 8 with resources_per_worker: {GPU: 1}" in found["ray_num_workers"]
    assert "RAY_ADDRESS" in found["MASTER_ADDR"] and "given '10.0.0.1'" in found["MASTER_ADDR"]
    assert messages({"FORCE_TORCHRUN": "0", "NNODES": "", "USE_RAY": "1"}) == {}  # off, empty, or what Loom does
    assert "always runs on Ray" in messages({"USE_RAY": "0"})["USE_RAY"]
    assert set(messages({"ASCEND_RT_VISIBLE_DEVICES": "0,1", "NPU_JIT_COMPILE": "true"})) == {
        "ASCEND_RT_VISIBLE_DEVICES", "NPU_JIT_COMPILE"}  # fmt: skip


def test_the_command_line_stops_on_a_refused_variable_before_reading_the_config(monkeypatch, capsys):
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    assert main(["plan", "no-such-config.yaml"]) == 2
    err = capsys.readouterr().err
    assert "problems in the environment" in err and "NPROC_PER_NODE: given '8'" in err
    assert "Traceback" not in err and "no-such-config" not in err


def test_a_model_hub_id_is_refused_while_another_hub_is_on(monkeypatch):
    raw = {"model_name_or_path": "org/model", "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
           "resources_per_worker": {"CPU": 1}}  # fmt: skip
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert any("USE_MODELSCOPE_HUB is on" in p.message for p in caught.value.problems)


def test_the_version_check_names_the_package_and_can_be_skipped(monkeypatch):
    installed = {"torch": "2.13.0+cpu", "transformers": "4.57.1", "ray": "2.60.0"}.get
    found = version_problems(["torch>=2.6", "transformers<6,>=5.0", "peft>=0.21", 'pytest>=8; extra == "dev"'],
                             installed)  # fmt: skip
    assert [p.key for p in found] == ["transformers", "peft"]  # the dev extra's pytest is not asked for
    assert "4.57.1 is installed" in found[0].message and "not installed" in found[1].message
    assert installed_version_problems({}) == []  # this environment meets Loom's requirements
    monkeypatch.setattr("importlib.metadata.requires", lambda name: ["transformers>=99"])
    assert [p.key for p in installed_version_problems({})] == ["transformers"]
    assert installed_version_problems({"DISABLE_VERSION_CHECK": "1"}) == []


def test_allow_extra_args_drops_an_unknown_key_with_a_warning(monkeypatch, capsys, model_dir):
    raw = {"model_name_or_path": model_dir, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
           "resources_per_worker": {"CPU": 1}, "lora_rnak": 4}  # fmt: skip
    with pytest.raises(ConfigError, match="lora_rnak"):
        validate_config(raw)
    monkeypatch.setenv("ALLOW_EXTRA_ARGS", "1")
    cfg = validate_config(raw)
    assert cfg.lora_rank == 8  # dropped, not read as lora_rank
    err = capsys.readouterr().err
    assert "lora_rnak" in err and "did you mean 'lora_rank'" in err and "dropped (ALLOW_EXTRA_ARGS)" in err


def test_optim_torch_sets_the_allocator_and_nccl_settings_in_the_workers(monkeypatch):
    env = forwarded_env()
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert forwarded_env()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"  # the user's value wins
    monkeypatch.setenv("OPTIM_TORCH", "0")
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS" not in forwarded_env()


def test_lmf_is_loom_unless_enable_short_console_turns_it_off():
    loom = subprocess.run([str(VENV_BIN / "loom"), "features"], capture_output=True, text=True, timeout=120)
    lmf = subprocess.run([str(VENV_BIN / "lmf"), "features"], capture_output=True, text=True, timeout=120)
    assert lmf.returncode == 0 and lmf.stdout == loom.stdout and "| `report_to` |" in lmf.stdout
    off = subprocess.run([str(VENV_BIN / "lmf"), "features"], capture_output=True, text=True, timeout=120,
                         env={"ENABLE_SHORT_CONSOLE": "0", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert off.returncode == 2 and "the command is `loom`" in off.stderr and off.stdout == ""


REMOTE_CONFIG = """from transformers import LlamaConfig


class OddConfig(LlamaConfig):
    model_type = "odd_llama"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_odd import OddConfig


def _gpu_kernels():
    import flash_attn_not_installed_here  # a GPU-only path this test never takes

    return flash_attn_not_installed_here


class OddForCausalLM(LlamaForCausalLM):
    config_class = OddConfig
"""


def remote_code_model(tiny_model: str, folder) -> str:
    """The tiny model as a remote-code model whose modeling file imports a package that is not installed."""
    import json
    import shutil

    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="odd_llama", auto_map={"AutoConfig": "configuration_odd.OddConfig",
                                                    "AutoModelForCausalLM": "modeling_odd.OddForCausalLM"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_odd.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_odd.py").write_text(REMOTE_MODEL)
    return str(folder)


def test_force_check_imports_decides_whether_a_remote_code_models_imports_are_checked(tiny_model, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    from workers.model import load_base_model

    path = remote_code_model(tiny_model, tmp_path / "odd")
    cfg = validate_config({"model_name_or_path": path, "trust_remote_code": True, "template": "default"},
                          purpose="infer")  # fmt: skip
    monkeypatch.setenv("FORCE_CHECK_IMPORTS", "1")
    with pytest.raises(ImportError, match="flash_attn_not_installed_here"):
        load_base_model(cfg)
    monkeypatch.delenv("FORCE_CHECK_IMPORTS")
    # LLaMA-Factory's default: the check is skipped and the model loads (transformers then keeps its class, so the
    # order here is forced, then default).
    assert type(load_base_model(cfg)).__name__ == "OddForCausalLM"
