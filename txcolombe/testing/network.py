"""The in-memory network: :class:`MemorySMTP`, its fake reactor, endpoints and DNS.

Every TCP connection made on :attr:`MemorySMTP.reactor` (a
``MemoryReactorClock``), to any host and port, reaches the one
:class:`~txcolombe.testing.MemorySMTPServer`; :meth:`MemorySMTP.flush` and
:meth:`MemorySMTP.advance` move the bytes and the fake clock. The
assertions tests make on what the server received live here too.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import Certificate
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from txcolombe.testing.server import MemorySMTPServer, Transaction
from txcolombe.testing.transport import Address, MemoryConnection

__all__ = ["MemoryResolver", "MemorySMTP"]


@dataclass
class _PendingConnection:
    """A connection attempt, completed at the next flush.

    From :meth:`MemorySMTP.endpoint` it has a ``deferred``; from the reactor's
    ``connectTCP`` a ``connector`` (and the factory is a ``ClientFactory``).
    """

    factory: IProtocolFactory
    implicit_tls: bool
    error: Exception | None
    deferred: Deferred[IProtocol] | None = None
    connector: Any = None
    server_address: Address | None = None


@implementer(IStreamClientEndpoint)
@dataclass
class _MemoryEndpoint:
    network: MemorySMTP
    implicit_tls: bool
    error: Exception | None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        pending: _PendingConnection

        def cancel(_: Deferred[IProtocol]) -> None:
            if pending in self.network._pending:
                self.network._pending.remove(pending)

        deferred: Deferred[IProtocol] = Deferred(cancel)
        pending = _PendingConnection(
            protocolFactory, self.implicit_tls, self.error, deferred=deferred
        )
        self.network._pending.append(pending)
        return deferred


class _NetworkReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose ``connectTCP`` reaches the in-memory server.

    Whatever the host and port, the connection goes to the one
    :class:`MemorySMTPServer`; names resolve (through
    ``MemoryReactorClock``'s resolver) to 127.0.0.1 without any lookup.
    """

    def __init__(self, network: MemorySMTP) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._network = network

    def connectTCP(  # type: ignore[no-untyped-def]
        self, host, port, factory, timeout=30, bindAddress=None
    ):
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)  # type: ignore[no-untyped-call]
        self._network._connect_tcp(host, port, factory, connector)
        return connector


