"""Tier 3: the inference paths that need CUDA — the vllm backend and GPTQ export — on a model built offline.
Skipped without a GPU (`pytest tests/gpu` on a CUDA machine runs them; bench/gpu.sh runs them too)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from inference.commands import export, open_engine
from inference.engine import Conversation, Sampling
from orchestrator.config import validate_config
from orchestrator.tiny import TinySpec, build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEMO_TEXTS = os.path.join(os.path.dirname(__file__), "..", "..", "orchestrator", "demo", "data", "loom_demo_pt.jsonl")
PROMPT = [{"role": "user", "content": "Convert 3 hours to minutes."}]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory) -> str:
    """A model GPTQ can group (hidden 256: whole groups of 128) and vLLM can page, built offline."""
    spec = TinySpec(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                    warmup_steps=0)  # fmt: skip
    return build_tiny_model(str(tmp_path_factory.mktemp("gpu") / "model"), spec)


@pytest.fixture(scope="module")
def adapter(gpu_model, tmp_path_factory) -> str:
    """A LoRA adapter with random (non-zero) B matrices, so that it visibly changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpu_model),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    folder = str(tmp_path_factory.mktemp("gpu") / "adapter")
    model.save_pretrained(folder)
    return folder


def config(model: str, **extra):
    return validate_config({"model_name_or_path": model, "template": "default", "infer_dtype": "float32",
                            "max_new_tokens": 12, "do_sample": False, **extra}, purpose="infer")  # fmt: skip


def test_vllm_answers_as_transformers_does_greedily_with_and_without_an_adapter(gpu_model, adapter):
    pytest.importorskip("vllm")
    talk, greedy = Conversation(PROMPT), Sampling(do_sample=False, max_new_tokens=12)
    vllm_args = {"infer_backend": "vllm", "vllm_gpu_util": 0.3, "vllm_enforce_eager": True, "vllm_maxlen": 512}
    tuned = config(gpu_model, adapter_name_or_path=adapter, **vllm_args)
    hf = open_engine(config(gpu_model, adapter_name_or_path=adapter))
    vllm = open_engine(tuned)
    expected = hf.chat(talk, greedy)[0].text
    got = vllm.chat(talk, greedy)[0]
    assert got.text == expected and got.completion_tokens > 0
    assert "".join(vllm.stream(talk, greedy)) == got.text
    sampled = vllm.chat(talk, Sampling(do_sample=True, temperature=1.0, n=3, max_new_tokens=8))
    assert len(sampled) == 3 and all(r.completion_tokens <= 8 for r in sampled)
    base = open_engine(config(gpu_model, **vllm_args)).chat(talk, greedy)[0].text
    assert base != got.text  # the adapter was applied by vLLM


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel (pip install gptqmodel)")
def test_gptq_export_writes_a_4_bit_model_that_loads_and_answers(gpu_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = config(gpu_model, export_dir=str(tmp_path / "gptq"), export_quantization_bit=4,
                 export_quantization_dataset=DEMO_TEXTS, export_quantization_nsamples=8,
                 export_quantization_maxlen=64)  # fmt: skip
    _, folder = export(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    assert model.config.quantization_config["bits"] == 4
    answer = open_engine(config(folder)).chat(Conversation(PROMPT), Sampling(max_new_tokens=8))[0]
    assert answer.completion_tokens > 0
