"""The store's circuit breaker: while the store is unreachable, calls fail at once.

Without it every request that needs the store waits out the driver's timeout, one behind
another where they share a lock; with it only the call that found the outage waits, and a
probe (not a request) finds out when the store is back.
"""
from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.down_since: float | None = None
        self.back_at = float("-inf")  # when the store was last found back (clock's time)
        self.trips = 0  # times the store was found unreachable

    @property
    def up(self) -> bool:
        return self.down_since is None

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else self.clock() - self.down_since

    def tripped(self, began: float) -> bool:
        """Record an outage seen by a call that began at ``began`` (clock's time); True when this
        call opened the breaker (start a probe).

        A call begun before the store was last found back is news of that earlier outage, not
        of a new one (a call left waiting in the driver's server selection fails after the probe
        found the store back): it opens nothing. The calls begun since will tell."""
        if self.down_since is not None or began < self.back_at:
            return False
        self.down_since = self.clock()
        self.trips += 1
        return True

    def reset(self) -> None:
        self.down_since = None
        self.back_at = self.clock()
