"""Options for exporting (merging, quantizing, uploading) a trained model."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "`loom export` is not built yet"


class ExportArgs(BaseModel):
    export_dir: str | None = not_yet(None, "Directory the exported model is written to.", REASON)
    export_size: int = not_yet(5, "Maximum size of one exported weight shard, in GB.", REASON, ge=1)
    export_device: Literal["cpu", "auto"] = not_yet(
        "cpu", "Device used while exporting; auto may use an accelerator.", REASON
    )
    export_quantization_bit: Literal[2, 3, 4, 8] | None = not_yet(
        None, "Bits per weight when quantizing the exported model (GPTQ).", REASON
    )
    export_quantization_dataset: str | None = not_yet(
        None, "Dataset path or name used to calibrate export quantization.", REASON
    )
    export_quantization_nsamples: int = not_yet(
        128, "Number of calibration samples for export quantization.", REASON, ge=1
    )
    export_quantization_maxlen: int = not_yet(
        1024, "Maximum input length of calibration samples for export quantization.", REASON, ge=1
    )
    export_legacy_format: bool = not_yet(False, "Save .bin files instead of .safetensors.", REASON)
    export_hub_model_id: str | None = not_yet(None, "Hugging Face Hub repo to upload the exported model to.", REASON)
