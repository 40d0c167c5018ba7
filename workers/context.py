"""One distributed context per worker: rank, world size, device; rank-0-only effects go through here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    node_id: str = ""  # the Ray node this rank runs on (empty outside Ray)
    node_ip: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def print0(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few floats over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def peak_memory_gb(self) -> float:
        """This worker's peak memory on its device: the CUDA allocator's peak, or on a CPU worker the process's
        peak resident set (its device memory is the host's)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def single_process_context() -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
