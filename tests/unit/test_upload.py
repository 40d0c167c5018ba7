"""Checkpoint uploads (workers/upload.py): each file retried with backoff, the manifest last, a clear error after the
last attempt, and never a manifest for an incomplete checkpoint. Real files, a real moto S3 server, and a pyarrow
filesystem that fails writes on purpose (tests/flaky_fs.py)."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from tests.conftest import BUCKET
from tests.flaky_fs import FlakyFileSystemHandler
from workers.checkpoint import MANIFEST, IncompleteCheckpoint, verify_checkpoint
from workers.upload import BASE_DELAY_S, CheckpointUploadError, local_files, upload_checkpoint

FILES = {"model/adapter_model.safetensors": 3000, "optimizer.pt": 2000, "rng_state.pt": 100, "scheduler.pt": 50,
         "trainer_state.json": 40}  # fmt: skip


def write_folder(folder, files: dict[str, int], manifest_lists: dict[str, int] | None = None) -> str:
    """A checkpoint folder as a rank leaves it: its files, and (rank 0) a manifest listing `manifest_lists`."""
    for name, size in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
    if manifest_lists is not None:
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump({"format": 1, "step": 4, "files": manifest_lists}, handle)
    return str(folder)


def flaky_local(**kwargs) -> tuple[pafs.PyFileSystem, FlakyFileSystemHandler]:
    handler = FlakyFileSystemHandler(pafs.LocalFileSystem(), **kwargs)
    return pafs.PyFileSystem(handler), handler


def test_transient_failures_are_retried_with_backoff_and_the_manifest_goes_last(tmp_path):
    source = write_folder(tmp_path / "local", FILES, manifest_lists=FILES)
    destination = str(tmp_path / "run" / "checkpoint-000004")
    filesystem, handler = flaky_local(failures=2)
    delays: list[float] = []
    uploaded = upload_checkpoint(source, filesystem, destination, retries=3, sleep=delays.append)
    assert uploaded == local_files(source) and uploaded[-1] == MANIFEST
    assert delays == [BASE_DELAY_S, 2 * BASE_DELAY_S]  # the first file failed twice: waits 0.5 s, then 1 s
    assert len(handler.attempts) == len(FILES) + 1 + 2
    assert [os.path.relpath(p, destination) for p in handler.written] == uploaded  # each file once, manifest last
    assert verify_checkpoint(destination)["files"] == FILES


def test_a_permanent_failure_is_reported_after_every_attempt_and_leaves_no_manifest(tmp_path):
    """Also the case of a retried step: a manifest from an earlier attempt at that checkpoint is removed first."""
    source = write_folder(tmp_path / "local", FILES, manifest_lists=FILES)
    destination = str(tmp_path / "run" / "checkpoint-000004")
    write_folder(destination, FILES, manifest_lists=FILES)  # a complete copy from an earlier attempt
    filesystem, handler = flaky_local(failures=10**6, match="optimizer.pt")
    delays: list[float] = []
    with pytest.raises(CheckpointUploadError) as failure:
        upload_checkpoint(source, filesystem, destination, retries=2, sleep=delays.append)
    message = str(failure.value)
    assert "optimizer.pt of checkpoint checkpoint-000004" in message and f"{destination}/optimizer.pt" in message
    assert "failed 3 time(s) (ray_upload_retries=2)" in message and "injected failure 3 opening" in message
    assert len(handler.attempts) == 3 and delays == [0.5, 1.0]
    assert not os.path.exists(os.path.join(destination, MANIFEST))
    with pytest.raises(IncompleteCheckpoint):
        verify_checkpoint(destination)


def test_a_manifest_whose_own_upload_failed_is_removed(tmp_path):
    """The write fails as it completes (the bytes reached the destination): the half-done manifest is deleted."""
    source = write_folder(tmp_path / "local", FILES, manifest_lists=FILES)
    destination = str(tmp_path / "run" / "checkpoint-000004")
    filesystem, handler = flaky_local(failures=10**6, match=MANIFEST, at_close=True)
    with pytest.raises(CheckpointUploadError, match=f"{MANIFEST} of checkpoint checkpoint-000004 .* failed 1 time"):
        upload_checkpoint(source, filesystem, destination, retries=0)
    assert len(handler.attempts) == 1
    assert all(os.path.isfile(os.path.join(destination, name)) for name in FILES)
    assert not os.path.exists(os.path.join(destination, MANIFEST))


def test_ranks_upload_their_own_files_into_one_checkpoint(tmp_path):
    """Rank 1's shard and rank 0's files (its manifest lists both) merge into one directory; rank 1 never touches
    the manifest."""
    shard = {"optimizer.rank1.pt": 500}
    rank0 = write_folder(tmp_path / "rank0", FILES, manifest_lists={**FILES, **shard})
    rank1 = write_folder(tmp_path / "rank1", shard)
    destination = str(tmp_path / "run" / "checkpoint-000004")
    filesystem, handler = flaky_local(failures=1, match="rank1")
    upload_checkpoint(rank0, filesystem, destination, retries=1, sleep=lambda _: None)
    assert upload_checkpoint(rank1, filesystem, destination, retries=1, sleep=lambda _: None) == list(shard)
    assert len(handler.attempts) == 2
    assert verify_checkpoint(destination)["files"] == {**FILES, **shard}


def test_transient_s3_failures_are_retried(tmp_path, s3):
    client, endpoint = s3
    host = endpoint.removeprefix("http://")
    source = write_folder(tmp_path / "local", FILES, manifest_lists=FILES)
    s3fs = pafs.S3FileSystem(endpoint_override=host, scheme="http")
    handler = FlakyFileSystemHandler(s3fs, failures=1, match="model/", at_close=True)
    destination = f"{BUCKET}/upload-test/checkpoint-000004"
    upload_checkpoint(source, pafs.PyFileSystem(handler), destination, retries=1, sleep=lambda _: None)
    assert len(handler.attempts) == 2  # the adapter's first upload failed as it completed, the second went through
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="upload-test/checkpoint-000004/")["Contents"]
    sizes = {item["Key"].rsplit("checkpoint-000004/", 1)[1]: item["Size"] for item in listed}
    assert {name: sizes[name] for name in FILES} == FILES and MANIFEST in sizes
