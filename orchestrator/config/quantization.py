"""Quantized model loading (QLoRA and friends): orchestrator/quantization.py checks them, workers/quantization.py
loads them."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param


class QuantizationArgs(BaseModel):
    quantization_method: Literal["bitsandbytes", "hqq", "eetq"] = param(
        "bitsandbytes",
        "Quantization backend: bitsandbytes (4 or 8 bits; CPU or CUDA), hqq (1-8 bits, swapped in after loading), "
        "eetq (8 bits, CUDA workers).",
    )
    quantization_bit: Literal[1, 2, 3, 4, 5, 6, 8] | None = param(
        None, "Load the model with this many bits per weight and train LoRA on top (QLoRA); lora only."
    )
    quantization_type: Literal["fp4", "nf4"] = param("nf4", "4-bit data type for bitsandbytes: fp4 or nf4.")
    double_quantization: bool = param(True, "Also quantize the quantization constants (bitsandbytes 4-bit).")
    quantization_device_map: Literal["auto"] | None = param(
        None,
        "Inference commands: spread a 4-bit bitsandbytes model over the devices (device_map auto; weights that fit "
        "nowhere go to offload_folder). Training places each worker's model itself.",
    )
