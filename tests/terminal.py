"""Drive a command through a real pseudo-terminal, as a user at a keyboard would: type lines, read what it shows."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None = None):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                        close_fds=True)  # fmt: skip
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Everything shown from the last read up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{text!r} never shown; the terminal shows:\n{self.seen[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the other side closed
                    pass
        cut = self.seen.index(text) + len(text)
        shown, self.seen = self.seen[:cut], self.seen[cut:]
        return shown

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.master)
