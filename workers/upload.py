"""Copy a local checkpoint folder into the run storage, file by file, each file retried, the manifest last.

Ray Train calls this through `ray.train.report(checkpoint_upload_fn=...)` (see entry.py). Ray's own retry around
an upload only matches a few AWS error strings; here every I/O error of the destination is retried with exponential
backoff, and the manifest (`loom_checkpoint.json`) goes up only after every other file has, so a checkpoint whose
upload failed part-way is never a valid Loom checkpoint (`verify_checkpoint` refuses a folder without it).

Ray still wraps the whole upload in its own retry, which re-runs it (up to 3 times in Ray 2.60) only when the error
message holds one of a few AWS error strings (SLOW_DOWN, INTERNAL_FAILURE, ...): a throttled store then gets more
attempts than `ray_upload_retries` alone.

Several ranks may upload into the same checkpoint directory, each its own files; only a folder that holds the
manifest (rank 0's) touches it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from .checkpoint import MANIFEST

logger = logging.getLogger(__name__)

# Debug knob for bench/checkpoint_overhead.py: a JSON-lines file each rank appends one line per report to.
TIMINGS_ENV = "LOOM_REPORT_TIMINGS"
BASE_DELAY_S = 0.5  # first wait before a retry; doubled after each failed attempt
CHUNK = 16 * 1024 * 1024


class CheckpointUploadError(RuntimeError):
    """A file of a checkpoint could not be uploaded after every retry."""


def local_files(folder: str) -> list[str]:
    """Paths relative to `folder` (posix separators), sorted, the manifest last."""
    names = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, files in os.walk(folder)
        for name in files
    )
    return [name for name in names if name != MANIFEST] + [name for name in names if name == MANIFEST]


def upload_checkpoint(
    folder: str,
    filesystem: pafs.FileSystem,
    destination: str,
    *,
    retries: int,
    base_delay_s: float = BASE_DELAY_S,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Upload every file of `folder` to `destination` on `filesystem`; returns the relative paths uploaded.

    Each file gets `retries + 1` attempts, waiting base_delay_s, 2 * base_delay_s, ... between them. When a file
    still fails, CheckpointUploadError names the checkpoint, the destination, the attempts and the last error; the
    manifest is then absent at the destination (it is uploaded last, and removed again if its own upload failed).
    """
    destination = destination.rstrip("/")
    checkpoint = destination.rsplit("/", 1)[-1]
    retry = functools.partial(_with_retries, filesystem=filesystem, retries=retries, base_delay_s=base_delay_s,
                              sleep=sleep)  # fmt: skip
    files = local_files(folder)
    if MANIFEST in files:
        # A manifest left by an earlier attempt at this step must not vouch for the files about to be replaced.
        stale = f"{destination}/{MANIFEST}"
        retry(functools.partial(_delete_if_present, filesystem, stale), f"removing the old {MANIFEST} of {checkpoint}",
              stale, outcome="Nothing of the checkpoint was replaced.")  # fmt: skip
    created: set[str] = set()
    for name in files:
        target = f"{destination}/{name}"
        put = functools.partial(_put, os.path.join(folder, name), filesystem, target, created)
        try:
            retry(put, f"uploading {name} of checkpoint {checkpoint}", target,
                  outcome=f"The checkpoint has no {MANIFEST} in storage, so it is never resumed from.")  # fmt: skip
        except CheckpointUploadError:
            if name == MANIFEST:
                with contextlib.suppress(OSError):  # a half-written manifest must not survive either
                    _delete_if_present(filesystem, target)
            raise
    return files


def _put(source: str, filesystem: pafs.FileSystem, target: str, created: set[str]) -> None:
    parent = target.rsplit("/", 1)[0]
    if parent not in created:
        filesystem.create_dir(parent, recursive=True)
        created.add(parent)
    with open(source, "rb") as src, filesystem.open_output_stream(target) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)


def _with_retries(
    action: Callable[[], None],
    what: str,
    target: str,
    *,
    outcome: str,
    filesystem: pafs.FileSystem,
    retries: int,
    base_delay_s: float,
    sleep: Callable[[float], None],
) -> None:
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            action()
            return
        except OSError as error:  # pyarrow reports every I/O failure (S3, HDFS, local) as an OSError subclass
            if attempt == attempts:
                raise CheckpointUploadError(
                    f"{what} to {filesystem.type_name}:{target} failed {attempts} time(s) "
                    f"(ray_upload_retries={retries}); last error: {type(error).__name__}: {error}. {outcome}"
                ) from error
            delay = base_delay_s * 2 ** (attempt - 1)
            logger.warning("%s failed (attempt %d of %d), retrying in %.1f s: %s",
                           what, attempt, attempts, delay, error)  # fmt: skip
            sleep(delay)


def _delete_if_present(filesystem: pafs.FileSystem, path: str) -> None:
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_file(path)


@dataclass
class ReportTiming:
    """How long one ray.train.report took on one rank, and the checkpoint upload inside it (LOOM_REPORT_TIMINGS)."""

    step: int
    rank: int
    checkpoint: bool
    upload_s: float = 0.0
    report_s: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)

    @contextlib.contextmanager
    def uploading(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.upload_s = round(time.perf_counter() - started, 4)

    def write(self) -> None:
        path = os.environ.get(TIMINGS_ENV)
        if not path:
            return
        self.report_s = round(time.perf_counter() - self.started, 4)
        record = {k: v for k, v in asdict(self).items() if k != "started"}
        with open(path, "a", encoding="utf-8") as handle:  # one short line per write: ranks do not interleave
            handle.write(json.dumps(record) + "\n")
