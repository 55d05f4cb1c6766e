"""Reaching a server: destinations, endpoints and the TLS policy.

A destination is a host name (resolved by ``HostnameEndpoint``, which races
IPv6 and IPv4: happy eyeballs) or an IP address (the reactor's ``connectTCP``
as it is, :func:`connect_tcp`). Implicit TLS wraps the endpoint with
``wrapClientTLS``; STARTTLS reuses the same TLS options later.
Unless the caller gives its own connection creator, the server's certificate
is verified against the destination's name with ``optionsForClientTLS``
(service_identity), on the platform's trust store or on ``trust_root``.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import cast

# Twisted has no public name for the interface of a trust root: twisted.internet.ssl
# exports what makes one (platformTrust, trustRootFromCertificates) but not
# IOpenSSLTrustRoot itself. This is the package's one import of it; the other
# modules take it from here.
from twisted.internet._sslverify import IOpenSSLTrustRoot as IOpenSSLTrustRoot
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import (
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import (
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import (
    IConnector,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from txcolombe.codec.address import parse_domain
from txcolombe.codec.errors import (
    ConnectionFailed,
    ConnectionRefused,
    ConnectTimeout,
    InvalidAddress,
    NameResolutionFailed,
    SMTPError,
    Step,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Destination = str | IPAddress


@dataclass(frozen=True)
class Host:
    """A parsed destination: ``name`` for connecting and for certificate checks."""

    name: str
    ip: IPAddress | None

    @classmethod
    def parse(cls, destination: Destination) -> Host:
        """Accept ``mx.example.org``, ``192.0.2.1``, ``2001:db8::1``, ``[::1]``
        or an ``ipaddress`` object.

        :raises InvalidAddress: anything else.
        """
        if isinstance(destination, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return cls(str(destination), destination)
        if not isinstance(destination, str):
            raise InvalidAddress(f"invalid destination {destination!r}")
        return cls._parse_text(destination)

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def _parse_text(cls, destination: str) -> Host:
        """:meth:`parse` for text, cached: the same few destinations come
        back connection after connection (hosts are immutable)."""
        text = destination.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
            if text[:5].lower() == "ipv6:":
                text = text[5:]
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return cls(parse_domain(text), None)
        return cls(str(ip), ip)


def tls_options(
    host: Host,
    *,
    tls: IOpenSSLClientConnectionCreator | None = None,
    trust_root: IOpenSSLTrustRoot | None = None,
) -> IOpenSSLClientConnectionCreator:
    """The TLS client options for ``host``: ``tls`` as is, or verified ones.

    Verified options are made once per process for each server name and
    trust root (the same object), then reused: each holds an OpenSSL context
    whose trust store is loaded once instead of at every connection.
    """
    if tls is not None:
        return tls
    return _verified_options(host.name, Identity(trust_root))


class Identity:
    """A key part that is its object, compared by identity (trust roots and
    credentials need not be hashable); a key holding it keeps the object
    alive, so its id is never reused while the key exists."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.value is self.value


@functools.lru_cache(maxsize=64)
def _verified_options(name: str, trust_root: Identity) -> IOpenSSLClientConnectionCreator:
    """A context is bound to one name: Twisted verifies the name in the
    context's callback, so options are cached per name, not shared."""
    return optionsForClientTLS(name, trustRoot=trust_root.value)  # type: ignore[arg-type]


def endpoint_for(
    reactor: IReactorTCP,
    host: Host,
    port: int,
    *,
    implicit_tls: IOpenSSLClientConnectionCreator | None = None,
    timeout: float = 30.0,
) -> IStreamClientEndpoint:
    """A TCP endpoint (happy eyeballs for a name), TLS-wrapped when ``implicit_tls`` is given."""
    if not 0 < port < 65536:
        raise InvalidAddress(f"invalid port {port}")
    endpoint: IStreamClientEndpoint
    if host.ip is None:
        endpoint = HostnameEndpoint(reactor, host.name, port, timeout=timeout)
    elif host.ip.version == 4:
        # No resolution and no happy eyeballs to do for an address.
        endpoint = TCP4ClientEndpoint(reactor, host.name, port, timeout=timeout)
    else:
        endpoint = TCP6ClientEndpoint(reactor, host.name, port, timeout=timeout)  # type: ignore[no-untyped-call]
    if implicit_tls is not None:
        endpoint = wrap_tls(implicit_tls, endpoint, reactor)
    return endpoint


def connect_tcp(
    reactor: IReactorTCP,
    host: Host,
    port: int,
    factory: ClientFactory,
    *,
    timeout: float = 30.0,
) -> IConnector:
    """Connect ``factory`` to the address ``host``: the reactor's ``connectTCP``, no endpoint.

    An endpoint puts a wrapping protocol of its own between the transport
    and ``factory``'s (one more call for every event of the connection) and
    reports the outcome with Deferreds; a ``ClientFactory`` hears both from
    the connector itself (``buildProtocol``, ``clientConnectionFailed``).
    For an address only: a name needs ``HostnameEndpoint``'s happy eyeballs.
    """
    if host.ip is None:
        raise InvalidAddress(f"{host.name} is no IP address")
    if not 0 < port < 65536:
        raise InvalidAddress(f"invalid port {port}")
    return reactor.connectTCP(host.name, port, factory, timeout=timeout)


def wrap_tls(
    creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint, reactor: object
) -> IStreamClientEndpoint:
    """``wrapClientTLS`` on our reactor (its ``clock`` keyword is recent)."""
    # Every reactor keeps time; callers hold it by the interface they need most.
    clock = cast(IReactorTime, reactor)
    try:
        return wrapClientTLS(creator, endpoint, clock=clock)
    except TypeError:
        return wrapClientTLS(creator, endpoint)


def connect_error(failure: Failure, host: Host, port: int) -> SMTPError:
    """Name a failed connection attempt."""
    where = f"{host.name} port {port}"
    if isinstance(failure.value, DNSLookupError):
        cls: type[ConnectionFailed] = NameResolutionFailed
        text = f"cannot resolve {host.name}"
    elif isinstance(failure.value, ConnectionRefusedError):
        cls, text = ConnectionRefused, f"{where} refused the connection"
    elif isinstance(failure.value, ConnectTimeoutError):
        cls, text = ConnectTimeout, f"no connection to {where} in time"
    else:
        cls, text = ConnectionFailed, f"cannot connect to {where}: {failure.getErrorMessage()}"
    error = cls(text, step=Step.CONNECT)
    error.__cause__ = failure.value
    return error


#: Seconds a looked-up FQDN is reused: ``socket.getfqdn()`` may ask the
#: resolver (a reverse lookup), too slow to repeat for every connection.
FQDN_LIFETIME = 60.0

_fqdn: tuple[float, str | None] | None = None  # (when looked up, the EHLO name)


def default_domain() -> str | None:
    """This host's FQDN for EHLO, or None if it is no valid domain name.

    Looked up again once :data:`FQDN_LIFETIME` has passed, so a host whose
    name changes (or whose resolver comes up late) is seen within a minute.
    """
    global _fqdn
    now = time.monotonic()
    if _fqdn is None or now - _fqdn[0] >= FQDN_LIFETIME:
        _fqdn = (now, _lookup_domain())
    return _fqdn[1]


def _lookup_domain() -> str | None:
    name = socket.getfqdn()
    if "." not in name:
        return None
    try:
        return parse_domain(name)
    except InvalidAddress:
        return None
