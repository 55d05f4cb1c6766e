"""Where a shaper keeps its counters and suspensions.

A :class:`Store` holds, per site, the GCRA TAT of each throttle, the
connection slots in use and the back-off state; every operation is one
atomic step that answers with a Deferred, so that a store shared by
several relays (:class:`~txcolombe.delivery.shaping.redisstore.RedisStore`) and the
in-process :class:`MemoryStore` are used alike. Times are the shaper's
clock's, passed in.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from txcolombe.delivery.shaping.backoff import BackoffRules, SiteState, slow_down
from txcolombe.delivery.shaping.throttle import gcra

#: The throttles kept per site.
COUNTERS = ("messages", "connections")


class Store(Protocol):
    """Counters and suspensions by site name."""

    #: Seconds between retries for a slot another process may free (None:
    #: every slot is freed by this process, which wakes its waiters itself).
    poll: float | None

    def take(self, site: str, counter: str, now: float, interval: float) -> Deferred[float]:
        """A GCRA step on the site's ``counter``: 0.0 when a token was taken,
        else the seconds until one may be."""

    def open(self, site: str, lease: str, limit: int, now: float) -> Deferred[bool]:
        """Take one of the site's ``limit`` connection slots for ``lease``."""

    def refresh(self, site: str, lease: str, now: float) -> Deferred[None]:
        """Note that ``lease`` is still in use (a shared store expires slots)."""

    def close(self, site: str, lease: str) -> Deferred[None]:
        """Give back ``lease``'s slot."""

    def slow_down(
        self, site: str, now: float, reason: str, rules: BackoffRules
    ) -> Deferred[SiteState]:
        """Apply a slow-down reply (:func:`~txcolombe.delivery.shaping.backoff.slow_down`)."""

    def state(self, site: str) -> Deferred[SiteState]:
        """The site's stored back-off state."""

    def disconnect(self) -> Deferred[None]:
        """Let go of the store's connections (at shutdown)."""


class MemoryStore:
    """The in-process store (the default): plain dictionaries."""

    poll: float | None = None

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}
        self._slots: dict[str, set[str]] = {}
        self._states: dict[str, SiteState] = {}

    def take(self, site: str, counter: str, now: float, interval: float) -> Deferred[float]:
        decision = gcra(self._tats.get((site, counter)), now, interval)
        if decision.granted:
            self._tats[site, counter] = decision.tat
        return succeed(decision.wait)

    def open(self, site: str, lease: str, limit: int, now: float) -> Deferred[bool]:
        slots = self._slots.setdefault(site, set())
        if len(slots) >= limit:
            return succeed(False)
        slots.add(lease)
        return succeed(True)

    def refresh(self, site: str, lease: str, now: float) -> Deferred[None]:
        return succeed(None)  # slots here live as long as their lease

    def close(self, site: str, lease: str) -> Deferred[None]:
        self._slots.get(site, set()).discard(lease)
        return succeed(None)

    def slow_down(
        self, site: str, now: float, reason: str, rules: BackoffRules
    ) -> Deferred[SiteState]:
        state = slow_down(self._states.get(site, SiteState()), now, reason, rules)
        self._states[site] = state
        return succeed(state)

    def state(self, site: str) -> Deferred[SiteState]:
        return succeed(self._states.get(site, SiteState()))

    def disconnect(self) -> Deferred[None]:
        return succeed(None)
