""" "Did you mean ...?": the one way a wrong name is answered with the closest known one. Pure."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(given: object, known: Iterable[object], cutoff: float = 0.6) -> str:
    """`; did you mean 'x'?` for the known name closest to `given`, or "" when none is close."""
    match = difflib.get_close_matches(str(given), [str(k) for k in known], n=1, cutoff=cutoff)
    return f"; did you mean {match[0]!r}?" if match else ""
