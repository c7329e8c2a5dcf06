"""Where a request's next attempt should go, from how its attempts so far failed. Pure.

A failure that belongs to the upstream (connect error, timeout, 5xx) says the base URL is in
trouble: its other keys would fail the same way, so the retry goes to another base URL, and to
the same one only when no other is left. A failure that belongs to a key (429, 401/403, its own
``insufficient_quota``) says nothing about its siblings: the retry goes to another key of the
same upstream first, which keeps the request in its tier (and near its prompt cache).

A retry costs the retry budget unless it goes where a new request would go with confidence
(``Attempts.free``): the budget is there to keep retries from piling onto upstreams that fail,
not to stop a request from leaving one that is known to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from relay.balancer.outcome import KEY_OUTCOMES, OUTLIER_OUTCOMES, Outcome
from relay.balancer.pool import Endpoint
from relay.config import Config

Tiers = list[list[Endpoint]]


@dataclass
class Attempts:
    """One request's attempts so far."""

    tried: set[Endpoint] = field(default_factory=set)
    avoid: set[str] = field(default_factory=set)  # base URLs that failed with the upstream's fault
    prefer: str | None = None                      # an upstream whose key failed: its other keys first
    last: tuple[Outcome, Endpoint] | None = None   # the last failure

    def failed(self, outcome: Outcome, endpoint: Endpoint) -> None:
        self.last = (outcome, endpoint)
        if outcome in OUTLIER_OUTCOMES:
            self.avoid.add(endpoint.upstream.base_url)
            self.prefer = None
        elif outcome in KEY_OUTCOMES:
            self.prefer = endpoint.upstream.name

    def preference(self, tiers: Tiers) -> list[Tiers]:
        """``tiers`` split into groups to search in order, each lowest tier first: after a key's
        fault its upstream's other keys; then every base URL that has not failed; then those that
        have (when nothing else is left)."""
        groups: list[Tiers] = []
        if self.prefer is not None:
            groups.append([[ep for ep in tier if ep.upstream.name == self.prefer] for tier in tiers])
        if not self.avoid:
            groups.append(tiers)
            return groups
        groups.append([[ep for ep in tier if ep.upstream.base_url not in self.avoid] for tier in tiers])
        groups.append([[ep for ep in tier if ep.upstream.base_url in self.avoid] for tier in tiers])
        return groups

    def free(self, target: Endpoint, config: Config, now: float) -> bool:
        """Whether a retry on ``target`` goes where a new request would go with confidence, and so
        costs no retry budget: ``target`` is available, its upstream has not failed since its last
        success, and (after the upstream's fault) it is on another base URL.

        So a request that leaves an upstream which has just failed (or that was ejected while
        the request was on its way) reaches a healthy tier whatever other failures spent the
        budget; while everything fails, an upstream takes such retries only until its first
        failure, and every further retry is counted."""
        if self.last is not None:
            outcome, failed = self.last
            if outcome in OUTLIER_OUTCOMES and target.upstream.base_url == failed.upstream.base_url:
                return False
        return target.upstream_health.consecutive_failures == 0 and target.state(config, now).available
