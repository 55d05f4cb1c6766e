"""The :class:`Shaper`: waits for a site's connection slot and rate tokens.

The delivery code asks :meth:`Shaper.acquire` before it opens a connection
to a site and gets a :class:`Lease` once a connection slot is free, a
connection-rate token granted and the site not suspended; before each
message it waits on :meth:`Lease.message` for a message-rate token; it
gives the slot back with :meth:`Lease.release`, and passes every reply that
may mean "slow down" to :meth:`Shaper.report`. All waiting is on the
clock given (any ``IReactorTime``), so tests run on
:class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.codec.reply import Reply
from txcolombe.delivery.shaping.backoff import BackoffRules, SiteState
from txcolombe.delivery.shaping.policy import Limits, ShapingPolicy
from txcolombe.delivery.shaping.store import MemoryStore, Store

log = Logger(namespace="txcolombe.delivery.shaping")


class LeaseExhausted(Exception):
    """The lease has sent its ``messages_per_connection``: close the
    connection and acquire another lease."""


class LeaseReleased(Exception):
    """The lease was released: it sends nothing more."""


@dataclass
class _Site:
    """What this shaper knows of one site (for :meth:`Shaper.snapshot`)."""

    open: int = 0
    waiting: int = 0
    connections: int = 0
    messages: int = 0
    slow_downs: int = 0
    state: SiteState = field(default_factory=SiteState)
    freed: list[Deferred[None]] = field(default_factory=list)


class Lease:
    """One connection's right to send to a site."""

    def __init__(
        self,
        shaper: Shaper,
        site: str,
        domain: str | None,
        limits: Limits,
        lease_id: str,
        holds_slot: bool,
    ) -> None:
        self.shaper = shaper
        self.site = site
        self.domain = domain
        self.limits = limits
        self.id = lease_id
        #: Whether the lease holds one of the store's slots (max_connections).
        self.holds_slot = holds_slot
        #: Messages granted (or being waited for) on this lease.
        self.sent = 0
        self.released = False

    @property
    def remaining(self) -> int | None:
        """Messages this connection may still send (None: no limit)."""
        limit = self.limits.messages_per_connection
        return None if limit is None else max(0, limit - self.sent)

    def message(self) -> Deferred[None]:
        """Fires when the next message may be sent.

        Fails with :class:`LeaseExhausted` once ``messages_per_connection``
        have been, and :class:`LeaseReleased` after :meth:`release`.
        """
        if self.released:
            return fail(LeaseReleased(f"lease {self.id} on {self.site} was released"))
        if self.remaining == 0:
            return fail(
                LeaseExhausted(f"{self.sent} messages sent on one connection to {self.site}")
            )
        self.sent += 1
        waiting = Deferred.fromCoroutine(self.shaper._message(self))

        def failed(failure: Failure) -> Failure:
            self.sent -= 1
            return failure

        return waiting.addErrback(failed)

    def release(self) -> None:
        """Give the connection slot back (idempotent)."""
        if not self.released:
            self.released = True
            self.shaper._release(self)


