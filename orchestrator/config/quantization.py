"""Quantized model loading options (QLoRA and friends)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "quantized training is not built yet"


class QuantizationArgs(BaseModel):
    quantization_method: Literal["bitsandbytes", "hqq", "eetq"] = not_yet(
        "bitsandbytes", "Quantization backend: bitsandbytes, hqq or eetq.", REASON
    )
    quantization_bit: Literal[1, 2, 3, 4, 5, 6, 8] | None = not_yet(
        None, "Bits per weight when loading the model quantized (e.g. 4 or 8).", REASON
    )
    quantization_type: Literal["fp4", "nf4"] = not_yet("nf4", "4-bit data type for bitsandbytes: fp4 or nf4.", REASON)
    double_quantization: bool = not_yet(True, "Also quantize the quantization constants (bitsandbytes 4-bit).", REASON)
    quantization_device_map: Literal["auto"] | None = not_yet(
        None, "Device map used to run inference on a 4-bit quantized model.", REASON
    )
