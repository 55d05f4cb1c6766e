"""A long-lived delivery agent: what :func:`~txcolombe.delivery.deliver` learns, kept across calls.

A :class:`Deliverer` holds, for every delivery made through it:

- a DNS cache (answers kept for their TTL) in front of its resolver;
- the MTA-STS policy cache (:class:`~txcolombe.delivery.mtasts.MTASTS`);
- concurrency limits per exchanger host and per destination domain, shared
  by all its deliveries (Postfix's ``default_destination_concurrency_limit``);
- memory of dead hosts: an address whose connection or greeting timed out is
  not tried again for :attr:`Settings.dead_host_time` seconds (Postfix's
  connection cache and destination status do the same), so that one silent
  exchanger costs one timeout, not one per message;
- where its connections come from (source addresses), which address families
  it uses, and whether it races IPv6 and IPv4 (Happy Eyeballs,
  :mod:`txcolombe.delivery.eyeballs`);
- when given ``shaping`` (:mod:`txcolombe.delivery.shaping`), the limits of
  each destination site: every domain's delivery waits for its site's
  connection slot and message token, and every reply that means "slow down"
  (of any attempt) suspends the site;
- when asked (``reuse_time``), sessions left open after a delivery, for the
  next delivery to the same exchanger under the same options, whatever its
  domain (Postfix's connection cache); :meth:`Deliverer.close` quits them.

The module-level :func:`~txcolombe.delivery.deliver` uses :func:`default_deliverer`.
"""

from __future__ import annotations

import enum
import ipaddress
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.common import ResolverBase

from txcolombe.client.options import default_reactor
from txcolombe.client.session import Session
from txcolombe.codec.errors import ConnectTimeout, ResponseTimeout, SMTPError, Step, UsageError
from txcolombe.delivery.eyeballs import CONNECTION_ATTEMPT_DELAY
from txcolombe.delivery.routing import IPAddress

log = Logger(namespace="txcolombe.deliver")

T = TypeVar("T")

DEFAULT_MAX_PER_HOST = 20
"""Connections open at once to one exchanger host, by default."""
DEFAULT_MAX_PER_DOMAIN = 20
"""Deliveries at once to one recipient domain, by default (Postfix's 20)."""
DEFAULT_DEAD_HOST_TIME = 60.0
"""Seconds an address that timed out is skipped, by default."""
DEFAULT_REUSE_LIMIT = 100
"""Transactions one reused session carries at most, by default."""


class AddressFamily(enum.Enum):
    """Which exchanger addresses to use."""

    ANY = "any"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


