"""Writes sent, and clean closes made, in the same reactor turn on a real TCP
connection; buffered, or left to ``loseConnection``, otherwise."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import trustme
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txcolombe.client.writer import close_now, immediate_writer

reactor: Any = _reactor


class Collector(Protocol):
    """The far end: keeps what arrives; reads only when told to."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.made: Deferred[Collector] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.wanted = 0
        self.enough: Deferred[None] | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.enough is not None and len(self.received) >= self.wanted:
            enough, self.enough = self.enough, None
            enough.callback(None)

    def until(self, octets: int) -> Deferred[None]:
        """Fires once ``octets`` octets in all have arrived."""
        done: Deferred[None] = Deferred()
        if len(self.received) >= octets:
            done.callback(None)
        else:
            self.wanted, self.enough = octets, done
        return done


async def pair(client_protocol: type[Protocol] = Protocol) -> tuple[Protocol, Collector, Any]:
    """A client protocol connected over loopback TCP to a Collector, and the listener."""
    server = Collector()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: server)
    )
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(client_protocol)
    )
    await server.made
    return client, server, port


def close(client: Protocol, port: Any) -> Deferred[Any]:
    assert client.transport is not None
    client.transport.loseConnection()
    stopped: Deferred[Any] = port.stopListening()
    return stopped


@pytest_twisted.ensureDeferred
async def test_an_idle_tcp_connection_is_written_at_once() -> None:
    client, server, port = await pair()
    transport: Any = client.transport
    write = immediate_writer(transport)
    write(b"MAIL FROM:<a@example.com>\r\n")
    # Sent already: nothing waits in Twisted's buffer for the next turn.
    assert transport._tempDataLen == 0
    assert transport.offset == len(transport.dataBuffer)
    assert transport not in reactor.getWriters()
    await server.until(27)
    assert bytes(server.received) == b"MAIL FROM:<a@example.com>\r\n"
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_buffered_in_order() -> None:
    client, server, port = await pair()
    transport: Any = client.transport
    server.transport.pauseProducing()  # type: ignore[union-attr]  # the far end reads nothing yet
    write = immediate_writer(transport)
    pieces = [bytes([65 + n]) * (4 << 20) for n in range(4)]  # 16 MiB: more than the socket holds
    for piece in pieces:
        write(piece)
    # The rest waits in Twisted's buffer, so later writes queue behind it.
    assert transport._tempDataLen > 0 or transport.offset < len(transport.dataBuffer)
    write(b"end")
    server.transport.resumeProducing()  # type: ignore[union-attr]
    total = sum(map(len, pieces)) + 3
    await server.until(total)
    assert bytes(server.received) == b"".join(pieces) + b"end"
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_after_starttls_writes_go_through_tls() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_options = ssl.PrivateCertificate.loadPEM(
        cert.private_key_and_cert_chain_pem.bytes()
    ).options()
    client, server, port = await pair()
    transport: Any = client.transport
    write = immediate_writer(transport)
    server.transport.startTLS(server_options)  # type: ignore[union-attr]
    trust = ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    transport.startTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust))
    write(b"secret\r\n")
    await server.until(8)
    # The server's TLS layer decrypted it: the octets did not go out in clear.
    assert bytes(server.received) == b"secret\r\n"
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_a_closed_connection_takes_writes_quietly() -> None:
    client, _, port = await pair()
    transport: Any = client.transport
    write = immediate_writer(transport)
    transport.loseConnection()
    write(b"too late\r\n")  # dropped, as Twisted's own write drops it
    await port.stopListening()


def test_any_other_transport_keeps_its_own_write() -> None:
    transport = StringTransport()
    write = immediate_writer(transport)
    write(b"EHLO x\r\n")
    assert transport.value() == b"EHLO x\r\n"
    assert write == transport.write


class Closing(Collector):
    """A client end that notes how its connection ended."""


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_closes_cleanly_at_once() -> None:
    client, server, port = await pair(Closing)
    assert isinstance(client, Closing)
    transport: Any = client.transport
    write = immediate_writer(transport)
    write(b"QUIT\r\n")
    assert close_now(transport)
    # Closed before close_now() returned: the protocol was told, cleanly,
    # and the reactor no longer watches the socket.
    assert client.lost.called
    assert client.reason is not None and client.reason.check(ConnectionDone)
    assert transport not in reactor.getReaders() and transport not in reactor.getWriters()
    assert not close_now(transport)  # once only
    # The far end gets everything, then an orderly end of stream (not a reset).
    await server.lost
    assert server.reason is not None and server.reason.check(ConnectionDone)
    assert bytes(server.received) == b"QUIT\r\n"
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_connection_with_bytes_buffered_is_left_to_lose_connection() -> None:
    client, server, port = await pair()
    transport: Any = client.transport
    transport.write(b"still buffered\r\n")  # Twisted's own write: sent on the next turn
    assert not close_now(transport)
    assert transport.connected
    transport.loseConnection()
    await server.lost
    assert bytes(server.received) == b"still buffered\r\n"
    await port.stopListening()


def test_any_other_transport_is_not_closed_at_once() -> None:
    transport = StringTransport()
    assert not close_now(transport)
    assert not transport.disconnecting
