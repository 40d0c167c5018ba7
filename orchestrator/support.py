"""A feature's support status, shared by the config fields and the environment-variable registry."""

from __future__ import annotations

from enum import Enum


class Support(str, Enum):
    WORKS = "works"
    REFUSED = "refused"  # cannot work in this setting (no GPU, by design, ...): the reason says why
    NOT_YET = "not yet"  # planned; setting it stops the run instead of being ignored
