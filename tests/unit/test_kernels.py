"""The kernel keys (enable_liger_kernel, use_unsloth, use_unsloth_gc, mixture_of_depths): the driver's refusals, and
what runs on CPU up to the GPU boundary. The GPU side is tests/gpu/test_kernels_gpu.py."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from orchestrator import kernels as kernel_checks
from orchestrator.config.schema import LoomConfig
from workers import kernels

GPU = {"GPU": 1}


def config(resources=None, **keys) -> LoomConfig:
    return LoomConfig.model_validate({"model_name_or_path": "org/some-model", "resources_per_worker": resources or GPU,
                                      **keys})  # fmt: skip


def found(cfg: LoomConfig, model_type: str | None = None) -> dict[str, str]:
    return dict(kernel_checks.kernel_problems(cfg, model_type))


@pytest.fixture
def packages(monkeypatch):
    """liger-kernel and unsloth installed (and unsloth happy with the installed versions), whatever this venv has."""
    monkeypatch.setattr(kernel_checks, "installed", lambda module: True)
    monkeypatch.setattr(kernel_checks, "liger_model_types", lambda: ["llama", "mistral", "qwen2"])
    monkeypatch.setattr(kernel_checks, "unsloth_version_problems", lambda: [])


# ---------------------------------------------------------------- the driver's refusals


def test_nothing_is_refused_when_no_kernel_key_is_set():
    assert kernel_checks.kernel_problems(config(resources={"CPU": 1})) == []


@pytest.mark.parametrize("key", ["enable_liger_kernel", "use_unsloth", "use_unsloth_gc"])
def test_each_gpu_key_is_refused_on_workers_without_a_gpu(key):
    problems = found(config(resources={"CPU": 1}, **{key: True}))
    assert list(problems) == [key]
    message = problems[key]
    assert "the workers have no GPU (resources_per_worker {'CPU': 1.0})" in message
    assert 'resources_per_worker {"GPU": 1}' in message and f"or leave {key} false" in message


def test_a_missing_kernel_package_is_refused_with_its_pip_line(monkeypatch):
    monkeypatch.setattr(kernel_checks, "installed", lambda module: False)
    problems = found(config(enable_liger_kernel=True))
    assert problems["enable_liger_kernel"].endswith("pip install -c constraints.txt liger-kernel")
    problems = found(config(use_unsloth=True))
    assert "needs the unsloth package on the workers: pip install unsloth" in problems["use_unsloth"]


def test_liger_refuses_a_model_type_it_has_no_kernels_for_and_names_the_supported_ones(packages, tmp_path):
    assert found(config(enable_liger_kernel=True), "llama") == {}
    message = found(config(enable_liger_kernel=True), "gpt2")["enable_liger_kernel"]
    assert "model type 'gpt2' has no Liger kernels" in message and message.endswith("supported: llama, mistral, qwen2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))  # read from a local model folder
    local = LoomConfig.model_validate({"model_name_or_path": str(tmp_path), "resources_per_worker": GPU,
                                       "enable_liger_kernel": True})  # fmt: skip
    assert "model type 'bloom'" in found(local)["enable_liger_kernel"]
    assert found(config(enable_liger_kernel=True)) == {}  # a Hub id: the worker checks it when it loads the model


def test_liger_supported_types_are_read_from_the_installed_package_without_importing_it():
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed here (pip install -c constraints.txt liger-kernel)")
    types = kernel_checks.liger_model_types()
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"} <= set(types)


@pytest.mark.parametrize(
    ("keys", "key", "phrase"),
    [
        (
            {"finetuning_type": "full"},
            "use_unsloth",
            "finetuning_type 'full'; Loom runs unsloth for LoRA training only",
        ),
        ({"finetuning_type": "freeze"}, "use_unsloth", "(allowed: lora)"),
        ({"enable_liger_kernel": True}, "use_unsloth", "together with enable_liger_kernel"),
        ({"ray_num_workers": 2}, "use_unsloth", "ray_num_workers 2; unsloth's open-source release trains on one GPU"),
        ({"resources_per_worker": {"GPU": 2}}, "use_unsloth", "2 GPUs per worker"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "use_unsloth", "with DeepSpeed ZeRO-3"),
        ({"fsdp": "full_shard"}, "use_unsloth", "with fsdp 'full_shard'"),
        ({"train_from_scratch": True}, "use_unsloth", "unsloth loads pretrained weights only"),
        ({"adapter_name_or_path": "a,b"}, "adapter_name_or_path", "2 adapters with use_unsloth"),
        ({"adapter_name_or_path": "a", "create_new_adapter": True}, "adapter_name_or_path", "create_new_adapter"),
        ({"additional_target": "lm_head,score"}, "additional_target", "given score; with use_unsloth only"),
        ({"stage": "ppo", "reward_model": "rm", "reward_model_type": "lora"}, "use_unsloth", "reward_model_type lora"),
        ({"flash_attn": "fa2"}, "flash_attn", "given 'fa2' with use_unsloth, whose loader brings its own attention"),
        ({"shift_attn": True}, "shift_attn", "given True with use_unsloth"),
    ],
)
def test_unsloth_refusals(packages, keys, key, phrase):
    problems = dict(kernel_checks.unsloth_problems(config(**{"use_unsloth": True, **keys})))
    assert phrase in problems.get(key, ""), problems


def test_unsloth_accepts_one_lora_worker_with_zero2_one_adapter_and_embedding_targets(packages):
    cfg = config(use_unsloth=True, use_unsloth_gc=True, deepspeed={"zero_optimization": {"stage": 2}},
                 adapter_name_or_path="adapter", additional_target="embed_tokens,lm_head,norm")  # fmt: skip
    assert kernel_checks.kernel_problems(cfg) == []


def test_an_installed_unsloth_is_held_to_the_versions_it_declares(monkeypatch):
    monkeypatch.setattr(kernel_checks, "installed", lambda module: True)
    declared = [
        "torch<2.15.0,>=2.4.0",
        "transformers<=5.17.0,>=4.52.4",
        "trl<=1.15.0",
        "numpy",
        "xformers; extra == 'x'",
    ]
    installed = {"unsloth": "2026.10.9", "torch": "2.13.0+cpu", "transformers": "5.24.0", "trl": "1.16.0"}
    monkeypatch.setattr("importlib.metadata.requires", lambda name: declared)
    monkeypatch.setattr(kernel_checks, "installed_version", installed.get)
    assert kernel_checks.unsloth_version_problems() == ["transformers<=5.17.0,>=4.52.4 (installed: 5.24.0)",
                                                  "trl<=1.15.0 (installed: 1.16.0)"]  # fmt: skip
    message = found(config(use_unsloth=True))["use_unsloth"]
    assert message.startswith("unsloth 2026.10.9 declares transformers<=5.17.0,>=4.52.4 (installed: 5.24.0); trl")
    assert "DISABLE_VERSION_CHECK=1 to run anyway" in message
    monkeypatch.setenv("DISABLE_VERSION_CHECK", "1")
    assert found(config(use_unsloth=True)) == {}


def test_unsloth_gc_is_a_way_of_checkpointing_and_follows_the_checkpointing_switch():
    off = found(config(use_unsloth_gc=True, disable_gradient_checkpointing=True))
    assert "gradient checkpointing is off" in off["use_unsloth_gc"]
    assert (
        "gradient checkpointing is off"
        in found(config(use_unsloth_gc=True, gradient_checkpointing=False))["use_unsloth_gc"]
    )
    assert found(config(use_unsloth_gc=True)) == {}  # no package needed
    assert kernels.unsloth_checkpointing(config(use_unsloth=True)) == "unsloth"
    assert kernels.unsloth_checkpointing(config(use_unsloth=True, disable_gradient_checkpointing=True)) is False


@pytest.mark.parametrize("mode", ["convert", "load"])
def test_mixture_of_depths_is_refused_with_the_measured_reason(mode, tiny_model):
    from orchestrator.errors import ConfigError
    from tests.helpers import tiny_config

    with pytest.raises(ConfigError) as error:
        tiny_config(tiny_model, mixture_of_depths=mode)
    assert "mixture_of_depths: refused: the mixture-of-depth package" in str(error.value)
    assert "`import MoD` fails on transformers 5" in str(error.value)


def test_the_mixture_of_depth_package_still_fails_to_import_on_this_transformers():
    """Where the package is installed, the refusal's first reason is checked for real: a release that imports on
    transformers 5 fails this test, and the refusal needs a new look."""
    if importlib.util.find_spec("MoD") is None:
        pytest.skip("mixture-of-depth is not installed (pip install mixture-of-depth==1.2.0 to check the refusal)")
    with pytest.raises(ImportError, match="TRANSFORMERS_CACHE"):
        import MoD  # noqa: F401


# ---------------------------------------------------------------- on CPU, up to the GPU boundary


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model)


def test_offloaded_checkpointing_wraps_every_decoder_layer_and_needs_an_accelerator_to_train(tiny):
    model = tiny()
    kernels.enable_offloaded_checkpointing(model, {"use_reentrant": False})
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, True]
    assert model.config.use_cache is False
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[:2] == (1, 4)  # not training: no checkpoint, nothing offloaded
    model.train()
    with pytest.raises(RuntimeError, match="pin_memory"):  # the boundary: pinned host memory needs a GPU
        model(input_ids=ids)


@pytest.fixture(scope="module")
def liger():
    return pytest.importorskip("liger_kernel.transformers", reason="liger-kernel (and triton) not installed here")


def test_liger_picks_the_llama_patch_with_its_loss_kernels_off(liger, tiny):
    apply, options = kernels.liger_patch(tiny())
    assert apply.__name__ == "apply_liger_kernel_to_llama"
    assert options == {"cross_entropy": False, "fused_linear_cross_entropy": False}
    assert kernels.liger_kernels_on(apply, options) == ["rope", "rms_norm", "swiglu"]
    with pytest.raises(ValueError, match="model type 'gpt2' has no Liger kernels .* supported: .*llama"):
        kernels.liger_patch(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


def test_liger_patches_the_instance_on_cpu_and_its_kernels_need_a_gpu(liger, tiny, monkeypatch):
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # liger rebinds these: put them back after
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    model = tiny()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            kernels.apply_liger_kernel(model)
    apply, options = kernels.liger_patch(model)
    apply(model=model, **options)  # what apply_liger_kernel does past its CUDA guard
    assert model.model.norm.forward.__func__.__qualname__ == "LigerRMSNorm.forward"
    assert {layer.mlp._get_name() for layer in model.model.layers} == {"LigerSwiGLUMLP"}
    assert {layer.input_layernorm.forward.__func__.__qualname__ for layer in model.model.layers} == {
        "LigerRMSNorm.forward"
    }
    assert model.forward.__func__ is modeling_llama.LlamaForCausalLM.forward  # loss kernels off: logits as before
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="active drivers"):  # the boundary: Triton finds no GPU
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
