"""`loom status RUN`: a run's state read from its storage (local, NFS or S3), without Ray.

From the run directory (`ray_storage_path`/`ray_run_name`): its `checkpoint-NNNNNN` folders, each checked against
its manifest (complete or not), the one Ray's snapshot commits as the latest, that one's step and the steps planned,
the last reported metrics, and the workers and nodes of the attempt that wrote it. Given the config, also what rank
0's output_dir says where this machine can read it (the run marker, the last logged step).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .preflight import read_marker

CHECKPOINT = re.compile(r"checkpoint-(\d{6})$")


@dataclass
class RunStatus:
    run_dir: str
    exists: bool
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # name, step, complete
    committed: str | None = None  # the latest checkpoint Ray's snapshot commits
    step: int | None = None  # of the committed checkpoint
    total_steps: int | None = None
    finished: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)  # the last reported with a checkpoint
    workers: list[dict[str, Any]] = field(default_factory=list)  # rank -> node of the attempt that wrote it
    output_dir: str | None = None
    marker: dict[str, Any] | None = None  # rank 0's loom_run.json, when readable here
    logged_step: int | None = None  # the last step in trainer_log.jsonl, when readable here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _complete(filesystem: Any, folder: str) -> bool:
    manifest = storage.read_json(filesystem, f"{folder}/loom_checkpoint.json")
    if not manifest:
        return False
    infos = filesystem.get_file_info([f"{folder}/{name}" for name in manifest.get("files", {})])
    return all(info.size == size for info, size in zip(infos, manifest["files"].values(), strict=True))


def run_status(run_dir: str, filesystem: Any = None, output_dir: str | None = None) -> RunStatus:
    filesystem, root = storage.resolve(run_dir, filesystem)
    status = RunStatus(run_dir=run_dir, exists=storage.exists(filesystem, root), output_dir=output_dir)
    if status.exists:
        from pyarrow.fs import FileSelector, FileType

        names = sorted(info.base_name for info in filesystem.get_file_info(FileSelector(root))
                       if info.type == FileType.Directory and CHECKPOINT.match(info.base_name))  # fmt: skip
        status.checkpoints = [{"name": n, "step": int(CHECKPOINT.match(n).group(1)),
                               "complete": _complete(filesystem, f"{root}/{n}")} for n in names]  # fmt: skip
        snapshot = storage.read_json(filesystem, f"{root}/checkpoint_manager_snapshot.json") or {}
        latest = snapshot.get("latest_checkpoint_result") or {}
        status.committed = latest.get("checkpoint_dir_name")
        status.metrics = latest.get("metrics") or {}
        if status.committed:
            state = storage.read_json(filesystem, f"{root}/{status.committed}/trainer_state.json") or {}
            manifest = storage.read_json(filesystem, f"{root}/{status.committed}/loom_checkpoint.json") or {}
            status.step, status.total_steps = state.get("global_step"), state.get("total_steps")
            status.finished, status.workers = bool(state.get("finished")), manifest.get("workers") or []
    if output_dir:
        status.marker = read_marker(output_dir)
        status.logged_step = _last_logged_step(output_dir)
    return status


def _last_logged_step(output_dir: str) -> int | None:
    from .plots import read_log

    try:
        steps = [r["step"] for r in read_log(output_dir) if "step" in r]
    except OSError:
        return None
    return steps[-1] if steps else None


def describe(status: RunStatus) -> str:
    if not status.exists and not status.marker:
        return f"no run at {status.run_dir} (nothing was written there yet)"
    lines = [f"run          {status.run_dir}"]
    state = (status.marker or {}).get("status") or ("finished" if status.finished else None)
    if state == "running":
        state = "running, or stopped before its end (rank 0's marker says running)"
    lines.append(f"state        {state or 'started: no checkpoint committed and no marker readable here'}")
    if status.step is not None:
        total = f" of {status.total_steps}" if status.total_steps else ""
        lines.append(f"steps        {status.step}{total} in {status.committed} (the committed checkpoint)")
    if status.logged_step is not None:
        lines.append(f"logged       step {status.logged_step} (trainer_log.jsonl in {status.output_dir})")
    if status.checkpoints:
        shown = ", ".join(c["name"][len("checkpoint-"):] + ("" if c["complete"] else " (incomplete)")
                          for c in status.checkpoints)  # fmt: skip
        lines.append(f"checkpoints  {len(status.checkpoints)}: {shown}")
    if status.metrics:
        lines.append("metrics      " + ", ".join(f"{k} {v}" for k, v in status.metrics.items() if k != "time"))
    workers = status.workers or (status.marker or {}).get("workers") or []
    if workers:
        nodes = {w["node_id"] for w in workers}
        placed = ", ".join(f"rank {w['rank']} on {w['node_ip']} (node {w['node_id'][:8]})" for w in workers)
        lines.append(f"workers      {len(workers)} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}: {placed}")
    return "\n".join(lines)
