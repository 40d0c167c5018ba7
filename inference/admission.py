"""How many API requests run, wait, or are turned away (MAX_CONCURRENT and LOOM_API_QUEUE).

The rule, exactly: at most `running` requests generate at once; up to `waiting` more wait for a turn, served in
arrival order; a request that finds `running + waiting` already inside is answered at once with 429 and a
Retry-After of the seconds a place should take to free (the recent mean request time, times the requests ahead of
it, over `running`; at least 1). A waiting client that goes away gives its place back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque


class Busy(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"server busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Admission:
    def __init__(self, running: int, waiting: int):
        self.running, self.waiting = running, waiting
        self.inside = 0
        self._turns = asyncio.Semaphore(running)
        self._durations: deque[float] = deque(maxlen=32)

    def retry_after(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1) / self.running))

    def admit(self) -> Ticket:
        """A place inside, or Busy when every running and waiting place is taken."""
        if self.inside >= self.running + self.waiting:
            raise Busy(self.retry_after())
        self.inside += 1
        return Ticket(self)


class Ticket:
    """One admitted request: `async with ticket` waits for a turn and, on leaving, frees the turn and the place.
    `release()` frees the place of a request that never took its turn (a stream whose client left first)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._released = False
        self._started = 0.0

    async def __aenter__(self) -> Ticket:
        try:
            await self.admission._turns.acquire()
        except BaseException:
            self.release()
            raise
        self._started = time.monotonic()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.admission._durations.append(time.monotonic() - self._started)
        self.admission._turns.release()
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.admission.inside -= 1
