"""Quantized loading and QLoRA on the real tiny model, on CPU (torch, no Ray), and the driver's refusals.

The configs are built with `LoomConfig.model_validate`, which skips the "not supported yet" check that
`validate_config` still applies to the quantization keys.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import LoomConfig
from orchestrator.quantization import frozen_bits, quantization_problems
from tests.helpers import DEMO_DATA
from workers.model import load_base_model, load_frozen_model
from workers.quantization import disable_cpu_repacking, from_pretrained_kwargs, linear_types, quantization_config

bnb = pytest.importorskip("bitsandbytes")

HIDDEN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Measured on the tiny model (build_tiny_model, hidden 64) with the adapter trained below, 2026-12-07: mean |logit
# difference| between the QLoRA model and its adapter loaded onto the unquantized base was 0.35 at 4-bit nf4 (max
# 2.7) and 0.027 at 8-bit (max 0.24): the size of the quantized base's own error (0.22 and 0.019 mean), while the
# adapter itself moves the logits by 3.6 on average (logit std 1.4). Tolerances: about 1.5x the measured means.
ROUND_TRIP = {4: 0.5, 8: 0.04}


def qcfg(tiny_model: str, **extra) -> LoomConfig:
    raw = {"model_name_or_path": tiny_model, "dataset": "loom_demo_sft", "dataset_dir": str(DEMO_DATA),
           "template": "default", "resources_per_worker": {"CPU": 1}, "lora_rank": 8}  # fmt: skip
    return LoomConfig.model_validate({**raw, **extra})


def load(cfg: LoomConfig, bits: int | None, path: str | None = None):
    return load_base_model(cfg, path, bits=bits)  # the workers' loader: from_pretrained, then quantize_after_load


def hidden_linears(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if name.endswith(HIDDEN_LINEARS)}


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 500, (4, 24), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- what is in memory


def test_4bit_nf4_holds_linear_weights_packed_in_uint8(tiny_model):
    cfg = qcfg(tiny_model, quantization_bit=4)
    model = load(cfg, 4)
    linears = hidden_linears(model)
    assert linears and all(type(m) is bnb.nn.Linear4bit for m in linears.values())
    for module in linears.values():
        weight, state = module.weight, module.weight.quant_state
        assert weight.dtype == torch.uint8 and not weight.requires_grad
        # two 4-bit codes per byte: 1/8 of the fp32 bytes
        assert weight.numel() * weight.element_size() * 8 == module.in_features * module.out_features * 4
        assert state.quant_type == "nf4" and state.nested  # double quantization: the block scales are 8-bit too
        assert state.dtype == torch.float32  # the compute dtype of an fp32 run
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # the head stays full precision
    full = sum(m.in_features * m.out_features * 4 for m in linears.values())
    held = sum(m.weight.numel() for m in linears.values())
    assert held * 8 == full


def test_8bit_holds_int8_weights_and_fp4_without_double_quant(tiny_model):
    model = load(qcfg(tiny_model, quantization_bit=8), 8)
    linears = hidden_linears(model)
    assert all(type(m) is bnb.nn.Linear8bitLt and m.weight.dtype == torch.int8 for m in linears.values())
    assert all(m.weight.numel() == m.in_features * m.out_features for m in linears.values())  # 1 byte each: 1/4
    config = quantization_config("bitsandbytes", 4, quant_type="fp4", double_quant=False)
    assert config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
    fp4 = load(qcfg(tiny_model, quantization_bit=4, quantization_type="fp4", double_quantization=False), 4)
    state = next(iter(hidden_linears(fp4).values())).weight.quant_state
    assert state.quant_type == "fp4" and not state.nested


# ---------------------------------------------------------------- QLoRA trains on CPU


def train_qlora(cfg: LoomConfig, bits: int, steps: int = 6):
    """LoRA on the k-bit base through Loom's own apply_lora and gradient checkpointing (reentrant), with an
    evaluation pass after every step: the loss on the repeated batch, and the weights before and after."""
    from workers.model import apply_lora, enable_gradient_checkpointing

    torch.manual_seed(0)
    model = apply_lora(cfg, load(cfg, bits), None)
    enable_gradient_checkpointing(cfg, model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, losses = batch(), []
    for _ in range(steps):
        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        model.eval()
        with torch.no_grad():  # evaluation between steps: must not cut the gradients of the next step
            model(input_ids=x)
    return model, before, losses


@pytest.fixture(scope="module")
def qlora(tiny_model, tmp_path_factory):
    """{bits: (model, weights before, losses, adapter folder)} for a 4-bit and an 8-bit QLoRA run."""
    runs = {}
    for bits in (4, 8):
        model, before, losses = train_qlora(qcfg(tiny_model, quantization_bit=bits, lora_target="all"), bits)
        folder = str(tmp_path_factory.mktemp(f"qlora{bits}"))
        model.save_pretrained(folder)
        runs[bits] = (model, before, losses, folder)
    return runs


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_step_changes_only_lora_weights_and_lowers_the_loss(qlora, bits):
    model, before, losses, _ = qlora[bits]
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed and all(".lora_A." in name or ".lora_B." in name for name in changed)
    targeted = {name.split(".lora_")[0].split(".")[-1] for name in changed}
    assert targeted == set(HIDDEN_LINEARS)  # lora_target all found every k-bit linear layer
    assert losses[-1] < losses[0] - 1.0, losses  # every step learned, also after the evaluation passes


def test_saved_qlora_adapter_loads_onto_the_unquantized_base(qlora, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = batch(1)
    for bits in (4, 8):
        quantized, _, _, folder = qlora[bits]
        quantized.eval()
        fp_base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        with torch.no_grad():
            plain = fp_base(input_ids=x).logits
            ours = quantized(input_ids=x).logits
            with quantized.disable_adapter():
                ours_base = quantized(input_ids=x).logits
            fp = PeftModel.from_pretrained(fp_base, folder).eval()
            theirs = fp(input_ids=x).logits
        gap, base_gap = (ours - theirs).abs().mean().item(), (ours_base - plain).abs().mean().item()
        assert (theirs - plain).abs().mean().item() > 5 * ROUND_TRIP[bits]  # the adapter does change the model
        assert gap < ROUND_TRIP[bits] and gap < 2 * base_gap, (bits, gap, base_gap)  # only the base's k-bit error


def test_an_eval_pass_keeps_lora_gradients_flowing(tiny_model):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first no-grad eval forward (on CPUs with
    AVX512-BF16); quantize_after_load turns that off. Without it the tiny model's 176-wide MLP fails the repacking
    outright, and a model whose widths allow it trains on with every LoRA gradient None (measured)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = qcfg(tiny_model, quantization_bit=4)
    model = get_peft_model(load(cfg, 4), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch())
    model.train()
    model(input_ids=batch(), labels=batch()).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if bnb.functional.has_avx512bf16():  # the failure the switch prevents, on this CPU
        bare = AutoModelForCausalLM.from_pretrained(tiny_model, **from_pretrained_kwargs(cfg, 4)).eval()
        with pytest.raises(AssertionError, match="divisible by block_n"), torch.no_grad():
            bare(input_ids=batch())
    assert disable_cpu_repacking(model) == 2 * len(HIDDEN_LINEARS)


# ---------------------------------------------------------------- hqq (CPU, its own HQQLinear)


def test_hqq_4bit_quantizes_after_loading_and_trains_lora(tiny_model):
    pytest.importorskip("hqq")
    from hqq.core.quantize import HQQLinear
    from peft import LoraConfig, get_peft_model

    cfg = qcfg(tiny_model, quantization_bit=4, quantization_method="hqq")
    assert from_pretrained_kwargs(cfg, 4) == {}
    model = load(cfg, 4)
    linears = hidden_linears(model)
    assert all(type(m) is HQQLinear for m in linears.values())
    assert all(m.W_q.dtype == torch.uint8 and m.W_q.numel() * 2 == m.in_features * m.out_features
               for m in linears.values())  # fmt: skip
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    found = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, linear_types())}
    assert found == set(HIDDEN_LINEARS) | {"lm_head"}  # what `lora_target: all` must count (HQQLinear is no Linear)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(HIDDEN_LINEARS)))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x, losses = batch(), []
    for _ in range(4):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    with pytest.raises(ValueError, match="quantize_after_load"):
        quantization_config("hqq", 4)


# ---------------------------------------------------------------- frozen reference / reward models


def test_frozen_model_loads_quantized_with_its_adapter(qlora, tiny_model):
    quantized, _, _, folder = qlora[4]
    cfg = qcfg(tiny_model, stage="dpo", finetuning_type="full", ref_model=tiny_model, ref_model_quantization_bit=4)
    assert frozen_bits(cfg, "reference") == 4
    frozen = load_frozen_model(cfg, tiny_model, folder, frozen_bits(cfg, "reference"))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert any(type(m) is bnb.nn.Linear4bit for m in frozen.modules())
    x = batch(2)
    quantized.eval()
    with torch.no_grad():
        assert torch.allclose(frozen(input_ids=x).logits, quantized(input_ids=x).logits, atol=1e-4)
    lora = qcfg(tiny_model, stage="dpo", quantization_bit=4)  # the LoRA policy's own base is its reference
    assert frozen_bits(lora, "reference") == 4 and frozen_bits(lora, "reward") is None


def test_device_map_follows_the_device(tiny_model):
    cfg = qcfg(tiny_model, quantization_bit=4)
    assert "device_map" not in from_pretrained_kwargs(cfg, 4)  # CPU: bitsandbytes quantizes without a map
    assert from_pretrained_kwargs(cfg, 4, "cuda:1")["device_map"] == {"": "cuda:1"}
    assert from_pretrained_kwargs(cfg, None, "cuda:1") == {}
    bf16 = from_pretrained_kwargs(qcfg(tiny_model, quantization_bit=4, bf16=True), 4)["quantization_config"]
    assert bf16.bnb_4bit_compute_dtype == torch.bfloat16
    infer = qcfg(tiny_model, quantization_bit=4, quantization_device_map="auto")
    assert from_pretrained_kwargs(infer, 4, "cuda:0")["device_map"] == "auto"


# ---------------------------------------------------------------- the driver's refusals


def problems(cfg: LoomConfig, purpose: str = "train") -> dict[str, str]:
    return dict(quantization_problems(cfg, purpose))


def test_a_plain_qlora_config_has_no_problems(tiny_model):
    assert problems(qcfg(tiny_model, quantization_bit=4)) == {}
    assert problems(qcfg(tiny_model, quantization_bit=8, deepspeed={"zero_optimization": {"stage": 3}})) == {}
    assert problems(qcfg(tiny_model, quantization_bit=4, fsdp="full_shard auto_wrap")) == {}
    assert problems(qcfg(tiny_model)) == {}
    assert problems(qcfg(tiny_model, quantization_bit=4, quantization_device_map="auto"), "infer") == {}


GPU = {"resources_per_worker": {"GPU": 1}}


@pytest.mark.parametrize(
    ("extra", "key", "phrases"),
    [
        ({"quantization_bit": 3}, "quantization_bit", ["given 3", "bitsandbytes takes 4 or 8 bits"]),
        ({"quantization_bit": 4, "quantization_method": "eetq", **GPU}, "quantization_bit", ["eetq takes 8 bits"]),
        ({"quantization_bit": 8, "quantization_method": "eetq"}, "quantization_method",
         ["given 'eetq'", "CUDA only", "no GPU", "bitsandbytes and hqq run on CPU"]),
        ({"quantization_bit": 4, "finetuning_type": "full"}, "quantization_bit", ["finetuning_type lora, not 'full'"]),
        ({"quantization_bit": 4, "finetuning_type": "freeze"}, "quantization_bit", ["LoRA adapters only"]),
        ({"quantization_bit": 8, "quantization_type": "fp4"}, "quantization_type",
         ["given 'fp4'", "bitsandbytes 4-bit only", "8-bit"]),
        ({"quantization_bit": 4, "quantization_method": "hqq", "double_quantization": True}, "double_quantization",
         ["given True", "bitsandbytes 4-bit only", "hqq"]),
        ({"quantization_type": "fp4"}, "quantization_type", ["no model is quantized", "set quantization_bit"]),
        ({"quantization_method": "hqq"}, "quantization_method", ["no model is quantized"]),
        ({"quantization_bit": 4, "quantization_device_map": "auto"}, "quantization_device_map",
         ["for inference", "its own device"]),
        ({"quantization_bit": 8, "fsdp": "full_shard auto_wrap"}, "quantization_bit",
         ["8-bit with FSDP", "no attribute 'CB'", "use 4 bits"]),
        ({"quantization_bit": 4, "quantization_method": "hqq", "deepspeed": {"zero_optimization": {"stage": 3}}},
         "quantization_bit", ["hqq 4-bit with DeepSpeed ZeRO-3", "after loading"]),
        ({"quantization_bit": 8, "quantization_method": "eetq", "fsdp": "full_shard", **GPU}, "quantization_bit",
         ["eetq 8-bit with FSDP"]),
        ({"quantization_bit": 4, "pissa_init": True}, "pissa_init", ["full-precision weights"]),
        ({"quantization_bit": 8, "use_dora": True}, "use_dora", ["second forward", "quantization_bit 4"]),
        ({"quantization_bit": 4, "train_from_scratch": True}, "quantization_bit", ["from_config"]),
        ({"quantization_bit": 4, "adapter_name_or_path": "a,b"}, "adapter_name_or_path",
         ["given 2 adapter(s): 1 would be merged", "re-quantizes"]),
        ({"quantization_bit": 4, "adapter_name_or_path": "a", "create_new_adapter": True}, "adapter_name_or_path",
         ["with create_new_adapter: 1 would be merged"]),
        ({"stage": "dpo", "ref_model_quantization_bit": 4}, "ref_model_quantization_bit",
         ["policy's own base", "set ref_model"]),
        ({"stage": "dpo", "pref_loss": "simpo", "finetuning_type": "full", "ref_model_quantization_bit": 4},
         "ref_model_quantization_bit", ["reference-free"]),
        ({"stage": "dpo", "ref_model": "x", "ref_model_adapters": "a,b", "ref_model_quantization_bit": 8},
         "ref_model_adapters", ["names 2 adapters", "takes one"]),
        ({"stage": "ppo", "reward_model": "r", "reward_model_quantization_bit": 4}, "reward_model_quantization_bit",
         ["reward_model_type lora", "policy's own base"]),
        ({"stage": "ppo", "reward_model": "http://x", "reward_model_type": "api", "reward_model_quantization_bit": 4},
         "reward_model_quantization_bit", ["over HTTP"]),
        ({"stage": "ppo", "reward_model": "r", "reward_model_type": "full", "reward_model_quantization_bit": 4,
          "fsdp": "full_shard"}, "reward_model_quantization_bit", []),  # 4-bit shards: no problem (checked below)
    ],
)  # fmt: skip
def test_refusals_name_the_key_what_was_given_and_what_is_allowed(tiny_model, extra, key, phrases):
    found = problems(qcfg(tiny_model, **extra))
    if not phrases:
        assert key not in found, found
        return
    assert key in found, found
    for phrase in phrases:
        assert phrase in found[key], found[key]


def test_a_missing_package_names_the_pip_line(tiny_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    found = problems(qcfg(tiny_model, quantization_bit=4, quantization_method="hqq"))
    assert "pip install 'hqq>=0.2.1'" in found["quantization_method"]
    eetq = problems(qcfg(tiny_model, quantization_bit=8, quantization_method="eetq", **GPU))
    if importlib.util.find_spec("kernels") is None:
        assert "pip install 'kernels>=0.18.2,<0.19'" in eetq["quantization_method"]
    else:
        assert "quantization_method" not in eetq or "kernels" in eetq["quantization_method"]


def test_inference_loads_the_base_4_bit_with_the_qlora_adapter_attached(qlora, tiny_model):
    """loom chat / api / predict with quantization_bit: the engine holds the base in 4 bits (bitsandbytes' layers)
    with the one adapter attached, not merged, and answers as the QLoRA model does."""
    from inference.backends import load_engine
    from inference.source import ModelSource
    from orchestrator.config import validate_config

    quantized, _, _, folder = qlora[4]
    cfg = validate_config({**qcfg(tiny_model).model_dump(exclude_defaults=True), "quantization_bit": 4,
                           "adapter_name_or_path": folder}, purpose="infer")  # fmt: skip
    engine = load_engine(cfg, ModelSource(tiny_model, (folder,), None, tiny_model))
    assert any(type(m) is bnb.nn.Linear4bit for m in engine.model.modules())
    assert hasattr(engine.model, "peft_config")  # attached: merging would re-quantize the base
    x = batch(3)
    quantized.eval()
    with torch.no_grad():
        assert torch.allclose(engine.model(input_ids=x).logits, quantized(input_ids=x).logits, atol=1e-4)
