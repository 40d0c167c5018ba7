"""Quantized loading (QLoRA): the base model held in k bits, a LoRA adapter trained on top in full precision.

Keys (LLaMA-Factory's names): `quantization_method` (bitsandbytes | hqq | eetq), `quantization_bit`,
`quantization_type` (nf4 | fp4, bitsandbytes 4-bit), `double_quantization` (bitsandbytes 4-bit),
`quantization_device_map` (inference only), and `ref_model_quantization_bit` / `reward_model_quantization_bit` for
the frozen reference (dpo, kto, ppo) and reward (ppo) models when they are loaded as models of their own.

How each method loads with the pinned stack (transformers 5.24, measured on CPU):
- bitsandbytes: a `BitsAndBytesConfig` passed to `from_pretrained`; 4-bit (Linear4bit, packed uint8) and 8-bit
  (Linear8bitLt, int8) load, train LoRA and run inference on CPU as well as CUDA.
- hqq: transformers 5.24 declares HqqConfig but its loader does not quantize with it ("QuantizationMethod.HQQ is not
  available yet"), so Loom loads the weights unquantized and swaps each linear layer for hqq's HQQLinear itself
  (`quantize_after_load`). Runs on CPU (hqq's PyTorch backend); PEFT wraps HQQLinear with its own LoRA layer.
- eetq: an `EetqConfig`; transformers 5 runs it through the `kernels` package, which fetches
  kernels-community/quantization-eetq from the Hugging Face Hub at load time, and refuses to load without CUDA.

The pure parts (`METHODS`, `frozen_bits`, the driver's `quantization_problems`) are orchestrator/quantization.py.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from orchestrator.quantization import METHODS, uses_device_map_auto

# ---------------------------------------------------------------- configs and loading


def compute_dtype_of(cfg: Any) -> Any:
    """The dtype a k-bit layer computes in: the run's half type when it has one (bf16, pure_bf16, fp16), else fp32."""
    import torch

    if cfg.bf16 or cfg.pure_bf16:
        return torch.bfloat16
    return torch.float16 if cfg.fp16 else torch.float32


def quantization_config(
    method: str, bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: Any = None
) -> Any:
    """The object to pass as `quantization_config=` to `from_pretrained` (compute_dtype None: float32).

    hqq has none that works with transformers 5.24 (its loader raises NotImplementedError for HqqConfig): load the
    model unquantized and call `quantize_after_load`."""
    import torch

    compute_dtype = compute_dtype or torch.float32
    if bits not in METHODS[method].bits:
        raise ValueError(f"{method} takes {', '.join(map(str, METHODS[method].bits))} bits, not {bits}")
    if method == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        # quant_storage stays uint8 (the default), unlike LLaMA-Factory's "storage = compute dtype" for FSDP1: Loom
        # runs FSDP2, which shards uint8 storage fine and never casts it; a float32 storage is cast to bf16 by a
        # bf16 MixedPrecisionPolicy and the packed weights are destroyed (measured: "shape [64, 32] is invalid").
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if method == "eetq":
        from transformers import EetqConfig

        return EetqConfig()
    raise ValueError("hqq is not loaded through from_pretrained with transformers 5.24; use quantize_after_load")


def from_pretrained_kwargs(cfg: Any, bits: int | None, device: Any = None) -> dict[str, Any]:
    """Extra `from_pretrained` keyword arguments for a model held in `bits` (None: not quantized, {}).

    `device`: where the weights go. A CUDA device: a bitsandbytes/eetq model is quantized straight onto it
    (device_map {"": device}). Pass None under ZeRO-3 and FSDP, which place the weights themselves (as
    LLaMA-Factory does), and on CPU, where bitsandbytes quantizes without a device map. hqq returns {} (it is
    quantized after loading)."""
    if bits is None or cfg.quantization_method == "hqq":
        return {}
    kwargs: dict[str, Any] = {
        "quantization_config": quantization_config(
            cfg.quantization_method, bits, cfg.quantization_type, cfg.double_quantization, compute_dtype_of(cfg)
        )
    }
    if uses_device_map_auto(cfg):  # inference only (the checks refuse it for training)
        kwargs["device_map"] = "auto"
    elif device is not None and str(device).startswith("cuda"):
        kwargs["device_map"] = {"": device}
    return kwargs


def quantize_after_load(model: Any, cfg: Any, bits: int | None, device: Any = "cpu") -> Any:
    """Finish a quantized load; call it right after `from_pretrained(..., **from_pretrained_kwargs(...))` for the
    policy and for frozen models alike. `device`: the worker's device (ctx.device), also under ZeRO-3 and FSDP.
    Returns the model (changed in place).

    - hqq: replace every linear layer but the output head with hqq's HQQLinear (`bits`, group size 64, axis 0 as
      LLaMA-Factory configures it), quantized onto `device` (HQQLinear keeps its scales in a dict that a later
      `nn.Module.to` does not move, so it is built where it will run).
    - bitsandbytes 4-bit: turn off bitsandbytes' CPU weight repacking (see `disable_cpu_repacking`).
    """
    if bits is None:
        return model
    if cfg.quantization_method == "hqq":
        _quantize_hqq(model, bits, compute_dtype_of(cfg), device or "cpu")
    disable_cpu_repacking(model)
    return model


def _quantize_hqq(model: Any, bits: int, compute_dtype: Any, device: Any) -> None:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    head = model.get_output_embeddings()
    config = BaseQuantizeConfig(nbits=bits, group_size=64, axis=0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                quantized = HQQLinear(child, config, compute_dtype=compute_dtype, device=str(device), del_orig=True)
                setattr(parent, name, quantized)


def disable_cpu_repacking(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers in their canonical layout on the CPU. Returns how many 4-bit layers it set.

    Why: bitsandbytes 0.50.2's Linear4bit, on a CPU with AVX512-BF16, rewrites its weight in place into a CPU GEMM
    layout on the first forward pass that runs in eval mode without grad (evaluation, generation, a frozen model).
    From then on every forward, also in training, goes through `gemv_4bit`, which has no autograd formula: measured
    here, after one evaluation pass every LoRA gradient is None and training silently stops learning. The repacking
    also asserts out_features % 32 == 0 (the tiny test model's 176-wide MLP fails it), computes in bf16 whatever the
    run's dtype, and would be undone by FSDP or ZeRO-3, which re-gather the original layout while the quantization
    state says "repacked". On CUDA the flag is never read."""
    return _set_cpu_repacking(model, lambda module: False)[0]


def _set_cpu_repacking(model: Any, allowed: Any) -> tuple[int, int]:
    """(4-bit layers seen, layers left with repacking on)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0, 0
    seen = on = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = bool(allowed(module))
            seen, on = seen + 1, on + module.support_avx512bf16_for_cpu
    return seen, on


def linear_types() -> tuple[type, ...]:
    """The module types LoRA can target as linear layers: torch's Linear (which bitsandbytes' Linear4bit and
    Linear8bitLt subclass) and hqq's HQQLinear (which does not). `lora_target: all` must count both."""
    import torch

    types: tuple[type, ...] = (torch.nn.Linear,)
    if importlib.util.find_spec("hqq") is not None:
        from hqq.core.quantize import HQQLinear

        types += (HQQLinear,)
    return types
