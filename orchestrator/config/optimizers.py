"""Memory-saving optimizers and block-wise training methods (APOLLO, BAdam, GaLore, Adam-mini, LLaMA Pro)."""

from typing import Literal

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

APOLLO = "APOLLO is not wired yet"
BADAM = "BAdam is not wired yet"
GALORE = "GaLore is not wired yet"


class OptimizerArgs(BaseModel):
    use_adam_mini: bool = not_yet(False, "Use the Adam-mini optimizer.", "Adam-mini is not wired yet")
    use_llama_pro: bool = not_yet(
        False, "Train only the expanded blocks (LLaMA Pro block expansion).", "LLaMA Pro is not wired yet"
    )

    use_apollo: bool = not_yet(False, "Use the APOLLO optimizer.", APOLLO)
    apollo_target: str = not_yet(
        "all", "Modules APOLLO applies to, comma-separated; all means every linear module.", APOLLO
    )
    apollo_rank: int = not_yet(16, "Rank of APOLLO's gradient projection.", APOLLO, ge=1)
    apollo_update_interval: int = not_yet(200, "Steps between updates of the APOLLO projection.", APOLLO, ge=1)
    apollo_scale: float = not_yet(32.0, "APOLLO scaling factor.", APOLLO, gt=0)
    apollo_proj: Literal["svd", "random"] = not_yet("random", "APOLLO low-rank projection: svd or random.", APOLLO)
    apollo_proj_type: Literal["std", "right", "left"] = not_yet("std", "Side APOLLO projects on.", APOLLO)
    apollo_scale_type: Literal["channel", "tensor"] = not_yet(
        "channel", "Granularity of APOLLO's scaling: channel or tensor.", APOLLO
    )
    apollo_layerwise: bool = not_yet(False, "Update layer by layer to save more memory.", APOLLO)
    apollo_scale_front: bool = not_yet(False, "Apply the norm-growth limiter before gradient scaling.", APOLLO)

    use_badam: bool = not_yet(False, "Use the BAdam block-coordinate optimizer.", BADAM)
    badam_mode: Literal["layer", "ratio"] = not_yet("layer", "BAdam mode: layer-wise or ratio-wise.", BADAM)
    badam_start_block: int | None = not_yet(None, "Index of the first block updated by layer-wise BAdam.", BADAM, ge=0)
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] | None = not_yet(
        "ascending", "Order in which layer-wise BAdam switches blocks.", BADAM
    )
    badam_switch_interval: int | None = not_yet(
        50, "Steps between block switches in layer-wise BAdam; -1 disables switching.", BADAM, ge=-1
    )
    badam_update_ratio: float = not_yet(0.05, "Fraction of parameters updated by ratio-wise BAdam.", BADAM, gt=0, le=1)
    badam_mask_mode: Literal["adjacent", "scatter"] = not_yet(
        "adjacent", "How ratio-wise BAdam picks parameters: adjacent or scatter.", BADAM
    )
    badam_verbose: int = not_yet(
        0, "BAdam verbosity: 0 silent, 1 block prefixes, 2 trainable parameters.", BADAM, ge=0, le=2
    )

    use_galore: bool = not_yet(False, "Use GaLore gradient low-rank projection.", GALORE)
    galore_target: str = not_yet(
        "all", "Modules GaLore applies to, comma-separated; all means every linear module.", GALORE
    )
    galore_rank: int = not_yet(16, "Rank of GaLore's gradient projection.", GALORE, ge=1)
    galore_update_interval: int = not_yet(200, "Steps between updates of the GaLore projection.", GALORE, ge=1)
    galore_scale: float = not_yet(0.25, "GaLore scaling factor.", GALORE, gt=0)
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = not_yet(
        "std", "GaLore projection type.", GALORE
    )
    galore_layerwise: bool = not_yet(False, "Update layer by layer to save more memory.", GALORE)
