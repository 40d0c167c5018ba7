"""The driver's live progress line: step / total, loss, tokens/s, epoch and ETA, while `loom train` runs.

Rank 0 appends one line per logged step to trainer_log.jsonl; the driver follows that file (no extra process, no
extra Ray call per step). On a terminal one line is redrawn in place; otherwise (a log file, CI) each logged step
is one plain line. Where the driver cannot see rank 0's output_dir (a cluster without a shared path), it shows
nothing, and `loom status` reads the run instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    """What the line shows, from the records seen: rates between the first and the last, by the wall-clock time
    rank 0 wrote each one (the time the driver saw it, for a log without it)."""

    total_steps: int
    seen: list[tuple[float, int, int]] = field(default_factory=list)  # (time written, step, tokens seen)

    def add(self, record: dict[str, Any], now: float) -> None:
        written = float(record.get("time") or now)
        self.seen.append((written, int(record["step"]), int(record.get("tokens_seen") or 0)))

    def rates(self) -> tuple[float, float] | None:
        """Steps/s and tokens/s between the first and the last record seen by this driver."""
        if len(self.seen) < 2 or self.seen[-1][0] <= self.seen[0][0]:
            return None
        (t0, s0, k0), (t1, s1, k1) = self.seen[0], self.seen[-1]
        return (s1 - s0) / (t1 - t0), (k1 - k0) / (t1 - t0)

    def line(self, record: dict[str, Any]) -> str:
        step = int(record["step"])
        parts = [f"step {step}/{self.total_steps} ({100 * step // max(self.total_steps, 1)}%)"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        rates = self.rates()
        if rates and rates[1] > 0:
            parts.append(f"{rates[1]:.0f} tokens/s")
        if "epoch" in record:
            parts.append(f"epoch {record['epoch']:.2f}")
        if rates and rates[0] > 0:
            parts.append(f"ETA {clock((self.total_steps - step) / rates[0])}")
        return "  ".join(parts)


class ProgressFollower:
    """Follows trainer_log.jsonl from a thread and draws each new logged step on `stream`."""

    def __init__(self, log_path: str, total_steps: int, after_step: int = 0, stream: IO[str] | None = None,
                 interval_s: float = 0.5, live: bool | None = None):  # fmt: skip
        """`after_step`: the step a resumed run continues after. The file that is there now is an earlier
        attempt's: rank 0 replaces it when it starts (workers/trainlog.py), and only the new one is followed."""
        self.path, self.interval_s = log_path, interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.progress = Progress(total_steps)
        self._shown, self._drawn = after_step, False
        self._earlier = self._file_id()  # an earlier attempt's file, never read
        self._following: tuple[int, int] | None = None  # the file read now, and how far
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="loom-progress", daemon=True)

    def __enter__(self) -> ProgressFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last steps, written just before the run ended
        if self._drawn and self.live:
            self.stream.write("\n")
            self.stream.flush()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def _file_id(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_ino, stat.st_dev

    def _records(self) -> list[dict[str, Any]]:
        """The whole lines appended to this attempt's log since the last poll (only the new bytes are read; a file
        replaced under us, as a restart rewrites it, is read from its start), with a step beyond the last shown (a
        restarted attempt's redone steps are not shown twice)."""
        current = self._file_id()
        if current is None or current == self._earlier:
            return []
        self._earlier = None  # replaced once: every later file is this run's (even one on a reused inode)
        if current != self._following:
            self._following, self._offset = current, 0
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                appended = handle.read()
        except OSError:
            return []
        whole = appended[: appended.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(whole)
        records = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(record.get("step", 0)) > self._shown:
                records.append(record)
        return records

    def poll(self) -> None:
        for record in self._records():
            self._shown = int(record["step"])
            if "loss" not in record:  # an eval-only line
                continue
            self.progress.add(record, time.time())
            self._draw(self.progress.line(record))

    def _draw(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(f"progress      {text}\n")
        self.stream.flush()
        self._drawn = True
