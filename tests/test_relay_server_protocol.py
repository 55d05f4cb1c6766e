"""The Twisted server protocol in memory (StringTransport, Clock), and over a
real loopback socket: replies, storing, flow control, the idle timer."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from txcolombe.codec.reply import Reply
from txcolombe.server.machine import ServerConfig, ServerEnvelope
from txcolombe.server.protocol import (
    MAX_PENDING_INPUT,
    SMTPServerFactory,
    SMTPServerProtocol,
)

CONFIG = ServerConfig(hostname="relay.test")


class Handler:
    """Stores by answering from ``self.answers`` (a Deferred per message)."""

    def __init__(self) -> None:
        self.stored: list[tuple[ServerEnvelope, bytes]] = []
        self.pending: list[Deferred[Reply]] = []
        self.hold = False

    def relay_allowed(self, client_address: str) -> bool:
        return True

    def check_password(self, username: str, password: str) -> Deferred[bool]:
        return succeed(False)

    def store(self, envelope: ServerEnvelope, data: bytes) -> Deferred[Reply]:
        self.stored.append((envelope, data))
        if self.hold:
            d: Deferred[Reply] = Deferred()
            self.pending.append(d)
            return d
        return succeed(Reply.of(250, f"2.0.0 Ok: queued as Q{len(self.stored)}"))


class Paused(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()


def connect(idle: float = 60.0) -> tuple[SMTPServerProtocol, Paused, Handler, Clock]:
    clock = Clock()
    handler = Handler()
    protocol = SMTPServerProtocol(CONFIG, handler, reactor=clock, idle_timeout=idle)
    transport = Paused()
    protocol.makeConnection(transport)
    return protocol, transport, handler, clock


def codes(transport: StringTransport) -> list[int]:
    lines = transport.value().split(b"\r\n")
    transport.clear()
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


TRANSACTION = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n"


def test_pipelined_input_waits_for_the_store_without_pausing() -> None:
    protocol, transport, handler, _ = connect()
    assert codes(transport) == [220]
    handler.hold = True
    protocol.dataReceived(b"EHLO c.test\r\n" + TRANSACTION + b"QUIT\r\n")
    assert codes(transport) == [250, 250, 250, 354]  # QUIT waits for the 250
    assert transport.pauses == 0  # little buffered: reading goes on
    handler.pending.pop().callback(Reply.of(250, "2.0.0 Ok: queued as Q1"))
    assert codes(transport) == [250, 221]
    assert transport.disconnecting
    ((envelope, data),) = handler.stored
    assert data == b"Subject: s\r\n\r\nhi\r\n" and str(envelope.recipients[0]) == "b@y.test"


def test_much_pipelined_input_while_waiting_pauses_the_transport() -> None:
    protocol, transport, handler, _ = connect()
    handler.hold = True
    protocol.dataReceived(b"EHLO c.test\r\n" + TRANSACTION)
    protocol.dataReceived(b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 1))
    assert transport.producerState == "paused"
    handler.pending.pop().callback(Reply.of(250, "2.0.0 Ok"))
    assert transport.producerState == "producing"
    assert codes(transport)[-1] == 250 and protocol.machine is not None
    assert protocol.machine.buffered == 0


def test_idle_timeout_not_counting_the_wait_for_the_store() -> None:
    protocol, transport, handler, clock = connect(idle=60)
    codes(transport)
    clock.advance(59)
    protocol.dataReceived(b"EHLO c.test\r\n")  # activity: the clock starts over
    clock.advance(59)
    assert not transport.disconnecting
    handler.hold = True
    protocol.dataReceived(TRANSACTION)
    clock.advance(600)  # storing takes long: not the client's idleness
    assert not transport.disconnecting
    handler.pending.pop().callback(Reply.of(250, "2.0.0 Ok"))
    codes(transport)
    clock.advance(59.5)
    assert not transport.disconnecting
    clock.advance(1)
    assert codes(transport) == [421] and transport.disconnecting


# -- over a real socket: replies go straight to it ----------------------------------------


class Recording(SMTPServerFactory):
    """Notes whether each connection's socket has TCP_NODELAY set."""

    no_delay: list[int]

    def buildProtocol(self, addr: object) -> SMTPServerProtocol:
        protocol = super().buildProtocol(addr)
        made = protocol.connectionMade

        def connection_made() -> None:
            made()
            handle = protocol.transport.getHandle()  # type: ignore[union-attr]
            self.no_delay.append(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        protocol.connectionMade = connection_made  # type: ignore[method-assign]
        return protocol  # type: ignore[return-value]


@pytest.fixture
def server() -> Iterator[tuple[int, Handler, Recording]]:
    handler = Handler()
    factory = Recording(CONFIG, handler)
    factory.no_delay = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        yield port.getHost().port, handler, factory
    finally:
        port.stopListening()


def _client(port: int) -> list[bytes]:
    """One transaction, a command at a time; the reply lines (last of each)."""
    commands = [
        b"EHLO c.test\r\n",
        b"MAIL FROM:<a@x.test>\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        b"DATA\r\n",
        b"Subject: s\r\n\r\n..hi\r\n.\r\n",
        b"QUIT\r\n",
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        file = sock.makefile("rb")
        replies = [file.readline()]
        for command in commands:
            sock.sendall(command)
            line = file.readline()
            while line[3:4] == b"-":
                line = file.readline()
            replies.append(line)
        return replies


@pytest_twisted.ensureDeferred
async def test_conversation_over_loopback(server: tuple[int, Handler, Recording]) -> None:
    port, handler, factory = server
    replies = await deferToThread(_client, port)
    assert [line[:4] for line in replies] == [
        b"220 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"221 "
    ]  # fmt: skip
    assert replies[5] == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert handler.stored[0][1] == b"Subject: s\r\n\r\n.hi\r\n"
    assert factory.no_delay and all(factory.no_delay)