class MemoryResolver(ResolverBase):
    """A DNS resolver for :func:`~txcolombe.deliver`: one exchanger for every domain.

    Every domain's MX record names ``exchanger``; every name has one A record,
    ``address``, and no AAAA or TXT record (so no MTA-STS policy); the names
    in ``missing`` (and their subdomains) do not exist (NXDOMAIN). Give it as
    ``resolver=`` together with ``reactor=`` :attr:`MemorySMTP.reactor`, whose
    connections to any address reach the in-memory server.

    :ivar queries: every question asked, as ``(name, type)``, e.g.
        ``("example.org", "MX")``.
    """

    def __init__(
        self,
        *,
        exchanger: str = "mx.example.org",
        address: str = "192.0.2.25",
        missing: Iterable[str] = (),
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.exchanger = exchanger
        self.address = address
        self.missing = {name.rstrip(".").lower() for name in missing}
        self.queries: list[tuple[str, str]] = []

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: object
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        text = name.decode("ascii", "replace").rstrip(".").lower()
        self.queries.append((text, dns.QUERY_TYPES.get(type, str(type))))
        if any(text == gone or text.endswith("." + gone) for gone in self.missing):
            return fail(DNSNameError(text))
        answers: list[dns.RRHeader] = []
        if type == dns.MX:
            record: Any = dns.Record_MX(10, self.exchanger.encode("ascii"))  # type: ignore[no-untyped-call]
            answers.append(dns.RRHeader(name, dns.MX, dns.IN, 300, record))
        elif type == dns.A:
            record = dns.Record_A(self.address)  # type: ignore[no-untyped-call]
            answers.append(dns.RRHeader(name, dns.A, dns.IN, 300, record))
        return succeed((answers, [], []))


class MemorySMTP:
    """An in-memory network with one :class:`MemorySMTPServer` on it.

    Clients reach the server in two ways: through :meth:`endpoint` (give it as
    ``endpoint=``), or through :attr:`reactor` alone: every TCP connection
    made on it, to any host and port, goes to the server (port 465 with
    implicit TLS), so ``sendmail(..., reactor=fake.reactor)``,
    ``Pool(reactor=fake.reactor)`` and ``deliver(..., reactor=fake.reactor,
    resolver=fake.resolver)`` need nothing else.

    :param server: the server (a fresh :class:`MemorySMTPServer` by default).
    :param reactor: the fake reactor; by default a fresh
        ``MemoryReactorClock`` whose TCP connections reach the server. One
        given here only records its ``connectTCP`` calls.
    :param buffer_size: octets a transport buffers before pausing its producer.
    :param implicit_tls_ports: ports where connections made through the
        reactor speak TLS from the first byte.

    :ivar reactor: give it as ``reactor=``; move its clock with :meth:`advance`.
    :ivar resolver: a :class:`MemoryResolver`, for ``deliver(resolver=)``.
    :ivar connections: every connection made, in order.
    :ivar cooperator: a :class:`~twisted.internet.task.Cooperator` run by the
        fake reactor, for body producers that take one.
    :ivar connect_error: when set, every connection attempt through the
        reactor fails with it (e.g.
        ``twisted.internet.error.ConnectionRefusedError()``).
    """

    max_rounds = 100_000
    """How many rounds :meth:`flush` runs before it gives up."""

    def __init__(
        self,
        server: MemorySMTPServer | None = None,
        *,
        reactor: MemoryReactorClock | None = None,
        buffer_size: int = 64 * 1024,
        implicit_tls_ports: Iterable[int] = (465,),
    ) -> None:
        self.server = server if server is not None else MemorySMTPServer()
        self.reactor = reactor if reactor is not None else _NetworkReactor(self)
        self.buffer_size = buffer_size
        self.implicit_tls_ports = frozenset(implicit_tls_ports)
        self.connect_error: Exception | None = None
        self.resolver = MemoryResolver()
        self.connections: list[MemoryConnection] = []
        if self.server.clock is None:
            self.server.clock = self.reactor
        clock = self.reactor
        self.cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        self._pending: list[_PendingConnection] = []
        self._ports = itertools.count(49152)

    @property
    def trust_root(self) -> Certificate:
        """The CA to trust for the server's certificate: give it as ``trust_root=``."""
        return self.server.trust_root

    def endpoint(
        self, *, implicit_tls: bool = False, error: Exception | None = None
    ) -> IStreamClientEndpoint:
        """A client endpoint that connects to :attr:`server` at the next :meth:`flush`.

        :param implicit_tls: the server speaks TLS from the first byte (port
            465); the client must too (``submit()`` does on port 465).
        :param error: fail each connection attempt with this instead (e.g.
            ``twisted.internet.error.ConnectionRefusedError()``).
        """
        return _MemoryEndpoint(self, implicit_tls, error)

    def flush(self) -> bool:
        """Run due calls and move bytes until nothing moves; True if anything did.

        :raises RuntimeError: the conversation never settles.
        """
        busy = False
        for _ in range(self.max_rounds):
            self.reactor.advance(0)
            moved = self._complete_connections()
            for connection in list(self.connections):
                moved = connection.pump() or moved
            if not moved:
                return busy
            busy = True
        raise RuntimeError(f"the conversation did not settle in {self.max_rounds} rounds")

    def advance(self, seconds: float) -> None:
        """Move the fake clock ``seconds`` ahead, flushing after each timer that fires.

        Bytes travel instantly: a reply a slow server sends at second 200
        reaches the client before a timer of the client's that fires at
        second 300, however large the step.
        """
        self.flush()
        clock = self.reactor
        target = clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            clock.advance(max(0.0, min(due) - clock.seconds()))
            self.flush()
        clock.advance(max(0.0, target - clock.seconds()))
        self.flush()

    # -- running code and checking what arrived ---------------------------------------------

    def run(self, work: Deferred[Any] | Coroutine[Any, Any, Any], *, advance: float = 0.0) -> Any:
        """Flush until ``work`` (a Deferred or a coroutine) has a result, and return it.

        The fake clock moves only if ``advance`` allows: up to ``advance``
        seconds, from one timer to the next, stopping as soon as ``work`` is
        done and every connection is closed (a QUIT the server never answers
        runs out its grace period). A failure is raised as its exception::

            receipt = fake.run(txcolombe.sendmail(..., reactor=fake.reactor))
            with pytest.raises(MailboxUnavailable):
                fake.run(txcolombe.sendmail(..., reactor=fake.reactor))

        :raises AssertionError: ``work`` has not finished by then.
        """
        deferred = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        box: list[Any] = []

        def keep(result: Any) -> Any:
            box.append(result)
            return result  # unchanged, for a later run() or callback

        deferred.addBoth(keep)
        self.flush()
        deadline = self.reactor.seconds() + advance
        # A result comes before the QUIT that follows it: within ``advance``,
        # also let a connection still open (a QUIT unanswered) run out.
        while not box or any(not c.closed for c in self.connections):
            due = [c.getTime() for c in self.reactor.getDelayedCalls()]
            if not due or min(due) > deadline:
                break
            self.advance(max(0.0, min(due) - self.reactor.seconds()))
        if not box:
            waiting = "" if advance == 0 else f" after {advance:g} s of fake time"
            raise AssertionError(
                f"{deferred!r} has not fired{waiting}; is something waiting on the clock?"
            )
        if isinstance(box[0], Failure):
            deferred.addErrback(lambda _: None)  # handled: raised here
            box[0].raiseException()
        return box[0]

    def react(
        self,
        main: Callable[..., Any],
        argv: Iterable[object] = (),
        *,
        advance: float = 24 * 3600.0,
    ) -> Any:
        """Like ``twisted.internet.task.react``, on the fake reactor.

        Calls ``main(reactor, *argv)`` and :meth:`run`\\ s what it returns
        (a Deferred, a coroutine or a value), letting up to ``advance`` fake
        seconds pass. Returns its result instead of exiting; raises its
        failure.
        """
        result = main(self.reactor, *argv)
        if isinstance(result, Deferred):
            return self.run(result, advance=advance)
        if inspect.iscoroutine(result):
            return self.run(result, advance=advance)
        return result

    def assert_sent(
        self,
        *,
        sender: str | None = None,
        recipients: Iterable[str] | None = None,
        subject: str | None = None,
        contains: bytes | str | None = None,
        tls: bool | None = None,
        auth: str | None = None,
    ) -> Transaction:
        """The one recorded :class:`Transaction` that matches every criterion given.

        :param sender: the reverse-path (``""`` for ``<>``).
        :param recipients: the recipients, in any order.
        :param subject: the message's ``Subject``, decoded.
        :param contains: bytes (or UTF-8 text) found in the message.
        :param tls: the transaction ran under TLS (or not).
        :param auth: the authenticated user.
        :raises AssertionError: no transaction, or several, match; the
            message lists what the server received.
        """
        wanted = set(recipients) if recipients is not None else None
        needle = contains.encode() if isinstance(contains, str) else contains

        def matches(t: Transaction) -> bool:
            return (
                (sender is None or t.sender == sender)
                and (wanted is None or set(t.recipients) == wanted)
                and (subject is None or t.message()["Subject"] == subject)
                and (needle is None or needle in t.data)
                and (tls is None or t.tls == tls)
                and (auth is None or t.auth == auth)
            )

        found = [t for t in self.server.transactions if matches(t)]
        if len(found) == 1:
            return found[0]
        criteria = {
            "sender": sender,
            "recipients": recipients,
            "subject": subject,
            "contains": contains,
            "tls": tls,
            "auth": auth,
        }
        asked = ", ".join(f"{k}={v!r}" for k, v in criteria.items() if v is not None)
        raise AssertionError(
            f"{len(found) or 'no'} message(s) match {asked or 'anything'}; "
            f"the server received: {self._summary()}"
        )

    def assert_nothing_sent(self) -> None:
        """:raises AssertionError: the server accepted a message."""
        if self.server.transactions:
            raise AssertionError(f"the server received: {self._summary()}")

    def assert_clean(self) -> None:
        """Check that nothing was left behind: every connection closed, no timer pending.

        :raises AssertionError: a connection is still open, or a delayed call
            still waits on :attr:`reactor`.
        """
        open_connections = [c for c in self.connections if not c.closed]
        timers = self.reactor.getDelayedCalls()
        if open_connections or timers:
            raise AssertionError(
                f"left behind: {len(open_connections)} open connection(s), "
                f"{len(timers)} pending timer(s) {timers!r}"
            )

    def _summary(self) -> str:
        if not self.server.transactions:
            return "nothing"
        return "; ".join(
            f"<{t.sender}> -> {', '.join(f'<{r}>' for r in t.recipients)} "
            f"({len(t.data)} octets, Subject: {t.message()['Subject']!r})"
            for t in self.server.transactions
        )

    # -- connections ----------------------------------------------------------------------------

    def _connect_tcp(self, host: str, port: int, factory: IProtocolFactory, connector: Any) -> None:
        address: Address = (
            IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        )
        implicit = port in self.implicit_tls_ports
        self._pending.append(
            _PendingConnection(
                factory, implicit, self.connect_error, connector=connector, server_address=address
            )
        )

    def _complete_connections(self) -> bool:
        pending, self._pending = self._pending, []
        for attempt in pending:
            self._complete(attempt)
        return bool(pending)

    def _failed(self, attempt: _PendingConnection, error: Exception) -> None:
        if attempt.deferred is not None:
            attempt.deferred.errback(error)
        else:
            reason = Failure(error)  # type: ignore[no-untyped-call]
            cast(Any, attempt.factory).clientConnectionFailed(attempt.connector, reason)

    def _complete(self, attempt: _PendingConnection) -> None:
        if attempt.connector is not None and attempt.connector.stoppedConnecting:
            return  # cancelled (e.g. happy eyeballs connected elsewhere)
        if attempt.error is not None:
            self._failed(attempt, attempt.error)
            return
        port = 465 if attempt.implicit_tls else 25
        server_address = attempt.server_address or IPv4Address("TCP", "192.0.2.25", port)
        client_address: Address
        if isinstance(server_address, IPv6Address):
            client_address = IPv6Address("TCP", "2001:db8::1", next(self._ports))
        else:
            client_address = IPv4Address("TCP", "192.0.2.1", next(self._ports))
        factory = attempt.factory
        if isinstance(factory, TLSMemoryBIOFactory):
            # A TLS wrapper made without a clock (wrapClientTLS's default)
            # would flush its writes on the global reactor: use ours.
            factory._clock = self.reactor
        client = factory.buildProtocol(server_address)
        if client is None:
            self._failed(attempt, ConnectionAborted("the factory built no protocol"))
            return
        server = self.server.buildProtocol(client_address)
        server.implicit_tls = attempt.implicit_tls
        connection = MemoryConnection(self, client, server, client_address, server_address)
        self.connections.append(connection)
        server.makeConnection(connection.server)  # type: ignore[no-untyped-call]
        client.makeConnection(connection.client)
        if attempt.deferred is not None:
            attempt.deferred.callback(client)
