"""Where and how the job runs on the Ray cluster."""

from typing import Literal

from pydantic import BaseModel

from .fields import param


class RayArgs(BaseModel):
    ray_run_name: str | None = param(
        None, "Run name: results go to <ray_storage_path>/<ray_run_name>; derived from the config when unset."
    )
    ray_storage_path: str = param("./saves", "Storage path (local, NFS or pyarrow URI) that holds run directories.")
    ray_num_workers: int = param(1, "Number of Ray Train workers (one process each).", ge=1)
    resources_per_worker: dict | str = param(
        {"GPU": 1}, 'Resources of each worker bundle, as a dict or a JSON string, e.g. {"CPU": 1}.'
    )
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = param(
        "PACK", "Placement-group strategy of the worker bundles."
    )
    ray_max_failures: int = param(
        0,
        "Times the run restarts its workers from the latest checkpoint after a failure (-1: always).",
        ge=-1,
        source="loom",
    )
