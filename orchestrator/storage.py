"""The run storage as a pyarrow filesystem: local paths, NFS, any pyarrow URI, S3-compatible endpoints, or a
filesystem built by the user's own factory (`ray_storage_filesystem: package.module:function`)."""

from __future__ import annotations

import importlib
import json
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .paths import is_uri


def storage_filesystem(cfg: Any) -> pafs.FileSystem | None:
    """The filesystem Ray Train should write the run to; None lets Ray resolve it from the path."""
    if cfg.ray_storage_filesystem:
        module_name, _, function = cfg.ray_storage_filesystem.partition(":")
        filesystem = getattr(importlib.import_module(module_name), function)()
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(
                f"{cfg.ray_storage_filesystem} returned {type(filesystem).__name__}, not a pyarrow FileSystem"
            )
        return filesystem
    if cfg.ray_storage_endpoint:
        endpoint = urlparse(cfg.ray_storage_endpoint)
        return pafs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    return None


def ray_storage_path(storage_path: str, filesystem: pafs.FileSystem | None) -> str:
    """With a filesystem of our own, Ray wants the path without its scheme (s3://bucket/runs -> bucket/runs)."""
    if filesystem is None or not is_uri(storage_path):
        return storage_path
    parsed = urlparse(storage_path)
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def resolve(path: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, ray_storage_path(path, filesystem)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def read_json(filesystem: pafs.FileSystem, path: str) -> Any | None:
    try:
        with filesystem.open_input_stream(path) as handle:
            return json.loads(handle.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound
