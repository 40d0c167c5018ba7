"""A pyarrow filesystem that fails writes on purpose, over a real one (local or S3): for upload-retry tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs


class FlakyFileSystemHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over a real filesystem (local, S3) whose writes fail on purpose.

    The first `failures` output streams opened on a path containing `match` fail with OSError: at open, or, with
    `at_close`, after the bytes went through (a write that fails while it completes). `written` lists every path
    written successfully, in order; `attempts` every output path asked for that matched.
    """

    def __init__(self, base, failures: int, match: str = "", at_close: bool = False, log: str | None = None,
                 slow: str = "", delay_s: float = 0.0):  # fmt: skip
        self.base, self.failures, self.match, self.at_close, self.log = base, failures, match, at_close, log
        self.slow, self.delay_s = slow, delay_s  # the first write in a process to a path holding `slow` waits
        self.attempts: list[str] = []
        self.written: list[str] = []

    def __reduce__(self):  # picklable into Ray workers; counters start afresh in each process
        args = (self.base, self.failures, self.match, self.at_close, self.log, self.slow, self.delay_s)
        return FlakyFileSystemHandler, args

    def _noted(self, text: str) -> bool:
        if not self.log or not os.path.isfile(self.log):
            return False
        with open(self.log, encoding="utf-8") as handle:
            return text in handle.read()

    def _note(self, message: str) -> None:
        if self.log:  # visible to a test when it happened in another process (a Ray worker)
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(f"{time.time():.2f} {message}\n")

    def _injected(self, message: str) -> OSError:
        self._note(message)
        return OSError(message)

    def open_output_stream(self, path, metadata):
        if self.slow and self.slow in path and not self._noted(" slow "):  # once: a window to kill this writer in
            self._note(f"{os.getpid()} slow {path}")
            time.sleep(self.delay_s)
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


CHAOS_FAIL_ENV, CHAOS_SLOW_ENV = "LOOM_TEST_FAIL_WRITE", "LOOM_TEST_SLOW_WRITE"


def chaos_storage() -> pafs.PyFileSystem:
    """The chaos test's storage: the local disk, where the first write of a path holding $LOOM_TEST_FAIL_WRITE fails
    once in each process, and the first write of a path holding $LOOM_TEST_SLOW_WRITE (the first of the whole
    run, as the log tells) waits 20 s, while the test kills the writer. Both are noted, with the time and the writer's pid, in $LOOM_TEST_FLAKY_LOG."""
    fail, slow = os.environ.get(CHAOS_FAIL_ENV, ""), os.environ.get(CHAOS_SLOW_ENV, "")
    handler = FlakyFileSystemHandler(pafs.LocalFileSystem(), failures=1 if fail else 0, match=fail or "\0",
                                     log=os.environ.get(FLAKY_LOG_ENV), slow=slow, delay_s=20.0)  # fmt: skip
    return pafs.PyFileSystem(handler)