class Shaper:
    """Traffic shaping by site, on ``store`` (in-process by default).

    :param policy: the limits by site and domain.
    :param backoff: which replies suspend a site, and for how long.
    :param clock: the clock to wait on (default: the global reactor).
    """

    def __init__(
        self,
        policy: ShapingPolicy | None = None,
        backoff: BackoffRules | None = None,
        *,
        store: Store | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock = clock
        self.policy = policy or ShapingPolicy()
        self.backoff = backoff or BackoffRules()
        self.store: Store = store if store is not None else MemoryStore()
        self._sites: dict[str, _Site] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)

    def _site(self, site: str) -> _Site:
        return self._sites.setdefault(site, _Site())

    def acquire(self, site: str, domain: str | None = None) -> Deferred[Lease]:
        """Fires with a :class:`Lease` once a connection to ``site`` (for
        ``domain``'s limits) may be opened; cancel it to stop waiting."""
        return Deferred.fromCoroutine(self._acquire(site, domain))

    async def _acquire(self, site: str, domain: str | None) -> Lease:
        limits = self.policy.limits(site, domain)
        info = self._site(site)
        lease_id = f"{self._prefix}:{next(self._ids)}"
        holds_slot = False
        info.waiting += 1
        try:
            while True:
                state = await self._state(site)
                now = self.clock.seconds()
                if state.suspended(now):
                    await deferLater(self.clock, state.suspended_until - now)
                    continue
                if not holds_slot and limits.max_connections is not None:
                    holds_slot = await self.store.open(site, lease_id, limits.max_connections, now)
                    if not holds_slot:
                        await self._freed(info)
                        continue
                if limits.connection_rate is not None:
                    interval = limits.connection_rate.interval / state.factor
                    wait = await self.store.take(site, "connections", now, interval)
                    if wait:
                        await deferLater(self.clock, wait)
                        continue
                break
        except BaseException:
            if holds_slot:
                self._close_slot(site, lease_id)
            raise
        finally:
            info.waiting -= 1
        info.open += 1
        info.connections += 1
        return Lease(self, site, domain, limits, lease_id, holds_slot)

    async def _message(self, lease: Lease) -> None:
        rate = lease.limits.message_rate
        while True:
            state = await self._state(lease.site)
            now = self.clock.seconds()
            if state.suspended(now):
                await deferLater(self.clock, state.suspended_until - now)
                continue
            if rate is not None:
                wait = await self.store.take(
                    lease.site, "messages", now, rate.interval / state.factor
                )
                if wait:
                    await deferLater(self.clock, wait)
                    continue
            break
        if lease.holds_slot:
            await self.store.refresh(lease.site, lease.id, now)
        self._site(lease.site).messages += 1

    def _release(self, lease: Lease) -> None:
        self._site(lease.site).open -= 1
        if lease.holds_slot:
            self._close_slot(lease.site, lease.id)

    def _close_slot(self, site: str, lease_id: str) -> None:
        def freed(_: object) -> None:
            waiting, info.freed = info.freed, []
            for d in waiting:
                d.callback(None)

        info = self._site(site)
        closed = self.store.close(site, lease_id)
        closed.addCallback(freed).addErrback(
            lambda f: log.failure("cannot free a slot of {site}", f, site=site)
        )

    def _freed(self, info: _Site) -> Deferred[None]:
        """Fires when a slot of the site is freed here, or after the store's
        ``poll`` seconds (a slot freed by another process)."""
        timer: IDelayedCall | None = None

        def cancel(d: Deferred[None]) -> None:
            if d in info.freed:
                info.freed.remove(d)
            if timer is not None and timer.active():
                timer.cancel()

        def stop_timer(_: None) -> None:
            if timer is not None and timer.active():
                timer.cancel()

        d: Deferred[None] = Deferred(cancel)
        info.freed.append(d)
        if self.store.poll is not None:

            def poll() -> None:
                if d in info.freed:
                    info.freed.remove(d)
                    d.callback(None)

            timer = self.clock.callLater(self.store.poll, poll)
        return d.addCallback(stop_timer)

    async def _state(self, site: str) -> SiteState:
        state = await self.store.state(site)
        self._site(site).state = state
        return state.at(self.clock.seconds())

    def report(self, site: str, reply: Reply | str) -> Deferred[bool]:
        """Look at a reply from ``site``: one that means "slow down" suspends
        the site and lowers its rates. Fires with whether it did."""
        reason = self.backoff.reason(reply)
        if reason is None:
            return succeed(False)
        info = self._site(site)
        info.slow_downs += 1
        now = self.clock.seconds()

        def noted(state: SiteState) -> bool:
            info.state = state
            log.info(
                "shaping: site {site} suspended for {seconds:.0f}s, rate x{factor:g}: {reason}",
                site=site, seconds=state.suspended_until - now, factor=state.factor,
                reason=reason,
            )  # fmt: skip
            return True

        return self.store.slow_down(site, now, reason, self.backoff).addCallback(noted)

    def close(self) -> Deferred[None]:
        """Disconnect from the store (the relay's shutdown)."""
        return self.store.disconnect()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each site this shaper has seen: its connections and waiters here,
        totals, and its back-off state (as last read from the store)."""
        now = self.clock.seconds()
        return {
            name: {
                "connections_open": info.open,
                "waiting": info.waiting,
                "connections_total": info.connections,
                "messages_total": info.messages,
                "slow_downs": info.slow_downs,
                **info.state.snapshot(now),
            }
            for name, info in sorted(self._sites.items())
        }
