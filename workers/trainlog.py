"""trainer_log.jsonl: one JSON line per logged step, rewritten on resume so no step is counted twice."""

from __future__ import annotations

import json
import os
from typing import Any


class TrainerLog:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps beyond `step` (written after the checkpoint a resumed run starts from)."""
        kept = [record for record in self.read() if record.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
