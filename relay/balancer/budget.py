"""The retry budget: retries at most a share of recent requests, never fewer than a floor. Pure."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetryBudget:
    """Retries allowed: at most ``ratio`` of the requests in the last window, but never fewer
    than ``floor`` (so a quiet relay still fails over). Counts in one-second buckets."""

    ratio: float
    floor: int
    window_s: float
    _requests: dict[int, int] = field(default_factory=dict)
    _retries: dict[int, int] = field(default_factory=dict)

    def _prune(self, now: float) -> None:
        oldest = int(now - self.window_s)
        for counts in (self._requests, self._retries):
            for second in [s for s in counts if s <= oldest]:
                del counts[second]

    def record_request(self, now: float) -> None:
        self._prune(now)
        self._requests[int(now)] = self._requests.get(int(now), 0) + 1

    def try_retry(self, now: float) -> bool:
        self._prune(now)
        retries = sum(self._retries.values())
        allowed = max(self.floor, int(self.ratio * sum(self._requests.values())))
        if retries >= allowed:
            return False
        self._retries[int(now)] = self._retries.get(int(now), 0) + 1
        return True
