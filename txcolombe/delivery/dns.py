"""DNS lookups for delivery, through ``twisted.names``.

Every lookup takes the resolver to ask (any ``IResolver``: tests point a
``twisted.names.client.Resolver`` at their own server) and follows CNAMEs
(RFC 5321 §5.1), in the answer or with new queries, up to
:data:`MAX_CNAME_CHAIN` links. Failures become routing errors:
NXDOMAIN is :class:`~txcolombe.codec.errors.NoSuchDomain` (permanent); SERVFAIL,
REFUSED, timeouts and anything else are :class:`~txcolombe.codec.errors.DNSFailure`
(temporary). An existing name without records of the type asked is an
empty answer, not an error.

:class:`ResolvingEndpoint` connects to a host name resolved by the same
resolver (used for the MTA-STS policy host).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure
from zope.interface import implementer

from txcolombe.codec.errors import DNSFailure, NoSuchDomain, RoutingError
from txcolombe.delivery.routing import MX, IPAddress

#: Retransmission delays of one query, in seconds (twisted.names' default
#: is 1, 3, 11, 45: a minute per unanswered query is too long for mail).
DEFAULT_DNS_TIMEOUT: tuple[float, ...] = (1.0, 3.0, 11.0)
#: CNAME links followed before giving up (a loop or a very long chain).
MAX_CNAME_CHAIN = 8

__all__ = [
    "DEFAULT_DNS_TIMEOUT",
    "AddressAnswer",
    "ResolvingEndpoint",
    "default_resolver",
    "lookup_addresses",
    "lookup_mx",
    "lookup_txt",
]


def default_resolver() -> IResolver:
    """The process's resolver (``/etc/resolv.conf`` and ``/etc/hosts``, cached)."""
    from twisted.names import client

    return cast(IResolver, client.getResolver())  # type: ignore[no-untyped-call]


def _name(value: object) -> str:
    """A DNS name as lower-case text without the final dot."""
    raw = value.name if isinstance(value, dns.Name) else value
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    return text.rstrip(".").lower()


def _error(name: str, what: str, failure: BaseException) -> RoutingError:
    if isinstance(failure, dns_error.DNSNameError | dns_error.AuthoritativeDomainError):
        error: RoutingError = NoSuchDomain(f"{name} does not exist (looking up {what})")
    elif isinstance(failure, dns_error.DNSServerError):
        error = DNSFailure(f"DNS server failure looking up {what} for {name}")
    elif isinstance(failure, TimeoutError | DeferredTimeout | dns_error.DNSQueryTimeoutError):
        error = DNSFailure(f"DNS timeout looking up {what} for {name}")
    elif isinstance(failure, dns_error.DNSQueryRefusedError):
        error = DNSFailure(f"DNS query refused looking up {what} for {name}")
    elif isinstance(failure, dns_error.DomainError):
        # A plain DomainError is what a resolver chain says when no resolver
        # knows the name: the same as NXDOMAIN.
        if type(failure) is dns_error.DomainError:
            error = NoSuchDomain(f"{name} does not exist (looking up {what})")
        else:
            error = DNSFailure(f"DNS error looking up {what} for {name}: {failure!r}")
    else:
        error = DNSFailure(f"DNS lookup of {what} for {name} failed: {failure!r}")
    error.__cause__ = failure
    return error


def _detached(inner: Deferred[Any]) -> Deferred[Any]:
    """``inner``'s result, in a Deferred that can be cancelled without
    touching ``inner``: twisted.names' queries have no canceller, and
    cancelling one leaves its timeout to fire on a finished Deferred."""
    outer: Deferred[Any] = Deferred(lambda _: None)

    def forward(result: Any) -> None:
        if outer.called:
            return  # cancelled meanwhile; a failure is consumed here
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(forward)
    return outer


async def _query(resolver: IResolver, name: str, rtype: int, timeout: Sequence[float]) -> list[Any]:
    """The payloads of ``rtype`` records for ``name``, following CNAMEs."""
    what = dns.QUERY_TYPES.get(rtype, str(rtype))
    current = name.rstrip(".").lower()
    seen = {current}
    for _ in range(MAX_CNAME_CHAIN + 1):
        query = dns.Query(current.encode("ascii"), rtype, dns.IN)
        try:
            result = await _detached(resolver.query(query, cast(Sequence[int], tuple(timeout))))
        except CancelledError:
            raise
        except Exception as failure:
            raise _error(current, what, failure) from failure
        answers = cast(Sequence[dns.RRHeader], result[0])
        by_name: dict[str, list[dns.RRHeader]] = {}
        for record in answers:
            by_name.setdefault(_name(record.name), []).append(record)
        while True:
            records = by_name.get(current, [])
            found = [record.payload for record in records if record.type == rtype]
            if found:
                return found
            alias = next((r for r in records if r.type == dns.CNAME), None)
            if alias is None:
                return []  # the name exists but has no such record (NODATA)
            target = _name(cast(Any, alias.payload).name)
            if target in seen:
                raise DNSFailure(f"CNAME loop at {target} looking up {what} for {name}")
            seen.add(target)
            current = target
            if target not in by_name:
                break  # ask again for the alias's target
    raise DNSFailure(f"CNAME chain too long looking up {what} for {name}")


