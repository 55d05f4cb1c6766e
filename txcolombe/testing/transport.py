"""The in-memory transports: two ends of a connection, bytes held until a flush.

A :class:`MemoryConnection` joins a client protocol and the server's
protocol through two :class:`MemoryTransport` ends. Writes wait in the
writer's transport until :meth:`MemoryConnection.pump` (called by
:meth:`txcolombe.testing.MemorySMTP.flush`) hands them to the other end;
producers are paused and resumed as TCP transports do; ``startTLS`` puts a
real TLS layer in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

# Twisted's pull-to-push adapter has no public name; it is subclassed here
# to pull on the fake clock's cooperator instead of the global reactor's.
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.error import ConnectionLost as ConnectionLostError
from twisted.internet.interfaces import (
    IConsumer,
    IProducer,
    IProtocol,
    IPullProducer,
    IPushProducer,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Cooperator
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

if TYPE_CHECKING:
    from txcolombe.testing.network import MemorySMTP
    from txcolombe.testing.server import MemoryServerProtocol

__all__ = ["MemoryConnection", "MemoryTransport"]

Address = IPv4Address | IPv6Address


@implementer(ITCPTransport, IConsumer)
class _Wire:
    """The raw byte stream under a TLS layer started on a :class:`MemoryTransport`."""

    def __init__(self, end: MemoryTransport) -> None:
        self._end = end

    def write(self, data: bytes) -> None:
        self._end._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._end._wire_write(b"".join(data))

    def loseConnection(self) -> None:
        self._end._wire_lose()

    def abortConnection(self) -> None:
        self._end._wire_abort()

    def loseWriteConnection(self) -> None:
        self._end._wire_lose()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._end._wire_register(producer, streaming)

    def unregisterProducer(self) -> None:
        self._end._wire_unregister()

    def getPeer(self) -> Address:
        return self._end.getPeer()

    def getHost(self) -> Address:
        return self._end.getHost()

    def getTcpNoDelay(self) -> bool:
        return self._end.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._end.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self._end.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self._end.setTcpKeepAlive(enabled)


@implementer(ITCPTransport, ITLSTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of a :class:`MemoryConnection`, as its protocol sees it.

    Writes wait in a buffer until :meth:`MemorySMTP.flush` delivers them. A
    registered producer is paused while more than ``buffer_size`` octets
    wait, and resumed once they are delivered, as a TCP transport does.
    ``startTLS`` inserts a real :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol`.

    :ivar protocol: the protocol connected to this end.
    :ivar writes: every ``write`` the protocol made, as given (before TLS).
    :ivar tcp_no_delay: the last value given to ``setTcpNoDelay``.
    :ivar disconnecting: the protocol asked to close (or abort).
    :ivar aborted: the protocol called ``abortConnection``.
    :ivar tls: TLS was started on this end.
    :ivar reading_paused: the protocol paused reading (``pauseProducing``);
        nothing is delivered to it until it resumes.
    :ivar producer: the producer registered by the protocol, if any.
    """

    def __init__(
        self,
        connection: MemoryConnection,
        protocol: IProtocol,
        *,
        is_server: bool,
        host: Address,
        peer: Address,
        buffer_size: int,
    ) -> None:
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.tcp_no_delay = False
        self.tcp_keep_alive = False
        self.disconnecting = False
        self.aborted = False
        self.tls = False
        self.reading_paused = False
        self.producer: IProducer | None = None
        self._connection = connection
        self._is_server = is_server
        self._host = host
        self._peer = peer
        self._buffer_size = buffer_size
        self._receiver: IProtocol = protocol
        self._tls: TLSMemoryBIOProtocol | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._wire_closing = False
        self._wire_aborted = False
        self._wire_producer: Any = None  # IPushProducer, or IPullProducer
        self._wire_streaming = True
        self._wire_paused = False

    @property
    def buffered(self) -> int:
        """Octets written and not yet delivered."""
        return self._out_size

    # -- ITransport ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self.writes.append(data)
        if self._tls is not None:
            self._tls.write(data)  # type: ignore[no-untyped-call]
        else:
            self._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self._tls is not None:
            self._tls.loseConnection()  # type: ignore[no-untyped-call]
        else:
            self._wire_lose()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True
        if self._tls is not None:
            self._tls.abortConnection()  # type: ignore[no-untyped-call]
        self._wire_abort()

    def loseWriteConnection(self) -> None:
        """Half-close is not simulated: the same as :meth:`loseConnection`."""
        self.loseConnection()

    def getPeer(self) -> Address:
        return self._peer

    def getHost(self) -> Address:
        return self._host

    def getTcpNoDelay(self) -> bool:
        return self.tcp_no_delay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.tcp_no_delay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.tcp_keep_alive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.tcp_keep_alive = enabled

    # -- TLS ---------------------------------------------------------------------------------

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        """Put a TLS layer between this end and its protocol, from now on."""
        is_client = (not self._is_server) if beNormal else self._is_server
        factory = TLSMemoryBIOFactory(
            contextFactory, is_client, Factory(), clock=self._connection.network.reactor
        )
        tls = TLSMemoryBIOProtocol(factory, self.protocol, _connectWrapped=False)  # type: ignore[no-untyped-call]
        producer, streaming = self._wire_producer, self._wire_streaming
        if producer is not None:
            self._wire_unregister()
        self._tls = tls
        self._receiver = tls
        self.tls = True
        alsoProvides(self, ITLSTransport)
        tls.makeConnection(_Wire(self))  # type: ignore[no-untyped-call]
        if producer is not None:
            tls.registerProducer(producer, streaming)  # type: ignore[no-untyped-call]

    def getHandle(self) -> object:
        """The ``OpenSSL.SSL.Connection`` once TLS is started, else None."""
        return self._tls.getHandle() if self._tls is not None else None  # type: ignore[no-untyped-call]

    def getPeerCertificate(self) -> object:
        if self._tls is None:
            return None
        return self._tls.getPeerCertificate()  # type: ignore[no-untyped-call]

    # -- IConsumer -----------------------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self.producer!r} is already registered")
        self.producer = producer
        if self._tls is None:
            self._wire_register(producer, streaming)
        elif streaming:
            self._tls.registerProducer(producer, True)  # type: ignore[no-untyped-call]
        else:
            # The TLS layer would pull from a pull producer on the global
            # reactor's cooperator (FileSender, e.g. twisted.mail's client):
            # pull on the fake clock instead.
            pusher = _FakeClockPullToPush(
                producer, cast(IConsumer, self._tls), self._connection.network.cooperator
            )
            self._tls.registerProducer(pusher, True)  # type: ignore[no-untyped-call]
            if self._tls._producer is not None:
                pusher.startStreaming()

    def unregisterProducer(self) -> None:
        self.producer = None
        if self._tls is not None:
            self._tls.unregisterProducer()  # type: ignore[no-untyped-call]
        else:
            self._wire_unregister()

    # -- IPushProducer: reading -----------------------------------------------------------------

    def pauseProducing(self) -> None:
        """Stop delivering received bytes to the protocol (a slow reader)."""
        self.reading_paused = True

    def resumeProducing(self) -> None:
        """Deliver received bytes again, at the next flush."""
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- the wire -------------------------------------------------------------------------------

    def _wire_write(self, data: bytes) -> None:
        if self._wire_aborted or self._connection.closed or not data:
            return
        self._out.append(bytes(data))
        self._out_size += len(data)
        producer = self._wire_producer
        if (
            producer is not None
            and self._wire_streaming
            and not self._wire_paused
            and self._out_size > self._buffer_size
        ):
            self._wire_paused = True
            producer.pauseProducing()

    def _wire_lose(self) -> None:
        self._wire_closing = True

    def _wire_abort(self) -> None:
        self._wire_aborted = True
        self._out.clear()
        self._out_size = 0

    def _wire_register(self, producer: IProducer, streaming: bool) -> None:
        self._wire_producer = producer
        self._wire_streaming = streaming
        self._wire_paused = False
        if not streaming:
            cast(IPullProducer, producer).resumeProducing()

    def _wire_unregister(self) -> None:
        self._wire_producer = None
        self._wire_paused = False

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return data

    def _drained(self) -> None:
        producer = self._wire_producer
        if producer is None or self._connection.closed:
            return
        if not self._wire_streaming:
            producer.resumeProducing()
        elif self._wire_paused:
            self._wire_paused = False
            producer.resumeProducing()

    def _deliver(self, data: bytes) -> None:
        self._receiver.dataReceived(data)

    def _lost(self, reason: Exception) -> None:
        producer, self._wire_producer = self._wire_producer, None
        self.producer = None
        if producer is not None:
            producer.stopProducing()
        self._receiver.connectionLost(Failure(reason))  # type: ignore[no-untyped-call]


