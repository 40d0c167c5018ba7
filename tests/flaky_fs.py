"""A pyarrow filesystem that fails writes on purpose, over a real one (local or S3): for upload-retry tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs


class FlakyFileSystemHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over a real filesystem (local, S3) whose writes fail on purpose.

    The first `failures` output streams opened on a path containing `match` fail with OSError: at open, or, with
    `at_close`, after the bytes went through (a write that fails while it completes). `written` lists every path
    written successfully, in order; `attempts` every output path asked for that matched.
    """

    def __init__(self, base, failures: int, match: str = "", at_close: bool = False, log: str | None = None):
        self.base, self.failures, self.match, self.at_close, self.log = base, failures, match, at_close, log
        self.attempts: list[str] = []
        self.written: list[str] = []

    def __reduce__(self):  # picklable into Ray workers; counters start afresh in each process
        return FlakyFileSystemHandler, (self.base, self.failures, self.match, self.at_close, self.log)

    def _injected(self, message: str) -> OSError:
        if self.log:  # visible to a test when the failure happened in another process (a Ray worker)
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(message + "\n")
        return OSError(message)

    def open_output_stream(self, path, metadata):
        if self.match not in path:
            return self.base.open_output_stream(path, metadata=metadata)
        self.attempts.append(path)
        fail = len(self.attempts) <= self.failures
        if fail and not self.at_close:
            raise self._injected(f"injected failure {len(self.attempts)} opening {path}")
        stream = self.base.open_output_stream(path, metadata=metadata)
        message = f"injected failure {len(self.attempts)} closing {path}"
        failure = (lambda: self._injected(message)) if fail else None
        return pa.PythonFile(_Stream(stream, path, self.written, failure), mode="w")

    def get_type_name(self):
        return f"flaky-{self.base.type_name}"

    def equals(self, other):
        return other.type_name == f"py::{self.get_type_name()}"

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.base.open_input_stream(path)

    def open_input_file(self, path):
        return self.base.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.base.open_append_stream(path, metadata=metadata)


class _Stream:
    """An output stream that records a finished write, or fails at close after passing the bytes on."""

    def __init__(self, inner, path: str, written: list[str], failure: Callable[[], OSError] | None):
        self.inner, self.path, self.written, self.failure, self.closed = inner, path, written, failure, False

    def write(self, data) -> int:
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
        self.closed = True
        if self.failure:
            raise self.failure()
        self.written.append(self.path)


def flaky_filesystem(base, failures: int, match: str = "", at_close: bool = False, log: str | None = None):
    """A pyarrow FileSystem over `base` whose first `failures` matching writes fail (see FlakyFileSystemHandler)."""
    return pafs.PyFileSystem(FlakyFileSystemHandler(base, failures, match, at_close, log))


FLAKY_LOG_ENV = "LOOM_TEST_FLAKY_LOG"


def flaky_local_storage() -> pafs.PyFileSystem:
    """A `ray_storage_filesystem` factory for Ray tests: the local disk, where the first write of a checkpoint file
    in each process fails once (as a store's transient error would). Injected failures go to $LOOM_TEST_FLAKY_LOG."""
    return flaky_filesystem(pafs.LocalFileSystem(), failures=1, match="/checkpoint-", log=os.environ.get(FLAKY_LOG_ENV))
