"""Memory-saving optimizers and block-wise training methods (APOLLO, BAdam, GaLore, Adam-mini, LLaMA Pro)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import param


class OptimizerArgs(BaseModel):
    use_adam_mini: bool = param(False, "Use the Adam-mini optimizer (one second moment per head or neuron).")
    use_llama_pro: bool = param(
        False,
        "LLaMA Pro: train only the blocks `loom llama-pro` inserted (freeze_trainable_layers of them, evenly spaced), "
        "under finetuning_type freeze, or LoRA on those blocks only.",
    )

    use_apollo: bool = param(False, "Use the APOLLO optimizer.")
    apollo_target: str = param("all", "Modules APOLLO applies to, comma-separated; all means every linear module.")
    apollo_rank: int = param(16, "Rank of APOLLO's gradient projection.", ge=1)
    apollo_update_interval: int = param(200, "Steps between updates of the APOLLO projection.", ge=1)
    apollo_scale: float = param(32.0, "APOLLO scaling factor.", gt=0)
    apollo_proj: Literal["svd", "random"] = param("random", "APOLLO low-rank projection: svd or random.")
    apollo_proj_type: Literal["std", "right", "left"] = param("std", "Side APOLLO projects on.")
    apollo_scale_type: Literal["channel", "tensor"] = param(
        "channel", "Granularity of APOLLO's scaling: channel or tensor."
    )
    apollo_layerwise: bool = param(False, "Update layer by layer to save more memory.")
    apollo_scale_front: bool = param(False, "Apply the norm-growth limiter before gradient scaling.")

    use_badam: bool = param(False, "Use the BAdam block-coordinate optimizer.")
    badam_mode: Literal["layer", "ratio"] = param("layer", "BAdam mode: layer-wise or ratio-wise.")
    badam_start_block: int | None = param(None, "Index of the first block updated by layer-wise BAdam.", ge=0)
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] | None = param(
        "ascending", "Order in which layer-wise BAdam switches blocks."
    )
    badam_switch_interval: int | None = param(
        50, "Steps between block switches in layer-wise BAdam; -1 disables switching.", ge=-1
    )
    badam_update_ratio: float = param(0.05, "Fraction of parameters updated by ratio-wise BAdam.", gt=0, le=1)
    badam_mask_mode: Literal["adjacent", "scatter"] = param(
        "adjacent", "How ratio-wise BAdam picks parameters: adjacent or scatter."
    )
    badam_verbose: int = param(0, "BAdam verbosity: 0 silent, 1 block prefixes, 2 trainable parameters.", ge=0, le=2)

    use_galore: bool = param(False, "Use GaLore gradient low-rank projection.")
    galore_target: str = param("all", "Modules GaLore applies to, comma-separated; all means every linear module.")
    galore_rank: int = param(16, "Rank of GaLore's gradient projection.", ge=1)
    galore_update_interval: int = param(200, "Steps between updates of the GaLore projection.", ge=1)
    galore_scale: float = param(0.25, "GaLore scaling factor.", gt=0)
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = param("std", "GaLore projection type.")
    galore_layerwise: bool = param(False, "Update layer by layer to save more memory.")
