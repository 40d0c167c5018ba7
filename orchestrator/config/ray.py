"""Where and how the job runs on the Ray cluster."""

from typing import Literal

from pydantic import BaseModel

from .fields import param


class RayArgs(BaseModel):
    ray_run_name: str | None = param(
        None, "Run name: results go to <ray_storage_path>/<ray_run_name>; derived from the config when unset."
    )
    ray_storage_path: str = param("./saves", "Storage path (local, NFS or pyarrow URI) that holds run directories.")
    ray_storage_shared: bool = param(
        False,
        "The local ray_storage_path (and output_dir) is on a filesystem every node mounts (NFS, a shared volume); "
        "a multi-node run refuses a local path without it.",
        source="loom",
    )
    ray_storage_endpoint: str | None = param(
        None,
        "Endpoint of an S3-compatible store (MinIO, Ceph, R2...) for an s3:// ray_storage_path, e.g. "
        "http://minio:9000; credentials come from each node's environment, as for S3.",
        source="loom",
    )
    ray_storage_filesystem: str | None = param(
        None,
        "`package.module:function` returning the pyarrow FileSystem that holds ray_storage_path, for stores pyarrow "
        "cannot open from a URI alone.",
        source="loom",
    )
    ray_num_workers: int = param(1, "Number of Ray Train workers (one process each).", ge=1)
    ray_min_workers: int | None = param(
        None,
        "Elastic training: the fewest workers the run goes on with. Ray Train starts as many as the cluster holds, "
        "between this and ray_num_workers, and resizes from the latest checkpoint when nodes come or go.",
        ge=1,
        source="loom",
    )
    ray_resize_interval_s: float = param(
        60.0,
        "Elastic training: how often (seconds) a healthy run checks whether more workers would fit.",
        gt=0,
        source="loom",
    )
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
    ray_placement_wait_s: float = param(
        60.0,
        "How long `loom train` waits for the cluster to have its worker bundles free (another job may hold them) "
        "before it stops with what is missing, instead of waiting without end.",
        source="loom",
        ge=0,
    )
    ray_upload_retries: int = param(
        3,
        "Retries of each checkpoint file upload to the storage path (waits 0.5 s, doubled each time); after the last, "
        "the workers fail and ray_max_failures decides whether to restart.",
        ge=0,
        source="loom",
    )