@dataclass(frozen=True)
class Settings:
    """How a :class:`Deliverer` connects and what it remembers."""

    max_per_host: int = DEFAULT_MAX_PER_HOST
    max_per_domain: int = DEFAULT_MAX_PER_DOMAIN
    dead_host_time: float = DEFAULT_DEAD_HOST_TIME
    family: AddressFamily = AddressFamily.ANY
    source_ipv4: str | None = None
    source_ipv6: str | None = None
    happy_eyeballs: bool = True
    attempt_delay: float = CONNECTION_ATTEMPT_DELAY
    cache_dns: bool = True
    reuse_time: float = 0.0
    """Seconds an idle session is kept for the next delivery (0: none is kept;
    Postfix keeps them 2 s)."""
    reuse_limit: int = DEFAULT_REUSE_LIMIT

    def __post_init__(self) -> None:
        if self.max_per_host < 1 or self.max_per_domain < 1:
            raise UsageError("max_per_host and max_per_domain must be at least 1")
        if min(self.dead_host_time, self.attempt_delay, self.reuse_time) < 0:
            raise UsageError("dead_host_time, attempt_delay and reuse_time must not be negative")
        if self.reuse_limit < 1:
            raise UsageError("reuse_limit must be at least 1")
        object.__setattr__(self, "family", AddressFamily(self.family))
        for name, version in (("source_ipv4", 4), ("source_ipv6", 6)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise UsageError(f"{name}: not an IP address: {value!r}") from None
            if address.version != version:
                raise UsageError(f"{name}: not an IPv{version} address: {value!r}")


class CachingResolver(ResolverBase):
    """``inner``, with each answer that holds records kept for its smallest TTL.

    Not ``twisted.names.cache.CacheResolver``: that one schedules a timer per
    entry, which a test's reactor reports as left behind; here an entry is
    checked against the clock when it is asked for.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, inner: IResolver, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.clock = clock
        self.entries: dict[dns.Query, tuple[float, Any]] = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        query = dns.Query(name, type, cls)
        now = self.clock.seconds()
        entry = self.entries.get(query)
        if entry is not None and entry[0] > now:
            return succeed(entry[1])
        answer: Deferred[Any] = self.inner.query(query, timeout)

        def keep(payload: Any) -> Any:
            records = payload[0]
            ttl = min((record.ttl for record in records), default=0)
            if ttl > 0:
                if len(self.entries) >= self.MAX_ENTRIES:
                    self._prune(now)
                self.entries[query] = (now + ttl, payload)
            return payload

        return answer.addCallback(keep)

    def _prune(self, now: float) -> None:
        for query, (expiry, _) in list(self.entries.items()):
            if expiry <= now:
                del self.entries[query]
        while len(self.entries) >= self.MAX_ENTRIES:
            del self.entries[next(iter(self.entries))]


class _Limits:
    """Keyed semaphores that exist only while someone holds or waits for them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._semaphores: dict[Any, DeferredSemaphore] = {}

    def run(self, key: Any, function: Callable[[], Deferred[T]]) -> Deferred[T]:
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = DeferredSemaphore(self.size)

        def release(result: Any) -> Any:
            if semaphore.tokens == semaphore.limit and not semaphore.waiting:
                self._semaphores.pop(key, None)
            return result

        return semaphore.run(function).addBoth(release)

    def busy(self, key: Any) -> int:
        semaphore = self._semaphores.get(key)
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens


@dataclass
class Idle:
    """A session kept open after a delivery, and what it was opened with."""

    session: Session
    extra: Any
    """What the delivery that opened it needs to judge it again (its TLS check)."""
    uses: int = 1
    timer: IDelayedCall | None = None


@dataclass
class _Clocked:
    """What a Deliverer remembers under one clock (tests run several)."""

    dead: dict[tuple[IPAddress, int], tuple[float, str]] = field(default_factory=dict)
    idle: dict[Hashable, list[Idle]] = field(default_factory=dict)


class Deliverer:
    """Delivers like :func:`~txcolombe.delivery.deliver`, and remembers between deliveries.

    :param resolver: the resolver its deliveries use unless one is given to
        :meth:`deliver` (default: the system's); cached unless
        ``settings.cache_dns`` is false.
    :param settings: the limits and connection choices (:class:`Settings`);
        keyword arguments build one: ``Deliverer(max_per_host=5)``.
    :param shaping: traffic shaping per destination site: its settings
        (``ShapingSettings``, the relay's ``[shaping]`` section in Python) or a
        ``Shaper`` of one's own; None (the default) shapes nothing.
    """

    def __init__(
        self,
        *,
        resolver: IResolver | None = None,
        reactor: Any = None,
        settings: Settings | None = None,
        shaping: Any = None,
        **kwargs: Any,
    ) -> None:
        if settings is not None and kwargs:
            raise UsageError("give either settings= or keyword settings, not both")
        self.settings = settings if settings is not None else Settings(**kwargs)
        self._reactor = reactor
        self._resolver = resolver
        self._cached_resolver: IResolver | None = None
        self._hosts = _Limits(self.settings.max_per_host)
        self._domains = _Limits(self.settings.max_per_domain)
        self._clocked: weakref.WeakKeyDictionary[Any, _Clocked] = weakref.WeakKeyDictionary()
        self._shaping = shaping
        self._shaped: tuple[Any, Any] | None = None  # (Shaper, SiteResolver), made on first use

    def deliver(self, sender: Any, recipients: Any, body: Any, **options: Any) -> Any:
        """:func:`~txcolombe.delivery.deliver` through this Deliverer; same arguments."""
        from txcolombe.delivery.deliver import deliver

        return deliver(sender, recipients, body, deliverer=self, **options)

    # -- what deliver() asks ---------------------------------------------------------

    def reactor(self, given: Any) -> Any:
        """The reactor of one delivery: ``given``, else this Deliverer's, else the global one."""
        if given is not None:
            return given
        if self._reactor is None:
            self._reactor = default_reactor()
        return self._reactor

    def resolver(self, given: IResolver | None, reactor: Any) -> IResolver:
        """The resolver for one delivery: ``given`` as it is, else the cached one."""
        if given is not None:
            return given
        if self._cached_resolver is None:
            from txcolombe.delivery.dns import default_resolver

            inner = self._resolver if self._resolver is not None else default_resolver()
            self._cached_resolver = (
                CachingResolver(inner, reactor) if self.settings.cache_dns else inner
            )
        return self._cached_resolver

    def for_domain(self, domain: str, function: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run one domain's delivery within the per-domain limit."""
        return self._domains.run(domain.lower(), function)

    def shaped(
        self,
        domain: str,
        names: Sequence[str],
        function: Callable[[], Deferred[dict[str, Any]]],
        resolver: IResolver,
        reactor: Any,
    ) -> Deferred[dict[str, Any]]:
        """One domain's delivery within its site's limits (when shaping)."""
        if self._shaping is None:
            return function()
        from txcolombe.delivery.shaping.run import shaped

        shaper, sites = self._shaper(resolver, reactor)
        return Deferred.fromCoroutine(shaped(shaper, sites, domain, names, function))

    @property
    def shaper(self) -> Any:
        """The ``Shaper`` (None before the first shaped delivery, or when not shaping)."""
        return self._shaped[0] if self._shaped is not None else None

    def _messages_per_connection(self, domain: str | None) -> int | None:
        """The shaping limit on messages per connection for ``domain``'s site."""
        if self._shaped is None or domain is None:
            return None
        shaper, sites = self._shaped
        site = sites.cached(domain)
        if site is None:
            return None
        limit: int | None = shaper.policy.limits(site, domain).messages_per_connection
        return limit

    def _shaper(self, resolver: IResolver, reactor: Any) -> tuple[Any, Any]:
        if self._shaped is None:
            from txcolombe.delivery.shaping import Shaper, SiteNamer, SiteResolver

            given = self._shaping
            if isinstance(given, Shaper):
                shaper, namer = given, SiteNamer()
            else:
                shaper, namer = given.shaper(reactor), given.sites
            self._shaped = (shaper, SiteResolver(resolver, clock=reactor, namer=namer))
        return self._shaped

    def for_host(self, host: str, function: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run one connection to exchanger ``host`` within the per-host limit."""
        return self._hosts.run(host.lower(), function)

    def usable(self, addresses: Sequence[IPAddress]) -> list[IPAddress]:
        """The addresses of the families this Deliverer uses."""
        family = self.settings.family
        if family is AddressFamily.ANY:
            return list(addresses)
        version = 4 if family is AddressFamily.IPV4 else 6
        return [address for address in addresses if address.version == version]

    def dead(self, clock: IReactorTime, address: IPAddress, port: int) -> str | None:
        """Why ``address`` is being skipped, or None when it may be tried."""
        memory = self._memory(clock)
        entry = memory.dead.get((address, port))
        if entry is None:
            return None
        until, reason = entry
        if clock.seconds() >= until:
            del memory.dead[(address, port)]
            return None
        return reason

    def failed(self, clock: IReactorTime, address: IPAddress, port: int, error: SMTPError) -> None:
        """Learn from a failed connection: a timeout marks the address dead."""
        timed_out = isinstance(error, ConnectTimeout) or (
            isinstance(error, ResponseTimeout) and error.step is Step.GREETING
        )
        if not timed_out or self.settings.dead_host_time == 0:
            return
        until = clock.seconds() + self.settings.dead_host_time
        self._memory(clock).dead[(address, port)] = (until, str(error))
        log.info(
            "{address} port {port} timed out; skipped for {seconds:.0f} s",
            address=str(address),
            port=port,
            seconds=self.settings.dead_host_time,
        )

    def forget(self) -> None:
        """Forget every dead host (e.g. after the network came back)."""
        for memory in self._clocked.values():
            memory.dead.clear()

    def endpoint(
        self, reactor: Any, address: IPAddress, port: int, timeout: float
    ) -> IStreamClientEndpoint:
        """A TCP endpoint to ``address``, from the source address of its family."""
        if address.version == 6:
            source = self.settings.source_ipv6
            return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                reactor,
                str(address),
                port,
                timeout=timeout,
                bindAddress=(source, 0) if source else None,
            )
        source = self.settings.source_ipv4
        return TCP4ClientEndpoint(
            reactor,
            str(address),
            port,
            timeout=timeout,
            bindAddress=(source, 0) if source else None,
        )

    # -- sessions kept for reuse --------------------------------------------------------

    def take_idle(self, clock: IReactorTime, key: Hashable) -> Idle | None:
        """A usable idle session opened under ``key``, taken out of the cache."""
        kept = self._memory(clock).idle.get(key, [])
        while kept:
            idle = kept.pop()
            if idle.timer is not None and idle.timer.active():
                idle.timer.cancel()
            if idle.session.usable:
                idle.uses += 1
                return idle
            idle.session.abort()
        return None

    def keep_idle(
        self, clock: IReactorTime, key: Hashable, idle: Idle, domain: str | None = None
    ) -> bool:
        """Keep ``idle`` for the next delivery; False when it must be closed instead
        (kept too long, spent, or its site's ``messages_per_connection`` reached)."""
        settings = self.settings
        limit = settings.reuse_limit
        per_connection = self._messages_per_connection(domain)
        if per_connection is not None:
            limit = min(limit, per_connection)
        if settings.reuse_time == 0 or idle.uses >= limit or not idle.session.usable:
            return False
        kept = self._memory(clock).idle.setdefault(key, [])
        idle.timer = clock.callLater(settings.reuse_time, self._expire, clock, key, idle)
        kept.append(idle)
        return True

    def _expire(self, clock: IReactorTime, key: Hashable, idle: Idle) -> None:
        memory = self._memory(clock)
        kept = memory.idle.get(key, [])
        if idle in kept:
            kept.remove(idle)
            if not kept:
                memory.idle.pop(key, None)
            _quit(idle.session)

    def close(self) -> Deferred[None]:
        """QUIT every idle session; fires when they are all closed."""
        closing: list[Deferred[None]] = []
        for memory in self._clocked.values():
            for kept in memory.idle.values():
                for idle in kept:
                    if idle.timer is not None and idle.timer.active():
                        idle.timer.cancel()
                    closing.append(_quit(idle.session))
            memory.idle.clear()
        if self._shaped is not None:
            closing.append(self._shaped[0].close())  # the shaper's store (Redis)
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def idle(self, host: str) -> int:
        """Sessions to exchanger ``host`` kept open for reuse now."""
        name = host.lower()
        return sum(
            len(kept)
            for memory in self._clocked.values()
            for key, kept in memory.idle.items()
            if isinstance(key, tuple) and key[0] == name
        )

    def connections(self, host: str) -> int:
        """Connections open now to exchanger ``host`` through this Deliverer."""
        return self._hosts.busy(host.lower())

    def _memory(self, clock: IReactorTime) -> _Clocked:
        memory = self._clocked.get(clock)
        if memory is None:
            memory = self._clocked[clock] = _Clocked()
        return memory


def _quit(session: Session) -> Deferred[None]:
    closing = session.quit()
    closing.addErrback(lambda _: None)
    return closing


_default: Deliverer | None = None


def default_deliverer() -> Deliverer:
    """The process-wide :class:`Deliverer` that :func:`~txcolombe.delivery.deliver` uses."""
    global _default
    if _default is None:
        _default = Deliverer()
    return _default