async def lookup_mx(
    resolver: IResolver, domain: str, timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT
) -> list[MX]:
    """The domain's MX records, unsorted; empty when it has none.

    :raises NoSuchDomain: the domain does not exist.
    :raises DNSFailure: the answer could not be had now.
    """
    payloads = await _query(resolver, domain, dns.MX, timeout)
    return [MX.of(p.preference, _name(p.name)) for p in payloads]


async def lookup_txt(
    resolver: IResolver, name: str, timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT
) -> list[bytes]:
    """Each TXT record of ``name``, its strings concatenated (RFC 7208 style);
    empty when the name has none.

    :raises NoSuchDomain: the name does not exist.
    :raises DNSFailure: the answer could not be had now.
    """
    payloads = await _query(resolver, name, dns.TXT, timeout)
    return [b"".join(p.data) for p in payloads]


class AddressAnswer:
    """A host's addresses by family; ``error`` is the failure of a family
    that did not answer, kept to say why when no address is usable."""

    def __init__(
        self,
        ipv6: list[ipaddress.IPv6Address],
        ipv4: list[ipaddress.IPv4Address],
        error: RoutingError | None = None,
    ) -> None:
        self.ipv6 = ipv6
        self.ipv4 = ipv4
        self.error = error

    def __bool__(self) -> bool:
        return bool(self.ipv6 or self.ipv4)


async def lookup_addresses(
    resolver: IResolver, host: str, timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT
) -> AddressAnswer:
    """The AAAA and A records of ``host``, asked at the same time.

    One family failing while the other answers is not an error: the answer
    says which failed. Both failing raises the more hopeful failure
    (temporary before permanent).

    :raises NoSuchDomain: the host does not exist.
    :raises DNSFailure: neither family could be had now.
    """
    aaaa: Deferred[list[Any]] = Deferred.fromCoroutine(_query(resolver, host, dns.AAAA, timeout))
    a: Deferred[list[Any]] = Deferred.fromCoroutine(_query(resolver, host, dns.A, timeout))
    results = await DeferredList([aaaa, a], consumeErrors=True)
    errors: list[RoutingError] = []
    families: list[list[Any]] = []
    for ok, value in results:
        if ok:
            families.append(value)
            continue
        families.append([])
        failure = cast(Failure, value)
        if isinstance(failure.value, CancelledError):
            raise failure.value
        if not isinstance(failure.value, RoutingError):
            failure.raiseException()
        errors.append(failure.value)
    # Both record types hold the address in network order (packed bytes).
    ipv6 = [ipaddress.IPv6Address(p.address) for p in families[0]]
    ipv4 = [ipaddress.IPv4Address(p.address) for p in families[1]]
    if len(errors) == 2:
        temporary = [e for e in errors if e.temporary]
        raise (temporary or errors)[0]
    return AddressAnswer(ipv6, ipv4, errors[0] if errors else None)


@implementer(IStreamClientEndpoint)
class ResolvingEndpoint:
    """TCP to ``host``: its addresses from ``resolver`` tried in order
    (IPv6 first), each with ``timeout`` seconds to connect."""

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        dns_timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._timeout = timeout
        self._dns_timeout = dns_timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        answer = await lookup_addresses(self._resolver, self._host, self._dns_timeout)
        addresses: list[IPAddress] = [*answer.ipv6, *answer.ipv4]
        if not addresses:
            raise ConnectError(string=f"{self._host} has no address")  # type: ignore[no-untyped-call]
        last: BaseException | None = None
        for address in addresses:
            endpoint: IStreamClientEndpoint
            if address.version == 6:
                endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                    self._reactor, str(address), self._port, timeout=self._timeout
                )
            else:
                endpoint = TCP4ClientEndpoint(
                    self._reactor, str(address), self._port, timeout=self._timeout
                )
            try:
                return await endpoint.connect(factory)
            except CancelledError:
                raise
            except Exception as error:
                last = error
        assert last is not None
        raise last
