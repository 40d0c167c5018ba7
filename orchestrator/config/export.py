"""Options for exporting (merging, quantizing, uploading) a trained model (`loom export`, inference/export.py)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param

GPTQ = " GPTQ needs gptqmodel and optimum on a CUDA device (refused at the driver without them)."


class ExportArgs(BaseModel):
    export_dir: str | None = param(None, "Directory the exported model is written to (new or empty).")
    export_size: float = param(
        5, "Maximum size of one exported weight shard, in GB (fractions allowed: 0.5 is 512 MB).", gt=0
    )
    export_device: Literal["cpu", "auto"] = param(
        "cpu", "Device used while exporting; auto keeps the model where it loaded (an accelerator when present)."
    )
    export_quantization_bit: Literal[2, 3, 4, 8] | None = param(
        None, "Bits per weight when quantizing the exported model (GPTQ)." + GPTQ
    )
    export_quantization_dataset: str | None = param(
        None, "JSON or JSON-lines file of calibration texts for export quantization." + GPTQ
    )
    export_quantization_nsamples: int = param(128, "Number of calibration samples for export quantization.", ge=1)
    export_quantization_maxlen: int = param(1024, "Tokens per calibration sample for export quantization.", ge=1)
    export_legacy_format: bool = param(False, "Save .bin files instead of .safetensors.")
    export_hub_model_id: str | None = param(
        None, "Hugging Face Hub repo to upload the exported model to (refused when HF_HUB_OFFLINE is set)."
    )
