"""Errors the driver turns into one clean message and a non-zero exit code."""

from __future__ import annotations

from dataclasses import dataclass


class LoomError(Exception):
    """Base of every error Loom reports to the user without a traceback."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where, what was given, what is allowed."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(LoomError):
    """Every problem found in a config, reported together."""

    exit_code = 2

    def __init__(self, problems: list[Problem], source: str = "config", partial: object | None = None):
        self.problems = list(problems)
        self.source = source
        self.partial = partial  # the config built from the keys that were valid (for the file checks that follow)
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} in {source}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


class DataError(LoomError):
    """A dataset, registry entry, file, column or row that cannot be used."""

    exit_code = 3


class PlanError(LoomError):
    """A plan that cannot run: bundles that cannot be placed, a run directory in the way."""

    exit_code = 4


class TrainingError(LoomError):
    """The training job failed on the cluster."""

    exit_code = 5