class _FakeClockPullToPush(_PullToPush):
    """Twisted's pull-to-push adapter, pulling on a cooperator of our choosing."""

    def __init__(self, producer: IProducer, consumer: IConsumer, cooperator: Cooperator) -> None:
        super().__init__(producer, consumer)  # type: ignore[no-untyped-call]
        self._cooperator = cooperator

    def startStreaming(self) -> None:
        self._coopTask = self._cooperator.cooperate(self._pull())  # type: ignore[no-untyped-call]


class MemoryConnection:
    """A connection between a client protocol and the server, in memory.

    :ivar client: the client's end.
    :ivar server: the server's end.
    :ivar server_protocol: the :class:`~txcolombe.testing.MemoryServerProtocol` on the server's end.
    :ivar closed: both ends have been told the connection is lost.
    """

    def __init__(
        self,
        network: MemorySMTP,
        client_protocol: IProtocol,
        server_protocol: MemoryServerProtocol,
        client_address: Address,
        server_address: Address,
    ) -> None:
        self.network = network
        self.closed = False
        self.server_protocol = server_protocol
        size = network.buffer_size
        self.client = MemoryTransport(
            self,
            client_protocol,
            is_server=False,
            host=client_address,
            peer=server_address,
            buffer_size=size,
        )
        self.server = MemoryTransport(
            self,
            server_protocol,
            is_server=True,
            host=server_address,
            peer=client_address,
            buffer_size=size,
        )

    def pump(self) -> bool:
        """Deliver what each end wrote, or close; True if anything happened."""
        if self.closed:
            return False
        for end in (self.client, self.server):
            if end._wire_aborted:
                self._close(end, aborted=True)
                return True
        moved = False
        for source, target in ((self.client, self.server), (self.server, self.client)):
            if not source._out or target.reading_paused:
                continue
            data = source._take()
            if not (target._wire_closing or target._wire_aborted):
                target._deliver(data)
            source._drained()
            moved = True
            if self.closed:
                return True
        if moved:
            return True
        for end in (self.client, self.server):
            if end._wire_aborted or (end._wire_closing and not end._out):
                self._close(end, aborted=end._wire_aborted)
                return True
        return False

    def _close(self, initiator: MemoryTransport, *, aborted: bool) -> None:
        self.closed = True
        peer = self.server if initiator is self.client else self.client
        if aborted:
            initiator._lost(ConnectionAborted())
            peer._lost(ConnectionLostError("the peer reset the connection"))
        else:
            initiator._lost(ConnectionDone())
            peer._lost(ConnectionDone())
